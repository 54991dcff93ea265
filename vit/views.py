"""The ViT paper's three views of what a trained ViT has learned (Dosovitskiy et al., 2021,
Figure 7), for any checkpoint, as figures and as numbers:

- the patch-embedding filters: the first principal components of `patch_embed.proj.weight`,
  drawn as RGB patches;
- position-embedding similarity: for each patch position, the cosine similarity of its position
  embedding with every other position's (learned or sin-cos), drawn as a grid of grids;
- mean attention distance per head against depth, in pixels: for each query patch, the
  attention-weighted distance between patch centres, averaged over queries and images.

    vit-views ckpt_path=.../best.ckpt                       # the val split's first 64 images
    vit-views ckpt_path=... split=test num_images=256 components=28
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from vit.attention import attention_maps
from vit.checkpoint import load_checkpoint
from vit.cli import hydra_cli
from vit.config import EVAL_RULES, check_rules
from vit.errors import ConfigError
from vit.evaluate import build_eval_data, check_split
from vit.model import VisionTransformer
from vit.outputs import plt, save_figure, write_atomic

log = logging.getLogger("vit")


def patch_embedding_components(weight: torch.Tensor, k: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal components of the patch-embedding filters: weight (D, C, p, p) -> the first k
    components (k, C, p, p), unit norm, and the fraction of the filters' variance each explains (k,)."""
    D = weight.shape[0]
    X = weight.detach().reshape(D, -1).double()  # one row per embedding dimension: a C*p*p filter
    X = X - X.mean(dim=0)
    _, S, Vh = torch.linalg.svd(X, full_matrices=False)  # rows of Vh: principal directions
    k = min(k, Vh.shape[0])
    # A component's sign is arbitrary; fix it so that its largest entry is positive.
    comps = Vh[:k] * torch.sign(Vh[:k].gather(1, Vh[:k].abs().argmax(dim=1, keepdim=True)))
    explained = S.square() / S.square().sum().clamp(min=1e-30)
    return comps.reshape(k, *weight.shape[1:]).float(), explained[:k].float()


def patch_position_embeddings(model: VisionTransformer) -> torch.Tensor:
    """The position embeddings of the patch tokens, (gh * gw, D) in raster order (no prefix rows)."""
    if model.pos_embed is None:
        raise ConfigError("this model has no position embedding (pos_embed='none'): nothing to compare")
    pe = model.pos_embed.detach()[0]
    return pe if model.no_embed_class else pe[model.num_prefix_tokens :]


