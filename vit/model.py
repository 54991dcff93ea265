"""A Vision Transformer written from scratch, weight-for-weight compatible with timm.

Pure PyTorch: no Lightning, no Hydra, no file I/O (`vit.pretrained` loads timm checkpoints).
Module and parameter names follow
`timm.models.vision_transformer.VisionTransformer`, so checking against timm is
`load_state_dict(strict=True)` plus equal logits, with no key mapping.

    PatchEmbed -> Attention -> Mlp -> Block -> VisionTransformer
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PatchEmbed",
    "Attention",
    "Mlp",
    "GluMlp",
    "LayerScale",
    "DropPath",
    "Block",
    "VisionTransformer",
    "sincos_pos_embed_2d",
    "resample_pos_embed",
    "mimetic_init_",
    "impulse_init_",
    "whiten_patch_embed_",
]

GLOBAL_POOLS = ("token", "avg", "avgmax", "max", "")
POS_EMBEDS = ("learn", "sincos", "none")
WEIGHT_INITS = ("", "mimetic", "impulse")  # timm's default init; ours: mimetic_init_ / impulse_init_ on top of it


def _pair(x: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a pair (height, width), got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


class PatchEmbed(nn.Module):
    """Image -> sequence of patch tokens, in row-major (raster) order."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        bias: bool = True,
        strict_img_size: bool = True,
        shift: int = 0,
    ) -> None:
        super().__init__()
        self.strict_img_size = strict_img_size  # False: any size that the patch tiles (dynamic_img_size)
        if shift < 0:
            raise ValueError(f"shift must be >= 0 pixels, got {shift}")
        self.shift = shift  # > 0: shifted patch tokenization (`shifted_views`)
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        for side, (i, p) in zip(("height", "width"), zip(self.img_size, self.patch_size)):
            if p <= 0 or i <= 0 or i % p != 0:
                raise ValueError(
                    f"img_size {self.img_size} is not divisible by patch_size {self.patch_size} "
                    f"(image {side} {i}, patch {side} {p}); pick a patch size that tiles the image"
                )
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        # A convolution with kernel = stride = patch is a linear map applied to each patch (of the
        # image, and with a shift of its four shifted copies too: 5 x in_chans channels).
        views = 5 if shift else 1
        self.proj = nn.Conv2d(in_chans * views, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)

    def shifted_views(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 5C, H, W) with a shift: the image and its copies moved `shift` pixels
        along each diagonal (zeros, the mean colour once normalized, fill the edges), as Lee et al.
        2021's shifted patch tokenization. With shift = p/2, a p x p patch of the result holds the
        2p x 2p pixels centred on it, so the linear embedding sees past the patch grid's borders; it
        is one linear map still (a strided convolution with a sparse 2p-wide kernel), not a
        convolutional stem. Without a shift: x as it is."""
        if not self.shift:
            return x
        s, (h, w) = self.shift, x.shape[-2:]
        padded = F.pad(x, (s, s, s, s))
        return torch.cat([x, *(padded[..., i : i + h, j : j + w] for i in (0, 2 * s) for j in (0, 2 * s))], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.strict_img_size:
            if x.ndim != 4 or x.shape[1] != self.in_chans or tuple(x.shape[2:]) != self.img_size:
                raise ValueError(
                    f"expected images of shape (batch, {self.in_chans}, {self.img_size[0]}, "
                    f"{self.img_size[1]}), got {tuple(x.shape)}; resize the input or build the model "
                    f"with matching img_size / in_chans (or dynamic_img_size=True)"
                )
        elif (
            x.ndim != 4
            or x.shape[1] != self.in_chans
            or x.shape[2] % self.patch_size[0]
            or x.shape[3] % self.patch_size[1]
        ):
            raise ValueError(
                f"expected images of shape (batch, {self.in_chans}, H, W) with H, W multiples of the "
                f"patch size {self.patch_size}, got {tuple(x.shape)}"
            )
        x = self.proj(self.shifted_views(x))  # (B, D, gh, gw)
        # (B, gh*gw, D), row-major over the grid. Contiguous: a transposed view would carry its
        # strides into every add of the residual stream (measured ~3% slower training on CPU).
        return x.flatten(2).transpose(1, 2).contiguous()


class Attention(nn.Module):
    """Multi-head self-attention with one qkv projection.

    `fused_attn=False` runs the explicit maths (the reference, and the only path whose attention
    probabilities `vit.attention` can record, as the input of `attn_drop`); `fused_attn=True` runs
    the same function through `F.scaled_dot_product_attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused_attn: bool = True,
        qk_norm: bool = False,
        self_mask: bool = False,
        learned_temperature: bool = False,
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(
                f"embed_dim {dim} is not divisible by num_heads {num_heads}; "
                f"choose num_heads among the divisors of {dim}"
            )
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        # qk_norm: LayerNorm over each head's queries and keys (timm's q_norm/k_norm), which bounds
        # the attention logits, so a high learning rate cannot blow the softmax up.
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        # self_mask: no token attends to itself (the diagonal masking of Lee et al. 2021's locality
        # self-attention); its own value still reaches the block's output through the residual.
        self.self_mask = self_mask
        # learned_temperature: each head's logit scale is a parameter (the other half of locality
        # self-attention), kept as a log so it stays positive; it starts at head_dim^-0.5.
        self.log_temperature = (
            nn.Parameter(torch.full((num_heads,), math.log(self.scale))) if learned_temperature else None
        )
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, C = x.shape
        # (B, N, 3*C) -> (3, B, heads, N, head_dim)
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def _qkv_first(self, x: torch.Tensor, num_queries: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries for the first `num_queries` tokens only; keys and values for all of them.
        Rows [0:C] of the qkv weight make queries, rows [C:3C] keys and values."""
        B, N, C = x.shape
        w, b = self.qkv.weight, self.qkv.bias
        q = F.linear(x[:, :num_queries], w[:C], None if b is None else b[:C])  # (B, n, C)
        kv = F.linear(x, w[C:], None if b is None else b[C:])  # (B, N, 2C)
        q = q.reshape(B, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = kv.reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    @staticmethod
    def _diagonal(num_queries: int, num_keys: int, device: torch.device) -> torch.Tensor:
        """(num_queries, num_keys) bool, True where query i meets key i: itself."""
        if num_keys < 2:
            raise ValueError("self_mask needs at least 2 tokens: a lone token would have nothing to attend to")
        return torch.eye(num_queries, num_keys, dtype=torch.bool, device=device)

    def forward(
        self, x: torch.Tensor, num_queries: int | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(B, N, C) -> (B, N, C); with `num_queries`, only the first num_queries tokens attend
        (to all N tokens): (B, num_queries, C), the same rows the full call would give.
        rope: (sin, cos), each (N_patches, head_dim), from `rope_2d`: the queries and keys of the
        last N_patches tokens are rotated by their positions (the prefix tokens before them are not)."""
        B, N, C = x.shape
        if num_queries is None:
            q, k, v = self._qkv(x)  # each (B, heads, N, head_dim)
        else:
            q, k, v = self._qkv_first(x, num_queries)  # q: (B, heads, num_queries, head_dim)
            N = num_queries
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            prefix = k.shape[-2] - rope[0].shape[0]  # tokens before the patches: class token, registers
            q, k = apply_rope(q, rope, prefix), apply_rope(k, rope, prefix)
        diagonal = self._diagonal(N, k.shape[-2], x.device) if self.self_mask else None  # (N, N_keys) or None
        scale = self.scale
        if self.log_temperature is not None:
            scale = self.log_temperature.exp().to(q.dtype)[:, None, None]  # per head: (heads, 1, 1)
        if self.fused_attn:
            if self.log_temperature is not None:
                q = q * scale
            x = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=None if diagonal is None else ~diagonal,  # True: may attend
                dropout_p=self.attn_drop.p if self.training else 0.0,
                scale=None if self.log_temperature is None else 1.0,
            )
        else:
            attn = (q * scale) @ k.transpose(-2, -1)  # (B, heads, N, N)
            if diagonal is not None:
                attn = attn.masked_fill(diagonal, float("-inf"))
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)  # concatenate heads
        return self.proj_drop(self.proj(x))


def patch_centres(
    grid_size: tuple[int, int], base_grid: tuple[int, int] | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column (gh*gw,) of each patch's centre, row-major, counted in patches of `base_grid`
    (default: the grid itself, whose patches then sit at 0, 1, 2, ...): on a smaller grid of the same
    image each patch takes its centre's place on the base grid (2 x 2 on 4 x 4: 0.5 and 2.5)."""
    gh, gw = grid_size
    bh, bw = base_grid or grid_size
    ys = (torch.arange(gh, dtype=torch.float32, device=device) + 0.5) * (bh / gh) - 0.5
    xs = (torch.arange(gw, dtype=torch.float32, device=device) + 0.5) * (bw / gw) - 0.5
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return y.flatten(), x.flatten()


def rope_2d(
    grid_size: tuple[int, int],
    head_dim: int,
    theta: float = 100.0,
    base_grid: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2-D rotary position embedding (Su et al. 2021; for images Heo et al. 2024,
    "Rotary position embedding for vision transformer"): (sin, cos), each (gh*gw, head_dim).

    The first half of each head's channels turns with the patch's row, the second with its column,
    in head_dim/4 pairs per axis at frequencies 1 down to ~1/theta radian per patch. A query at p
    and a key at p' rotated so meet at an angle that depends on p - p' only: the logits see
    relative positions. Positions count patches of `base_grid` (default: the grid itself), each patch
    at its centre, as in `sincos_pos_embed_2d`, so progressive resizing keeps a region's offsets.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"rope needs head_dim divisible by 4 (a pair per frequency per axis), got {head_dim}")
    if not theta > 0:
        raise ValueError(f"rope_theta must be > 0, got {theta}")
    y, x = patch_centres(grid_size, base_grid, device)
    n = head_dim // 4
    omega = 1.0 / theta ** (torch.arange(n, dtype=torch.float32, device=device) / n)  # (n,)
    ay = y[:, None] * omega  # (N, n): the row's angle per frequency
    ax = x[:, None] * omega
    # Channel layout per head: [y pair a | y pair b | x pair a | x pair b], n channels each; the
    # pairs are (channel i, channel i + n) within each axis' half, as `_rotate_half_axial` pairs them.
    sin = torch.cat([ay.sin(), ay.sin(), ax.sin(), ax.sin()], dim=1)
    cos = torch.cat([ay.cos(), ay.cos(), ax.cos(), ax.cos()], dim=1)
    return sin, cos


def _rotate_half_axial(t: torch.Tensor) -> torch.Tensor:
    """(..., head_dim): each axis' half [a, b] -> [-b, a] (a quarter-turn of every pair)."""
    ya, yb, xa, xb = t.chunk(4, dim=-1)
    return torch.cat([-yb, ya, -xb, xa], dim=-1)


def apply_rope(t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], prefix: int = 0) -> torch.Tensor:
    """Rotate the patch rows of t (B, heads, L, head_dim) by their positions; rows [0:prefix] (class
    token, registers) stay. With L < prefix + N_patches (the class-token head's queries), the first
    patch rows take the first positions."""
    sin, cos = rope
    if t.shape[-2] <= prefix:
        return t
    rows = t[..., prefix:, :]
    n = rows.shape[-2]
    # The tables in t's dtype: a float32 table would promote a bf16 step to float32.
    rows = rows * cos[:n].to(t.dtype) + _rotate_half_axial(rows) * sin[:n].to(t.dtype)
    return torch.cat([t[..., :prefix, :], rows], dim=-2) if prefix else rows


def _noisy_identity_factors(dim: int, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L, R (dim, dim) with L @ R = alpha * Z + beta * I, Z uniform with variance 1/dim; the
    singular values are split evenly (L = U sqrt(S), R = sqrt(S) V^T), so L[:, :r] @ R[:r] is the
    best rank-r approximation of the target."""
    bound = math.sqrt(3.0 / dim)  # uniform(-b, b) has variance b^2 / 3 = 1 / dim
    z = torch.empty(dim, dim).uniform_(-bound, bound)
    u, s, vh = torch.linalg.svd(alpha * z + beta * torch.eye(dim))
    root = s.sqrt()
    return u * root, root[:, None] * vh


@torch.no_grad()
def mimetic_init_(attn: Attention, qk: tuple[float, float] = (0.7, 0.7), vo: tuple[float, float] = (0.4, 0.4)) -> None:
    """Mimetic initialization (Trockman & Kolter, ICML 2023) of one attention layer, in place.

    Trained ViTs' heads have W_q^T W_k close to a positive multiple of the identity (a token
    attends to tokens like itself, and through the positions to its neighbours) and W_proj W_v
    close to a negative one. Starting there instead of from random weights gives the attention
    a local, convolution-like pattern from the first step. Per head, W_q^T W_k is the best
    rank-head_dim approximation of a1 Z + b1 I (a new Z per head); W_proj W_v = a2 Z - b2 I.
    Biases keep their init (zeros); only the weights of qkv and proj change.
    """
    C, hd = attn.proj.in_features, attn.head_dim
    w = attn.qkv.weight  # (3C, C): rows [0:C] make queries, [C:2C] keys, [2C:3C] values
    for h in range(attn.num_heads):
        L, R = _noisy_identity_factors(C, *qk)
        rows = slice(h * hd, (h + 1) * hd)
        w[rows] = L[:, :hd].T  # W_q of head h: (hd, C)
        w[C:][rows] = R[:hd]  # W_k of head h: (hd, C); W_q^T W_k = L[:, :hd] @ R[:hd]
    L, R = _noisy_identity_factors(C, vo[0], -vo[1])
    w[2 * C :] = R  # W_v (C, C)
    attn.proj.weight.copy_(L)  # W_proj (C, C): W_proj @ W_v = a2 Z - b2 I


def sincos_frequencies(
    dim: int, temperature: float = 10000.0, device: torch.device | str | None = None
) -> torch.Tensor:
    """The dim/4 frequencies of `sincos_pos_embed_2d`, highest first: 1 down to ~1/temperature."""
    return 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32, device=device) / (dim // 4))


# weight_init="impulse": the patch embedding's initial weights are scaled by this, so that in the
# first LayerNorm the sin-cos positions outweigh the pixels and the heads' positional pattern, not a
# token's likeness to itself, sets where they attend (measured on training images: README).
IMPULSE_PATCH_EMBED_GAIN = 0.3


@torch.no_grad()
def impulse_init_(
    attn: Attention, offsets: list[tuple[int, int]], temperature: float = 10000.0, scale: float = 8.0
) -> None:
    """Impulse initialization of one attention layer's queries and keys, in place, for sin-cos
    positions: head h starts attending from each patch to the patch `offsets[h]` = (dy, dx) away,
    one tap of a convolution (Zheng et al. 2024, "Structured initialization for attention in
    vision transformers"). Values, output projection and biases keep their init.

    Derived in closed form rather than fitted: `sincos_pos_embed_2d` stores, per frequency w,
    (sin wy, cos wy) and (sin wx, cos wx), and a shift by d rotates each pair by w d. With W_k
    reading the head_dim/4 highest frequencies of each of the four quarters and W_q reading the
    same channels rotated by (dy, dx), q_i . k_j = scale * sum_w [cos w(y_i + dy - y_j) + cos w(x_i + dx - x_j)]
    for the positions' part, largest at j = i + (dy, dx), on every grid size (progressive resizing
    included). `offsets` count patches of the grid the positions are built on; `scale` multiplies
    the logits before the 1/sqrt(head_dim).
    """
    C, hd, H = attn.proj.in_features, attn.head_dim, attn.num_heads
    if hd % 4 or C % 4:
        raise ValueError(f"weight_init='impulse' needs embed_dim and head_dim divisible by 4, got {C} and {hd}")
    if len(offsets) != H:
        raise ValueError(f"impulse_init_ needs one offset per head ({H}), got {len(offsets)}")
    q4, n = C // 4, hd // 4  # channels per quarter (sin y, cos y, sin x, cos x); frequencies per head
    w = attn.qkv.weight  # (3C, C): rows [0:C] make queries, [C:2C] keys
    idx = torch.arange(n, device=w.device)
    omega = sincos_frequencies(C, temperature, w.device)[:n]  # the n highest
    root = math.sqrt(scale)
    w[: 2 * C].zero_()
    for h, (dy, dx) in enumerate(offsets):
        for axis, d in ((0, dy), (1, dx)):  # quarters 0, 1: sin y, cos y; 2, 3: sin x, cos x
            sin_ch = idx + 2 * axis * q4  # the channel of sin(w t) for each frequency
            cos_ch = sin_ch + q4
            c, s = torch.cos(omega * d), torch.sin(omega * d)
            rows_sin = h * hd + 2 * axis * n + idx  # this head's query / key rows for the pairs
            rows_cos = rows_sin + n
            # query (sin w(t+d), cos w(t+d)): the pair (sin wt, cos wt) rotated; key: the pair itself
            w[rows_sin, sin_ch], w[rows_sin, cos_ch] = root * c, root * s
            w[rows_cos, sin_ch], w[rows_cos, cos_ch] = -root * s, root * c
            w[C + rows_sin, sin_ch] = root
            w[C + rows_cos, cos_ch] = root


@torch.no_grad()
def whiten_patch_embed_(patch_embed: PatchEmbed, images: torch.Tensor, eps: float = 1e-2) -> None:
    """Data-dependent init: the patch embedding starts as a whitening of the image patches.

    images: (N, C, H, W), as the first training steps see them (normalized, at their size).
    With the patches' covariance V diag(lam) V^T (k = C*p*p directions, 5x that with shifted patch
    tokens), the weight becomes s * R diag(lam + eps * mean(lam))^-1/2 V^T over the r = min(D, k)
    directions that vary most, R a random (D, r) matrix with orthonormal columns: the tokens of these
    images have one and the same variance, s^2, along each of those directions, instead of the few
    smooth directions of natural images dominating (airbench's whitened first layer, for a linear
    patch embedding); with D < k the k - r least varying ones are left out. eps damps the directions
    that barely vary (pixel noise, JPEG). s keeps the mean per-channel token variance that the
    embedding had before; the bias centres the tokens. Draws R from torch's global RNG.
    """
    w = patch_embed.proj.weight  # (D, C', p, p): C' = C, or 5C with shifted patch tokens
    D, k = w.shape[0], w[0].numel()
    r = min(D, k)
    ph, pw = patch_embed.patch_size
    x = patch_embed.shifted_views(images.to(w.dtype))
    # (N, C*p*p, L) -> (N*L, C*p*p): every patch as a row, channel-major like the conv kernel.
    patches = F.unfold(x, (ph, pw), stride=(ph, pw)).transpose(1, 2).reshape(-1, k).double()
    if patches.shape[0] <= k:
        raise ValueError(f"whitening needs more than {k} patches, got {patches.shape[0]}")
    mean, cov = patches.mean(0), torch.cov(patches.T)  # (k,), (k, k)
    lam, V = torch.linalg.eigh(cov)  # ascending eigenvalues, orthonormal eigenvectors (columns)
    lam = lam.clamp_min(0)
    floor = eps * lam.mean()
    lam, V = lam[-r:], V[:, -r:]  # the r directions that vary most
    white = (lam + floor).rsqrt()[:, None] * V.T  # (r, k): patch -> whitened coordinates
    R, _ = torch.linalg.qr(torch.randn(D, r, dtype=torch.float64))  # (D, r), orthonormal columns
    old = w.reshape(D, k).double()
    before = torch.einsum("dk,kl,dl->d", old, cov, old).mean()  # mean channel variance of the tokens now
    new = R @ white
    after = torch.einsum("dk,kl,dl->d", new, cov, new).mean()
    new = new * (before / after).sqrt()
    w.copy_(new.reshape(w.shape).to(w.dtype))
    if patch_embed.proj.bias is not None:
        patch_embed.proj.bias.copy_((-(new @ mean)).to(w.dtype))


class Mlp(nn.Module):
    """Two-layer perceptron with exact (erf) GELU, as in ViT."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class GluMlp(nn.Module):
    """Gated MLP as timm's `GluMlp` with `gate_last=False` and SiLU (`SwiGLUPacked`; Shazeer 2020):
    fc1 makes `hidden` features, the first half gates the second, fc2 reads the `hidden // 2`
    products. Its weights, d h + (h / 2) d = 1.5 d h, equal a GELU MLP's 2 d (r d) at
    h = 4 r d / 3: `mlp_ratio` 2.667 for ratio 2 (2.625 at 128 wide, where h must be even)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0) -> None:
        super().__init__()
        if hidden_features % 2:
            raise ValueError(
                f"a gated MLP splits fc1's {hidden_features} features into gate and value halves: "
                "pick an mlp_ratio that makes int(embed_dim * mlp_ratio) even"
            )
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.SiLU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()  # timm's slot for an optional norm on the gated features
        self.fc2 = nn.Linear(hidden_features // 2, in_features)
        self.drop2 = nn.Dropout(drop)

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's: the value half of fc1 starts near 0 with bias 1 (its weights N(0, 1e-6)), so at
        init the block's MLP is fc2(SiLU(gate))."""
        half = self.fc1.out_features // 2
        nn.init.ones_(self.fc1.bias[half:])
        nn.init.normal_(self.fc1.weight[half:], std=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.fc1(x).chunk(2, dim=-1)  # (..., hidden // 2) each
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(gate) * value))))


