"""`vit-train`: check the config, build data, model and Trainer, fit, test the best checkpoint.

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
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from vit.checkpoint import read_checkpoint, recorded_model_config
from vit.cli import hydra_cli
from vit.config import check_train_config, cpp_compiler_found, print_config_tree
from vit.data import ImageDataModule
from vit.errors import CheckpointError, ConfigError, VitError
from vit.model import VisionTransformer, whiten_patch_embed_
from vit.module import ViTClassifier
from vit.pretrained import load_timm_weights
from vit.tta import tta_mode

log = logging.getLogger("vit")

# The model group's keys that are vit-train's options (build_module), not VisionTransformer keywords.
MODEL_RUN_OPTIONS = ("compile", "pretrained", "whiten_patches")


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, with our own errors (and the libraries' complaints about a bad
    value, such as an unknown trainer.precision) surfacing as one config error, not Hydra's wrapper."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, VitError):
            raise e.__cause__ from None
        raise ConfigError(str(e.__cause__ or e).strip()) from e


def build_datamodule(cfg: DictConfig) -> ImageDataModule:
    """The DataModule; it reads no image until Lightning calls prepare_data and setup."""
    return _instantiate(cfg.data, _convert_="all")


def build_module(cfg: DictConfig, dm: ImageDataModule) -> ViTClassifier:
    """The LightningModule, its network sized for the data (image size, classes)."""
    model_kw: dict[str, Any] = OmegaConf.to_container(cfg.model, resolve=True)  # type: ignore[assignment]
    # MODEL_RUN_OPTIONS: how vit-train builds and starts the network, not the network's keywords.
    compile_, pretrained = model_kw.pop("compile", False), model_kw.pop("pretrained", None)
    whiten = model_kw.pop("whiten_patches", False)
    if whiten and pretrained:
        raise ConfigError(
            "model.whiten_patches=true would overwrite the pretrained patch embedding; set one of the two"
        )
    if pretrained and cfg.optim.get("depth_schedule"):
        raise ConfigError(
            "optim.depth_schedule starts the blocks it holds back as identities, which would discard "
            "model.pretrained's weights for them; set one of the two"
        )
    if compile_ and not _trains_on_gpu(cfg) and not cpp_compiler_found():
        raise ConfigError(
            "model.compile=true: on a CPU torch.compile builds its kernels with a C++ compiler, and it "
            "found none (g++, or the one $CXX names); install one or set model.compile=false"
        )
    h, w = dm.img_size
    model_kw.update(img_size=h if h == w else [h, w], num_classes=dm.num_classes)
    optim: dict[str, Any] = OmegaConf.to_container(cfg.optim, resolve=True)  # type: ignore[assignment]
    try:
        module = ViTClassifier(model=model_kw, compile=bool(compile_), **optim)
    except ValueError as e:  # the network's own checks of its keywords (model.*)
        raise ConfigError(str(e)) from e
    if pretrained:
        load_timm_weights(module.net, os.path.expanduser(pretrained))
        log.info("started from timm weights %s", pretrained)
    if whiten and not cfg.get("ckpt_path"):  # a resumed run loads its trained weights instead
        whiten_from_data(module.net, dm)
    return module


def _trains_on_gpu(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def whiten_from_data(net: VisionTransformer, dm: ImageDataModule, num_images: int = 5000) -> None:
    """model.whiten_patches: the patch embedding starts as a whitening of the patches of up to
    `num_images` training images, drawn with the run's seed and passed through the training
    pipeline as the first steps see them (augmented, resized to the first scheduled size)."""
    dm.setup("fit")  # loads the training images once; Lightning's own call later finds them loaded
    images, labels = dm.train_set.images, dm.train_set.labels
    idx = torch.randperm(len(labels))[:num_images]
    x, _ = dm.pipeline.train(images[idx], labels[idx], fraction=0.0)
    try:
        whiten_patch_embed_(net.patch_embed, x)
    except ValueError as e:
        raise ConfigError(f"model.whiten_patches: {e}") from e
    log.info("patch embedding whitened on %d training images at %dx%d", len(idx), *x.shape[-2:])


def check_resumable(ckpt_path: str, module: ViTClassifier) -> None:
    """Fail with one message, before training, when ckpt_path cannot continue this run."""
    recorded = recorded_model_config(read_checkpoint(ckpt_path))  # also: missing, truncated, unsafe
    # fused_attn and dynamic_img_size switch how the same weights run, weight_init how they
    # started, not what they are; a key that an older checkpoint lacks counts as its default.
    defaults = {k: p.default for k, p in inspect.signature(VisionTransformer).parameters.items()}
    differ = {
        k: (recorded.get(k, defaults.get(k)), v)
        for k, v in module.net.config.items()
        if k not in ("fused_attn", "dynamic_img_size", "weight_init") and recorded.get(k, defaults.get(k)) != v
    }
    if differ:
        detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
        raise CheckpointError(
            f"ckpt_path={ckpt_path} was trained with another model configuration ({detail}); "
            "resume with the same model and data overrides as the original run"
        )


def build_trainer(cfg: DictConfig) -> L.Trainer:
    callbacks = [_instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    loggers: list[Logger] = [_instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    extra = {}
    if not any(isinstance(c, ProgressBar) for c in callbacks):
        # callbacks.progress=null means no bar: without this Lightning would add its default one.
        extra["enable_progress_bar"] = False
    return _instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra)


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit (and test) as configured; returns the final metrics (floats)."""
    if cfg.get("print_config") and rank_zero_only.rank == 0:
        print_config_tree(cfg)
    check_train_config(cfg)
    if cfg.get("ckpt_path") and not os.path.isfile(cfg.ckpt_path):
        raise CheckpointError(f"checkpoint not found: ckpt_path={cfg.ckpt_path}")
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
    tta = tta_mode(cfg.get("test_tta"), "test_tta")
    if cfg.get("test") and not trainer.fast_dev_run:
        if tta and dm.val_size > 0:  # the best checkpoint's validation accuracy with the TTA views
            module.val_tta = tta
            results = trainer.validate(module, datamodule=dm, ckpt_path=best or None, weights_only=True)
            module.val_tta = None
            metrics.update({k: float(v) for r in results for k, v in r.items()})  # a dict per dataloader
        if dm.has_test:
            module.test_tta = tta
            results = trainer.test(module, datamodule=dm, ckpt_path=best or None, weights_only=True)
            metrics.update({k: float(v) for k, v in results[0].items()})

    if trainer.is_global_zero:
        log.info("run directory: %s", cfg.paths.output_dir)
        if best:
            log.info("best checkpoint (val/acc %.4f): %s", float(ckpt_cb.best_model_score or 0), best)
        log.info("final metrics: %s", {k: round(v, 4) for k, v in sorted(metrics.items())})
    return metrics


def run(cfg: DictConfig) -> float | None:
    """One job: train, and return the metric a sweeper (Optuna) optimizes."""
    return train(cfg).get(cfg.get("optimized_metric") or "val/acc_best")


main = hydra_cli(run, config_name="train")

if __name__ == "__main__":
    main()
