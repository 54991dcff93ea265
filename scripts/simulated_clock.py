"""A time-boxed run (`experiment=cpu_30min`) on any machine, step for step as a given CPU takes it.

With `optim.schedule_by_time=true` every schedule (learning rate, image size) follows the wall
clock, so the same preset takes different steps on every machine, and a GPU would run it as a
different recipe. This script swaps the run's clock (`vit.schedule.RunClock`) for a simulated one:
each optimizer step costs the CPU's measured time per step at the image size it trained at, and
the run ends when those costs fill the budget. Everything else is `vit-train`, unchanged. On a GPU
that turns a 30-minute CPU benchmark into a few minutes, and several of them run side by side, so
a lever can be measured over seeds instead of once:

    python scripts/simulated_clock.py -- experiment=cpu_30min data=folder data.root=$HOME/data/cifar10-jpeg \\
        trainer.accelerator=gpu callbacks.progress=null seed=1 data.seed=42 optim.weight_decay=0.3

Everything after `--` is passed to `vit-train` (`seed` varies the run, `data.seed=42` keeps the
validation split). The costs are the medians of a 2-core AMD EPYC's 30-minute run of the preset
when it was 128 wide (2026-11-26, batch 256: 3,405 / 2,160 / 1,455 / 1,049 / 798 img/s at 16 / 20 /
24 / 28 / 32 px, 11,583 steps); the default budget, 1,544 s of step time, gives that model 11,585
steps (the rest of its 30 minutes went to validation and epoch ends). For the preset's 112-wide
model the default costs are those divided by 112 wide's bare-step speed relative to 128 wide's, as
`scripts/benchmark.py --variant embed_dim=112 --img-size-at S --batch-size 256` measured it on a 2-core
Intel Xeon (1.17-1.21x: 13,735 steps). Another shape needs its own `--step-ms` (measured the same
way): the defaults fit the preset's fp32 112-wide model only, and a run that builds another model
without --step-ms is refused before its first step (on a host whose CPU multiplies bf16 in hardware,
AMX or AVX512-BF16, the preset resolves to 128 wide in bf16: add `model.embed_dim=112
trainer.precision=32-true model.fused_attn=true`, or pass its costs, `AMX_BF16_STEP_MS` with
`--budget-s 1682`). What it does not model: the CPU's own
floating-point results (fp32 on the GPU too, the preset's precision) and the order in which a
slower or faster minute falls.
"""

from __future__ import annotations

import argparse
import sys

import lightning as L

import vit.module
from vit.errors import ConfigError
from vit.schedule import RunClock, img_size_at

# Median milliseconds per step of 256 images on the machine named above, by training image size,
# for the 128-wide model (pass these as --step-ms to rerun the twenty-third session's sweeps).
WIDE_128_STEP_MS = {16: 256e3 / 3405, 20: 256e3 / 2160, 24: 256e3 / 1455, 28: 256e3 / 1049, 32: 256e3 / 798}
# The preset's 112-wide model: a bare step's speed relative to 128 wide's, by image size (above).
WIDE_112_SPEEDUP = {16: 1.170, 20: 1.203, 24: 1.207, 28: 1.195, 32: 1.210}
FAST_CPU_STEP_MS = {size: ms / WIDE_112_SPEEDUP[size] for size, ms in WIDE_128_STEP_MS.items()}
FAST_CPU_BUDGET_S = 1544.0
# The model those default costs were measured for: a run that builds another is refused unless it
# brings its own --step-ms (on a host whose CPU multiplies bf16 in hardware the preset resolves to 128 wide).
FAST_CPU_SHAPE = {"embed_dim": 112, "depth": 3, "num_heads": 4, "mlp_ratio": 2.0, "patch_size": 4}
# The preset as a CPU with AMX units resolves it (128 wide, bf16 autocast, the attention's explicit maths),
# on a 2-core Intel Xeon (2026-12-04): the medians of its 30-minute run by image size (5,523 / 3,522 /
# 2,691 / 1,975 / 1,591 img/s) and its step time (1,682 s in 17,139 steps). Not the defaults: pass them as
# --step-ms and --budget-s to sweep that recipe on a GPU.
AMX_BF16_STEP_MS = {16: 256e3 / 5523, 20: 256e3 / 3522, 24: 256e3 / 2691, 28: 256e3 / 1975, 32: 256e3 / 1591}
AMX_BF16_BUDGET_S = 1682.0


