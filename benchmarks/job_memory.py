"""Peak resident memory of the main job and of the comparison job, side by side, on ViT-B/32-shaped experts.

    python benchmarks/job_memory.py                       # 2, 4 and 8 experts: about 40 minutes on 2 cores
    python benchmarks/job_memory.py --experts 2 --world /tmp/b32   # build the world there once, keep it

What it builds (once, for the largest count; about 3.5 GB on disk): the clip suite's inputs as
tests/helpers/clip_zoo.py writes them, at ViT-B/32's shapes: a random CLIPModel base (vision tower 12
blocks of width 768 on 224-pixel inputs in 32-pixel patches, text tower 12 blocks of width 512; the
tokenizer is that helper's character vocabulary, so the text embedding is smaller than CLIP's 49,408
tokens), experts = base + random task vectors saved as FusionBench's are on the hub (one
model.safetensors with 'vision_model.' keys), and one small image dataset per task (three classes,
256-pixel images). Nothing is downloaded.

What it runs, for every count T in --experts (the first T tasks), each job in a fresh Python process
through train.py with the same data options (--calib-samples and --select-samples per task,
--test-samples per task):

    main     the main job: task arithmetic, E-PMQ with the automatic anchor choice over
             --candidates (the experts' targets kept for the later candidates, as the default does);
    compare  experiment=compare at 4 bits with GPTQ, RegMean -> GPTQ and E-PMQ (its own candidates,
             --candidates), no ablation grid, no ingredients, no FP calibrated reference.

The candidate lists are short so that a setting takes minutes; the memory either job holds does not
depend on how many candidates it scores (each candidate reuses the kept targets). What the comparison
job adds is the RegMean merge, its Gram matrices and the second merged model.

What it measures: the peak resident set of the whole job process (VmHWM of /proc/self/status, read
when the process exits), in GiB, and the job's wall time. Workers run with
MALLOC_MMAP_THRESHOLD_=128 KiB (--mmap-threshold) so that resident memory follows live tensors
rather than glibc's retained heap (see benchmarks/calibration_cost.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30

# run train.py in this process and print its peak resident set as the last line, however it exits
WORKER = """
import atexit, runpy, sys
def peak():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    print("VmHWM_kB", fields["VmHWM"].split()[0], flush=True)
atexit.register(peak)
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


def build_world(root: Path, experts: int, args) -> None:
    """The B/32-shaped suite inputs under root (skipped when root already holds them)."""
    if (root / "done.json").exists() and json.loads((root / "done.json").read_text())["experts"] >= experts:
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import clip_zoo

    classes = {f"task{t}": [f"kind{c} of thing{t}" for c in range(3)] for t in range(experts)}
    rows = {"train": args.calib_samples + args.select_samples, "test": args.test_samples}
    t0 = time.perf_counter()
    clip_zoo.build(root, shape=clip_zoo.B32, classes=classes, rows=rows, layout="prefixed")
    (root / "done.json").write_text(json.dumps({"experts": experts}))
    print(f"world: {experts} B/32-shaped experts written under {root} in {time.perf_counter() - t0:.0f} s")


def job_options(root: Path, T: int, job: str, out: Path, args) -> list[str]:
    tasks = ",".join(f"task{t}" for t in range(T))
    candidates = "[" + ",".join(args.candidates) + "]"
    common = ["suite=clip", f"suite.base={root}/base", f"suite.experts='{root}/experts/{{task}}'",
              f"suite.datasets='{root}/data/{{task}}'", f"suite.tasks=[{tasks}]", f"suite.cache_dir={out}/cache",
              f"data.calib_samples={args.calib_samples}", f"data.select_samples={args.select_samples}",
              f"data.test_samples={args.test_samples}", f"anchor.candidates.strength={candidates}",
              f"paths.output_dir={out}/run", "save_model=false"]
    if job == "main":
        return common
    return [*common, "experiment=compare", "compare.bits=[4]", "compare.methods=[gptq,regmean_gptq,epmq]",
            "compare.ablation=null", "compare.ingredients=null", "compare.fp_calibrated=false"]


def run_job(root: Path, T: int, job: str, args) -> dict:
    env = dict(os.environ)
    if args.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    with tempfile.TemporaryDirectory(prefix=f"job_memory_{job}_") as tmp:
        cmd = [sys.executable, "-c", WORKER, *job_options(root, T, job, Path(tmp), args)]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines or not lines[-1].startswith("VmHWM_kB"):
        raise RuntimeError(f"{job} job with {T} experts failed (exit {done.returncode}):\n"
                           f"{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return {"peak_gib": int(lines[-1].split()[1]) * 1024 / GiB, "seconds": seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[2, 4, 8], help="the counts T to measure")
    parser.add_argument("--calib-samples", type=int, default=8, help="calibration samples per task")
    parser.add_argument("--select-samples", type=int, default=8, help="anchor-selection samples per task")
    parser.add_argument("--test-samples", type=int, default=4, help="test samples per task")
    parser.add_argument("--candidates", nargs="+", default=["1.0", "inf"], help="anchor candidates (λ)")
    parser.add_argument("--world", help="folder for the experts, kept (default: a temporary one, deleted after)")
    parser.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                        help="MALLOC_MMAP_THRESHOLD_ of the jobs in bytes; 0 leaves glibc's default")
    args = parser.parse_args(argv)

    tmp = None if args.world else tempfile.TemporaryDirectory(prefix="job_memory_world_")
    root = Path(args.world or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        build_world(root, max(args.experts), args)
        print(f"peak resident memory of each job (GiB), one fresh process each; {args.calib_samples} calibration, "
              f"{args.select_samples} selection and {args.test_samples} test samples per task")
        print(f"{'experts':>7} {'main':>7} {'compare':>8} {'compare/main':>13} {'main s':>7} {'compare s':>10}")
        for T in args.experts:
            main_job, compare_job = run_job(root, T, "main", args), run_job(root, T, "compare", args)
            print(f"{T:>7} {main_job['peak_gib']:>7.2f} {compare_job['peak_gib']:>8.2f} "
                  f"{compare_job['peak_gib'] / main_job['peak_gib']:>13.2f} {main_job['seconds']:>7.0f} "
                  f"{compare_job['seconds']:>10.0f}", flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    main()
