"""The terminal table a run prints (report.json is written atomically by epmq.io.files)."""

from __future__ import annotations


def accuracy_table(metrics: dict[str, dict[str, float]], tasks: list[str], scale: float = 100) -> str:
    """A plain-text table: one row per evaluated model, one column per task, then the average.

    metrics: model name -> {task: metric, ..., "avg": mean}; printed times `scale` (100: accuracies
    in [0, 1] as percent; 1: a perplexity as it is).
    """
    header = ["model", *tasks, "avg"]
    rows = [[name, *(_fmt(accs.get(t), scale) for t in tasks), _fmt(accs.get("avg"), scale)]
            for name, accs in metrics.items()]
    widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _fmt(x: float | None, scale: float) -> str:
    return "-" if x is None else f"{scale * x:.2f}"
