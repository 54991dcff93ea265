"""LightningModule: the network with its loss, metrics and optimizer wiring.

Hyperparameters are plain dicts of primitives (`hparams.model` is the network's complete
constructor config), so checkpoints load with `torch.load(..., weights_only=True)` and the network
is rebuilt from the file alone. The learning rate follows the run's one measure of progress,
`vit.schedule.RunClock`, which this module adds to the Trainer's callbacks.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vit.errors import DivergedError
from vit.model import VisionTransformer, zero_residuals_
from vit.optim import build_optimizer
from vit.schedule import RunClock, lookahead_alpha, lr_factor, parse_depth_schedule, parse_patch_drop_schedule, value_at
from vit.tta import tta_logits


def compile_static(net: torch.nn.Module) -> torch.nn.Module:
    """torch.compile with one static graph per input shape (`dynamic=False`).

    By default torch compiles again when a shape changes and then treats the changed sizes as
    symbolic, so a progressive-resizing run (16 to 32 px, validated at 32) trains on general
    graphs. In `vit-train experiment=cpu_30min model.compile=true` on 2 cores, static graphs kept
    the eager run's pace (8,896 and 8,559 steps in 30 minutes against 8,813 eager the same day)
    where the default had lost 5% (8,103 against 8,551; README). Under bf16 autocast a bare step ran 1.35x /
    1.23x eager's at 16 / 32 px on a 2-core Zen 4, yet a 30-minute run took no more steps than eager the
    same night (README). Each shape costs one compile (~11 s there in fp32, 18-27 s in bf16):
    the schedule's sizes, evaluation (no grad) and its last partial batch; the limit on recompiles
    is raised so that none of them falls back to eager.
    """
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    return torch.compile(net, dynamic=False)


class ViTClassifier(L.LightningModule):
    def __init__(
        self,
        model: dict[str, Any],
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 1.0,
        min_lr_ratio: float = 0.01,
        lr_decay: str = "cosine",
        label_smoothing: float = 0.1,
        schedule_by_time: bool = False,
        scale_lr_with_world_size: bool = False,
        muon_lr: float | None = None,
        muon_momentum: float = 0.95,
        muon_weight_decay: float = 0.0,
        fused: bool = False,
        lookahead_k: int | None = None,
        lookahead_decay: float = 0.774,
        lookahead_power: float = 3.0,
        patch_drop_schedule: list[list[float]] | None = None,
        depth_schedule: list[list[int]] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.net = VisionTransformer(**model)
        self.save_hyperparameters()
        self.hparams["model"] = dict(self.net.config)  # every constructor argument, defaults included
        # torch.compile wraps the same module, so parameter names and checkpoints are unchanged;
        # kept out of the module registry (no second copy of the weights in the state dict).
        self.__dict__["_compiled"] = compile_static(self.net) if compile else None
        self.clock = RunClock(by_time=schedule_by_time)
        # [[fraction, rate], ...]: the share of patch tokens the network drops in training, set
        # before each step from the run clock (None: model.patch_drop_rate throughout).
        self.patch_drop_schedule = parse_patch_drop_schedule(patch_drop_schedule)
        # [[fraction, blocks], ...]: the network grows, training its first `blocks` blocks from that
        # fraction on (cheaper steps while shallow). The blocks it holds back start as identities,
        # so the network skipping them and the network running them (a checkpoint) are the same.
        self.depth_schedule = parse_depth_schedule(depth_schedule, len(self.net.blocks))
        if self.depth_schedule:
            for blk in self.net.blocks[self.depth_schedule[0][1] :]:
                zero_residuals_(blk)
        k = self.net.num_classes
        self.train_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.test_acc_tta = MulticlassAccuracy(num_classes=k, average="micro")
        self.val_acc_tta = MulticlassAccuracy(num_classes=k, average="micro")
        # vit.tta modes ("hflip", "hflip_translate"), set by vit-train's test_tta for the final
        # evaluations: the test also reports test/acc_tta; a validation pass with val_tta set
        # reports val/acc_tta alone (the best checkpoint's plain accuracy is val/acc_best).
        self.test_tta: str | None = None
        self.val_tta: str | None = None
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # kept in checkpoints, so a resumed run remembers its best
        self._flops: dict[tuple[tuple[int, ...], float], int] = {}
        # Lightning's ThroughputMonitor reads this after each step to report FLOP/s (None: not yet known).
        self.flops_per_batch: int | None = None

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.clock]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compiled(x) if self._compiled is not None else self.net(x)

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # x: at the scheduled size; y: class indices (B,) or mixup/cutmix soft targets (B, K)
        self.flops_per_batch = self._training_flops(tuple(x.shape))
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise DivergedError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}; "
                "lower the learning rate or check the data. The last good checkpoint is kept."
            )
        hard = y.argmax(dim=1) if y.ndim == 2 else y
        # The epoch's metrics are updated here and logged once, at the epoch's end: logging a
        # torchmetrics object each step costs Lightning ~1 ms (it moves the metric to the
        # device on every call), ~1.5% of a 16 px step (scripts/benchmark.py --loop).
        self.train_loss.update(loss.detach())
        self.train_acc.update(logits.detach(), hard)
        self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/img_size", float(x.shape[-1]), on_step=True, on_epoch=False)  # progressive resizing
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/loss_epoch", self.train_loss.compute())
        self.log("train/acc", self.train_acc.compute(), prog_bar=True)
        self.train_loss.reset()
        self.train_acc.reset()

    def _training_flops(self, shape: tuple[int, ...]) -> int:
        """FLOPs of a forward + backward at this batch shape, patch-drop rate and number of running
        blocks, counted once per combination on the meta device (here, in grad mode: ThroughputMonitor reads it under inference mode)."""
        key = (shape, self.net.patch_drop.prob, self.net.active_blocks or len(self.net.blocks))
        if key not in self._flops:
            with torch.device("meta"):
                net = VisionTransformer(**{**self.net.config, "patch_drop_rate": key[1], "depth": key[2]})
            x = torch.empty(shape, device="meta")
            self._flops[key] = measure_flops(net, lambda: net(x), lambda y: y.sum())
        return self._flops[key]

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        getattr(self, f"{stage}_loss")(loss)
        getattr(self, f"{stage}_acc")(logits, y)
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"), on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", getattr(self, f"{stage}_acc"), on_epoch=True, prog_bar=True)
        return logits

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if self.val_tta:
            x, y = batch
            self.val_acc_tta(tta_logits(self, x, self.val_tta), y)
            self.log("val/acc_tta", self.val_acc_tta, on_epoch=True, prog_bar=True)
            return
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self.val_tta:
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True)
        self.log("time/minutes", self.clock.minutes())  # wall clock since training started

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits = self._eval_step(batch, "test")
        if self.test_tta:  # test/acc stays the plain accuracy; test/acc_tta averages the TTA views
            x, y = batch
            self.test_acc_tta(tta_logits(self, x, self.test_tta, logits), y)
            self.log("test/acc_tta", self.test_acc_tta, on_epoch=True, prog_bar=True)

    # -- optimization ---------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; with optim.muon_lr, Muon for the blocks' weight matrices; with optim.lookahead_k,
        inside Lookahead (vit.optim)."""
        hp, scale = self.hparams, self.peak_lr() / self.hparams.lr
        muon_lr = hp.muon_lr * scale if hp.muon_lr is not None else None
        return build_optimizer(
            self.net,
            self.peak_lr(),
            hp.weight_decay,
            hp.betas,
            muon_lr,
            hp.muon_momentum,
            hp.muon_weight_decay,
            hp.lookahead_k,
            hp.fused,
        )

    def peak_lr(self) -> float:
        """optim.lr (and optim.muon_lr in proportion), times the Trainer's world size with scale_lr_with_world_size (the linear
        scaling rule: lr is for one process's batch, and the Trainer knows how many there are)."""
        return self.hparams.lr * (self.trainer.world_size if self.hparams.scale_lr_with_world_size else 1)

    def on_train_start(self) -> None:
        self._follow_schedules()

    def on_train_batch_end(self, *args: Any) -> None:
        self._follow_schedules()

    def _follow_schedules(self) -> None:
        """Set the learning rate, the patch-drop rate and the blocks trained for the next step from
        the run's progress (the clock has just been refreshed: callbacks' hooks run before the module's)."""
        rate = value_at(self.clock.fraction, self.patch_drop_schedule)
        if rate is not None:
            self.net.patch_drop.prob = rate
        blocks = value_at(self.clock.fraction, self.depth_schedule)
        if blocks is not None:
            self.net.active_blocks = int(blocks)
        hp = self.hparams
        warmup = self.clock.epochs_to_fraction(hp.warmup_epochs)
        factor = lr_factor(self.clock.fraction, warmup, hp.min_lr_ratio, hp.lr_decay)
        alpha = lookahead_alpha(self.clock.fraction, hp.lookahead_decay, hp.lookahead_power)
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                if "lookahead_alpha" in group:  # timm's Lookahead wraps the optimizer (optim.lookahead_k)
                    group["lookahead_alpha"] = alpha
                # setdefault: optimizer states resumed from checkpoints of before the run clock lack it.
                group["lr"] = group.setdefault("peak_lr", self.peak_lr()) * factor