def position_similarity(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cosine similarity of every patch position's embedding with every other's: pos (gh*gw, D)
    -> (gh, gw, gh, gw), where [i, j] is the (gh, gw) map of position (i, j) against all."""
    p = F.normalize(pos.double(), dim=-1)
    return (p @ p.T).reshape(*grid, *grid).float()


def patch_distances(grid: tuple[int, int], patch_size: tuple[int, int]) -> torch.Tensor:
    """Distances in pixels between the centres of every pair of patches: (gh*gw, gh*gw)."""
    ys, xs = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64) * patch_size[0],
        torch.arange(grid[1], dtype=torch.float64) * patch_size[1],
        indexing="ij",
    )
    centres = torch.stack([ys.flatten(), xs.flatten()], dim=1)  # (P, 2); the half-patch offset cancels
    return torch.cdist(centres, centres)


def mean_attention_distance(
    maps: torch.Tensor, grid: tuple[int, int], patch_size: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """Mean attention distance in pixels, (depth, heads), from maps (depth, B, heads, N, N).

    For each patch query, the distance to each patch key weighted by the attention it pays it
    (renormalized over the patch keys: class token and registers have no position), averaged over
    the queries and the images."""
    a = maps[..., num_prefix_tokens:, num_prefix_tokens:].double()  # (depth, B, heads, P, P)
    if a.shape[-1] != grid[0] * grid[1]:
        raise ValueError(f"maps have {a.shape[-1]} patch tokens, the grid {grid} has {grid[0] * grid[1]}")
    a = a / a.sum(dim=-1, keepdim=True).clamp(min=1e-30)
    per_query = (a * patch_distances(grid, patch_size).to(a.device)).sum(dim=-1)  # (depth, B, heads, P)
    return per_query.mean(dim=(1, 3)).float()


# -- figures --------------------------------------------------------------------------------


def components_figure(comps: torch.Tensor, explained: torch.Tensor, title: str) -> plt.Figure:
    k = len(comps)
    cols = min(7, k)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.45 * rows + 0.5), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= k:
            continue
        c = comps[i]
        c = (c - c.min()) / (c.max() - c.min()).clamp(min=1e-12)  # each component stretched to [0, 1]
        ax.imshow(c.permute(1, 2, 0).numpy() if c.shape[0] == 3 else c[0].numpy(), interpolation="nearest")
        ax.set_title(f"{i + 1}: {explained[i]:.1%}", fontsize=7)
    fig.suptitle(f"{title}\npatch-embedding filters: first {k} principal components (variance explained)", fontsize=8)
    fig.tight_layout()
    return fig


def similarity_figure(sim: torch.Tensor, title: str) -> plt.Figure:
    gh, gw = sim.shape[:2]
    low = float(sim.min())  # one colour scale for all panels, from the least similar pair up to 1
    fig, axes = plt.subplots(gh, gw, figsize=(0.55 * gw + 1.2, 0.55 * gh + 0.8), squeeze=False)
    for i in range(gh):
        for j in range(gw):
            im = axes[i, j].imshow(sim[i, j].numpy(), vmin=low, vmax=1, cmap="viridis")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for j in range(gw):
        axes[-1, j].set_xlabel(str(j + 1), fontsize=6)
    for i in range(gh):
        axes[i, 0].set_ylabel(str(i + 1), fontsize=6)
    fig.colorbar(im, ax=axes, fraction=0.03, label="cosine similarity")
    fig.suptitle(f"{title}\nposition-embedding similarity (input patch row / column)", fontsize=8)
    return fig


def distance_figure(distance: torch.Tensor, img_size: tuple[int, int], title: str) -> plt.Figure:
    depth, heads = distance.shape
    fig, ax = plt.subplots(figsize=(4.5, 3.5))
    for h in range(heads):
        ax.scatter(range(1, depth + 1), distance[:, h].numpy(), s=14, label=f"head {h}")
    ax.set_xlabel("network depth (block)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_xticks(range(1, depth + 1))
    ax.set_ylim(0, max(img_size) * 0.75)
    if heads <= 8:
        ax.legend(fontsize=6, loc="lower right")
    ax.set_title(f"{title}\nsize of the attended area by head and depth", fontsize=8)
    fig.tight_layout()
    return fig


def run_views(cfg: DictConfig) -> dict[str, Any]:
    check_rules(cfg, EVAL_RULES)
    check_split(cfg.split)
    ckpt = load_checkpoint(os.path.expanduser(cfg.ckpt_path))
    path = Path(cfg.ckpt_path)
    model, name = ckpt.model, "/".join(path.parts[-3:])  # <run>/checkpoints/<file>
    grid, patch = model.patch_embed.grid_size, model.patch_embed.patch_size
    dm = build_eval_data(ckpt, None, cfg.split)  # before any file is written: a bad split fails first
    images = (dm.test_set if cfg.split == "test" else dm.val_set).images[: cfg.num_images]

    comps, explained = patch_embedding_components(model.patch_embed.proj.weight, cfg.components)
    sim = position_similarity(patch_position_embeddings(model), grid)
    distance = torch.zeros(model.config["depth"], model.blocks[0].attn.num_heads, dtype=torch.float64)
    for i in range(0, len(images), cfg.batch_size):  # a running mean over batches of images
        batch = images[i : i + cfg.batch_size]
        maps = attention_maps(model, ckpt.normalize(batch))
        distance += mean_attention_distance(maps, grid, patch, model.num_prefix_tokens).double() * len(batch)
    distance = (distance / len(images)).float()

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_figure(components_figure(comps, explained, name), out / "patch_embedding_components.png")
    save_figure(
        similarity_figure(sim, f"{name} ({model.config['pos_embed']} positions)"), out / "position_similarity.png"
    )
    save_figure(
        distance_figure(distance, model.patch_embed.img_size, f"{name}, {len(images)} {cfg.split} images"),
        out / "attention_distance.png",
    )
    numbers = {
        "ckpt_path": os.path.abspath(cfg.ckpt_path),
        "split": cfg.split,
        "num_images": len(images),
        "patch_components_explained_variance": explained.tolist(),
        "position_similarity": sim.tolist(),
        "mean_attention_distance_px": distance.tolist(),  # [block][head]
        "num_register_tokens": model.num_reg_tokens,
    }
    write_atomic(out / "views.json", lambda tmp: tmp.write_text(json.dumps(numbers, indent=2)))  # last: complete
    log.info("wrote %s", out)
    return numbers


main = hydra_cli(run_views, config_name="views")

if __name__ == "__main__":
    main()