# The blocks' MLP by `mlp_layer`: "mlp" (fc1 -> GELU -> fc2, timm's Mlp) or "swiglu" (timm's SwiGLUPacked
# with act_layer=nn.SiLU: fc1 packs the gate and the value, fc2 reads their product, half as wide).
MLP_LAYERS: dict[str, type[nn.Module]] = {"mlp": Mlp, "swiglu": GluMlp}


class LayerScale(nn.Module):
    """Per-channel learnable scale of a residual branch (CaiT); `gamma` as in timm."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, rescale the survivors."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask.div_(keep)  # scale the (B, 1, 1) mask, not x: one pass over x, timm's rounding

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        fused_attn: bool = True,
        qk_norm: bool = False,
        mlp_layer: str = "mlp",
        self_mask: bool = False,
        learned_temperature: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(
            dim, num_heads, qkv_bias, attn_drop, proj_drop, fused_attn, qk_norm, self_mask, learned_temperature
        )
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP_LAYERS[mlp_layer](dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, num_queries: int | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """(B, N, C) -> (B, N, C), or (B, num_queries, C): the outputs of the first tokens only,
        which still attend to all N (what a class-token head reads from the last block).
        rope: the patch tokens' rotary tables (`rope_2d`), or None."""
        h = self.attn(self.norm1(x), num_queries, rope)
        if num_queries is not None:
            x = x[:, :num_queries]
        x = x + self.drop_path1(self.ls1(h))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x


