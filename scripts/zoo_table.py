"""Results table of the offline zoo's held-out test splits (FP32 merges and round-to-nearest).

    python scripts/zoo_table.py                     # build (or load from cache) the default zoo
    python scripts/zoo_table.py --size micro --no-write

Rows: base with heads; each expert on its own task; simple average; task arithmetic at λ = 0.3 and
at the best λ in 0.1..1.0 chosen on the calibration splits (never on test); TIES (λ = 0.3, top 20%);
round-to-nearest of the task-arithmetic (0.3) merge at 4, 3 and 2 bits, with one grid per row and
with groups of 128 input columns, on every nn.Linear weight of the encoder layers.
The table replaces the block between the markers in docs/ZOO.md (appended when absent).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionModel

from epmq.core.gptq import rtn
from epmq.core.merge import simple_average, task_arithmetic, ties_merging
from epmq.core.quant import QuantSpec
from epmq.families.offline.classifier import CLIPClassifier, accuracy, tower_state_dict
from epmq.families.offline.zoo import Zoo, build_zoo, open_zoo

START, END = "<!-- zoo-table:start -->", "<!-- zoo-table:end -->"
LAMBDAS = [round(0.1 * k, 1) for k in range(1, 11)]
DOC = Path(__file__).resolve().parents[1] / "docs" / "ZOO.md"

StateDict = dict[str, torch.Tensor]


class Evaluator:
    """Accuracy of a tower state dict under each task's frozen head, on one split of every task."""

    def __init__(self, zoo: Zoo, split: str):
        self.zoo, self.tasks = zoo, zoo.tasks
        self.config = CLIPVisionModel.from_pretrained(str(zoo.tower_dir("base"))).config
        self.heads = {t: zoo.head(t) for t in self.tasks}
        self.data = {}
        for t in self.tasks:
            rows = zoo.data(t)[split].with_format("torch")[:]
            self.data[t] = (rows["pixel_values"], rows["label"])

    def tower(self, state: StateDict) -> CLIPVisionModel:
        model = CLIPVisionModel(self.config)
        model.load_state_dict(tower_state_dict(state))
        return model.eval()

    def __call__(self, state: StateDict, tasks: list[str] | None = None) -> dict[str, float]:
        """{task: accuracy %} for `tasks` (default all) and their "avg"."""
        tower = self.tower(state)
        accs = {t: accuracy(CLIPClassifier(tower, self.heads[t]), *self.data[t]) for t in tasks or self.tasks}
        accs["avg"] = sum(accs.values()) / len(accs)
        return accs


def rtn_encoder(state: StateDict, spec: QuantSpec, evaluator: Evaluator) -> StateDict:
    """Round every nn.Linear weight of the encoder layers to its grid (biases stay FP32)."""
    tower = evaluator.tower(state)
    with torch.no_grad():
        for module in tower.encoder.layers.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(rtn(module.weight, spec).weight)
    return tower.state_dict()


def fmt_row(name: str, accs: dict[str, float], tasks: list[str], ref: float | None = None) -> str:
    cells = [f"{accs[t]:.1f}" if t in accs else "" for t in tasks] + [f"{accs['avg']:.1f}"]
    delta = "" if ref is None else f"{accs['avg'] - ref:+.1f}"
    return f"| {name} | " + " | ".join(cells) + f" | {delta} |"


