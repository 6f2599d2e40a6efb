"""Mean and spread of test accuracy over the runs of a sweep, grouped by setting.

    python scripts/summarize_runs.py logs/calibrate/multiruns/<date>_<time> [more folders ...]

Reads every report.json below the given folders and prints, per (merge, method, bits), the number of
runs, the mean and the standard deviation of the quantized model's average test accuracy (in %), the
mean calibration time, and the anchor settings the runs chose.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def setting(report: dict) -> tuple:
    cfg = report["config"]
    merge = cfg.get("merge") or {}
    name = merge.get("_target_", "none").rsplit(".", 1)[-1]
    if "scaling_factor" in merge:
        name += f"({merge['scaling_factor']:g})"
    return name, report["method"], report["quant"]["spec"]["bits"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for folder in args.folders:
        for path in sorted(folder.rglob("report.json")):
            report = json.loads(path.read_text())
            groups[setting(report)].append(report)
    if not groups:
        raise SystemExit(f"no report.json under {[str(f) for f in args.folders]}")
    print(f"{'merge':<22} {'method':<6} {'bits':>4} {'runs':>4} {'avg acc %':>16} {'calib s':>8}  anchors chosen")
    for key in sorted(groups):
        reports = groups[key]
        accs = [100 * r["metrics"]["quantized"]["avg"] for r in reports]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        secs = statistics.mean(r["timings"]["calibration_s"] for r in reports)
        anchors = sorted({f"{r['quant']['form']}/{r['quant']['strength']:g}" for r in reports}) \
            if key[1] == "epmq" else []
        print(f"{key[0]:<22} {key[1]:<6} {key[2]:>4} {len(reports):>4} "
              f"{statistics.mean(accs):>8.2f} ± {spread:<5.2f} {secs:>8.1f}  {' '.join(anchors)}")


if __name__ == "__main__":
    main()
