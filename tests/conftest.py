"""Shared fixtures: small generated datasets (tests never read downloaded data), composed Hydra
configs, and running the entry points as a user would."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from vit.config import CONFIG_DIR

REPO = Path(__file__).resolve().parents[1]
# Small enough to train in seconds on 2 cores, big enough to learn.
TINY_MODEL = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path_rate=0.0"]
FAST = [
    "data.num_workers=0",
    "data.val_size=30",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "callbacks.progress=null",
]


def make_images(n_per_class: int, classes: int = 3, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, size, size) images whose class is the brightest colour channel (learnable)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    images = (torch.rand(len(labels), 3, size, size, generator=g) * 100).to(torch.uint8)
    for c in range(classes):
        images[labels == c, c % 3] += 120 + 20 * (c // 3)
    return images, labels


def write_folder(root: Path, n_train: int = 40, n_test: int = 10, classes: int = 3, size: int = 16) -> Path:
    """root/{train,test}/class_<k>/<i>.png"""
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        if n == 0:
            continue
        images, labels = make_images(n, classes, size, seed)
        for i, (img, y) in enumerate(zip(images, labels.tolist())):
            d = root / split / f"class_{y}"
            d.mkdir(parents=True, exist_ok=True)
            torchvision.io.write_png(img, str(d / f"{i:04d}.png"))
    return root


def write_cifar_pickles(root: Path, n_per_class: int = 4) -> Path:
    """The CIFAR-10 python-pickle layout torchvision reads (root/cifar-10-batches-py/...)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(files):
        images, labels = make_images(n_per_class, classes=10, size=32, seed=k)
        data = images.reshape(len(labels), -1).numpy()  # rows of 1024 R, then G, then B, as CIFAR stores
        with open(d / name, "wb") as f:
            pickle.dump({"data": np.ascontiguousarray(data), "labels": labels.tolist()}, f)
    return root


@pytest.fixture(scope="session")
def folder_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("folder_data"))


def compose_train(overrides: list[str], output_dir: Path, config_name: str = "train") -> DictConfig:
    """Compose the real config with overrides, as `vit-train` would, writing into output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    GlobalHydra.instance().clear()
    return cfg


def cli_env() -> dict[str, str]:
    """The environment for a CLI subprocess: this interpreter's bin/ first on PATH, so the console
    scripts (vit-predict, ...) are the installed ones even when the venv is not activated."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.pop("HYDRA_FULL_ERROR", None)
    env["PYTHONWARNINGS"] = "ignore"
    return env


def run_module(module: str, args: list[str], cwd: Path, timeout: int = 400) -> subprocess.CompletedProcess:
    """`python -m module args...` in cwd, as a user would run it; output captured."""
    [r] = run_all([module_cmd(module, args)], cwd, timeout)
    return r


def module_cmd(module: str, args: list[str]) -> list[str]:
    """The command line of `python -m module args...` with this interpreter."""
    return [sys.executable, "-m", module, *args]


def run_all(
    cmds: list[list[str]], cwd: Path, timeout: int = 400, env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess]:
    """Independent commands run at once, results in their order. Most of a CLI test's seconds are
    one core importing torch, Lightning and timm: two such processes side by side take about the
    time of one on two cores. Commands that share a path must not run together."""
    env = cli_env() if env is None else env

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)

    with ThreadPoolExecutor(max_workers=len(cmds)) as pool:
        return list(pool.map(run, cmds))


@pytest.fixture(scope="session")
def trained_run(folder_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained once on the generated folder dataset; its run directory."""
    from vit.train import train

    run = tmp_path_factory.mktemp("trained") / "run"
    overrides = ["data=folder", f"data.root={folder_data}", "data.img_size=16", "trainer.max_epochs=3", "optim.lr=3e-3"]
    train(compose_train([*overrides, *TINY_MODEL, *FAST], run))
    return run


def as_written_before_the_redesign(ckpt_path: Path, out: Path) -> Path:
    """The same trained checkpoint in the layout vit-train wrote before the core redesign: model
    config, class names, normalization and data source under one `vit` entry, no DataModule state,
    a LambdaLR scheduler state and `img_size_schedule` among the hyperparameters."""
    raw = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    data = raw.pop("ImageDataModule")
    config = dict(raw["hyper_parameters"]["model"])
    raw["vit"] = {
        "model_config": config,
        "class_names": data["class_names"],
        "mean": data["mean"],
        "std": data["std"],
        "data": data["source"],
    }
    hp = raw["hyper_parameters"]
    hp["model"] = {k: config[k] for k in ("img_size", "num_classes", "patch_size", "embed_dim", "depth", "num_heads")}
    hp["img_size_schedule"] = None
    hp.pop("scale_lr_with_world_size", None)
    raw["lr_schedulers"] = [{"base_lrs": [1e-3, 1e-3], "last_epoch": raw["global_step"], "_step_count": 1}]
    for group in raw["optimizer_states"][0]["param_groups"]:  # LambdaLR's key, not the run clock's
        group["initial_lr"] = group.pop("peak_lr")
    torch.save(raw, out)
    return out