def make_table(zoo: Zoo) -> tuple[str, dict]:
    """Evaluate every row; returns (markdown block, numbers for the acceptance checks)."""
    tasks = zoo.tasks
    test, calib = Evaluator(zoo, "test"), Evaluator(zoo, "calibration")
    base = zoo.tower("base").state_dict()
    experts = {t: zoo.tower(t).state_dict() for t in tasks}
    rows, t0 = [], time.perf_counter()

    base_acc = test(base)
    expert_acc = {t: test(experts[t], [t])[t] for t in tasks}
    expert_acc["avg"] = sum(expert_acc.values()) / len(tasks)
    ta = task_arithmetic(base, experts, scaling_factor=0.3)
    ta_acc = test(ta)
    sweep = {lam: calib(task_arithmetic(base, experts, scaling_factor=lam))["avg"] for lam in LAMBDAS}
    best = max(sweep, key=sweep.get)
    rows += [fmt_row("base + heads (no fine-tuning)", base_acc, tasks),
             fmt_row("experts, each on its own task", expert_acc, tasks),
             fmt_row("simple average", test(simple_average(base, experts)), tasks),
             fmt_row("task arithmetic λ = 0.3", ta_acc, tasks),
             fmt_row(f"task arithmetic, best λ on calibration (λ = {best})",
                     test(task_arithmetic(base, experts, scaling_factor=best)), tasks),
             fmt_row("TIES λ = 0.3, top 20%", test(ties_merging(base, experts, 0.3, 20)), tasks)]
    rtn_acc = {}
    for bits in (4, 3, 2):
        for group, label in ((-1, "per-row"), (128, "group-128")):
            rtn_acc[bits, label] = test(rtn_encoder(ta, QuantSpec(bits=bits, group_size=group), test))
            rows.append(fmt_row(f"RTN {bits}-bit {label}, of task arithmetic λ = 0.3", rtn_acc[bits, label],
                                tasks, ta_acc["avg"]))
    eval_s = time.perf_counter() - t0

    header = "| model | " + " | ".join(tasks) + " | avg | Δ avg vs TA 0.3 |\n" + "|---" * (len(tasks) + 3) + "|"
    timings = zoo.manifest["metrics"]["timings"]
    sweep_txt = ", ".join(f"{lam}: {acc:.1f}" for lam, acc in sweep.items())
    checks = {
        "experts_avg": expert_acc["avg"],
        "merge_gap": expert_acc["avg"] - ta_acc["avg"],
        "rtn_loss": {f"{b}-bit {g}": ta_acc["avg"] - a["avg"] for (b, g), a in rtn_acc.items()},
    }
    loss3 = max(checks["rtn_loss"]["3-bit per-row"], checks["rtn_loss"]["3-bit group-128"])
    loss2 = max(checks["rtn_loss"]["2-bit per-row"], checks["rtn_loss"]["2-bit group-128"])
    verdict = [
        f"1. experts average {checks['experts_avg']:.1f} on their own tasks (needs >= 90): "
        f"{'met' if checks['experts_avg'] >= 90 else 'NOT met'}",
        f"2. task arithmetic λ = 0.3 sits {checks['merge_gap']:.1f} points below the experts (needs >= 10): "
        f"{'met' if checks['merge_gap'] >= 10 else 'NOT met'}",
        f"3. round-to-nearest of that merge loses up to {loss3:.1f} points at 3 bits (needs >= 2) and up to "
        f"{loss2:.1f} at 2 bits (needs >= 8): {'met' if loss3 >= 2 and loss2 >= 8 else 'NOT met'}",
    ]
    block = "\n".join([
        START,
        f"Zoo `{zoo.root.name}` (size {zoo.manifest['size']}, seed {zoo.manifest['seed']}), held-out test "
        f"splits, accuracy in %. Build: {timings['build_s']:.0f} s wall, {timings['build_cpu_s']:.0f} s CPU "
        f"(pretraining {timings['pretrain_s']:.0f} s, heads {timings['heads_s']:.0f} s, experts "
        f"{timings['experts_s']:.0f} s); this table: {eval_s:.0f} s.",
        "",
        header,
        *rows,
        "",
        f"Task-arithmetic λ sweep, average accuracy on the calibration splits: {sweep_txt}.",
        "",
        "Acceptance checks:",
        "",
        *verdict,
        END,
    ])
    return block, checks


def write_block(doc: Path, block: str) -> None:
    """Replace the marked block in doc (or append it), writing through a temporary file."""
    text = doc.read_text() if doc.is_file() else "# The offline zoo\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="default", help="zoo size: default or micro")
    parser.add_argument("--cache-dir", default=None, help="zoo cache folder (default: $EPMQ_CACHE/zoo or ~/.cache/epmq/zoo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DOC, help="markdown file whose table block is replaced")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    zoo = open_zoo(build_zoo(args.size, args.cache_dir, args.seed, progress=True))
    block, _ = make_table(zoo)
    print(block)
    if not args.no_write:
        write_block(args.out, block)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
