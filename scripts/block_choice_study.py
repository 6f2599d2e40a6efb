"""Would choosing E-PMQ's anchor strength per block beat one λ for the whole model? A study on the offline suite.

    OMP_NUM_THREADS=1 python scripts/block_choice_study.py merge=task_arithmetic seed=0 suite.seed=0 quant.bits=4 \
        --out docs/results/block_choice/zoo0/ta_s0_b4.jsonl
    python scripts/block_choice_study.py --summarize docs/results/block_choice --runs docs/results

The greedy per-block choice, emulated with the engine. For block l = 0 .. L-1 and every candidate λ of
anchor.candidates.strength (strongest first): calibrate the whole model with the blocks before l at the λ
already chosen for them and block l at the candidate, put the blocks after l back to the FP merged weights,
and score the model on half A of the selection samples. Block l keeps the candidate with the least half-A NLL
(ties: the stronger anchor, as the run-level choice). The model with every block at its chosen λ is then
scored on both halves and on the test split. Block l thus sees what a one-pass per-block choice would give
it: the blocks before it quantized at their chosen λ, the FP merge after it. The emulation costs K·L
calibrations instead of one, which is fine for a study and says nothing about a one-pass implementation's
time.

Output: JSON lines, one per (block, candidate) with its half scores, then {"final": [λ per block], ...}.

--summarize pairs every study file <zoo>/<merge>_s<S>_b<bits>.jsonl with the comparison run
<runs>/<zoo>/<merge>_s<S>/results.json and prints, per setting and on average, the greedy choice against the
run-level choice made the same way (its ablation rows of the same candidates, chosen on half A by NLL), both
judged on half B. Test accuracy is printed for the record only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _config(overrides: list[str], out: str | None = None):
    """The train config with `overrides`, quiet, writing into `out` (default: a new temporary folder)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "logger=none", "trainer.enable_progress_bar=false", "suite.progress=false", *overrides])
    out = out or tempfile.mkdtemp(prefix="block_choice_")
    with open_dict(cfg):
        cfg.paths.output_dir = out
        cfg.hydra.runtime.output_dir = out
    HydraConfig().set_config(cfg)
    return cfg


