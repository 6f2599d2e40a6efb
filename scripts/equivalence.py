"""Behaviour before and after a refactor, compared exactly: the same runs, the same codes, the same numbers.

    python scripts/equivalence.py run before.json --worlds /tmp/equiv      # on the old commit
    python scripts/equivalence.py run after.json --worlds /tmp/equiv       # on the new one, same machine
    python scripts/equivalence.py compare before.json after.json

`run` builds the tiny worlds once into --worlds (the micro offline zoo, a tiny FLAN-T5 and a tiny Llama
world from tests/helpers; kept, so that both sides calibrate the very same files), then runs every case
below through `python train.py` in a subprocess with one thread and the same seed, each into its own
folder under --worlds/runs. It records, per case:

- a sha256 of every tensor of every safetensors file the run wrote (the exported checkpoint's packed
  codes, scales, zero points and other tensors; every calibration step's codes, for every anchor
  candidate), keyed by file and tensor name;
- report.json (the main job) or results.json (the comparison job) without what is not a result: times,
  memory, the resolved config (its `_target_` strings move with the code) and the folder paths.

`compare` says, case by case, how many tensors and numbers it compared and lists every difference; it
exits with status 1 when there is one. Floats are compared exactly (no tolerance).

Options renamed by a refactor are translated by RENAMED (old spelling -> new) when the checkout has the
new config node, so that both sides run the same settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# what differs between two identical calibrations: wall-clock, memory, where files are, the config's spelling
VOLATILE = {"seconds", "select_seconds", "time_s", "peak_mem_mb", "timings", "peak_memory_mb", "config",
            "model_dir"}

MICRO = ["suite.size=micro", "suite.progress=false", "data.calib_samples=8", "data.select_samples=8",
         "data.batch_size=8", "data.test_samples=48"]
FIXED = ["quant.strength=1.0", "quant.form=output"]


def t5(worlds: Path) -> list[str]:
    root = worlds / "flan_t5"
    return ["suite=flan_t5", f"suite.base={root / 'base'}", f"suite.experts='{root / 'experts' / '{task}'}'",
            f"suite.data={root / 'data'}", "suite.tasks=[sst2,rte]", "data.calib_samples=8", "data.select_samples=8",
            "data.batch_size=8", "data.test_samples=16", "quant.group_size=16"]


def llama(worlds: Path) -> list[str]:
    root = worlds / "llama"
    return ["suite=causal_lm", f"suite.base={root / 'base'}",
            f"suite.experts={{alpha: {root / 'alpha'}, beta: {root / 'beta'}}}",
            f"suite.datasets={{alpha: {root / 'alpha_text'}, beta: {root / 'beta_text'}}}", "suite.seq_len=12",
            "data.calib_samples=6", "data.select_samples=4", "data.test_samples=4", "data.batch_size=3",
            "quant.bits=3", "quant.group_size=16"]


def cases(worlds: Path) -> dict[str, list[str]]:
    """Case name -> train.py overrides."""
    return {
        "offline_default": ["suite.progress=false"],  # the quick start's main job on the default zoo (built once)
        "offline_gptq": [*MICRO, "quant=gptq"],
        "offline_epmq_fixed": [*MICRO, *FIXED],
        "offline_epmq_auto": [*MICRO],
        "offline_epmq_block": [*MICRO, "quant.select=block", "quant.form=output"],
        "offline_epmq_layer": [*MICRO, "quant.select=layer", "quant.form=output"],
        "offline_ingredients": [*MICRO, *FIXED, "quant.normalize=true", "quant.interp=0.5", "quant.extrapolate=1.5",
                                "quant.calibrate_bias=true", "quant.calibrate_norms=true"],
        "offline_true_sequential": [*MICRO, "quant.strength=2.0", "quant.form=weight",
                                    "calibration.true_sequential=true", "quant.bits=3", "quant.act_order=true"],
        "offline_compare": [*MICRO, "experiment=compare", "compare.bits=[3]",
                            "compare.methods=[rtn,gptq,regmean_gptq,epmq,epmq_layer,epmq_block]",
                            "compare.ablation.strength=[0.0,1.0,.inf]", "compare.ablation.form=[output]",
                            "quant.candidates.strength=[0.0,1.0,.inf]",
                            "~compare.ingredients", "+compare.ingredients={bias: {calibrate_bias: true}}"],
        "t5_epmq_auto": [*t5(worlds), "quant.candidates.strength=[0.0,1.0,.inf]"],
        "t5_gptq": [*t5(worlds), "quant=gptq"],
        "llama_epmq_fixed": [*llama(worlds), *FIXED],
        "llama_epmq_block": [*llama(worlds), "quant.select=block", "quant.form=output",
                             "quant.candidates.strength=[0.0,1.0,.inf]"],
    }


# old override key -> new one, applied when the checkout's conf/ has the new node (RENAMED_WHEN)
# (the anchor choice's options left the quant node for their own, conf/anchor, so that quant instantiates as written)
RENAMED: dict[str, str] = {"quant.select": "anchor.select", "quant.select_by": "anchor.select_by",
                           "quant.candidates.strength": "anchor.candidates.strength",
                           "quant.candidates.form": "anchor.candidates.form", "quant.folds": "anchor.folds"}
RENAMED_WHEN = "conf/anchor"


def translated(overrides: list[str]) -> list[str]:
    if not RENAMED or not (ROOT / RENAMED_WHEN).exists():
        return overrides
    out = []
    for o in overrides:
        key, sep, value = o.partition("=")
        out.append(RENAMED.get(key, key) + sep + value)
    return out


def build_worlds(worlds: Path) -> None:
    """The tiny worlds, built once (tests/helpers); both sides of a comparison read the same files."""
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    torch.set_num_threads(1)
    if not (worlds / "flan_t5" / "base").is_dir():
        from helpers.t5_glue_zoo import build_zoo

        build_zoo(worlds / "flan_t5", tasks=("sst2", "rte"))
    if not (worlds / "llama" / "beta_text").is_dir():
        from helpers.llm_world import build

        build(worlds / "llama")


def tensor_digests(folder: Path) -> dict[str, str]:
    """'<file relative to folder>:<tensor>' -> sha256 of its dtype, shape and bytes, for every safetensors file."""
    import torch
    from safetensors.torch import load_file

    digests = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for name, t in sorted(load_file(str(path)).items()):
            t = t.contiguous()
            h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            digests[f"{path.relative_to(folder)}:{name}"] = h.hexdigest()
    return digests


def stripped(obj):
    """obj without the VOLATILE keys, at any depth."""
    if isinstance(obj, dict):
        return {k: stripped(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [stripped(v) for v in obj]
    return obj


def run_case(name: str, overrides: list[str], worlds: Path) -> dict:
    out = worlds / "runs" / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "EPMQ_CACHE": str(worlds / "cache"),
           "PYTHONHASHSEED": "0"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *translated(overrides), "trainer.enable_progress_bar=false",
                           f"hydra.run.dir={out}"], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    report = out / "report.json" if (out / "report.json").is_file() else out / "results.json"
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return {"overrides": overrides, "report": stripped(json.loads(report.read_text())),
            "tensors": tensor_digests(out)}


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """Nested dicts and lists as {'a.b.0.c': leaf}."""
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    if isinstance(obj, list):
        return {k: v for i, value in enumerate(obj) for k, v in flatten(value, f"{prefix}{i}.").items()}
    return {prefix[:-1]: obj}


def compare(a: dict, b: dict) -> int:
    """Print what was compared and every difference; the number of differences."""
    differences = 0
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {'the second' if name not in a else 'the first'} file")
            differences += 1
            continue
        ta, tb = a[name]["tensors"], b[name]["tensors"]
        ra, rb = flatten(a[name]["report"]), flatten(b[name]["report"])
        bad = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
        bad_numbers = sorted(k for k in set(ra) | set(rb) if ra.get(k, "<missing>") != rb.get(k, "<missing>"))
        numbers = sum(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ra.values())
        status = "identical" if not bad and not bad_numbers else "DIFFERENT"
        print(f"{name}: {len(ta)} tensors, {len(ra)} report values ({numbers} numbers): {status}")
        for k in bad[:20]:
            print(f"    tensor {k}: {ta.get(k, '<missing>')[:12]} vs {tb.get(k, '<missing>')[:12]}")
        for k in bad_numbers[:20]:
            print(f"    report {k}: {ra.get(k, '<missing>')!r} vs {rb.get(k, '<missing>')!r}")
        differences += len(bad) + len(bad_numbers)
    return differences


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every case and write their digests")
    run.add_argument("out", type=Path)
    run.add_argument("--worlds", type=Path, required=True, help="where the tiny worlds and the runs live (kept)")
    run.add_argument("--only", nargs="*", help="case names (default: all); added to the cases already in OUT")
    cmp = sub.add_parser("compare", help="compare two digest files")
    cmp.add_argument("a", type=Path)
    cmp.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "compare":
        n = compare(json.loads(args.a.read_text()), json.loads(args.b.read_text()))
        print("no difference" if n == 0 else f"{n} difference(s)")
        raise SystemExit(1 if n else 0)
    worlds = args.worlds.resolve()
    build_worlds(worlds)
    chosen = cases(worlds)
    unknown = sorted(set(args.only or []) - set(chosen))
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases: {sorted(chosen)}")
    results = json.loads(args.out.read_text()) if args.only and args.out.is_file() else {}  # --only adds to a file
    for name, overrides in chosen.items():
        if not args.only or name in args.only:
            results[name] = run_case(name, overrides, worlds)
            args.out.write_text(json.dumps(results, indent=1, default=str))  # each case as soon as it is done
    print(f"{len(results)} cases in {args.out}")


if __name__ == "__main__":
    main()
