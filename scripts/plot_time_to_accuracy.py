"""Validation accuracy against wall-clock minutes, for several runs on one figure.

    python scripts/plot_time_to_accuracy.py docs/time_to_accuracy.png \
        --run "cpu_30min (new)=runs/new" --run "cpu_30min (previous)=runs/old" \
        --csv "timm plain loop=runs/timm_baseline.csv" --title "..."

`--run LABEL=DIR`: a vit-train run directory (its csv/metrics.csv). The minutes of each
validation are the logged `time/minutes` (wall clock since training started, validation
included); runs from before that key existed get an estimate, marked "est." in the legend:
`train/time` (ThroughputMonitor's training seconds, logged every log_every_n_steps, validation
excluded) at the validation's step, mapped linearly between anchors of known wall time: the start,
each image-size change of a run whose schedules followed the clock (at its fraction of the budget),
and the end of the fit. `--csv LABEL=FILE`: scripts/timm_baseline.py's
output (epochs, step, minutes, val_acc). Each curve's legend gives its best accuracy and its last
point's step count and minutes; the script prints every point with its step count.
"""

from __future__ import annotations

import argparse
import bisect
import csv
from pathlib import Path

from omegaconf import OmegaConf

from vit.outputs import plt, save_figure


def _label_path(value: str) -> tuple[str, Path]:
    label, sep, path = value.rpartition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH, got {value!r}")
    return label, Path(path)


def run_curve(run_dir: Path, fit_minutes: float) -> tuple[list[tuple[float, float, int]], bool]:
    """[(minutes, val acc, step)] of a vit-train run; True when the minutes are estimated."""
    metrics = run_dir / "csv" / "metrics.csv"
    if not metrics.is_file():
        raise SystemExit(f"error: {metrics} not found: --run takes a vit-train run directory")
    rows = list(csv.DictReader(open(metrics)))
    val = [(int(r["step"]), float(r["val/acc"])) for r in rows if r.get("val/acc")]
    if not val:
        raise SystemExit(f"error: {metrics} has no val/acc: the run never validated")
    minutes = [float(r["time/minutes"]) for r in rows if r.get("time/minutes")]
    if minutes and len(minutes) == len(val):
        return [(m, a, s) for m, (s, a) in zip(minutes, val)], False
    timed = sorted((int(r["step"]), float(r["train/time"])) for r in rows if r.get("train/time"))
    steps = [s for s, _ in timed]

    def train_time(step: int) -> float:  # linear between the logged steps
        i = bisect.bisect_left(steps, step)
        if i == 0:
            return timed[0][1] * step / max(1, steps[0])
        if i == len(steps):
            return timed[-1][1]
        (s0, t0), (s1, t1) = timed[i - 1], timed[i]
        return t0 + (t1 - t0) * (step - s0) / max(1, s1 - s0)

    # Anchors (training seconds -> wall minutes): the start, each image-size change of a run whose
    # schedules followed the clock (it happened at that fraction of the budget), and the end.
    anchors = [(0.0, 0.0)]
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    if cfg.optim.get("schedule_by_time") and cfg.data.get("img_size_schedule"):
        sizes = sorted((int(r["step"]), int(float(r["train/img_size"]))) for r in rows if r.get("train/img_size"))
        for fraction, size in sorted(map(tuple, cfg.data.img_size_schedule))[1:]:
            first = next((step for step, s in sizes if s == size), None)
            if first is not None:
                anchors.append((train_time(first), fraction * fit_minutes))
    anchors.append((train_time(val[-1][0]), fit_minutes))

    def minutes(seconds: float) -> float:
        i = min(max(1, bisect.bisect_left([a for a, _ in anchors], seconds)), len(anchors) - 1)
        (a0, m0), (a1, m1) = anchors[i - 1], anchors[i]
        return m0 + (m1 - m0) * (seconds - a0) / max(1e-9, a1 - a0)

    return [(minutes(train_time(s)), a, s) for s, a in val], True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output", type=Path)
    p.add_argument("--run", type=_label_path, action="append", default=[], help="LABEL=vit-train run dir")
    p.add_argument("--csv", type=_label_path, action="append", default=[], help="LABEL=timm_baseline.py CSV")
    p.add_argument("--fit-minutes", type=float, default=30.0, help="the runs' time budget (for estimated minutes)")
    p.add_argument("--title", default="CIFAR-10 validation accuracy, 2 CPU cores")
    args = p.parse_args()
    if not args.run and not args.csv:
        raise SystemExit("error: give at least one --run LABEL=DIR or --csv LABEL=FILE")
    fig, ax = plt.subplots(figsize=(6.4, 4))

    def draw(label: str, points: list[tuple[float, float, int]], style: str) -> None:
        # The legend carries each run's step count beside its minutes: machines' speeds drift.
        best = max(a for _, a, _ in points)
        legend = f"{label}: {best:.2%}, {points[-1][2]:,} steps in {points[-1][0]:.0f} min"
        ax.plot([m for m, _, _ in points], [a for _, a, _ in points], style, ms=3, label=legend)
        print(label, " ".join(f"{m:.1f}min/{s}:{a:.2%}" for m, a, s in points))

    for label, run_dir in args.run:
        points, estimated = run_curve(run_dir, args.fit_minutes)
        draw(f"{label} (minutes est.)" if estimated else label, points, "o-")
    for label, path in args.csv:
        if not path.is_file():
            raise SystemExit(f"error: {path} not found: --csv takes scripts/timm_baseline.py's output")
        rows = list(csv.DictReader(open(path)))
        if not rows:
            raise SystemExit(f"error: {path} has no evaluations")
        draw(label, [(float(r["minutes"]), float(r["val_acc"]), int(r["step"])) for r in rows], "s--")
    ax.set_xlabel("wall-clock minutes (training + validation)")
    ax.set_ylabel("validation accuracy (5,000 images)")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: no curve hidden
    args.output.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, args.output, dpi=100)
    print(args.output)


if __name__ == "__main__":
    main()
