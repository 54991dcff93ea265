"""`vit-eval`: evaluate a checkpoint on a split; metrics.json, a confusion matrix, a reliability diagram.

vit-eval ckpt_path=outputs/.../checkpoints/best.ckpt                 # its own test split
vit-eval ckpt_path=... split=val
vit-eval ckpt_path=... data=folder data.root=~/data/other-images
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import hydra
import matplotlib
import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
)

from vit.checkpoint import Checkpoint, load_checkpoint
from vit.cli import CONFIG_DIR, user_errors_exit, write_atomic
from vit.data import DataError, ImageDataModule, normalize

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

log = logging.getLogger("vit")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_eval_data(ckpt: Checkpoint, data_cfg: dict[str, Any] | None, split: str) -> ImageDataModule:
    """The split to evaluate, preprocessed as the checkpoint says (size, normalization)."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    recorded = ckpt.raw["vit"].get("data", {})
    if data_cfg is None:
        if not recorded:
            raise DataError("this checkpoint records no dataset; pass data=cifar10|folder data.root=...")
        data_cfg = dict(recorded)
    data_cfg = {k: v for k, v in data_cfg.items() if k not in ("_target_", "augment", "mix", "mean", "std")}
    # The validation split is defined by training: carve it the same way.
    data_cfg.update({k: recorded[k] for k in ("val_size", "seed") if k in recorded})
    data_cfg.update(img_size=list(ckpt.img_size), mean=ckpt.mean, std=ckpt.std, download=False, num_workers=0)
    dm = ImageDataModule(**data_cfg)
    if split == "test" and not dm.has_test:
        raise DataError(f"{dm.root} has no test split; use split=val")
    dm.setup("test" if split == "test" else "fit")
    if dm.class_names != ckpt.class_names:
        raise DataError(f"dataset classes {dm.class_names} differ from the checkpoint's {ckpt.class_names}")
    return dm


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    images: torch.Tensor,
    mean: list[float],
    std: list[float],
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Logits (N, K) for uint8 images (N, C, H, W), in batches."""
    model = model.to(device).eval()
    out = [
        model(normalize(images[i : i + batch_size].to(device), mean, std)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], num_bins: int = 15) -> dict:
    """top-1/top-5, per-class accuracy, confusion matrix, ECE and the reliability curve."""
    k = logits.shape[1]
    probs = logits.softmax(dim=1)
    top5 = MulticlassAccuracy(num_classes=k, top_k=min(5, k), average="micro")(logits, labels)
    top1 = MulticlassAccuracy(num_classes=k, average="micro")(logits, labels)
    per_class = MulticlassAccuracy(num_classes=k, average=None)(logits, labels)
    confusion = MulticlassConfusionMatrix(num_classes=k)(logits, labels)
    ece = MulticlassCalibrationError(num_classes=k, n_bins=num_bins, norm="l1")(probs, labels)
    # Reliability curve: accuracy vs confidence in equal-width confidence bins.
    conf, pred = probs.max(dim=1)
    bins = torch.clamp((conf * num_bins).long(), max=num_bins - 1)
    correct = (pred == labels).float()
    count = torch.bincount(bins, minlength=num_bins)
    acc_bin = torch.bincount(bins, weights=correct, minlength=num_bins) / count.clamp(min=1)
    conf_bin = torch.bincount(bins, weights=conf, minlength=num_bins) / count.clamp(min=1)
    return {
        "num_samples": int(len(labels)),
        "top1": float(top1),
        "top5": float(top5),
        "ece": float(ece),
        "per_class_accuracy": {name: float(a) for name, a in zip(class_names, per_class)},
        "confusion_matrix": confusion.tolist(),
        "reliability": {"count": count.tolist(), "accuracy": acc_bin.tolist(), "confidence": conf_bin.tolist()},
    }


def plot_confusion(confusion: list[list[int]], class_names: list[str], path: Path) -> None:
    cm = torch.tensor(confusion, dtype=torch.float)
    norm = cm / cm.sum(dim=1, keepdim=True).clamp(min=1)  # rows: true class, as fractions
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 1.0 + 0.55 * n))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                int(cm[i, j]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_title("confusion matrix")
    save_figure(fig, path)


def plot_reliability(rel: dict[str, list[float]], ece: float, path: Path) -> None:
    n = len(rel["count"])
    edges = torch.linspace(0, 1, n + 1)
    centers = ((edges[:-1] + edges[1:]) / 2).tolist()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    acc = [a if c else 0.0 for a, c in zip(rel["accuracy"], rel["count"])]
    ax.bar(centers, acc, width=1 / n, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(f"reliability diagram (ECE {ece:.3f})")
    ax.legend(loc="upper left")
    save_figure(fig, path)


def save_figure(fig: plt.Figure, path: Path, dpi: int = 120) -> None:
    """Write a figure atomically and close it."""
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".")))
    finally:
        plt.close(fig)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    ckpt = load_checkpoint(os.path.expanduser(cfg.ckpt_path))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None
    dm = build_eval_data(ckpt, data_cfg, cfg.split)
    ds = dm.test_set if cfg.split == "test" else dm.val_set
    device = resolve_device(cfg.device)
    logits = predict_logits(ckpt.model, ds.images, ckpt.mean, ckpt.std, cfg.batch_size, device)
    metrics = compute_metrics(logits, ds.labels, ckpt.class_names, cfg.num_bins)
    metrics.update(ckpt_path=os.path.abspath(cfg.ckpt_path), split=cfg.split, dataset=dm.name, root=dm.root)

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_confusion(metrics["confusion_matrix"], ckpt.class_names, out / "confusion_matrix.png")
    plot_reliability(metrics["reliability"], metrics["ece"], out / "reliability.png")
    # Last: its presence means the evaluation completed.
    write_atomic(out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(metrics, indent=2)))

    table = Table(title=f"{dm.name} {cfg.split}: {metrics['num_samples']} images")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name in ("top1", "top5", "ece"):
        table.add_row(name, f"{metrics[name]:.4f}")
    for name, acc in metrics["per_class_accuracy"].items():
        table.add_row(f"  {name}", f"{acc:.4f}")
    Console().print(table)
    log.info("wrote %s", out)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
