"""LightningModule: wraps the network with loss, metrics, optimizer and schedule.

Hyperparameters are plain dicts of primitives, so checkpoints load with
`torch.load(..., weights_only=True)`; the checkpoint also records the class names and the
input normalization (`checkpoint["vit"]`), which is what `vit.load_model` rebuilds from.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import Timer
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vit.model import VisionTransformer


def check_img_size_schedule(schedule: list[list[float]] | None, net: VisionTransformer) -> list[tuple[float, int]]:
    """optim.img_size_schedule as sorted (fraction, size) pairs; ValueError when `net` cannot run it."""
    pairs = []
    for item in schedule or []:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ValueError(f"optim.img_size_schedule entries are [fraction, size] pairs, got {item!r}")
        pairs.append((float(item[0]), int(item[1])))
    pairs.sort()
    if pairs:
        patch = net.patch_embed.patch_size
        if not net.dynamic_img_size:
            raise ValueError("optim.img_size_schedule needs model.dynamic_img_size=true")
        if pairs[0][0] != 0 or pairs[-1][0] >= 1 or any(sz <= 0 or sz % patch[0] or sz % patch[1] for _, sz in pairs):
            raise ValueError(
                f"optim.img_size_schedule={schedule} must start at fraction 0, keep fractions below 1 and "
                f"use sizes that are positive multiples of the patch size {patch}"
            )
    return pairs


class ViTClassifier(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        label_smoothing: float = 0.1,
        schedule_by_time: bool = False,
        img_size_schedule: list[list[float]] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = VisionTransformer(**model)
        # Progressive resizing: [[fraction, size], ...] trains at `size` px from that fraction of
        # the run on (e.g. [[0, 16], [0.5, 24], [0.75, 32]]); validation stays at the full size.
        self.img_size_schedule = check_img_size_schedule(img_size_schedule, self.net)
        self._total_steps = 1
        # torch.compile wraps the same module, so parameter names and checkpoints are unchanged;
        # kept out of the module registry (no second copy of the weights in the state dict).
        self.__dict__["_compiled"] = torch.compile(self.net) if compile else None
        k = self.net.num_classes
        self.train_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers its best
        # Set by the training script from the DataModule; saved into every checkpoint.
        self.data_info: dict[str, Any] = {}
        # Fraction of trainer.max_time spent so far (schedule_by_time); refreshed every step.
        self._time_fraction = 0.0

    def setup(self, stage: str) -> None:
        full = tuple(self.net.patch_embed.img_size)
        self._train_hw, self._flops_by_hw = full, {}
        if stage == "fit" and self.trainer is not None and self.trainer.datamodule is not None:
            # Training FLOPs of one batch (forward + backward) at every training size, counted on
            # the meta device now: ThroughputMonitor reads flops_per_batch under inference mode,
            # where no backward can run.
            batch, chans = self.trainer.datamodule.batch_size, self.net.patch_embed.in_chans
            with torch.device("meta"):
                net = VisionTransformer(**self.net.config)
            for hw in {full, *((sz, sz) for _, sz in self.img_size_schedule)}:
                x = torch.empty(batch, chans, *hw, device="meta")
                self._flops_by_hw[hw] = measure_flops(net, lambda x=x: net(x), lambda y: y.sum())

    @property
    def flops_per_batch(self) -> int | None:
        """FLOPs of the last training batch at the size it ran at (img_size_schedule changes it):
        Lightning's ThroughputMonitor reads this every step to report achieved FLOP/s."""
        return getattr(self, "_flops_by_hw", {}).get(getattr(self, "_train_hw", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compiled(x) if self._compiled is not None else self.net(x)

    # -- steps ----------------------------------------------------------------------------
    def train_img_size(self) -> int | None:
        """The training resolution now under img_size_schedule (None: no schedule)."""
        done = max(self.trainer.global_step / self._total_steps, self._time_fraction)
        sizes = [sz for start, sz in self.img_size_schedule if start <= done]
        return sizes[-1] if sizes else None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # y: class indices (B,) or mixup/cutmix soft targets (B, K)
        size = self.train_img_size() if self.img_size_schedule else None
        if size is not None and size != x.shape[-1]:
            # Downscale the whole batch (antialiased), so early steps see fewer patch tokens.
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        self._train_hw = tuple(x.shape[-2:])
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}; "
                "lower the learning rate or check the data. The last good checkpoint is kept."
            )
        hard = y.argmax(dim=1) if y.ndim == 2 else y
        self.train_loss(loss.detach())
        self.train_acc(logits.detach(), hard)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        getattr(self, f"{stage}_loss")(loss)
        getattr(self, f"{stage}_acc")(logits, y)
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", getattr(self, f"{stage}_acc"), on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    # -- optimization ---------------------------------------------------------------------
    def _timer(self) -> Timer | None:
        """Lightning's Timer callback, present when trainer.max_time is set."""
        timers = [c for c in self.trainer.callbacks if isinstance(c, Timer) and c.time_remaining() is not None]
        return timers[0] if timers else None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.hparams.schedule_by_time:
            return
        step = self.trainer.global_step
        # Every rank must use the same learning rate: rank 0's clock, broadcast (every 10 steps
        # when there are several processes, so the collective stays off most steps).
        if self.trainer.world_size == 1 or step % 10 == 0:
            timer = self._timer()
            fraction = timer.time_elapsed() / (timer.time_elapsed() + timer.time_remaining())
            self._time_fraction = float(self.trainer.strategy.broadcast(fraction))

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        skip = self.net.no_weight_decay()
        decay, no_decay = [], []
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            # Biases, LayerNorm/LayerScale vectors, pos_embed and cls_token get no weight decay.
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.betas),
        )
        total = self._total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(total - 1, int(hp.warmup_epochs * steps_per_epoch))
        if hp.schedule_by_time and self._timer() is None:
            raise ValueError("optim.schedule_by_time=true needs a time budget: set trainer.max_time")

        def lr_factor(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio
            if step < warmup:
                return (step + 1) / (warmup + 1)
            # Progress through the run: by steps, or by the time budget when that runs out first
            # (schedule_by_time), so a slower machine still finishes the decay inside max_time.
            done = max(step / total, self._time_fraction)
            w = warmup / total
            progress = min(1.0, max(0.0, (done - w) / max(1e-8, 1 - w)))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Self-describing: rebuild the network and its preprocessing from the file alone.
        checkpoint["vit"] = {"model_config": dict(self.net.config), **self.data_info}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.data_info = {k: v for k, v in checkpoint.get("vit", {}).items() if k != "model_config"}
