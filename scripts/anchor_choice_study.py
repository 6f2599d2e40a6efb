"""Does a cheaper anchor choice pick as well as the run-level one? The staged choice's study on the offline suite.

    OMP_NUM_THREADS=1 python scripts/anchor_choice_study.py merge=ties seed=0 suite.seed=0 quant.bits=4 \
        --out docs/results/anchor_choice/zoo0/ties_s0_b4.jsonl
    python scripts/anchor_choice_study.py --summarize docs/results/anchor_choice --runs docs/results

For one setting (the Hydra overrides), in one process: the merged model is prepared once; GPTQ is calibrated
once (the time the ratios are taken against); then every variant of VARIANTS (anchor.select and anchor.rounds)
runs the job's own choice (epmq.jobs.staged_choice.choose) with the selection samples cut to their half A, so
it chooses on half A only. The model it keeps is scored on half B and on the test split. Each variant's line
holds its rounds (every candidate's half-A scores at each round, the survivors, the seconds), the λ it kept,
its half-B and test scores and its time; the ratio to GPTQ's calibration is taken in the same process.

--summarize pairs every study file <zoo>/<merge>_s<S>_b<bits>.jsonl with the comparison run
<runs>/<zoo>/<merge>_s<S>/results.json, whose ablation rows give the run-level choice made on half A by the
NLL (the reference: every candidate calibrated in full), and prints per variant the mean half-B accuracy and
NLL against it, the mean test accuracy (for the record) and the mean time ratio to GPTQ.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from block_choice_study import _config  # noqa: E402  (scripts/ is on the path when a script runs)

# name -> anchor options; every variant chooses among anchor.candidates.strength of the config
VARIANTS = {
    # the shared pass on the FP merged model; the best on a quarter of the selection samples is calibrated
    "open_loop": {"select": "staged", "rounds": [
        {"fidelity": "open_loop", "calib_share": 1.0, "select_share": 0.25, "keep": 1}]},
    # the shared pass is the calibration at λ0 = 3 (the median of the run-level choices on zoo 0's half A)
    "pivot": {"select": "staged", "rounds": [
        {"fidelity": "open_loop", "pivot": 3.0, "calib_share": 1.0, "select_share": 0.25, "keep": 1}]},
    # the same, the best two calibrated in full and scored on all the selection samples
    "pivot_top2": {"select": "staged", "rounds": [
        {"fidelity": "open_loop", "pivot": 3.0, "calib_share": 1.0, "select_share": 0.25, "keep": 2}]},
    # the same two, each candidate scored on all the selection samples (what the scoring's share costs)
    "open_loop_full": {"select": "staged", "rounds": [
        {"fidelity": "open_loop", "calib_share": 1.0, "select_share": 1.0, "keep": 1}]},
    "pivot_full": {"select": "staged", "rounds": [
        {"fidelity": "open_loop", "pivot": 3.0, "calib_share": 1.0, "select_share": 1.0, "keep": 1}]},
    # the per-block choice (one calibration, each step's candidates solved from its statistics and scored),
    # after the first step only the previous step's choice and its two neighbours in the grid
    "block_nb1": {"select": "block", "block_neighbours": 1},
    "block_nb1_s25": {"select": "block", "block_neighbours": 1, "block_select_share": 0.25},
    "block_s25": {"select": "block", "block_select_share": 0.25},
    # successive halving with sequential calibrations on 1/8, then 1/2, of the calibration samples
    "halving": {"select": "staged", "rounds": [
        {"fidelity": "sequential", "calib_share": 0.125, "select_share": 0.25, "keep": 3},
        {"fidelity": "sequential", "calib_share": 0.5, "select_share": 0.5, "keep": 1}]},
}


def half_a_only(data) -> None:
    """Make the datamodule's selection samples its half A (select_dataloader(share) then cuts a share of A)."""
    from torch.utils.data import Subset

    from epmq.families.tasks import shared

    halves = [Subset(ds, range(len(ds) // 2)) for ds in data._select]

    def select_dataloader(share: float = 1.0):
        return [data._loader(Subset(ds, range(shared(len(ds), share))), batch_size=data.eval_batch_size)
                for ds in halves]

    data.select_dataloader = select_dataloader


def study(overrides: list[str], variants: list[str], out: Path) -> None:
    from omegaconf import OmegaConf, open_dict

    from epmq.jobs import steps
    from epmq.jobs.staged_choice import choose, rounds_of

    tmp = tempfile.mkdtemp(prefix="anchor_choice_")
    cfg = _config(["quant.form=output", *overrides], tmp)  # the grid's one form, as anchor.select=block needs
    steps.quiet_libraries()
    prepared = steps.prepare(cfg)
    half_b = prepared.data.select_halves_dataloaders()[1]
    half_a_only(prepared.data)
    gptq = steps.solvers(OmegaConf.merge(cfg.quant, {"strength": float("inf"), "form": "output"}), cfg.anchor)[0]
    gptq_seconds = steps.calibrate(cfg, prepared, gptq).seconds
    partial = out.with_name(out.name + ".partial")  # renamed when finished: no half-written study file
    with partial.open("w") as f:
        f.write(json.dumps({"overrides": overrides, "gptq_seconds": gptq_seconds}) + "\n")
        anchor = cfg.anchor
        for name in variants:
            with open_dict(cfg):  # each variant on the configured anchor options, not on the previous variant's
                cfg.anchor = OmegaConf.merge(anchor, VARIANTS[name])
            candidates = steps.solvers(cfg.quant, cfg.anchor)
            t0 = time.perf_counter()
            chosen, calib, selection, rounds = choose(cfg, prepared, candidates, rounds_of(cfg.anchor),
                                                      Path(tempfile.mkdtemp(dir=tmp)))
            seconds = time.perf_counter() - t0
            b = steps.evaluate(cfg, prepared, calib.model, half_b, "study/select_b")
            test = steps.evaluate(cfg, prepared, calib.model, prepared.data.test_dataloader(), "study/test").results
            f.write(json.dumps({"variant": name, "strength": chosen.strength, "rounds": rounds, "final": selection,
                                "step_strengths": [s for _, s in calib.module.step_strengths]
                                if getattr(chosen, "select", "") == "block" else None,
                                "select_b_avg_acc": b.results["avg"], "select_b_avg_nll": b.nll["avg"],
                                "test": test, "seconds": seconds, "ratio": seconds / gptq_seconds}) + "\n")
            f.flush()
    partial.replace(out)


def summarize(studies: Path, runs: Path) -> None:
    """Every variant against the run-level choice (chosen on half A by NLL), both judged on half B."""
    by_variant: dict[str, list] = {}
    for path in sorted(studies.rglob("*.jsonl")):
        zoo = next(p for p in path.parts[::-1] if p.startswith("zoo"))
        stem, bits = path.stem.rsplit("_b", 1)
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        run = json.loads((runs / zoo / stem / "results.json").read_text())
        candidates = {math.inf if s == "inf" else float(s) for s in run["config"]["quant"]["candidates"]["strength"]}
        rows = [r for r in run["ablation"] if r["bits"] == int(bits) and r["form"] == "output"
                and float(r["strength"]) in candidates]
        rows.sort(key=lambda r: -float(r["strength"]))  # min keeps the first: ties go to the stronger anchor
        ref = min(rows, key=lambda r: r["select_a_avg_nll"])
        for line in lines[1:]:
            by_variant.setdefault(line["variant"], []).append((f"{zoo}/{stem} {bits}b", line, ref))
    zoos = sorted({next(q for q in p.parts[::-1] if q.startswith("zoo")) for p in studies.rglob("*.jsonl")})
    for variant, pairs in by_variant.items():
        print(f"\n{variant}")
        for label, group in [(z, [p for p in pairs if p[0].startswith(z + "/")]) for z in zoos] + [("all", pairs)]:
            if not group:
                continue
            mean = lambda f: statistics.fmean(f(v, r) for _, v, r in group)  # noqa: E731
            same = sum(float(v["strength"]) == float(r["strength"]) for _, v, r in group)  # nan (per block): never
            print(f"  {label} ({len(group)}): B acc {mean(lambda v, r: 100 * v['select_b_avg_acc']):.2f} vs "
                  f"{mean(lambda v, r: 100 * r['select_b_avg_acc']):.2f}, B NLL {mean(lambda v, r: v['select_b_avg_nll']):.4f} "
                  f"vs {mean(lambda v, r: r['select_b_avg_nll']):.4f}, test {mean(lambda v, r: 100 * v['test']['avg']):.2f} "
                  f"vs {mean(lambda v, r: 100 * r['test']['avg']):.2f}; same λ {same}/{len(group)}; "
                  f"time {mean(lambda v, r: v['ratio']):.2f}x GPTQ")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config (merge, seed, suite.seed, quant.bits)")
    parser.add_argument("--out", type=Path, help="the JSON-lines file to write (a study run)")
    parser.add_argument("--variants", nargs="+", default=["open_loop", "pivot", "pivot_top2", "halving"],
                        choices=list(VARIANTS))
    parser.add_argument("--summarize", type=Path, help="a folder of study files <zoo>/<merge>_s<S>_b<bits>.jsonl")
    parser.add_argument("--runs", type=Path, default=ROOT / "docs" / "results", help="the comparison runs' folder")
    args = parser.parse_args()
    if args.summarize:
        summarize(args.summarize, args.runs)
    elif args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        study(args.overrides, args.variants, args.out)
    else:
        parser.error("give --out (run a study) or --summarize")


if __name__ == "__main__":
    main()
