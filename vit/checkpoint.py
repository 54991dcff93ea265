"""Reading checkpoints safely: `torch.load(weights_only=True)`, clear errors, model rebuilt from
the file alone (its recorded constructor arguments, class names and normalization)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from vit.model import VisionTransformer


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, unsafe or does not fit its recorded model."""


@dataclass
class Checkpoint:
    model: VisionTransformer  # CPU, eval mode
    class_names: list[str]
    mean: list[float]
    std: list[float]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def img_size(self) -> tuple[int, int]:
        return self.model.patch_embed.img_size


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
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model_config" not in ckpt.get("vit", {}):
        raise CheckpointError(
            f"{path} is not a checkpoint written by vit-train (no 'state_dict' and 'vit.model_config' entries)"
        )
    return ckpt


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Rebuild the trained network and its preprocessing from a vit-train checkpoint."""
    ckpt = read_checkpoint(path)
    info = ckpt["vit"]
    try:
        model = VisionTransformer(**info["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its recorded model config is invalid: {e}") from e
    # The LightningModule stores the network under `net.`; torch.compile may add `_orig_mod.`.
    state = {
        k.removeprefix("net.").replace("_orig_mod.", ""): v
        for k, v in ckpt["state_dict"].items()
        if k.startswith("net.")
    }
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: the weights do not fit the recorded model config: {e}") from e
    n = model.num_classes
    class_names = list(info.get("class_names") or [str(i) for i in range(n)])
    return Checkpoint(
        model=model.eval(),
        class_names=class_names,
        mean=list(info.get("mean") or [0.5] * model.patch_embed.in_chans),
        std=list(info.get("std") or [0.5] * model.patch_embed.in_chans),
        raw=ckpt,
    )


def load_model(path: str | os.PathLike) -> VisionTransformer:
    """The trained network from a vit-train checkpoint, on CPU in eval mode."""
    return load_checkpoint(path).model
