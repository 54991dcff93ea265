"""Reading checkpoints safely: `torch.load(weights_only=True)`, clear errors, the model and its
preprocessing rebuilt from the file alone.

A vit-train checkpoint records each thing once, through Lightning's own hooks:
`hyper_parameters.model` (the network's complete constructor config) and the DataModule's state
(`ImageDataModule`: class names, normalization, image size, data source and split). Checkpoints
written before that layout kept all of it under one `vit` entry; they load the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from vit.data import normalize
from vit.errors import CheckpointError
from vit.model import VisionTransformer

DATA_STATE_KEY = "ImageDataModule"  # where Lightning stores the DataModule's state_dict()


@dataclass
class Checkpoint:
    model: VisionTransformer  # CPU, eval mode
    class_names: list[str]
    mean: list[float] | None  # None: the file records no normalization (normalize() refuses)
    std: list[float] | None
    data: dict[str, Any] = field(default_factory=dict)  # source: name, root, val_size, seed
    path: str = ""
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def img_size(self) -> tuple[int, int]:
        return self.model.patch_embed.img_size

    def check_normalization(self) -> None:
        """CheckpointError when the file records no input normalization: guessing one (say 0.5)
        would give wrong predictions without a word."""
        if self.mean is None or self.std is None:
            raise CheckpointError(
                f"{self.path} records no input normalization (mean and std), so its inputs cannot be prepared "
                "as in training; use a checkpoint written by vit-train"
            )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> the float input the model was trained on."""
        self.check_normalization()
        return normalize(images, self.mean, self.std)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's dict, loaded with weights_only=True (no code in the file can run)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, or a pickle that wants to run code
        raise CheckpointError(
            f"cannot load checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "It is truncated, not a checkpoint, or holds objects other than tensors and primitives "
            "(refused for safety)."
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or recorded_model_config(ckpt) is None:
        raise CheckpointError(
            f"{path} is not a checkpoint written by vit-train (no 'state_dict' and recorded model config)"
        )
    return ckpt


def recorded_model_config(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The network's constructor config a checkpoint records (either layout), or None."""
    if isinstance(ckpt.get("vit"), dict) and "model_config" in ckpt["vit"]:  # the earlier layout
        return ckpt["vit"]["model_config"]
    model = (ckpt.get("hyper_parameters") or {}).get("model")
    return model if isinstance(model, dict) else None


def recorded_data(ckpt: dict[str, Any]) -> dict[str, Any]:
    """class_names, mean, std and source {name, root, val_size, seed}, from either layout."""
    if isinstance(ckpt.get("vit"), dict):  # the earlier layout: the same facts, `data` for `source`
        old = ckpt["vit"]
        return {
            "class_names": old.get("class_names"),
            "mean": old.get("mean"),
            "std": old.get("std"),
            "source": old.get("data") or {},
        }
    state = ckpt.get(DATA_STATE_KEY) or {}
    return {k: state.get(k) for k in ("class_names", "mean", "std")} | {"source": state.get("source") or {}}


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Rebuild the trained network and its preprocessing from a vit-train checkpoint."""
    ckpt = read_checkpoint(path)
    try:
        model = VisionTransformer(**recorded_model_config(ckpt))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its recorded model config is invalid: {e}") from e
    # The LightningModule stores the network under `net.`.
    state = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the recorded model config: {e}") from e
    data = recorded_data(ckpt)
    return Checkpoint(
        model=model.eval(),
        class_names=list(data["class_names"] or [str(i) for i in range(model.num_classes)]),
        mean=list(data["mean"]) if data["mean"] else None,
        std=list(data["std"]) if data["std"] else None,
        data=dict(data["source"]),
        path=os.fspath(path),
        raw=ckpt,
    )


def load_model(path: str | os.PathLike) -> VisionTransformer:
    """The trained network from a vit-train checkpoint, on CPU in eval mode."""
    return load_checkpoint(path).model
