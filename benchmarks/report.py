"""Ratios from one pytest-benchmark JSON: for each group, every baseline's median time over
pneumoseg's (above 1 means pneumoseg is faster). Optionally draws them as a PNG.

    python benchmarks/report.py rle.json [--png benchmarks/results/rle_cpu.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from collections import defaultdict


def ratios(path: str) -> list[tuple[str, str, float, float]]:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    ours: dict[str, float] = {}
    for b in data["benchmarks"]:
        extra = b.get("extra_info", {})
        median = b["stats"]["median"]
        if extra.get("baseline"):
            groups[b["group"]][extra["impl"]] = median
        else:
            ours[b["group"]] = median
    rows = []
    for group, baselines in sorted(groups.items()):
        if group not in ours:
            continue
        for impl, median in sorted(baselines.items()):
            rows.append((group, impl, median / ours[group], ours[group]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("json")
    parser.add_argument("--png", help="also draw the ratios to this PNG file")
    args = parser.parse_args()
    rows = ratios(args.json)
    width = max((len(f"{g} vs {i}") for g, i, _, _ in rows), default=10)
    print(f"{'group vs baseline':<{width}}  speed-up (baseline / pneumoseg, median)")
    for group, impl, ratio, _ in rows:
        print(f"{group + ' vs ' + impl:<{width}}  {ratio:8.2f}x")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{g}\nvs {i}" for g, i, _, _ in rows]
        fig, ax = plt.subplots(figsize=(9, 0.6 * len(rows) + 1.5))
        ax.barh(range(len(rows)), [r for _, _, r, _ in rows], color="tab:blue")
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.set_xlabel("speed-up of pneumoseg (baseline median / pneumoseg median), log scale")
        ax.set_title(f"pneumoseg speed-ups, one run ({Path(args.json).name})")
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