@torch.no_grad()
def zero_residuals_(blk: Block) -> None:
    """Zero the output projections of a block's two residual branches (attention's `proj`, the
    MLP's `fc2`): the block is then the identity, x + 0 + 0, until training moves them. A model
    that grows (optim.depth_schedule) starts its held-back blocks so, which makes running them
    and skipping them the same function; their other weights keep their init."""
    for linear in (blk.attn.proj, blk.mlp.fc2):
        nn.init.zeros_(linear.weight)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)


def sincos_pos_embed_2d(
    grid_size: tuple[int, int],
    dim: int,
    temperature: float = 10000.0,
    base_grid: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (gh*gw, dim), row-major like the patches.

    A quarter of the channels each for sin(y), cos(y), sin(x), cos(x) (MAE / "Simple ViT").
    Positions count patches of `base_grid` (default: the grid itself); on another grid each patch
    takes the position of its centre in base-grid units, so a 16 px image and a 32 px image of the
    same scene give each region the same code (as resizing a learned embedding would).
    """
    if dim % 4 != 0:
        raise ValueError(f"pos_embed='sincos' needs embed_dim divisible by 4, got {dim}")
    y, x = patch_centres(grid_size, base_grid, device)
    omega = sincos_frequencies(dim, temperature, device)  # (dim/4,)
    y = y[:, None] * omega[None, :]  # (N, dim/4)
    x = x[:, None] * omega[None, :]
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


class PatchDropout(nn.Module):
    """Keep a random subset of the patch tokens in training (timm's PatchDropout, Liu et al. 2022):
    fewer tokens per step, so cheaper steps. Prefix tokens (class, registers) are always kept; the
    kept patches are in random order (attention does not care). Identity in eval mode.

    `prob` is an attribute, not a buffer: a training schedule may change it between steps."""

    def __init__(self, prob: float = 0.5, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, prefix + L, D) -> (B, prefix + max(1, int(L * (1 - prob))), D) in training."""
        if not self.training or self.prob == 0.0:
            return x
        p = self.num_prefix_tokens
        prefix, x = x[:, :p], x[:, p:]
        B, L = x.shape[:2]
        num_keep = max(1, int(L * (1.0 - self.prob)))
        # The same draws as timm: one normal per token, the smallest num_keep ranks kept.
        keep = torch.argsort(torch.randn(B, L, device=x.device), dim=-1)[:, :num_keep]  # (B, num_keep)
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return torch.cat([prefix, x], dim=1) if p else x

    def extra_repr(self) -> str:
        return f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}"


class VisionTransformer(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2021) with timm's keywords, defaults and names.

    Extra over timm: `pos_embed="sincos"` (a fixed buffer, not a parameter; its lowest frequency
    set by `pos_embed_temperature`, as in timm's `build_sincos2d_pos_embed`); `fused_attn`;
    `weight_init="mimetic"` (`mimetic_init_` of each attention layer after timm's init) and, with
    sin-cos positions, `weight_init="impulse"` (`impulse_init_`); `self_mask` (no token attends to
    itself) and `learned_temperature` (a learned logit scale per head), the two parts of Lee et
    al. 2021's locality self-attention; `rope` (axial rotary positions on queries and keys,
    `rope_2d`), beside or instead of `pos_embed`; `shifted_patches` (the patch embedding also sees
    the image shifted half a patch along each diagonal, `PatchEmbed.shifted_views`; no timm
    counterpart). `global_pool` takes timm's "avg", "max", "avgmax".
    `reg_tokens`: register tokens after the class token (timm's keyword, names and order).
    `config` holds the constructor arguments, so `VisionTransformer(**model.config)` rebuilds it.
    """

    def __init__(
        self,
        *,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        mlp_layer: str = "mlp",
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        reg_tokens: int = 0,
        pos_embed: str = "learn",
        pos_embed_temperature: float = 10000.0,
        no_embed_class: bool = False,
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        dynamic_img_size: bool = False,
        weight_init: str = "",
        fused_attn: bool = True,
        self_mask: bool = False,
        learned_temperature: bool = False,
        rope: bool = False,
        rope_theta: float = 100.0,
        shifted_patches: bool = False,
    ) -> None:
        super().__init__()
        # Plain primitives only: checkpoints store this dict and tools rebuild from it.
        self.config: dict[str, Any] = {
            "img_size": list(img_size) if isinstance(img_size, (tuple, list)) else img_size,
            "patch_size": list(patch_size) if isinstance(patch_size, (tuple, list)) else patch_size,
            "in_chans": in_chans,
            "num_classes": num_classes,
            "global_pool": global_pool,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "mlp_layer": mlp_layer,
            "qkv_bias": qkv_bias,
            "qk_norm": qk_norm,
            "init_values": init_values,
            "class_token": class_token,
            "reg_tokens": reg_tokens,
            "pos_embed": pos_embed,
            "pos_embed_temperature": pos_embed_temperature,
            "no_embed_class": no_embed_class,
            "fc_norm": fc_norm,
            "drop_rate": drop_rate,
            "pos_drop_rate": pos_drop_rate,
            "patch_drop_rate": patch_drop_rate,
            "proj_drop_rate": proj_drop_rate,
            "attn_drop_rate": attn_drop_rate,
            "drop_path_rate": drop_path_rate,
            "dynamic_img_size": dynamic_img_size,
            "weight_init": weight_init,
            "fused_attn": fused_attn,
            "self_mask": self_mask,
            "learned_temperature": learned_temperature,
            "rope": rope,
            "rope_theta": rope_theta,
            "shifted_patches": shifted_patches,
        }
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' without a class token")
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"weight_init must be one of {WEIGHT_INITS}, got {weight_init!r}")
        if weight_init == "impulse" and pos_embed != "sincos":
            raise ValueError(
                f"weight_init='impulse' is derived from sin-cos positions: set pos_embed='sincos', not {pos_embed!r}"
            )
        if mlp_layer not in MLP_LAYERS:
            raise ValueError(f"mlp_layer must be one of {tuple(MLP_LAYERS)}, got {mlp_layer!r}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {POS_EMBEDS}, got {pos_embed!r}")
        if not pos_embed_temperature > 0:
            raise ValueError(f"pos_embed_temperature must be > 0, got {pos_embed_temperature}")
        if pos_embed != "sincos" and pos_embed_temperature != 10000.0:
            raise ValueError(f"pos_embed_temperature sets sin-cos positions; pos_embed={pos_embed!r} does not use it")
        if depth < 1 or embed_dim < 1 or num_classes < 0 or reg_tokens < 0:
            raise ValueError(
                "need depth >= 1, embed_dim >= 1, num_classes >= 0, reg_tokens >= 0; "
                f"got {depth}, {embed_dim}, {num_classes}, {reg_tokens}"
            )
        if rope and patch_drop_rate > 0:
            raise ValueError(
                "rope rotates each patch token by its grid position, which patch dropping discards: "
                "set patch_drop_rate=0 with rope=True"
            )
        if rope and num_heads > 0 and embed_dim % num_heads == 0:  # (else Attention says why the heads don't fit)
            rope_2d((1, 1), embed_dim // num_heads, rope_theta)  # head_dim and theta checked here
        elif rope_theta != 100.0:
            raise ValueError(f"rope_theta sets the rotary embedding; rope=False does not use it (got {rope_theta})")
        if shifted_patches and min(_pair(patch_size)) < 2:
            raise ValueError(f"shifted_patches moves the image half a patch: needs patch_size >= 2, got {patch_size}")
        for name, rate in (
            ("drop_rate", drop_rate),
            ("pos_drop_rate", pos_drop_rate),
            ("patch_drop_rate", patch_drop_rate),
            ("proj_drop_rate", proj_drop_rate),
            ("attn_drop_rate", attn_drop_rate),
            ("drop_path_rate", drop_path_rate),
        ):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")

        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        # Prefix tokens, in timm's order: [class token], registers (Darcet et al. 2024), then patches.
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.rope_theta = rope_theta if rope else None  # None: no rotary embedding

        self.patch_embed = PatchEmbed(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            strict_img_size=not dynamic_img_size,
            shift=min(_pair(patch_size)) // 2 if shifted_patches else 0,  # half a patch, as Lee et al.
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.randn(1, embed_len, embed_dim) * 0.02)
        elif pos_embed == "sincos":
            # Fixed, so a buffer rebuilt at construction rather than stored in checkpoints.
            pe = sincos_pos_embed_2d(self.patch_embed.grid_size, embed_dim, pos_embed_temperature)
            if not no_embed_class and self.num_prefix_tokens:
                pe = torch.cat([pe.new_zeros(self.num_prefix_tokens, embed_dim), pe])  # prefix tokens: no position
            self.register_buffer("pos_embed", pe[None], persistent=False)
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # timm registers the module only when the rate is > 0; ours always exists (it holds no
        # weights, so state dicts are the same), so a schedule can switch it on during a run.
        self.patch_drop = PatchDropout(patch_drop_rate, num_prefix_tokens=self.num_prefix_tokens)

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth grows with depth
        self.blocks = nn.Sequential(
            *[
                Block(
                    embed_dim,
                    num_heads,
                    mlp_ratio,
                    qkv_bias,
                    proj_drop=proj_drop_rate,
                    attn_drop=attn_drop_rate,
                    init_values=init_values,
                    drop_path=dpr[i],
                    fused_attn=fused_attn,
                    qk_norm=qk_norm,
                    mlp_layer=mlp_layer,
                    self_mask=self_mask,
                    learned_temperature=learned_temperature,
                )
                for i in range(depth)
            ]
        )
        # How many of the blocks run (None: all). Not a constructor keyword (timm has none): a
        # growth schedule (optim.depth_schedule) sets it during training, and the blocks it holds
        # back are identities until then (`zero_residuals_`), so a checkpoint runs the same with all.
        self.active_blocks: int | None = None
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6) if not use_fc_norm else nn.Identity()
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights(weight_init)

    # -- init ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, mode: str = "") -> None:
        """timm's default ('jax'-free) init: trunc-normal(0.02) Linear weights and pos_embed,
        zero biases, a tiny normal class token; conv and LayerNorm keep PyTorch's defaults.
        mode="mimetic": then each attention layer's query, key, value and output weights as
        `mimetic_init_` sets them. mode="impulse": each layer's queries and keys as `impulse_init_`
        sets them, its heads on distinct random taps of a 3 x 3 kernel, and the patch embedding's
        weights times IMPULSE_PATCH_EMBED_GAIN (once per call: call it on a fresh model)."""
        if self.patch_embed.proj.weight.is_meta:
            return  # built on the meta device for its shapes only (the FLOP counter): no values, no RNG draws
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, GluMlp):  # after its Linear layers, as timm's named_apply (children first)
                m.init_weights()
        if mode == "mimetic":
            for blk in self.blocks:
                mimetic_init_(blk.attn)
        elif mode == "impulse":
            # Each layer's heads take distinct taps of a 3 x 3 kernel, drawn at random (seeded).
            taps = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
            for blk in self.blocks:
                H = blk.attn.num_heads
                order = torch.cat([torch.randperm(len(taps)) for _ in range(-(-H // len(taps)))])[:H]
                offsets = [taps[i] for i in order.tolist()]
                impulse_init_(blk.attn, offsets, self.config["pos_embed_temperature"])
            self.patch_embed.proj.weight.mul_(IMPULSE_PATCH_EMBED_GAIN)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    # -- forward ---------------------------------------------------------------------------
    def _pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor | None:
        """The position embedding for a patch grid other than the one the model was built for
        (dynamic_img_size): learned positions are resized bicubically as timm does; sin-cos ones
        are computed for the new grid, in the built grid's units."""
        pe, built = self.pos_embed, self.patch_embed.grid_size
        if pe is None or tuple(grid) == built:
            return pe
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        if isinstance(pe, nn.Parameter):
            return resample_pos_embed(pe, grid, prefix, old_grid=built)
        temperature = self.config["pos_embed_temperature"]
        new = sincos_pos_embed_2d(grid, self.embed_dim, temperature, base_grid=built, device=pe.device).to(pe.dtype)
        return torch.cat([pe[0, :prefix], new])[None]

    def _pos_embed(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, N, D) patch tokens -> (B, prefix + N, D): class token, registers, patches, positions."""
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        pos_embed = self._pos_embed_for(grid) if grid is not None else self.pos_embed
        if self.no_embed_class:  # positions for the patches only: add, then prepend
            if pos_embed is not None:
                x = x + pos_embed
            x = torch.cat([*prefix, x], dim=1) if prefix else x
        else:  # positions for every token: prepend, then add
            x = torch.cat([*prefix, x], dim=1) if prefix else x
            if pos_embed is not None:
                x = x + pos_embed
        return self.pos_drop(x)

    def _grid(self, x: torch.Tensor) -> tuple[int, int] | None:
        """The patch grid of images x under dynamic_img_size (None: the built grid)."""
        if not self.dynamic_img_size:
            return None
        return (x.shape[-2] // self.patch_embed.patch_size[0], x.shape[-1] // self.patch_embed.patch_size[1])

    def _rope(self, grid: tuple[int, int] | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The rotary tables of the patch grid (None without rope), positions in built-grid units."""
        if self.rope_theta is None:
            return None
        if self.training and self.patch_drop.prob > 0:
            raise RuntimeError("rope needs every patch token at its grid position: switch patch dropping off")
        built = self.patch_embed.grid_size
        return rope_2d(grid or built, self.blocks[0].attn.head_dim, self.rope_theta, base_grid=built, device=device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = self._grid(x)
        rope = self._rope(grid, x.device)
        x = self.patch_embed(x)  # (B, N, D)
        x = self.patch_drop(self._pos_embed(x, grid))  # (B, prefix + N, D); fewer patches in training with patch_drop
        for blk in self._running_blocks():
            x = blk(x, rope=rope)
        return self.norm(x)

    def _running_blocks(self) -> nn.Sequential:
        """The blocks a forward runs: all, or the first `active_blocks` while a model grows."""
        return self.blocks if self.active_blocks is None else self.blocks[: self.active_blocks]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D) as timm pools: the class token, or a reduction over the patch tokens."""
        if self.global_pool == "token":
            return x[:, 0]  # class token
        if not self.global_pool:
            return x
        x = x[:, self.num_prefix_tokens :]  # the patch tokens
        if self.global_pool == "avg":
            return x.mean(dim=1)
        if self.global_pool == "max":
            # Each feature's largest value over the tokens: where in the image a feature fires
            # does not matter, as airbench's global max pool (a CNN's) has it.
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax: timm's order of the sum

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc_norm(self.pool(x))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool != "token":
            return self.forward_head(self.forward_features(x))
        # The class-token head reads one token of the last block, so that block computes its
        # outputs for the class token only (queries, projection and MLP for 1 row instead of N;
        # keys and values still for all N). Same logits as forward_features -> forward_head,
        # with about (depth - 5/6) / depth of the FLOPs (0.86x at depth 6); forward_features
        # still returns every token.
        grid = self._grid(x)
        rope = self._rope(grid, x.device)
        x = self.patch_drop(self._pos_embed(self.patch_embed(x), grid))  # (B, 1 + N, D)
        blocks = self._running_blocks()
        for blk in blocks[:-1]:
            x = blk(x, rope=rope)
        x = self.norm(blocks[-1](x, num_queries=1, rope=rope))  # (B, 1, D)
        return self.forward_head(x)


# -- position embeddings for another grid (dynamic_img_size) --------------------------------


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int, old_grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """(1, prefix + gh*gw, D) -> (1, prefix + GH*GW, D): bicubic resize of the patch positions."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if old_grid is None:
        side = math.isqrt(grid.shape[1])
        if side * side != grid.shape[1]:
            raise ValueError(f"cannot infer the grid of a position embedding with {grid.shape[1]} patch tokens")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    D = grid.shape[-1]
    grid = grid.reshape(1, *old_grid, D).permute(0, 3, 1, 2).float()  # (1, D, gh, gw)
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
