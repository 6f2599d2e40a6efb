"""Images per second of the clip suite's evaluation on ViT-B/32-shaped models, and where the time goes.

    python benchmarks/eval_throughput.py                         # 2 tasks x 128 test images: about 5 minutes on 2 cores
    python benchmarks/eval_throughput.py --world /tmp/b32eval --settings 32,0 128,0 128,1

What it builds (once; kept with --world): the clip suite's inputs at ViT-B/32's shapes as
tests/helpers/clip_zoo.py writes them (a random CLIPModel, experts = base + task vectors, and per task a
dataset of --test random 256-pixel PNG images, 3 classes). Nothing is downloaded.

What it measures, in one process, one setting after the other:

    decode      reading a test row (PNG decoding by datasets), ms per image
    preprocess  the base's CLIP image processor on the decoded image (resize, crop, normalise), ms per image
    forward     the vision tower and head on ready pixel values, ms per image, at each evaluation batch size
    evaluate    the job's own evaluation (epmq.jobs.steps.evaluate: Lightning's test loop over the task loaders,
                the FP merged model) for each setting "eval_batch_size,num_workers", images per second

Every figure is the best of --repeats runs after one warm-up, with torch's default threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_world(root: Path, tasks: int, test: int) -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import clip_zoo

    names = [f"task{t}" for t in range(tasks)]
    if not (root / "base").is_dir():
        classes = {task: [f"kind{c} of thing{t}" for c in range(3)] for t, task in enumerate(names)}
        clip_zoo.build(root, shape=clip_zoo.B32, classes=classes, rows={"train": 8, "test": test}, layout="prefixed")
    return names


def best_of(repeats: int, fn) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--test", type=int, default=128, help="test images per task")
    parser.add_argument("--settings", nargs="+", default=["32,0", "128,0", "32,1"],
                        help="eval_batch_size,num_workers pairs for the evaluation loop")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--world", help="folder for the world, kept (default: a temporary one)")
    args = parser.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from epmq.jobs.steps import evaluate, prepare, quiet_libraries

    quiet_libraries()  # the job's own: no Lightning banners between the figures
    tmp = None if args.world else tempfile.TemporaryDirectory(prefix="eval_throughput_")
    root = Path(args.world or tmp.name)
    tasks = build_world(root, args.tasks, args.test)
    n = len(tasks) * args.test

    def config(batch: int, workers: int):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            return compose("train", overrides=[
                "suite=clip", f"suite.base={root}/base", f"suite.experts='{root}/experts/{{task}}'",
                f"suite.datasets='{root}/data/{{task}}'", f"suite.tasks=[{','.join(tasks)}]",
                f"suite.cache_dir={root}/cache", "data.calib_samples=4", "data.select_samples=0",
                f"data.eval_batch_size={batch}", f"data.num_workers={workers}", "trainer.enable_progress_bar=false",
                f"paths.output_dir={root}/run"])

    prepared = prepare(config(32, 0))
    suite, data = prepared.suite, prepared.data
    samples = data._test[0]
    print(f"ViT-B/32 shapes, {len(tasks)} tasks x {args.test} test images (256 px); torch threads "
          f"{torch.get_num_threads()}")

    rows = [samples.split[samples.rows[i]] for i in range(len(samples))]
    decode = best_of(args.repeats, lambda: [samples.split[samples.rows[i]] for i in range(len(samples))])
    preprocess = best_of(args.repeats, lambda: [samples.transform(r["image"]) for r in rows])
    print(f"decode      {1e3 * decode / len(samples):7.1f} ms/image", flush=True)
    print(f"preprocess  {1e3 * preprocess / len(samples):7.1f} ms/image", flush=True)

    model = suite.model(prepared.merged_state)
    evaluator = suite.evaluator({t: model for t in tasks}, "bench")
    classifier = evaluator.model(tasks[0])
    for batch in sorted({int(s.split(",")[0]) for s in args.settings}):
        x = torch.stack([samples.transform(r["image"]) for r in rows[:batch]])
        with torch.inference_mode():
            seconds = best_of(args.repeats, lambda: classifier(x))
        print(f"forward     {1e3 * seconds / len(x):7.1f} ms/image at batch {len(x)}", flush=True)

    for setting in args.settings:
        batch, workers = (int(v) for v in setting.split(","))
        cfg = config(batch, workers)
        data.eval_batch_size, data.num_workers = batch, workers
        seconds = best_of(args.repeats, lambda: evaluate(cfg, prepared, model, data.test_dataloader(), "bench/test"))
        print(f"evaluate    {n / seconds:7.1f} images/s  (eval_batch_size {batch}, num_workers {workers})", flush=True)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
