"""Plot a run's training curves (train loss per step, val accuracy per epoch) from its CSV log, and
print its measured training speed per training image size (median of the logged images/second).

python scripts/plot_curves.py outputs/<date>/<time> docs/curve.png [--title "..."]
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--title", default=None)
    args = p.parse_args()
    rows = list(csv.DictReader(open(args.run_dir / "csv" / "metrics.csv")))
    loss = [(int(r["step"]), float(r["train/loss_step"])) for r in rows if r.get("train/loss_step")]
    val = [(int(r["step"]), float(r["val/acc"])) for r in rows if r.get("val/acc")]
    if not loss or not val:
        raise SystemExit(f"error: {args.run_dir}/csv/metrics.csv has no train/loss_step or val/acc rows")
    # Speeds by training size: train/img_size and the throughput are logged in separate rows of one step.
    size_at = {int(r["step"]): int(float(r["train/img_size"])) for r in rows if r.get("train/img_size")}
    speeds = defaultdict(list)
    for r in rows:
        if r.get("train/device/samples_per_sec") and int(r["step"]) in size_at:
            speeds[size_at[int(r["step"])]].append(float(r["train/device/samples_per_sec"]))
    for size, values in sorted(speeds.items()):
        print(f"{size} px: median {statistics.median(values):,.0f} img/s over {len(values)} logged steps")
    print(f"val/acc {val[-1][1]:.2%} at step {val[-1][0]} (best {max(a for _, a in val):.2%})")
    fig, ax1 = plt.subplots(figsize=(6, 3.6))
    ax1.plot(*zip(*loss), color="tab:blue", lw=1, label="train loss (step)")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(*zip(*val), "o-", color="tab:red", label="val accuracy")
    ax2.set_ylabel("val accuracy", color="tab:red")
    for step, acc in val[-1:]:
        ax2.annotate(f"{acc:.1%}", (step, acc), textcoords="offset points", xytext=(-45, -14), color="tab:red")
    ax1.set_title(args.title or args.run_dir.name, fontsize=10)
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=100)
    print(args.output)


if __name__ == "__main__":
    main()
