"""`vit-train`: compose the config, build data, model and Trainer, fit, test the best checkpoint.

vit-train                                   # default recipe on CIFAR-10
vit-train model=vit_small trainer.max_epochs=200 optim.lr=5e-4
vit-train data=folder data.root=$HOME/data/cifar10-jpeg
vit-train -m model.depth=4,6                # a sweep
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from vit.checkpoint import CheckpointError, read_checkpoint
from vit.cli import CONFIG_DIR, user_errors_exit
from vit.data import ImageDataModule
from vit.model import VisionTransformer, load_timm_weights
from vit.module import ViTClassifier, check_img_size_schedule

log = logging.getLogger("vit")


def model_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The network's keywords from `model.*` (without `compile` and `pretrained`)."""
    kw: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    kw.pop("compile", None)
    kw.pop("pretrained", None)
    return kw


def check_model_config(cfg: DictConfig) -> None:
    """Build the network on the meta device (no memory, no data needed) and check the schedule
    options against it, so that an invalid override fails at once, before any dataset is
    downloaded or decoded."""
    img_size = cfg.data.get("img_size") or 32
    with torch.device("meta"):
        net = VisionTransformer(**model_kwargs(cfg), img_size=img_size, num_classes=10)
    optim = cfg.get("optim") or {}
    schedule = optim.get("img_size_schedule")
    check_img_size_schedule(OmegaConf.to_container(schedule) if schedule else None, net)
    if optim.get("schedule_by_time") and not cfg.trainer.get("max_time"):
        raise ValueError("optim.schedule_by_time=true needs a time budget: set trainer.max_time (DD:HH:MM:SS)")


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """Instantiate and load the data now, so a bad data.root fails before anything else."""
    dm: ImageDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.prepare_data()
    dm.setup("fit")
    return dm


def build_module(cfg: DictConfig, dm: ImageDataModule) -> ViTClassifier:
    """The LightningModule; the network's img_size and num_classes come from the data."""
    model_kw = model_kwargs(cfg)
    compile_ = bool(cfg.model.get("compile", False))
    pretrained = cfg.model.get("pretrained")
    h, w = dm.img_size
    model_kw["img_size"] = h if h == w else [h, w]
    model_kw["num_classes"] = dm.num_classes
    optim: dict[str, Any] = OmegaConf.to_container(cfg.optim, resolve=True)  # type: ignore[assignment]
    if optim.pop("scale_lr_with_world_size", False):
        world = int(cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1) * int(cfg.trainer.num_nodes)
        optim["lr"] *= world
        log.info("lr scaled by the world size %d to %g", world, optim["lr"])
    module = ViTClassifier(model=model_kw, compile=compile_, **optim)
    module.data_info = {
        "class_names": dm.class_names,
        "mean": dm.mean,
        "std": dm.std,
        # Where the data came from and how val was carved, so vit-eval can rebuild the same split.
        "data": {"name": dm.name, "root": os.path.abspath(dm.root), "val_size": dm.val_size, "seed": dm.seed},
    }
    if pretrained:
        load_timm_weights(module.net, os.path.expanduser(pretrained))
        log.info("started from timm weights %s", pretrained)
    return module


def check_resumable(ckpt_path: str, module: ViTClassifier) -> None:
    """Fail with one message, before training, when ckpt_path cannot continue this run."""
    recorded = read_checkpoint(ckpt_path)["vit"]["model_config"]  # also: missing, truncated, unsafe
    # fused_attn and dynamic_img_size switch how the same weights run, not what they are; a key
    # that an older checkpoint lacks counts as its default.
    defaults = {k: p.default for k, p in inspect.signature(VisionTransformer).parameters.items()}
    differ = {
        k: (recorded.get(k, defaults.get(k)), v)
        for k, v in module.net.config.items()
        if k not in ("fused_attn", "dynamic_img_size") and recorded.get(k, defaults.get(k)) != v
    }
    if differ:
        detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
        raise CheckpointError(
            f"ckpt_path={ckpt_path} was trained with another model configuration ({detail}); "
            "resume with the same model and data overrides as the original run"
        )


def build_trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers: list[Logger] = [hydra.utils.instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) as configured; returns the final metrics (floats)."""
    if cfg.get("ckpt_path") and not os.path.isfile(cfg.ckpt_path):
        raise CheckpointError(f"checkpoint not found: ckpt_path={cfg.ckpt_path}")
    check_model_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    if cfg.get("ckpt_path"):
        check_resumable(cfg.ckpt_path, module)
    trainer = build_trainer(cfg)

    trainer.fit(module, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    ckpt_cb = trainer.checkpoint_callback
    best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb is not None else ""
    if cfg.get("test") and dm.has_test and not trainer.fast_dev_run:
        results = trainer.test(module, datamodule=dm, ckpt_path=best or None, weights_only=True)
        metrics.update({k: float(v) for k, v in results[0].items()})

    if trainer.is_global_zero:
        log.info("run directory: %s", cfg.paths.output_dir)
        if best:
            log.info("best checkpoint (val/acc %.4f): %s", float(ckpt_cb.best_model_score or 0), best)
        log.info("final metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
@user_errors_exit
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # A sweeper (Optuna) optimizes the returned value.
    return metrics.get(cfg.get("optimized_metric") or "val/acc_best")


if __name__ == "__main__":
    main()
