"""How far RegMean's merged weights move when its Grams and its running sums are stored in float32.

    python benchmarks/regmean_precision.py --world /tmp/b32 --experts 4     # a world of benchmarks/job_memory.py

On the ViT-B/32-shaped world that benchmarks/job_memory.py builds (give its --world; built there when
missing), the comparison job's RegMean (epmq.jobs.compare: each expert's Grams over its own calibration
samples, alpha 0.6) is solved three ways from the same experts and samples:

    float64 / float64   Grams and sums in float64 (the reference)
    float32 / float64   Grams stored in float32, sums in float64
    float32 / float32   both in float32 (what the comparison job does; terms are formed and the system solved
                        in float64 either way)

and for each of the last two it prints the largest, over the weights, relative Frobenius error
||W − W_ref|| / ||W_ref|| and max |W − W_ref| / max |W_ref|.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"float64 / float64": ("float64", "float64"), "float32 / float64": ("float32", "float64"),
            "float32 / float32": ("float32", "float32")}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", required=True, help="the folder of benchmarks/job_memory.py's world")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=8)
    args = parser.parse_args(argv)

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from job_memory import build_world

    from epmq.core.regmean import RegMeanSums, gram_matrices
    from epmq.families.clip.suite import ClipSuite
    from epmq.io.pool import ExpertPool
    from epmq.jobs.compare import regmean_layers, task_batches

    root = Path(args.world)
    build_world(root, args.experts, argparse.Namespace(calib_samples=args.calib_samples, select_samples=8,
                                                       test_samples=4))
    tasks = [f"task{t}" for t in range(args.experts)]
    suite = ClipSuite(base=str(root / "base"), experts=str(root / "experts" / "{task}"),
                      datasets=str(root / "data" / "{task}"), tasks=tasks, cache_dir=str(root / "cache"))
    pool = ExpertPool(suite.base, suite.experts)
    data = suite.datamodule(calib_samples=args.calib_samples, select_samples=0, batch_size=32, seed=0)
    data.setup("fit")
    by_task = task_batches(data, len(tasks))
    sums = {name: RegMeanSums(0.6, dtype=getattr(torch, s)) for name, (_, s) in VARIANTS.items()}
    for t, task in enumerate(tasks):
        tower = suite.model(pool.expert_state_dict(task))
        layers = regmean_layers(suite, tower)
        batches = [suite.regmean_inputs(b) for b in by_task[t]]
        for name, (grams_dtype, _) in VARIANTS.items():
            grams = gram_matrices(tower, layers, batches, dtype=getattr(torch, grams_dtype))
            sums[name].add(task, {key: layer.weight for key, layer in layers.items()}, grams)
            del grams
    solved = {name: dict(s.solutions(mean_weight=lambda key: None)) for name, s in sums.items()}
    reference = solved.pop("float64 / float64")
    print(f"RegMean of {args.experts} ViT-B/32-shaped experts, {args.calib_samples} samples each, "
          f"{len(reference)} weights; error against float64 Grams and sums (worst weight):")
    for name, weights in solved.items():
        frobenius = max(((weights[k] - W).norm() / W.norm()).item() for k, W in reference.items())
        largest = max(((weights[k] - W).abs().max() / W.abs().max()).item() for k, W in reference.items())
        print(f"  Grams / sums {name}: relative Frobenius {frobenius:.1e}, max-abs {largest:.1e}")


if __name__ == "__main__":
    main()
