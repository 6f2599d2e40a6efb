"""What a run leaves behind: the terminal table and report.json (written atomically)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, then rename it to `path` (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; reports are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, payload: dict) -> Path:
    """Write `payload` as indented JSON to `path` atomically (see write_atomic)."""
    return write_atomic(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2, default=str)))


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
