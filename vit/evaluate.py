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

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from vit.checkpoint import Checkpoint, load_checkpoint
from vit.cli import hydra_cli
from vit.config import EVAL_RULES, check_rules
from vit.data import ImageDataModule
from vit.errors import ConfigError, DataError
from vit.outputs import plt, save_figure, write_atomic
from vit.tta import tta_logits, tta_mode

log = logging.getLogger("vit")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device={name!r} must be auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
    return torch.device(name)


def check_split(split: str) -> None:
    if split not in ("test", "val"):
        raise ConfigError(f"split={split!r} must be 'test' or 'val'")


def build_eval_data(ckpt: Checkpoint, data_cfg: dict[str, Any] | None, split: str) -> ImageDataModule:
    """The split to evaluate, preprocessed as the checkpoint says (size, normalization)."""
    check_split(split)
    recorded = ckpt.data
    if data_cfg is None:
        if not recorded:
            raise DataError("this checkpoint records no dataset; pass data=cifar10|folder data.root=...")
        data_cfg = dict(recorded)
    data_cfg = {
        k: v
        for k, v in data_cfg.items()
        if k not in ("_target_", "augment", "mix", "mean", "std", "img_size_schedule", "crop_padding_schedule")
    }
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
    ckpt: Checkpoint, images: torch.Tensor, batch_size: int, device: torch.device, tta: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (N, K) for uint8 images (N, C, H, W), normalized as the checkpoint records, in
    batches; with a `tta` mode (vit.tta), also the test-time-augmented log-probabilities (N, K),
    which reuse the plain forward pass."""
    model = ckpt.model.to(device).eval()
    plain, augmented = [], []
    for i in range(0, len(images), batch_size):
        x = ckpt.normalize(images[i : i + batch_size].to(device))
        logits = model(x)
        plain.append(logits.float().cpu())
        if tta:
            augmented.append(tta_logits(model, x, tta, logits).cpu())
    return torch.cat(plain), torch.cat(augmented) if tta else None


def reliability(probs: torch.Tensor, labels: torch.Tensor, num_bins: int) -> dict[str, Any]:
    """Confidence binned in `num_bins` equal-width bins, [i/n, (i+1)/n) and a closed last bin, with
    the expected calibration error computed from the same bins, so the reliability diagram and
    the ECE number cannot disagree: ECE = sum over bins of (count / N) * |accuracy - confidence|.
    (Equal to torchmetrics' MulticlassCalibrationError except that torchmetrics gives confidences
    of exactly 1.0 a bin of their own.)"""
    conf, pred = probs.max(dim=1)
    edges = torch.linspace(0, 1, num_bins + 1, dtype=conf.dtype)
    bins = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, num_bins - 1)
    correct = (pred == labels).to(conf.dtype)
    count = torch.bincount(bins, minlength=num_bins)
    acc_bin = torch.bincount(bins, weights=correct, minlength=num_bins) / count.clamp(min=1)
    conf_bin = torch.bincount(bins, weights=conf, minlength=num_bins) / count.clamp(min=1)
    ece = (count / len(labels) * (acc_bin - conf_bin).abs()).sum()
    return {"ece": float(ece), "count": count.tolist(), "accuracy": acc_bin.tolist(), "confidence": conf_bin.tolist()}


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str], num_bins: int = 15) -> dict:
    """top-1/top-5, per-class accuracy, confusion matrix, ECE and the reliability curve."""
    k = logits.shape[1]
    top5 = MulticlassAccuracy(num_classes=k, top_k=min(5, k), average="micro")(logits, labels)
    top1 = MulticlassAccuracy(num_classes=k, average="micro")(logits, labels)
    per_class = MulticlassAccuracy(num_classes=k, average=None)(logits, labels)
    confusion = MulticlassConfusionMatrix(num_classes=k)(logits, labels)
    rel = reliability(logits.softmax(dim=1), labels, num_bins)
    return {
        "num_samples": int(len(labels)),
        "top1": float(top1),
        "top5": float(top5),
        "ece": rel.pop("ece"),
        "per_class_accuracy": {name: float(a) for name, a in zip(class_names, per_class)},
        "confusion_matrix": confusion.tolist(),
        "reliability": rel,
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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    check_rules(cfg, EVAL_RULES)
    check_split(cfg.split)
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(os.path.expanduser(cfg.ckpt_path))
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else None
    dm = build_eval_data(ckpt, data_cfg, cfg.split)
    ds = dm.test_set if cfg.split == "test" else dm.val_set
    tta = tta_mode(cfg.get("tta"))
    logits, augmented = predict_logits(ckpt, ds.images, cfg.batch_size, device, tta)
    plain = compute_metrics(logits, ds.labels, ckpt.class_names, cfg.num_bins)
    if tta:  # report both: with the views averaged in, and without
        metrics = compute_metrics(augmented, ds.labels, ckpt.class_names, cfg.num_bins)
        metrics.update(tta=tta, top1_without_tta=plain["top1"], top5_without_tta=plain["top5"])
    else:
        metrics = dict(plain, tta=None)
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
    for name in ("top1", "top5", "ece", "top1_without_tta"):
        if name in metrics:
            table.add_row(name, f"{metrics[name]:.4f}")
    for name, acc in metrics["per_class_accuracy"].items():
        table.add_row(f"  {name}", f"{acc:.4f}")
    Console().print(table)
    log.info("wrote %s", out)
    return metrics


main = hydra_cli(evaluate, config_name="eval")


if __name__ == "__main__":
    main()
