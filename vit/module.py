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
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from vit.model import VisionTransformer


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
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = VisionTransformer(**model)
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

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer is not None and self.trainer.datamodule is not None:
            # Training FLOPs of one batch (forward + backward), counted on the meta device: lets
            # Lightning's ThroughputMonitor report achieved FLOP/s beside images/second.
            dm = self.trainer.datamodule
            with torch.device("meta"):
                net = VisionTransformer(**self.net.config)
                x = torch.empty(dm.batch_size, self.net.patch_embed.in_chans, *self.net.patch_embed.img_size)
            self.flops_per_batch = measure_flops(net, lambda: net(x), lambda y: y.sum())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._compiled(x) if self._compiled is not None else self.net(x)

    # -- steps ----------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch  # y: class indices (B,) or mixup/cutmix soft targets (B, K)
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
        total = max(1, int(self.trainer.estimated_stepping_batches))
        steps_per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(total - 1, int(hp.warmup_epochs * steps_per_epoch))

        def lr_factor(step: int) -> float:  # linear warmup, then cosine down to min_lr_ratio
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Self-describing: rebuild the network and its preprocessing from the file alone.
        checkpoint["vit"] = {"model_config": dict(self.net.config), **self.data_info}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.data_info = {k: v for k, v in checkpoint.get("vit", {}).items() if k != "model_config"}
