"""Attention maps: record every block's attention probabilities with hooks, attention rollout,
and `vit-attention`, which draws them over the input images.

    vit-attention ckpt_path=.../best.ckpt images=[cat.png,ship.jpg]
    vit-attention ckpt_path=.../best.ckpt split=val num_images=16 head_fusion=max discard_ratio=0.9
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from vit.checkpoint import Checkpoint, load_checkpoint
from vit.cli import hydra_cli
from vit.config import EVAL_RULES, check_rules
from vit.data import read_image
from vit.errors import ConfigError, DataError
from vit.evaluate import build_eval_data, check_split
from vit.model import Attention, VisionTransformer
from vit.outputs import plt, save_figure

log = logging.getLogger("vit")

HEAD_FUSIONS = ("mean", "max", "min")


@contextlib.contextmanager
def _recording(model: VisionTransformer, keep_grad: bool = False) -> Iterator[list[torch.Tensor]]:
    """Run attention through the explicit path and record each block's post-softmax probabilities.

    The probabilities are the input of `attn_drop` (identity in eval mode), captured by a forward
    pre-hook; `fused_attn` is switched off only for the duration, so the model's forward is
    unchanged otherwise.
    """
    attns = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.fused_attn for m in attns]
    maps: list[torch.Tensor] = []

    def hook(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        probs = inputs[0]
        if keep_grad and probs.requires_grad:
            probs.retain_grad()
        maps.append(probs)

    handles = [m.attn_drop.register_forward_pre_hook(hook) for m in attns]
    try:
        for m in attns:
            m.fused_attn = False
        yield maps
    finally:
        for m, f in zip(attns, saved):
            m.fused_attn = f
        for h in handles:
            h.remove()


def attention_maps(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of every block: (depth, batch, heads, tokens, tokens).

    `images` are normalized float inputs (B, C, H, W). The model runs in eval mode (no dropout)
    and is restored to its previous mode.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _recording(model) as maps:
            # forward_features: every token of every block (the class-token-only last block of
            # `forward` would give one row of the last map).
            model.forward_head(model.forward_features(images))
    finally:
        model.train(was_training)
    return torch.stack(maps)


def attention_maps_and_grads(
    model: VisionTransformer, images: torch.Tensor, target: torch.Tensor | int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention maps, their gradients w.r.t. the target class logit, and the logits.

    `target`: class index per image (default: the predicted class).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), _recording(model, keep_grad=True) as maps:
            logits = model.forward_head(model.forward_features(images))  # full maps, as above
            if target is None:
                target = logits.argmax(dim=1)
            target = torch.as_tensor(target, device=logits.device).expand(len(images))
            model.zero_grad(set_to_none=True)
            logits.gather(1, target[:, None]).sum().backward()
            grads = torch.stack([m.grad for m in maps])
            probs = torch.stack([m.detach() for m in maps])
        model.zero_grad(set_to_none=True)
    finally:
        model.train(was_training)
    return probs, grads, logits.detach()


def check_rollout_options(head_fusion: str, discard_ratio: float) -> None:
    """ConfigError (a ValueError) for a head fusion or discard ratio that rollout cannot use."""
    if head_fusion not in HEAD_FUSIONS:
        raise ConfigError(f"head_fusion={head_fusion!r} must be one of {HEAD_FUSIONS}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ConfigError(f"discard_ratio={discard_ratio!r} is out of range: it must be a number in [0, 1)")


def rollout(
    maps: torch.Tensor,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    num_prefix_tokens: int = 1,
    grid_size: tuple[int, int] | None = None,
    grads: torch.Tensor | None = None,
    class_token: bool | None = None,
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): (depth, B, heads, N, N) -> (B, grid_h, grid_w).

    Per layer: fuse heads (mean/max/min; with `grads`, the mean of the positive part of
    gradient x attention), zero the lowest `discard_ratio` of the weights (never those on the
    prefix columns: class token, registers), add the identity for the residual path,
    re-normalize each row to sum to one, and multiply the layers together. The map is the class
    token's row over the patches; without a class token, the mean of the patch tokens' rows.
    The first `num_prefix_tokens` tokens are the class token (when `class_token`, by default
    when there is any prefix) and the registers; the map covers patch tokens only.
    """
    class_token = num_prefix_tokens > 0 if class_token is None else class_token
    check_rollout_options(head_fusion, discard_ratio)
    depth, B, _, N, _ = maps.shape
    num_patches = N - num_prefix_tokens
    if grid_size is None:
        side = int(round(num_patches**0.5))
        grid_size = (side, side)
    if grid_size[0] * grid_size[1] != num_patches:
        raise ValueError(f"grid {grid_size} does not match {num_patches} patch tokens")

    eye = torch.eye(N, dtype=maps.dtype, device=maps.device)
    joint = eye.expand(B, N, N)
    for layer in range(depth):
        a = maps[layer]  # (B, heads, N, N)
        if grads is not None:
            fused = (a * grads[layer]).clamp(min=0).mean(dim=1)
        elif head_fusion == "mean":
            fused = a.mean(dim=1)
        elif head_fusion == "max":
            fused = a.amax(dim=1)
        else:
            fused = a.amin(dim=1)  # (B, N, N)
        if discard_ratio > 0:
            # Drop the weakest weights among the patch columns only; the class token's column stays.
            patch_part = fused[:, :, num_prefix_tokens:].reshape(B, -1)
            k = int(patch_part.shape[1] * discard_ratio)
            if k > 0:
                idx = patch_part.topk(k, dim=1, largest=False).indices
                patch_part = patch_part.scatter(1, idx, 0.0)
                fused = torch.cat([fused[:, :, :num_prefix_tokens], patch_part.view(B, N, num_patches)], dim=2)
        a = (fused + eye) / 2  # the residual connection carries half the signal
        a = a / a.sum(dim=-1, keepdim=True)  # rows sum to one again
        joint = a @ joint  # later layers apply after earlier ones
    if class_token:
        mask = joint[:, 0, num_prefix_tokens:]  # class token -> patches
    else:
        mask = joint[:, num_prefix_tokens:, num_prefix_tokens:].mean(dim=1)  # no class token: mean of patch rows
    return mask.reshape(B, *grid_size)


