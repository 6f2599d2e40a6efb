"""The automatic anchor choice's calibration time against GPTQ's, side by side in one process.

    python benchmarks/anchor_choice_cost.py --repeats 3             # the default offline suite: about 3 minutes
    python benchmarks/anchor_choice_cost.py --world /tmp/b32 --experts 8 --calib-samples 32 --select-samples 64 \
        --no-run-level                                               # ViT-B/32 shapes, 12 blocks, 8 experts

What it runs, in this process, on one prepared suite (merged once): GPTQ's calibration; plain E-PMQ at one
strength (--strength); the anchor choice with anchor.select=run (every candidate calibrated in full; skipped with
--no-run-level), with anchor.select=staged and the configured rounds, and with each --rounds given (YAML lists of
rounds, e.g. '[{fidelity: open_loop, pivot: 3.0, select_share: 0.25, keep: 1}]'), each through the job's own
epmq.jobs.staged_choice.choose. Extra Hydra overrides after `--` change the suite or the options.

--world builds (once) the clip suite's inputs at ViT-B/32's shapes as benchmarks/job_memory.py does: a random
CLIPModel base (12 vision blocks of width 768, 224-pixel images in 32-pixel patches), experts = base + random
task vectors, three classes per task whose zero-shot heads come from the text tower; the selection scores are
those heads' losses, as in a real run. Nothing is downloaded.

What it prints: each method's seconds (each calibration's trainer.fit, and for a choice everything it does:
passes, solves, scoring, final calibrations) and the ratio to GPTQ's, best of --repeats; for the staged choice,
where its time went (the shared pass and the solving inside it, the scoring, the final calibration).
Threads: --threads (default 1, as the studies ran: on 2 shared cores two threads stall each other).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def compose(overrides: list[str], out: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose("train", return_hydra_config=True, overrides=[
            "logger=none", "trainer.enable_progress_bar=false", "evaluate_references=false", "save_model=false",
            *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = out
        cfg.hydra.runtime.output_dir = out
    HydraConfig().set_config(cfg)
    return cfg


def world_options(args, out: str) -> list[str]:
    """The clip suite on a B/32-shaped world (built under --world on first use)."""
    import job_memory

    root = Path(args.world)
    job_memory.build_world(root, args.experts, argparse.Namespace(
        calib_samples=args.calib_samples, select_samples=args.select_samples, test_samples=4))
    tasks = ",".join(f"task{t}" for t in range(args.experts))
    return ["suite=clip", f"suite.base={root}/base", f"suite.experts='{root}/experts/{{task}}'",
            f"suite.datasets='{root}/data/{{task}}'", f"suite.tasks=[{tasks}]", f"suite.cache_dir={out}/cache",
            "data.test_samples=4"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", help="a folder for the B/32-shaped clip suite (built once, kept)")
    parser.add_argument("--experts", type=int, default=8, help="tasks of the B/32-shaped world")
    parser.add_argument("--calib-samples", type=int, default=None, help="data.calib_samples (per task)")
    parser.add_argument("--select-samples", type=int, default=None, help="data.select_samples (per task)")
    parser.add_argument("--strength", type=float, default=1.0, help="λ of the plain E-PMQ row")
    parser.add_argument("--no-run-level", action="store_true", help="leave out anchor.select=run (ten calibrations)")
    parser.add_argument("--rounds", nargs="*", default=[], help="more staged choices to time: anchor.rounds values")
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs of each method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the train config (after --)")
    args = parser.parse_args(argv)

    import torch
    import yaml
    from omegaconf import OmegaConf, open_dict

    from epmq.core.solvers import GPTQ
    from epmq.jobs import steps
    from epmq.jobs.staged_choice import choose, rounds_of

    if args.threads:
        torch.set_num_threads(args.threads)
    out = tempfile.mkdtemp(prefix="anchor_choice_cost_")
    options = world_options(args, out) if args.world else []
    options += [f"data.calib_samples={args.calib_samples}"] if args.calib_samples else []
    options += [f"data.select_samples={args.select_samples}"] if args.select_samples else []
    cfg = compose(options + args.overrides, out)
    steps.quiet_libraries()
    prepared = steps.prepare(cfg)
    spec = {k: cfg.quant[k] for k in ("bits", "group_size", "sym", "act_order", "static_groups", "percdamp",
                                      "blocksize")}

    def fixed(strength):
        return steps.solvers(OmegaConf.merge(cfg.quant, {"strength": strength, "form": "output"}), cfg.anchor)[0]

    def timed(method):
        best, detail = None, None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            result = method()
            seconds = time.perf_counter() - t0
            if best is None or seconds < best:
                best, detail = seconds, result
        return best, detail

    def choice(base, options):
        def run():
            with open_dict(cfg):
                cfg.anchor = OmegaConf.merge(base, options)
            candidates = steps.solvers(cfg.quant, cfg.anchor)
            chosen, calib, _, records = choose(cfg, prepared, candidates, rounds_of(cfg.anchor),
                                               Path(tempfile.mkdtemp(dir=out)))
            return chosen, calib, records
        return run

    anchor = cfg.anchor
    rows = [("gptq", lambda: steps.calibrate(cfg, prepared, GPTQ(**spec))),
            (f"epmq λ={args.strength:g}", lambda: steps.calibrate(cfg, prepared, fixed(args.strength)))]
    if not args.no_run_level:
        rows.append(("epmq, select=run", choice(anchor, {"select": "run"})))
    rows.append(("epmq, select=staged", choice(anchor, {"select": "staged"})))
    for k, rounds in enumerate(args.rounds):
        rows.append((f"epmq, select=staged ({k + 1})", choice(anchor, {"select": "staged", "rounds": yaml.safe_load(rounds)})))
        print(f"staged ({k + 1}): anchor.rounds={rounds}")
    print(f"suite: {cfg.suite._target_.rsplit('.', 1)[-1]}, {len(prepared.suite.tasks)} tasks, "
          f"{cfg.data.calib_samples} calibration and {cfg.data.select_samples} selection samples per task, "
          f"{cfg.quant.bits} bits, {torch.get_num_threads()} thread(s)")
    gptq_seconds = None
    for name, method in rows:
        seconds, detail = timed(method)
        gptq_seconds = gptq_seconds or seconds
        line = f"{name:28s} {seconds:8.1f} s  {seconds / gptq_seconds:5.2f}x GPTQ"
        if isinstance(detail, tuple):
            chosen, calib, records = detail
            line += f"   kept λ = {chosen.strength:g}"
            for record in records:
                split = ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in record.items() if k.endswith("_s"))
                line += f"\n{'':30s}round {record['round']} ({record['fidelity']}): {record['seconds']:.1f} s ({split})"
            rest = seconds - sum(r["seconds"] for r in records)
            line += f"\n{'':30s}after the rounds (final calibrations and their scoring): {rest:.1f} s"
        print(line, flush=True)


if __name__ == "__main__":
    main()
