"""How far through the run we are, and the schedules that follow it.

One number drives every schedule (the learning rate, the training image size, the random crop's
padding, the share of patch tokens dropped, the number of blocks trained, Lookahead's alpha):
the fraction of the run done, a pure function of the step count and the clock (`run_fraction`).
`RunClock`, a Lightning callback, refreshes it once per step; the schedules read `clock.fraction`
and are plain functions of it (`lr_factor`, `lookahead_alpha`, `value_at` for piecewise-constant schedules).

When is it refreshed? Lightning moves a batch to the device (where the data side applies the
image-size schedule) before `on_train_batch_start`, so the clock is refreshed at `on_train_start`
and at the end of every step (`on_train_batch_end`, after the optimizer step): `fraction` is then
the part of the run done before the next step, and that step's batch and learning rate both read
the same value.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import lightning as L
from lightning.pytorch.callbacks import Timer

from vit.errors import ConfigError


def run_fraction(step: int, total_steps: float, elapsed_s: float | None = None, budget_s: float | None = None) -> float:
    """Fraction of the run done, in [0, 1]: `step` of `total_steps`, or the time spent of a time
    budget when one is given and it runs out first (a slow machine still ends its schedules)."""
    done = step / total_steps if total_steps > 0 else 0.0
    if budget_s:
        done = max(done, (elapsed_s or 0.0) / budget_s)
    return min(1.0, max(0.0, done))


LR_DECAYS = ("cosine", "linear")


def lr_factor(fraction: float, warmup: float, min_lr_ratio: float, decay: str = "cosine") -> float:
    """Multiplier of the peak learning rate at `fraction` of the run: linear from 0 over the first
    `warmup` of the run, then down to `min_lr_ratio` at the end, along a half cosine (`decay`
    "cosine") or a straight line ("linear": below the cosine in the first half of the decay, above
    it in the second, so less of the run is spent near the floor)."""
    if decay not in LR_DECAYS:
        raise ConfigError(f"optim.lr_decay={decay!r} is not one of {list(LR_DECAYS)}")
    if fraction < warmup:
        return fraction / warmup
    progress = min(1.0, (fraction - warmup) / (1.0 - warmup)) if warmup < 1.0 else 1.0
    remaining = 1.0 - progress if decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * remaining


def lookahead_alpha(fraction: float, decay: float, power: float) -> float:
    """Lookahead's step toward the fast weights at `fraction` of the run: 1 - decay x fraction^power
    (1 at the start: no averaging; 1 - decay at the end)."""
    return 1.0 - decay * fraction**power


def parse_schedule(
    schedule: Sequence[Sequence[float]] | None, key: str, value: str, ok: Callable[[float], bool], allowed: str
) -> list[tuple[float, float]]:
    """[[fraction, value], ...] (the config key `key`; `value` names the value) as sorted
    (fraction, value) pairs, starting at fraction 0 with fractions below 1 and every value `ok`;
    ConfigError for anything else."""
    pairs = []
    for item in schedule or []:
        if not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2:
            raise ConfigError(f"{key} entries are [fraction, {value}] pairs, got {item!r}")
        pairs.append((float(item[0]), item[1]))
    pairs.sort()
    if pairs and (pairs[0][0] != 0 or pairs[-1][0] >= 1 or not all(ok(v) for _, v in pairs)):
        raise ConfigError(
            f"{key}={[list(p) for p in pairs]} must start at fraction 0, keep fractions below 1 and use {allowed}"
        )
    return pairs


def parse_img_size_schedule(schedule: Sequence[Sequence[float]] | None) -> list[tuple[float, int]]:
    """data.img_size_schedule: [[fraction, size], ...]. (That the sizes fit the model's patch is
    checked with the model config: `vit.config`.)"""
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
    return parse_schedule(schedule, "data.img_size_schedule", "size", ok, "positive integer sizes")  # type: ignore[return-value]


def parse_crop_padding_schedule(schedule: Sequence[Sequence[float]] | None) -> list[tuple[float, int]]:
    """data.crop_padding_schedule: [[fraction, padding], ...], paddings non-negative integers. (That
    they fit the image, and that the crop runs on batches, is checked with the data config.)"""
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    return parse_schedule(schedule, "data.crop_padding_schedule", "padding", ok, "non-negative integer paddings")  # type: ignore[return-value]


def parse_patch_drop_schedule(schedule: Sequence[Sequence[float]] | None) -> list[tuple[float, float]]:
    """optim.patch_drop_schedule: [[fraction, rate], ...], rates in [0, 1)."""
    ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1  # noqa: E731
    return [
        (f, float(v)) for f, v in parse_schedule(schedule, "optim.patch_drop_schedule", "rate", ok, "rates in [0, 1)")
    ]


def parse_depth_schedule(schedule: Sequence[Sequence[float]] | None, depth: int) -> list[tuple[float, int]]:
    """optim.depth_schedule: [[fraction, blocks], ...]: train the first `blocks` of the model's
    `depth` blocks from that fraction of the run on (a model grown by stacking blocks). Blocks are
    only ever added, and the last entry runs all `depth`: the network trained is the whole model."""
    ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= depth  # noqa: E731
    allowed = f"block counts from 1 to model.depth={depth}"
    pairs = parse_schedule(schedule, "optim.depth_schedule", "blocks", ok, allowed)
    counts = [blocks for _, blocks in pairs]
    if pairs and (counts != sorted(counts) or counts[-1] != depth):
        raise ConfigError(
            f"optim.depth_schedule={[list(p) for p in pairs]} must only add blocks and end with all "
            f"model.depth={depth} blocks: a block taken out after it has trained would change the network"
        )
    return pairs  # type: ignore[return-value]


def value_at(fraction: float, schedule: Sequence[tuple[float, float]]) -> float | None:
    """A piecewise-constant schedule's value at `fraction` of the run (None: no schedule)."""
    values = [value for start, value in schedule if start <= fraction]
    return values[-1] if values else None


