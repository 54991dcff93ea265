"""Lightning callbacks of this project: attention rollout drawn while the model trains.

`callbacks=attention` adds `AttentionRolloutMonitor` to the default callbacks; without it nothing
of this runs."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from vit.attention import attention_maps, check_rollout_options, overlay, rollout
from vit.outputs import plt


class AttentionRolloutMonitor(L.Callback):
    """Every `every_n_epochs` epochs, after validation, draw attention rollout for `num_images`
    validation images (evenly spaced over the split, the same ones each time) and hand the figure to each logger:
    TensorBoard gets it as an image (`attention/rollout`), the CSV logger as
    `attention/rollout_epoch<N>.png` in its folder; with neither, the PNG goes to the run folder's
    `attention/`. Rank 0 only; one forward pass of `num_images` through the explicit attention path."""

    def __init__(
        self, every_n_epochs: int = 1, num_images: int = 8, head_fusion: str = "mean", discard_ratio: float = 0.0
    ) -> None:
        check_rollout_options(head_fusion, discard_ratio)
        self.every_n_epochs, self.num_images = every_n_epochs, num_images
        self.head_fusion, self.discard_ratio = head_fusion, discard_ratio

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        dm, net = trainer.datamodule, pl_module.net
        # Evenly spaced over the split (which is ordered by class): several classes, the same images each time.
        every = torch.linspace(0, len(dm.val_set) - 1, min(self.num_images, len(dm.val_set))).long()
        images = dm.val_set.images[every]  # uint8 (n, C, H, W)
        maps = attention_maps(net, dm.pipeline.normalize(images.to(pl_module.device)))
        heat = rollout(
            maps.float().cpu(),
            self.head_fusion,
            self.discard_ratio,
            net.num_prefix_tokens,
            net.patch_embed.grid_size,
            class_token=net.cls_token is not None,
        )
        epoch = trainer.current_epoch
        fig = self.figure(images, heat, f"attention rollout, epoch {epoch} (step {trainer.global_step})", net)
        tensorboard = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        folders = [Path(lg.log_dir) for lg in trainer.loggers if isinstance(lg, CSVLogger)]
        for logger in tensorboard:
            logger.experiment.add_figure("attention/rollout", fig, global_step=trainer.global_step, close=False)
        if not tensorboard and not folders:  # W&B, MLflow or no logger: the run folder
            folders = [Path(trainer.default_root_dir)]
        for folder in folders:
            (folder / "attention").mkdir(parents=True, exist_ok=True)
            fig.savefig(folder / "attention" / f"rollout_epoch{epoch:03d}.png", dpi=90, bbox_inches="tight")
        plt.close(fig)

    def figure(self, images: torch.Tensor, heat: torch.Tensor, title: str, net: torch.nn.Module) -> plt.Figure:
        n = len(images)
        fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 2.0), squeeze=False)
        for ax, image, h in zip(axes[0], images, heat):
            overlay(ax, image, h, "")
        skipped = f"; {net.num_reg_tokens} register tokens skipped" if net.num_reg_tokens else ""
        fig.suptitle(f"{title} ({self.head_fusion}{skipped})", fontsize=8)
        fig.tight_layout()
        return fig
