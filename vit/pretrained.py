"""Starting from a timm checkpoint: read it (a state dict, or a .pth, .bin or .safetensors file),
resample what depends on the image and patch size with timm's own functions, load it strictly."""

from __future__ import annotations

import os
from typing import Any

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed

from vit.errors import CheckpointError
from vit.model import VisionTransformer

__all__ = ["load_timm_weights"]


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"timm checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd: Any = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle that is not plain weights
        raise CheckpointError(f"could not read {path} as a weights file (.pth, .bin or .safetensors): {e}") from e
    for key in ("state_dict", "model", "state_dict_ema"):  # common wrappers around the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return sd


def load_timm_weights(
    model: VisionTransformer, state_dict_or_path: dict[str, torch.Tensor] | str | os.PathLike
) -> VisionTransformer:
    """Load a timm ViT checkpoint into `model` (same parameter names: no key mapping).

    The patch kernel is resampled when the patch size differs (timm's `resample_patch_embed`,
    FlexiViT's pseudo-inverse resize), the position embedding when the patch grid differs (timm's
    `resample_abs_pos_embed`, bicubic), and the classifier head is kept at its fresh init when the
    class count differs (fine-tuning). Anything else that does not fit is a CheckpointError.
    """
    sd = dict(state_dict_or_path) if isinstance(state_dict_or_path, dict) else _read_state_dict(state_dict_or_path)
    own = model.state_dict()

    w = sd.get("patch_embed.proj.weight")
    if w is not None and w.shape[-2:] != own["patch_embed.proj.weight"].shape[-2:]:
        sd["patch_embed.proj.weight"] = resample_patch_embed(w, list(model.patch_embed.patch_size))
    pe = sd.get("pos_embed")
    if pe is not None and "pos_embed" in own and pe.shape != own["pos_embed"].shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        sd["pos_embed"] = resample_abs_pos_embed(pe, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
    head_mismatch = any(k in sd and sd[k].shape != own[k].shape for k in ("head.weight", "head.bias") if k in own)
    if head_mismatch:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        sd.update({k: v for k, v in own.items() if k.startswith("head.")})

    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if sd[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        raise CheckpointError(
            "timm checkpoint does not fit this model: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}; "
            "check embed_dim, depth, class_token, global_pool and qkv_bias against the checkpoint"
        )
    model.load_state_dict(sd, strict=True)
    return model