class SimulatedClock(RunClock):
    """RunClock whose fraction is simulated CPU time spent / `budget_s`: each step adds
    `step_ms[size]`, the size being the one the step trained at (the schedule's, read at the
    fraction that step's batch read). Stops the run when the budget is spent."""

    def __init__(
        self, step_ms: dict[int, float], budget_s: float, shape: dict[str, object] | None = None, **_: object
    ) -> None:
        super().__init__(by_time=False)  # the module's by_time is ignored: this clock is the time
        self.step_ms, self.budget_ms, self.shape = step_ms, budget_s * 1000, shape
        self.spent_ms, self._counted = 0.0, 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.shape is not None:  # costs measured for one model: another would take the wrong steps
            built = {key: pl_module.net.config[key] for key in self.shape}
            if built != self.shape:
                differ = " ".join(f"model.{k}={v}" for k, v in built.items() if v != self.shape[k])
                wanted = " ".join(f"model.{k}={v}" for k, v in self.shape.items() if v != built[k])
                raise ConfigError(
                    f"the default step costs are the fp32 112-wide preset's, but this run builds {differ}: "
                    f"override {wanted} (with trainer.precision=32-true model.fused_attn=true for the fp32 "
                    f"preset), or pass that model's measured --step-ms and --budget-s"
                )
        dm = trainer.datamodule
        sizes = {size for _, size in dm.img_size_schedule} or {dm.img_size[0]}
        if missing := sorted(sizes - self.step_ms.keys()):
            raise ConfigError(
                f"the run trains at {missing} px but --step-ms has costs for {sorted(self.step_ms)} px only"
            )
        self._counted = trainer.global_step  # a resumed run's earlier steps are in spent_ms already
        super().on_train_start(trainer, pl_module)

    # Kept in checkpoints, so a run resumed from last.ckpt continues its simulated time.
    def state_dict(self) -> dict[str, float]:
        return {"spent_ms": self.spent_ms}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.spent_ms = float(state_dict["spent_ms"])

    def _size(self, trainer: L.Trainer) -> int:
        dm = trainer.datamodule
        return img_size_at(self.fraction, dm.img_size_schedule) if dm.img_size_schedule else dm.img_size[0]

    def refresh(self, trainer: L.Trainer, sync: bool) -> None:
        steps = trainer.global_step - self._counted
        if steps > 0:
            self.spent_ms += steps * self.step_ms[self._size(trainer)]
            self._counted = trainer.global_step
        self.fraction = min(1.0, self.spent_ms / self.budget_ms)
        if self.fraction >= 1.0:
            trainer.should_stop = True


def parse_step_ms(text: str) -> dict[int, float]:
    """SIZE=MS pairs, "16=75.2,20=118.5" -> {16: 75.2, 20: 118.5}; argparse's error for anything else."""
    try:
        costs = {int(size): float(ms) for size, ms in (item.split("=") for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE=MS pairs separated by commas, got {text!r}") from None
    if not all(ms > 0 for ms in costs.values()):
        raise argparse.ArgumentTypeError(f"step costs must be positive milliseconds, got {text!r}")
    return costs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step-ms", type=parse_step_ms, default=None, help="SIZE=MS,...: a step's cost")
    p.add_argument("--budget-s", type=float, default=FAST_CPU_BUDGET_S, help="seconds of step time the run gets")
    args = p.parse_args(argv[:split])
    if args.budget_s <= 0:
        p.error(f"--budget-s must be positive, got {args.budget_s}")

    # Without --step-ms, the default costs, and the model they were measured for.
    step_ms, shape = (FAST_CPU_STEP_MS, FAST_CPU_SHAPE) if args.step_ms is None else (args.step_ms, None)
    # vit.module builds the run's clock by this name; the simulated one takes its place.
    vit.module.RunClock = lambda **kw: SimulatedClock(step_ms, args.budget_s, shape, **kw)  # type: ignore[misc]
    from vit.train import main as vit_train

    sys.argv = ["vit-train", *argv[split + 1 :]]
    vit_train()


if __name__ == "__main__":
    main()