def img_size_at(fraction: float, schedule: Sequence[tuple[float, int]]) -> int | None:
    """The training image size at `fraction` of the run (None: no schedule, keep the data's size)."""
    return value_at(fraction, schedule)  # type: ignore[return-value]


class RunClock(L.Callback):
    """The run's one measure of progress, `fraction` in [0, 1], refreshed once per step.

    `by_time`: count the time spent of `trainer.max_time` too (whichever is further along wins).
    Every process must follow the same schedule, so with several processes rank 0's clock is
    broadcast, every `sync_every` steps (the collective stays off most steps).
    """

    def __init__(self, by_time: bool = False, sync_every: int = 10) -> None:
        self.by_time, self.sync_every = by_time, sync_every
        self.fraction = 0.0
        self.total_steps = 1.0  # optimizer steps the run may take (trainer.estimated_stepping_batches)
        self.steps_per_epoch = 1
        self._time: tuple[float, float] | None = None  # (elapsed, budget) seconds, rank 0's
        self._started: float | None = None  # perf_counter() when this process started training

    @staticmethod
    def of(trainer: L.Trainer) -> RunClock | None:
        """The trainer's clock (the LightningModule adds one through `configure_callbacks`)."""
        return next((c for c in trainer.callbacks if isinstance(c, RunClock)), None)

    @staticmethod
    def _timer(trainer: L.Trainer) -> Timer | None:
        """Lightning's Timer callback, present when trainer.max_time is set."""
        return next((c for c in trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None), None)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.by_time and self._timer(trainer) is None:
            raise ConfigError("optim.schedule_by_time=true needs a time budget: set trainer.max_time (DD:HH:MM:SS)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total_steps = float(trainer.estimated_stepping_batches)
        self.steps_per_epoch = max(1, math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches))
        self._started = time.perf_counter()
        self.refresh(trainer, sync=True)

    def minutes(self) -> float:
        """Wall-clock minutes since training started in this process (validation included): the
        x axis of a time-to-accuracy curve."""
        return (time.perf_counter() - self._started) / 60 if self._started is not None else 0.0

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.refresh(trainer, sync=trainer.global_step % self.sync_every == 0)

    def refresh(self, trainer: L.Trainer, sync: bool) -> None:
        if self.by_time and (sync or trainer.world_size == 1 or self._time is None):
            timer = self._timer(trainer)
            elapsed = timer.time_elapsed()
            time = (elapsed, elapsed + timer.time_remaining())
            self._time = tuple(trainer.strategy.broadcast(time)) if trainer.world_size > 1 else time
        self.fraction = run_fraction(trainer.global_step, self.total_steps, *(self._time or (None, None)))

    def epochs_to_fraction(self, epochs: float) -> float:
        """A length in epochs as a fraction of the run (by steps), at most 1."""
        return min(1.0, epochs * self.steps_per_epoch / self.total_steps)