def study(overrides: list[str], out: Path) -> None:
    from epmq.core.solvers import EPMQ, Requirements
    from epmq.families.base import adapter_for
    from epmq.jobs import steps

    cfg = _config(overrides)
    steps.quiet_libraries()
    prepared = steps.prepare(cfg)
    spec = {k: cfg.quant[k] for k in ("bits", "group_size", "sym", "act_order", "static_groups", "percdamp", "blocksize")}
    merged = prepared.suite.model(prepared.merged_state)
    adapter = adapter_for(merged)
    stages = adapter.stages(merged)
    if len(stages) != 1:
        raise SystemExit("the study handles one-stage towers (the offline and CLIP suites)")
    blocks = adapter.blocks(merged, stages[0])
    prefixes = [adapter.block_prefix(stages[0], i) for i in range(len(blocks))]
    per_block = len(adapter.linear_layers(blocks[0], stages[0]))

    class PerBlock(EPMQ):
        """E-PMQ whose strength is strengths[b] for the layers of block b (solves come block by block)."""

        def __init__(self, strengths):
            super().__init__(strength=strengths[0], form="output", **spec)
            self.strengths, self.calls = list(strengths), 0

        @property
        def requirements(self) -> Requirements:  # a finite λ may follow a block at λ = ∞
            return Requirements(targets=True)

        def solve(self, W_m, stats=None, **context):
            self.strength = self.strengths[self.calls // per_block]
            self.calls += 1
            return super().solve(W_m, stats, **context)

    experts = steps.target_provider(cfg, prepared.pool, keep=True)

    def calibrated(strengths):
        solver = PerBlock(strengths)
        model = steps.calibrate(cfg, prepared, solver, targets=experts).model
        if solver.calls != per_block * len(blocks):
            raise SystemExit(f"expected {per_block} layers in each of {len(blocks)} blocks, solved {solver.calls}")
        return model

    candidates = sorted({float(c) for c in cfg.anchor.candidates.strength}, reverse=True)
    chosen, t0 = [], time.perf_counter()
    partial = out.with_name(out.name + ".partial")  # renamed when finished: no half-written study file
    with partial.open("w") as f:
        for l in range(len(blocks)):
            best = None
            for lam in candidates:
                model = calibrated(chosen + [lam] + [math.inf] * (len(blocks) - l - 1))
                with torch.no_grad():  # the blocks after l back to the FP merge
                    for name, p in model.named_parameters():
                        if any(name.startswith(p_) for p_ in prefixes[l + 1:]):
                            p.copy_(prepared.merged_state[name])
                scores = steps.select_half_scores(cfg, prepared, model, "study")
                f.write(json.dumps({"block": l, "strength": lam, **scores}) + "\n")
                f.flush()
                if best is None or scores["select_a_avg_nll"] < best[0]:
                    best = (scores["select_a_avg_nll"], lam)
            chosen.append(best[1])
        model = calibrated(chosen)
        scores = steps.select_half_scores(cfg, prepared, model, "study")
        test = steps.evaluate(cfg, prepared, model, prepared.data.test_dataloader(), "study/test").results
        f.write(json.dumps({"final": chosen, "test": test, **scores, "overrides": overrides,
                            "seconds": time.perf_counter() - t0}) + "\n")
    partial.replace(out)


def summarize(studies: Path, runs: Path) -> None:
    """Greedy per-block vs the run-level choice, both chosen on half A and judged on half B."""
    pairs = []
    for path in sorted(studies.glob("*/*.jsonl")):
        zoo, (stem, bits) = path.parent.name, path.stem.rsplit("_b", 1)
        final = next((json.loads(line) for line in path.read_text().splitlines() if '"final"' in line), None)
        if final is None:
            print(f"{path}: unfinished, skipped")
            continue
        run = json.loads((runs / zoo / stem / "results.json").read_text())
        candidates = {math.inf if s == "inf" else float(s) for s in run["config"]["quant"]["candidates"]["strength"]}
        rows = [r for r in run["ablation"] if r["bits"] == int(bits) and r["form"] == "output"
                and float(r["strength"]) in candidates]
        rows.sort(key=lambda r: -float(r["strength"]))  # min keeps the first: ties go to the stronger anchor
        best = min(rows, key=lambda r: r["select_a_avg_nll"])
        pairs.append((f"{zoo}/{stem} {bits}b", final, best))
    header = f"{'setting':24s} {'greedy λ per block':28s} {'B acc':>6s} {'B NLL':>7s} {'test':>6s} | {'run λ':>5s} {'B acc':>6s} {'B NLL':>7s} {'test':>6s}"
    print(header)
    for name, g, r in pairs:
        lam = "[" + ", ".join(f"{x:g}" for x in g["final"]) + "]"
        print(f"{name:24s} {lam:28s} {100 * g['select_b_avg_acc']:6.2f} {g['select_b_avg_nll']:7.4f} "
              f"{100 * g['test']['avg']:6.2f} | {float(r['strength']):5g} {100 * r['select_b_avg_acc']:6.2f} "
              f"{r['select_b_avg_nll']:7.4f} {100 * r['test']['avg']:6.2f}")
    zoos = sorted({name.split("/")[0] for name, *_ in pairs})
    print()
    for label, group in [(z, [p for p in pairs if p[0].startswith(z + "/")]) for z in zoos] + [("all", pairs)]:
        if not group:
            continue
        mean = lambda key, scale=1.0: (statistics.fmean(scale * g[key] for _, g, _ in group),  # noqa: E731
                                       statistics.fmean(scale * r[key] for *_, r in group))
        (g_acc, r_acc), (g_nll, r_nll) = mean("select_b_avg_acc", 100), mean("select_b_avg_nll")
        g_test = statistics.fmean(100 * g["test"]["avg"] for _, g, _ in group)
        r_test = statistics.fmean(100 * r["test"]["avg"] for *_, r in group)
        wins = sum(g["select_b_avg_nll"] < r["select_b_avg_nll"] for _, g, r in group)
        print(f"{label}, {len(group)} settings: greedy B {g_acc:.2f} % / {g_nll:.4f} (test {g_test:.2f}), "
              f"run-level B {r_acc:.2f} % / {r_nll:.4f} (test {r_test:.2f}); greedy's B NLL lower in {wins}/{len(group)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config (merge, seed, suite.seed, quant.bits)")
    parser.add_argument("--out", type=Path, help="the JSON-lines file to write (a study run)")
    parser.add_argument("--summarize", type=Path, help="a folder of study files <zoo>/<merge>_s<S>_b<bits>.jsonl")
    parser.add_argument("--runs", type=Path, default=ROOT / "docs" / "results", help="the comparison runs' folder")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize, args.runs)
    elif args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        study(args.overrides, args.out)
    else:
        parser.error("give --out (run a study) or --summarize")


if __name__ == "__main__":
    main()