# -- figures --------------------------------------------------------------------------------


def overlay(ax: plt.Axes, image: torch.Tensor, heat: torch.Tensor, title: str) -> None:
    """Draw a (gh, gw) map upsampled to the image and overlaid on it."""
    H, W = image.shape[1:]
    heat = F.interpolate(heat[None, None].float(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp(min=1e-12)
    ax.imshow(image.permute(1, 2, 0).numpy())
    ax.imshow(heat.numpy(), cmap="jet", alpha=0.5)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def attention_figure(
    image: torch.Tensor,
    maps: torch.Tensor,
    model: VisionTransformer,
    title: str,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    grads: torch.Tensor | None = None,
) -> plt.Figure:
    """One image (uint8 (3, H, W)) with its maps (depth, heads, N, N) of one sample."""
    grid = model.patch_embed.grid_size
    prefix, has_cls = model.num_prefix_tokens, model.cls_token is not None
    last = maps[-1]  # (heads, N, N)
    if has_cls:
        per_head = last[:, 0, prefix:]  # class token's attention to each patch
        source = "class-token attention"
    else:
        per_head = last[:, prefix:, prefix:].mean(dim=1)  # mean over patch queries
        source = "mean attention over patch tokens (no class token)"
    if model.num_reg_tokens:
        source += f"; {model.num_reg_tokens} register tokens skipped"
    heads = per_head.shape[0]
    panels = 1 + heads + 1 + (grads is not None)
    fig, axes = plt.subplots(1, panels, figsize=(2.2 * panels, 2.6))
    axes[0].imshow(image.permute(1, 2, 0).numpy())
    axes[0].set_title("input", fontsize=8)
    axes[0].axis("off")
    for h in range(heads):
        overlay(axes[1 + h], image, per_head[h].reshape(grid), f"last layer, head {h}")
    roll = rollout(maps[:, None], head_fusion, discard_ratio, prefix, grid, class_token=has_cls)[0]
    overlay(axes[1 + heads], image, roll, f"rollout ({head_fusion}, discard {discard_ratio:g})")
    if grads is not None:
        groll = rollout(maps[:, None], "mean", discard_ratio, prefix, grid, grads=grads[:, None], class_token=has_cls)[
            0
        ]
        overlay(axes[2 + heads], image, groll, "gradient rollout")
    fig.suptitle(f"{title}\n{source}", fontsize=9)
    fig.tight_layout()
    return fig


def _images_from_cfg(cfg: DictConfig, ckpt: Checkpoint) -> list[tuple[str, torch.Tensor, str]]:
    """(name, uint8 image at the model's size, note) for each requested image."""
    out = []
    if cfg.get("images"):
        for p in cfg.images:
            path = os.path.expanduser(str(p))
            img, original = read_image(path, ckpt.img_size)
            if img.shape[0] != ckpt.model.patch_embed.in_chans:
                raise DataError(f"{path}: model expects {ckpt.model.patch_embed.in_chans} channels")
            note = "" if original == tuple(ckpt.img_size) else f" (resized from {original[0]}x{original[1]})"
            out.append((Path(path).stem, img, note))
        return out
    dm = build_eval_data(ckpt, None, cfg.split)
    ds = dm.test_set if cfg.split == "test" else dm.val_set
    for i in range(min(cfg.num_images, len(ds))):
        out.append((f"{cfg.split}_{i:04d}_{ckpt.class_names[int(ds.labels[i])]}", ds.images[i], ""))
    return out


def run_attention(cfg: DictConfig) -> list[Path]:
    check_rules(cfg, EVAL_RULES)
    check_rollout_options(cfg.head_fusion, cfg.discard_ratio)  # before any checkpoint or image is read
    if not cfg.get("images"):
        check_split(cfg.split)
    if cfg.target_class is not None and not cfg.gradient:
        raise ConfigError("target_class is for the gradient rollout: add gradient=true")
    ckpt = load_checkpoint(os.path.expanduser(cfg.ckpt_path))
    if cfg.target_class is not None and not 0 <= int(cfg.target_class) < len(ckpt.class_names):
        raise ConfigError(
            f"target_class={cfg.target_class} is out of range: it must be in [0, {len(ckpt.class_names)}) "
            f"for this checkpoint's classes"
        )
    items = _images_from_cfg(cfg, ckpt)  # read all first: a bad image fails before any file is written
    if not items:
        raise DataError("no images: pass images=[a.png,...] or split=val num_images=N")
    model = ckpt.model
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, img, note in items:
        x = ckpt.normalize(img[None])
        if cfg.gradient:
            target = None if cfg.target_class is None else int(cfg.target_class)
            maps, grads, logits = attention_maps_and_grads(model, x, target)
            grads = grads[:, 0]
        else:
            maps, grads = attention_maps(model, x), None
            with torch.no_grad():
                logits = model(x)
        prob, pred = logits.softmax(1)[0].max(0)
        title = f"{name}{note}: predicted {ckpt.class_names[int(pred)]} ({float(prob):.0%})"
        fig = attention_figure(img, maps[:, 0], model, title, cfg.head_fusion, cfg.discard_ratio, grads)
        path = out / f"attention_{name}.png"
        save_figure(fig, path, dpi=110)
        written.append(path)
    log.info("wrote %d figures to %s", len(written), out)
    return written


main = hydra_cli(run_attention, config_name="attention")


if __name__ == "__main__":
    main()
