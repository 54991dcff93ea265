"""The network: shapes, fused == explicit, timm parity by construction, timm checkpoints, errors."""

import math

import pytest
import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from vit.errors import CheckpointError
from vit.model import (
    IMPULSE_PATCH_EMBED_GAIN,
    Attention,
    PatchEmbed,
    VisionTransformer,
    apply_rope,
    impulse_init_,
    resample_pos_embed,
    rope_2d,
    sincos_pos_embed_2d,
    whiten_patch_embed_,
    zero_residuals_,
)
from vit.optim import param_groups
from vit.pretrained import load_timm_weights

TINY = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=2, num_heads=4)

# Configurations that timm also builds: every switch the issue names, several sizes.
PARITY = [
    dict(TINY),
    dict(TINY, class_token=False, global_pool="avg"),
    dict(TINY, global_pool="avg"),
    dict(TINY, qkv_bias=False),
    dict(TINY, img_size=32, patch_size=8, embed_dim=48, num_heads=3, depth=3),
    dict(TINY, img_size=(16, 24), patch_size=4, mlp_ratio=2.0),
    dict(TINY, depth=1, num_heads=1, mlp_ratio=3.0),
    dict(TINY, init_values=1e-2),
    dict(TINY, no_embed_class=True),
    dict(TINY, in_chans=1, num_classes=3),
    dict(TINY, global_pool="avg", fc_norm=False),
    # Registers (timm's reg_tokens): after the class token, with or without positions of their own.
    dict(TINY, reg_tokens=4),
    dict(TINY, reg_tokens=2, no_embed_class=True),
    dict(TINY, reg_tokens=1, class_token=False, global_pool="avg"),
    # LayerNorm on each head's queries and keys; token dropping (identity in eval mode).
    dict(TINY, qk_norm=True),
    dict(TINY, qk_norm=True, class_token=False, global_pool="avg", qkv_bias=False),
    dict(TINY, patch_drop_rate=0.5),
    dict(TINY, patch_drop_rate=0.25, reg_tokens=2, class_token=False, global_pool="avg"),
    # The gated SiLU MLP (timm's SwiGLUPacked): fc1 packs gate and value, fc2 half as wide.
    dict(TINY, mlp_layer="swiglu"),
    dict(TINY, mlp_layer="swiglu", mlp_ratio=2.5, class_token=False, global_pool="avg", qkv_bias=False),
    # The patch tokens' largest value per feature, and its mean with their average (timm's "max", "avgmax").
    dict(TINY, class_token=False, global_pool="max"),
    dict(TINY, global_pool="avgmax", reg_tokens=2),
    dict(TINY, class_token=False, global_pool="avgmax", fc_norm=False),
]


def _timm_kw(kw):
    """Our keywords as timm's: mlp_layer="swiglu" is timm's SwiGLUPacked with act_layer=nn.SiLU."""
    kw = {k: v for k, v in kw.items() if k != "fused_attn"}
    if kw.pop("mlp_layer", "mlp") == "swiglu":
        kw.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU)
    return kw


def _pair(kw, seed=0):
    torch.manual_seed(seed)
    ours = VisionTransformer(**kw)
    theirs = TimmViT(**_timm_kw(kw))
    return ours, theirs


def _images(kw, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = kw["img_size"] if isinstance(kw["img_size"], tuple) else (kw["img_size"],) * 2
    return torch.randn(batch, kw.get("in_chans", 3), *size, generator=g)


def test_shapes_and_features():
    m = VisionTransformer(**TINY).eval()
    x = _images(TINY)
    assert m(x).shape == (3, 5)
    feats = m.forward_features(x)
    assert feats.shape == (3, 1 + 16, 32)  # class token + 4x4 patches
    assert m.forward_head(feats, pre_logits=True).shape == (3, 32)
    headless = VisionTransformer(**dict(TINY, num_classes=0))
    assert headless(x).shape == (3, 32)


def test_patch_tokens_are_row_major():
    pe = PatchEmbed(img_size=8, patch_size=4, in_chans=1, embed_dim=1)
    with torch.no_grad():
        pe.proj.weight.fill_(1.0)
        pe.proj.bias.zero_()
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 0:4, 4:8] = 1.0  # top-right patch -> token 1 in raster order
    x[0, 0, 4:8, 0:4] = 2.0  # bottom-left patch -> token 2
    assert pe(x)[0, :, 0].tolist() == [0.0, 16.0, 32.0, 0.0]


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax"])
def test_global_pool_reduces_the_patch_tokens_only(pool):
    m = VisionTransformer(**dict(TINY, reg_tokens=2, class_token=False, global_pool=pool)).eval()
    feats = torch.randn(3, 2 + 16, 32)
    feats[:, :2] = 1e3  # registers: left out of every reduction
    patches = feats[:, 2:]
    expected = {
        "avg": patches.mean(1),
        "max": patches.max(1).values,
        "avgmax": (patches.max(1).values + patches.mean(1)) / 2,
    }[pool]
    torch.testing.assert_close(m.pool(feats), expected, rtol=0, atol=1e-6)
    # The final LayerNorm moves after the pooling (timm's fc_norm default for these pools).
    assert isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.LayerNorm)
    torch.testing.assert_close(m.forward_head(feats, pre_logits=True), m.fc_norm(expected))


def test_max_pool_sends_each_feature_gradient_to_one_token():
    m = VisionTransformer(**dict(TINY, class_token=False, global_pool="max"))
    feats = torch.randn(2, 16, 32, requires_grad=True)
    m.pool(feats).sum().backward()
    # One token per (image, feature) holds the maximum and gets the whole gradient.
    assert feats.grad.sum(1).eq(1).all() and feats.grad.ne(0).sum(1).eq(1).all()


def test_config_rebuilds_model():
    m = VisionTransformer(**dict(TINY, global_pool="avg", class_token=False, drop_path_rate=0.1))
    clone = VisionTransformer(**m.config)
    assert clone.config == m.config
    clone.load_state_dict(m.state_dict(), strict=True)
    assert all(isinstance(v, (int, float, str, bool, list, type(None))) for v in m.config.values())


@pytest.mark.parametrize("kw", [TINY, dict(TINY, class_token=False, global_pool="avg", attn_drop_rate=0.3)])
def test_fused_equals_explicit(kw):
    fused = VisionTransformer(**kw, fused_attn=True).eval()
    explicit = VisionTransformer(**kw, fused_attn=False).eval()
    explicit.load_state_dict(fused.state_dict())
    x = _images(kw)
    torch.testing.assert_close(fused(x), explicit(x), atol=1e-5, rtol=0)


def test_attention_probs_rows_sum_to_one_and_drive_the_output():
    attn = Attention(16, num_heads=2, qkv_bias=True, fused_attn=False).eval()
    x = torch.randn(2, 5, 16)
    # The explicit path's probabilities are the input of attn_drop (what vit.attention records).
    seen = []
    attn.attn_drop.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    attn(x)
    p = seen[0]
    assert p.shape == (2, 2, 5, 5)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 5))
    # Recompute the output by hand from the probabilities.
    v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)[2]
    out = attn.proj((p @ v).transpose(1, 2).reshape(2, 5, 16))
    torch.testing.assert_close(attn(x), out)


@pytest.mark.parametrize(
    "kw", PARITY, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items() if TINY.get(k) != v) or "tiny"
)
def test_timm_parity_both_directions(kw):
    ours, theirs = _pair(kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same names, same order
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = _images(kw)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)
    # And the reverse direction: timm's weights into ours.
    torch.manual_seed(123)
    theirs2 = TimmViT(**_timm_kw(kw)).eval()
    ours.load_state_dict(theirs2.state_dict(), strict=True)
    torch.testing.assert_close(ours(x), theirs2(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "extra",
    [{}, {"reg_tokens": 3}, {"qk_norm": True}, {"mlp_layer": "swiglu"}],
    ids=["plain", "registers", "qk_norm", "swiglu"],
)
def test_timm_gradient_parity(fused, extra):
    kw = dict(TINY, init_values=1e-1, **extra)
    ours, theirs = _pair(kw)
    ours = VisionTransformer(**kw, fused_attn=fused)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x, y = _images(kw), torch.tensor([0, 3, 4])
    for m in (ours, theirs):
        torch.nn.functional.cross_entropy(m(x), y).backward()
    for (name, p), (tname, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert name == tname
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_swiglu_starts_as_timm_does_and_refuses_an_odd_width():
    # timm's GluMlp.init_weights: fc1's value half near 0 with bias 1, so the MLP starts as fc2(SiLU(gate)).
    torch.manual_seed(0)
    kw = dict(TINY, embed_dim=64, mlp_layer="swiglu", mlp_ratio=2.5)
    for m in (VisionTransformer(**kw), TimmViT(**_timm_kw(kw))):
        fc1, fc2 = m.blocks[0].mlp.fc1, m.blocks[0].mlp.fc2
        assert fc1.weight.shape == (160, 64) and fc2.weight.shape == (64, 80)
        assert fc1.weight[80:].abs().max() < 1e-4 and torch.equal(fc1.bias[80:], torch.ones(80))
        assert abs(fc1.weight[:80].std().item() - 0.02) < 0.003 and fc1.bias[:80].abs().max() == 0
    with pytest.raises(ValueError, match="even"):
        VisionTransformer(**dict(TINY, mlp_layer="swiglu", mlp_ratio=1.5 + 1 / 32))  # 32 * 1.53 -> 49 features
    with pytest.raises(ValueError, match="mlp_layer must be one of"):
        VisionTransformer(**dict(TINY, mlp_layer="geglu"))


def test_init_matches_timm_statistics():
    torch.manual_seed(0)
    m = VisionTransformer(img_size=32, patch_size=4, embed_dim=192, depth=2, num_heads=3, num_classes=10)
    fc1 = m.blocks[0].mlp.fc1.weight
    assert abs(fc1.std().item() - 0.02) < 0.002  # timm truncates at +-2 absolute: a no-op at std 0.02
    assert abs(fc1.mean().item()) < 0.001
    assert m.blocks[0].attn.qkv.bias.abs().max() == 0 and m.head.bias.abs().max() == 0
    assert abs(m.pos_embed.std().item() - 0.02) < 0.003
    assert m.cls_token.abs().max() < 1e-4


def test_mimetic_init_makes_qk_near_identity_and_vo_near_minus_identity():
    torch.manual_seed(0)
    C, heads = 64, 4
    m = VisionTransformer(**dict(TINY, embed_dim=C, num_heads=heads, weight_init="mimetic"))
    plain = VisionTransformer(**dict(TINY, embed_dim=C, num_heads=heads))
    eye = torch.eye(C)
    for blk in m.blocks:
        attn, hd = blk.attn, C // heads
        w = attn.qkv.weight
        wq, wk, wv = w[:C], w[C : 2 * C], w[2 * C :]
        for h in range(heads):
            qk = wq[h * hd : (h + 1) * hd].T @ wk[h * hd : (h + 1) * hd]  # (C, C), rank hd
            assert torch.linalg.matrix_rank(qk) == hd
            # The best rank-hd approximation of 0.7 Z + 0.7 I keeps a positive diagonal.
            assert qk.diagonal().mean() > 0.2 and (qk.diagonal() > 0).float().mean() > 0.9
        vo = attn.proj.weight @ wv  # full rank: exactly 0.4 Z - 0.4 I
        noise = (vo + 0.4 * eye) / 0.4
        assert abs(noise.diagonal().mean()) < 0.05
        assert abs(noise.std().item() * C**0.5 - 1.0) < 0.1  # Z has variance 1 / C
        assert attn.qkv.bias.abs().max() == 0 and attn.proj.bias.abs().max() == 0
    # Only the attention weights differ from timm's init; the other weights keep its statistics.
    assert abs(m.blocks[0].mlp.fc1.weight.std().item() - plain.blocks[0].mlp.fc1.weight.std().item()) < 0.003
    assert m.config["weight_init"] == "mimetic"


def test_mimetic_init_changes_values_not_structure():
    """A mimetic-initialized model is still timm's: strict load both ways, equal logits."""
    kw = dict(TINY, class_token=False, global_pool="avg")
    ours = VisionTransformer(**kw, weight_init="mimetic").eval()
    theirs = TimmViT(**kw).eval()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = _images(kw)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    back = VisionTransformer(**ours.config).eval()  # the config rebuilds it; the weights come from the state
    back.load_state_dict(theirs.state_dict(), strict=True)
    torch.testing.assert_close(back(x), ours(x), atol=0, rtol=0)


@pytest.mark.parametrize("temperature", [10000.0, 100.0])
@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])
def test_impulse_init_points_each_head_at_its_offset_on_any_grid(temperature, grid):
    """On sin-cos positions alone, head h's logits are scale * sum_w [cos w(dy_i + dy - dy_j) + ...]:
    the formula, and so largest at j = i + offset[h] for every patch whose target is on the grid."""
    C, heads = 64, 4
    attn = Attention(C, num_heads=heads, qkv_bias=True)
    values, proj, bias = attn.qkv.weight[2 * C :].clone(), attn.proj.weight.clone(), attn.qkv.bias.clone()
    offsets = [(0, 1), (1, 0), (-1, -1), (0, 0)]
    impulse_init_(attn, offsets, temperature, scale=3.0)
    gh, gw = grid
    pos = sincos_pos_embed_2d(grid, C, temperature)  # (N, C)
    q, k = (pos @ attn.qkv.weight[:C].T), (pos @ attn.qkv.weight[C : 2 * C].T)  # (N, C) each
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ys, xs = ys.flatten().float(), xs.flatten().float()
    hd, n = C // heads, C // heads // 4
    omega = 1.0 / temperature ** (torch.arange(n) / (C // 4))
    for h, (dy, dx) in enumerate(offsets):
        logits = q[:, h * hd : (h + 1) * hd] @ k[:, h * hd : (h + 1) * hd].T  # (N, N)
        dys = (ys[:, None] + dy - ys[None, :])[..., None] * omega
        dxs = (xs[:, None] + dx - xs[None, :])[..., None] * omega
        torch.testing.assert_close(logits, 3.0 * (dys.cos() + dxs.cos()).sum(-1), atol=1e-4, rtol=1e-4)
        ty, tx = ys + dy, xs + dx
        inside = (ty >= 0) & (ty < gh) & (tx >= 0) & (tx < gw)
        assert (logits.argmax(1)[inside] == (ty * gw + tx)[inside].long()).all()
    # Values, output projection and biases untouched.
    assert torch.equal(attn.qkv.weight[2 * C :], values) and torch.equal(attn.proj.weight, proj)
    assert torch.equal(attn.qkv.bias, bias)


def test_impulse_init_draws_distinct_taps_and_scales_only_the_patch_embedding():
    kw = dict(
        TINY, embed_dim=64, depth=3, class_token=False, global_pool="avg", pos_embed="sincos", dynamic_img_size=True
    )
    torch.manual_seed(0)
    plain = VisionTransformer(**kw)
    torch.manual_seed(0)
    m = VisionTransformer(**kw, weight_init="impulse")
    C, hd = 64, 16
    pos = sincos_pos_embed_2d((4, 4), C)
    for blk, ref in zip(m.blocks, plain.blocks, strict=True):
        w = blk.attn.qkv.weight
        taps = set()
        for h in range(4):
            rows = slice(h * hd, (h + 1) * hd)
            logits = (pos @ w[:C][rows].T) @ (pos @ w[C:][rows].T).T  # (16, 16) on the 4 x 4 grid
            at = logits[5].argmax().item()  # patch (1, 1): every tap of a 3 x 3 kernel is on the grid
            taps.add((at // 4 - 1, at % 4 - 1))
        assert len(taps) == 4  # distinct taps of the 3 x 3 kernel
        # Values, output projection and the MLP keep timm's init, drawn identically.
        torch.testing.assert_close(w[2 * C :], ref.attn.qkv.weight[2 * C :], atol=0, rtol=0)
        torch.testing.assert_close(blk.attn.proj.weight, ref.attn.proj.weight, atol=0, rtol=0)
        torch.testing.assert_close(blk.mlp.fc1.weight, ref.mlp.fc1.weight, atol=0, rtol=0)
    torch.testing.assert_close(m.patch_embed.proj.weight, IMPULSE_PATCH_EMBED_GAIN * plain.patch_embed.proj.weight)
    with torch.device("meta"):  # as the FLOP counter builds it: shapes only, no error
        assert VisionTransformer(**kw, weight_init="impulse").blocks[0].attn.qkv.weight.is_meta
    torch.manual_seed(0)
    again = VisionTransformer(**kw, weight_init="impulse")
    torch.testing.assert_close(again.blocks[2].attn.qkv.weight, m.blocks[2].attn.qkv.weight, atol=0, rtol=0)


def test_drop_path_increases_linearly_and_is_inactive_in_eval():
    m = VisionTransformer(**dict(TINY, depth=3, drop_path_rate=0.2))
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in m.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    m.eval()
    x = _images(TINY)
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(x), m(x))


def test_sincos_pos_embed():
    pe = sincos_pos_embed_2d((4, 4), 32)
    assert pe.shape == (16, 32)
    # sin^2 + cos^2 = 1 per frequency, for both axes
    torch.testing.assert_close(pe[:, :8] ** 2 + pe[:, 8:16] ** 2, torch.ones(16, 8))
    m = VisionTransformer(**dict(TINY, pos_embed="sincos"))
    assert "pos_embed" not in m.state_dict()  # fixed, rebuilt from config
    assert m.pos_embed.shape == (1, 17, 32)
    assert m(_images(TINY)).shape == (3, 5)


def test_sincos_temperature_sets_the_lowest_frequency_on_every_grid():
    # Channels [0, dim/4) are sin(y * omega_k), omega_k = temperature ** (-k / (dim/4)).
    pe = sincos_pos_embed_2d((8, 1), 32, temperature=100.0)  # y = 0..7, x = 0
    omega = 100.0 ** (-torch.arange(8) / 8)
    torch.testing.assert_close(pe[:, :8], torch.sin(torch.arange(8.0)[:, None] * omega))
    m = VisionTransformer(**dict(TINY, pos_embed="sincos", pos_embed_temperature=100.0, dynamic_img_size=True))
    assert m.config["pos_embed_temperature"] == 100.0
    torch.testing.assert_close(m.pos_embed[0, 1:], sincos_pos_embed_2d((4, 4), 32, temperature=100.0))
    # Another image size computes its grid with the same temperature (16 px: a 4 x 4 grid, 8 px: 2 x 2).
    coarse = m._pos_embed_for((2, 2))[0, 1:]
    torch.testing.assert_close(coarse, sincos_pos_embed_2d((2, 2), 32, 100.0, base_grid=(4, 4)))
    assert not torch.allclose(coarse, sincos_pos_embed_2d((2, 2), 32, base_grid=(4, 4)))


def test_load_timm_weights_resamples_from_a_file(tmp_path):
    torch.manual_seed(0)
    # A "pretrained" timm model at another resolution and patch size, saved to disk.
    src = TimmViT(img_size=64, patch_size=16, num_classes=7, embed_dim=32, depth=2, num_heads=4)
    for ext in ("pth", "safetensors"):
        path = tmp_path / f"timm.{ext}"
        if ext == "pth":
            torch.save({"model": src.state_dict()}, path)
        else:
            from safetensors.torch import save_file

            save_file(src.state_dict(), str(path))
        ours = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=32, depth=2, num_heads=4)
        fresh_head = ours.head.weight.detach().clone()
        load_timm_weights(ours, path)
        assert ours.pos_embed.shape == (1, 1 + 64, 32)
        assert ours.patch_embed.proj.weight.shape == (32, 3, 4, 4)
        torch.testing.assert_close(ours.head.weight, fresh_head)  # 7 -> 10 classes: head replaced
        torch.testing.assert_close(ours.blocks[1].mlp.fc2.weight, src.blocks[1].mlp.fc2.weight)
        torch.testing.assert_close(ours.cls_token, src.cls_token)
        torch.testing.assert_close(ours.pos_embed[:, :1], src.pos_embed[:, :1])  # class position kept
        assert torch.isfinite(ours(torch.randn(2, 3, 32, 32))).all()


def test_resample_pos_embed_is_identity_for_same_grid_and_smooth_otherwise():
    pe = torch.randn(1, 1 + 16, 8)
    assert resample_pos_embed(pe, (4, 4), 1) is pe
    # A constant embedding stays constant under resampling.
    const = torch.ones(1, 1 + 16, 8)
    torch.testing.assert_close(resample_pos_embed(const, (8, 8), 1), torch.ones(1, 65, 8))


def test_patch_kernel_resize_preserves_embeddings():
    # load_timm_weights resizes kernels with timm's resample_patch_embed (bicubic, FlexiViT).
    torch.manual_seed(0)
    w = torch.randn(6, 3, 4, 4)
    src = {
        k: v
        for k, v in TimmViT(img_size=16, patch_size=4, num_classes=5, embed_dim=6, depth=1, num_heads=2)
        .state_dict()
        .items()
    }
    src["patch_embed.proj.weight"] = w
    ours = load_timm_weights(
        VisionTransformer(img_size=32, patch_size=8, num_classes=5, embed_dim=6, depth=1, num_heads=2), src
    )
    w_big = ours.patch_embed.proj.weight.detach()
    assert w_big.shape == (6, 3, 8, 8)
    # Upsizing the kernel is exact: <x, w> == <resize(x), resize(w)> for any patch x.
    x = torch.randn(5, 3, 4, 4)
    x_big = torch.nn.functional.interpolate(x, size=(8, 8), mode="bicubic", antialias=True)
    torch.testing.assert_close(
        torch.einsum("bchw,dchw->bd", x_big, w_big), torch.einsum("bchw,dchw->bd", x, w), atol=1e-4, rtol=1e-4
    )


def test_load_timm_weights_rejects_mismatched_model(tmp_path):
    src = TimmViT(img_size=16, patch_size=4, num_classes=5, embed_dim=48, depth=2, num_heads=4)
    ours = VisionTransformer(**TINY)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_timm_weights(ours, src.state_dict())
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not read"):
        load_timm_weights(ours, bad)
    with pytest.raises(CheckpointError, match="timm checkpoint not found"):
        load_timm_weights(ours, tmp_path / "missing.pth")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(TINY, img_size=18), r"img_size \(18, 18\) is not divisible by patch_size \(4, 4\)"),
        (dict(TINY, num_heads=5), "embed_dim 32 is not divisible by num_heads 5"),
        (dict(TINY, global_pool="map"), "global_pool must be one of"),
        (dict(TINY, class_token=False), "needs class_token=True"),
        (dict(TINY, pos_embed="rope"), "pos_embed must be one of"),
        (dict(TINY, pos_embed="sincos", pos_embed_temperature=0.0), "pos_embed_temperature must be > 0, got 0.0"),
        (dict(TINY, pos_embed_temperature=100.0), "pos_embed='learn' does not use it"),
        (dict(TINY, drop_path_rate=1.5), r"drop_path_rate must be in \[0, 1\)"),
        (dict(TINY, weight_init="jax"), r"weight_init must be one of \('', 'mimetic', 'impulse'\), got 'jax'"),
        (dict(TINY, weight_init="impulse"), "derived from sin-cos positions: set pos_embed='sincos', not 'learn'"),
        (
            dict(TINY, embed_dim=24, num_heads=4, pos_embed="sincos", weight_init="impulse"),
            "head_dim divisible by 4, got 24 and 6",
        ),
    ],
)
def test_bad_config_raises_value_error(kw, match):
    with pytest.raises(ValueError, match=match):
        VisionTransformer(**kw)


@pytest.mark.parametrize("shape", [(2, 3, 32, 32), (2, 1, 16, 16), (3, 16, 16)])
def test_bad_input_shape_raises_value_error(shape):
    m = VisionTransformer(**TINY)
    with pytest.raises(ValueError, match=r"expected images of shape \(batch, 3, 16, 16\), got"):
        m(torch.randn(*shape))


@pytest.mark.parametrize(
    "kw",
    [
        dict(TINY),
        dict(TINY, class_token=False, global_pool="avg"),
        dict(TINY, no_embed_class=True),
        dict(TINY, reg_tokens=2),
    ],
)
@pytest.mark.parametrize("size", [(8, 8), (24, 12), (16, 16)])
def test_dynamic_img_size_matches_timm(kw, size):
    kw = dict(kw, dynamic_img_size=True)
    ours, theirs = _pair(kw)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=0)


def test_dynamic_sincos_positions_are_patch_centres_in_the_built_grid():
    same = sincos_pos_embed_2d((4, 4), 32, base_grid=(4, 4))
    torch.testing.assert_close(same, sincos_pos_embed_2d((4, 4), 32))
    # A 2x2 grid over a model built for 4x4: each patch sits at the centre of the 2x2 block of
    # built patches it covers, at 0.5 and 2.5 on each axis.
    coarse = sincos_pos_embed_2d((2, 2), 32, base_grid=(4, 4))
    omega = 1.0 / 10000.0 ** (torch.arange(8) / 8)
    for row, (y, x) in enumerate([(0.5, 0.5), (0.5, 2.5), (2.5, 0.5), (2.5, 2.5)]):
        want = torch.cat([(y * omega).sin(), (y * omega).cos(), (x * omega).sin(), (x * omega).cos()])
        torch.testing.assert_close(coarse[row], want)
    m = VisionTransformer(**dict(TINY, pos_embed="sincos", dynamic_img_size=True)).eval()
    x = _images(TINY)
    strict = VisionTransformer(**dict(TINY, pos_embed="sincos"))
    strict.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), strict.eval()(x))  # at the built size: the same function
    assert m(torch.randn(3, 3, 8, 8)).shape == (3, 5)


def test_dynamic_img_size_still_rejects_sizes_the_patch_does_not_tile():
    m = VisionTransformer(**dict(TINY, dynamic_img_size=True))
    with pytest.raises(ValueError, match=r"multiples of the patch size \(4, 4\), got \(2, 3, 10, 16\)"):
        m(torch.randn(2, 3, 10, 16))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "kw", [dict(TINY), dict(TINY, qkv_bias=False, init_values=0.1), dict(TINY, no_embed_class=True)]
)
def test_class_token_forward_equals_the_full_forward(kw, fused):
    # forward() computes only the class token in the last block; the full path must agree,
    # in values and in gradients.
    torch.manual_seed(0)
    m = VisionTransformer(**kw, fused_attn=fused)
    x = _images(kw)
    full = m.forward_head(m.forward_features(x))
    pruned = m(x)
    torch.testing.assert_close(pruned, full, atol=1e-6, rtol=0)
    g_full = torch.autograd.grad(full.square().sum(), list(m.parameters()))
    g_pruned = torch.autograd.grad(pruned.square().sum(), list(m.parameters()))
    for (name, _), a, b in zip(m.named_parameters(), g_pruned, g_full):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    # The last block's attention really runs on one query: its projection sees (B, 1, D).
    seen = []
    m.blocks[-1].attn.proj.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    m(x)
    assert seen == [(3, 1, 32)]


@pytest.mark.parametrize("extra", [dict(class_token=False, global_pool="avg"), {}])
def test_blocks_held_back_with_zero_residuals_are_identities_so_skipping_them_changes_nothing(extra):
    # A growing model (optim.depth_schedule) runs its first `active_blocks` blocks; the rest start
    # with zero output projections, so a checkpoint taken mid-growth runs the same with every block.
    torch.manual_seed(0)
    kw = dict(TINY, depth=3, **extra)
    m = VisionTransformer(**kw).eval()
    for blk in m.blocks[1:]:
        zero_residuals_(blk)
    x = _images(kw)
    every_block = m(x)
    m.active_blocks = 1
    seen = []
    hooks = [blk.register_forward_hook(lambda mod, args, out, i=i: seen.append(i)) for i, blk in enumerate(m.blocks)]
    one_block = m(x)
    assert seen == [0]  # the held-back blocks do not run
    torch.testing.assert_close(one_block, every_block, atol=1e-6, rtol=0)
    for h in hooks:
        h.remove()
    # Once a held-back block has weights of its own, skipping it is a different network.
    torch.nn.init.normal_(m.blocks[2].mlp.fc2.weight)
    m.active_blocks = None
    assert (m(x) - one_block).abs().max() > 1e-3
    # zero_residuals_ zeroes the two output projections only: the inner weights keep their init.
    assert all(p.abs().sum() > 0 for p in (m.blocks[1].attn.qkv.weight, m.blocks[1].mlp.fc1.weight))


def test_class_token_forward_with_drop_path_uses_the_same_random_stream_as_timm():
    kw = dict(TINY, depth=3, drop_path_rate=0.3)
    ours, theirs = _pair(kw)
    theirs.load_state_dict(ours.state_dict())
    x = _images(kw)
    torch.manual_seed(5)
    a = ours.train()(x)
    torch.manual_seed(5)
    b = theirs.train()(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "extra",
    [{}, {"class_token": False, "global_pool": "avg"}, {"reg_tokens": 2, "qk_norm": True}],
    ids=["class-token", "avg", "registers+qk_norm"],
)
def test_patch_drop_in_training_keeps_the_same_tokens_as_timm(extra):
    # In training, patch_drop_rate keeps a random max(1, int(L * (1 - rate))) of the L patch tokens
    # and every prefix token; with the same seed ours and timm's keep the same ones, so logits and
    # gradients are equal (the draws are the only randomness here).
    kw = dict(TINY, patch_drop_rate=0.5, **extra)
    ours, theirs = _pair(kw)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x, y = _images(kw), torch.tensor([0, 3, 4])
    outs = []
    for m in (ours.train(), theirs.train()):
        torch.manual_seed(11)
        out = m(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    # Half of the 16 patches reach the blocks; the prefix tokens all do.
    seen = []
    ours.blocks[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[1]))
    ours(x)
    assert seen == [ours.num_prefix_tokens + 8]
    # Another seed keeps other tokens; eval mode keeps them all, whatever the rate.
    torch.manual_seed(12)
    assert not torch.allclose(ours(x), outs[0])
    ours.eval()
    seen.clear()
    ours(x)
    assert seen == [ours.num_prefix_tokens + 16]


def test_registers_sit_after_the_class_token_and_are_read_by_no_head():
    m = VisionTransformer(**dict(TINY, reg_tokens=3)).eval()
    assert m.num_prefix_tokens == 4 and m.reg_token.shape == (1, 3, 32) and "reg_token" in m.no_weight_decay()
    x = _images(TINY)
    feats = m.forward_features(x)
    assert feats.shape == (3, 1 + 3 + 16, 32)
    torch.testing.assert_close(m(x), m.forward_head(feats), atol=1e-5, rtol=0)  # the class-token-only last block
    avg = VisionTransformer(**dict(TINY, reg_tokens=2, class_token=False, global_pool="avg")).eval()
    f = avg.forward_features(x)
    torch.testing.assert_close(avg.forward_head(f, pre_logits=True), avg.fc_norm(f[:, 2:].mean(1)))  # patches only


def _smooth_images(n: int, size: int) -> torch.Tensor:
    """Images whose neighbouring pixels are correlated, as in photographs: upsampled noise + a little noise."""
    coarse = torch.nn.functional.interpolate(torch.randn(n, 3, size // 4, size // 4), size=size, mode="bilinear")
    return 2.0 * coarse + 0.05 * torch.randn(n, 3, size, size)


def test_whiten_patch_embed_gives_centred_tokens_of_equal_variance_in_every_patch_direction():
    torch.manual_seed(0)
    pe = PatchEmbed(16, 4, 3, 64, strict_img_size=False)
    x = _smooth_images(400, 16)
    cov = lambda t: torch.cov(t.reshape(-1, t.shape[-1]).double().T)  # noqa: E731  (D, D) over all tokens
    with torch.no_grad():
        before = pe(x)
        whiten_patch_embed_(pe, x, eps=1e-6)
        after = pe(x)
    lam_before, lam_after = torch.linalg.eigvalsh(cov(before)), torch.linalg.eigvalsh(cov(after))
    # 48 patch directions (3 x 4 x 4) into 64 channels: 48 equal variances, 16 channels' worth of nothing.
    top = lam_after[-48:]
    assert top.min() / top.max() > 0.99, top
    assert lam_after[:16].abs().max() < 1e-6 * top.max()
    assert lam_before[-48:].min() / lam_before[-48:].max() < 1e-3  # the smooth images were far from it
    # The mean channel variance is kept, and the bias centres the tokens.
    torch.testing.assert_close(cov(after).diagonal().mean(), cov(before).diagonal().mean(), rtol=1e-4, atol=0)
    assert after.reshape(-1, 64).mean(0).abs().max() < 1e-4 * after.std()


def test_whiten_patch_embed_eps_damps_the_directions_that_barely_vary_and_needs_room():
    torch.manual_seed(0)
    x = _smooth_images(400, 16)
    spread = []
    for eps in (1e-6, 1e-1):
        pe = PatchEmbed(16, 4, 3, 48, strict_img_size=False)
        with torch.no_grad():
            whiten_patch_embed_(pe, x, eps=eps)
            lam = torch.linalg.eigvalsh(torch.cov(pe(x).reshape(-1, 48).double().T))
        spread.append((lam.max() / lam.min()).item())
    assert spread[0] < 1.1 < 10 < spread[1]  # larger eps: the least varying directions stay small
    with pytest.raises(ValueError, match="more than 48 patches"):
        whiten_patch_embed_(PatchEmbed(16, 4, 3, 64, strict_img_size=False), x[:2])


@pytest.mark.parametrize("shift", [0, 2])
def test_whiten_patch_embed_narrower_than_the_patches_keeps_the_directions_that_vary_most(shift):
    # 32 channels for 48 patch directions (240 with shifted patches: the image and 4 shifted copies):
    # the 32 most varying directions, each at one variance; what the tokens lose is only the rest.
    torch.manual_seed(0)
    x = _smooth_images(400, 16)
    pe = PatchEmbed(16, 4, 3, 32, strict_img_size=False, shift=shift)
    k = pe.proj.weight[0].numel()
    assert k == (240 if shift else 48)
    with torch.no_grad():
        whiten_patch_embed_(pe, x, eps=1e-6)
        tokens = pe(x).reshape(-1, 32).double()
    lam = torch.linalg.eigvalsh(torch.cov(tokens.T))
    assert lam.min() / lam.max() > 0.99, lam
    # The rows span the top 32 principal directions of the patches the convolution reads.
    patches = torch.nn.functional.unfold(pe.shifted_views(x), 4, stride=4).transpose(1, 2).reshape(-1, k).double()
    top = torch.linalg.eigh(torch.cov(patches.T))[1][:, -32:]  # (k, 32)
    w = pe.proj.weight.reshape(32, k).double()
    torch.testing.assert_close(w @ top @ top.T, w, atol=1e-6 * w.abs().max().item(), rtol=0)


def test_shifted_views_are_the_image_moved_half_a_patch_along_each_diagonal():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    pe = PatchEmbed(8, 4, 3, 16, shift=2)
    v = pe.shifted_views(x)
    assert v.shape == (2, 15, 8, 8) and torch.equal(v[:, :3], x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for n, (i, j) in enumerate([(0, 0), (0, 4), (4, 0), (4, 4)]):  # down-right, down-left, up-right, up-left
        torch.testing.assert_close(v[:, 3 * (n + 1) : 3 * (n + 2)], padded[..., i : i + 8, j : j + 8], rtol=0, atol=0)
    assert torch.equal(v[:, 3:6, 2:, 2:], x[..., :6, :6]) and not v[:, 3:6, :2].any()  # zeros fill the edge
    assert torch.equal(PatchEmbed(8, 4, 3, 16).shifted_views(x), x)  # no shift: the image as it is


def test_shifted_patch_token_sees_the_patch_and_half_a_patch_around_it():
    # Lee et al. 2021: one linear map still, over the 8 x 8 pixels centred on each 4 x 4 patch.
    torch.manual_seed(0)
    m = VisionTransformer(
        img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=10, shifted_patches=True
    )
    assert m.patch_embed.proj.weight.shape == (32, 15, 4, 4) and m.config["shifted_patches"] is True
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    m.patch_embed(x)[0, 5].sum().backward()  # token (1, 1): pixels 4..7 each way
    seen = x.grad[0].abs().sum(0) > 0
    expect = torch.zeros(16, 16, dtype=torch.bool)
    expect[2:10, 2:10] = True
    assert torch.equal(seen, expect)
    with pytest.raises(ValueError, match="needs patch_size >= 2"):
        VisionTransformer(img_size=16, patch_size=1, embed_dim=32, depth=1, num_heads=2, shifted_patches=True)
    with pytest.raises(ValueError, match="shift must be >= 0"):
        PatchEmbed(16, 4, 3, 32, shift=-1)


def test_self_mask_keeps_each_token_from_attending_to_itself():
    # Locality self-attention's diagonal masking: each row of probabilities is a softmax over the
    # other tokens only, so the diagonal is exactly 0 and the rest equals the softmax of the
    # off-diagonal logits alone.
    torch.manual_seed(0)
    attn = Attention(16, num_heads=2, qkv_bias=True, fused_attn=False, self_mask=True).eval()
    x = torch.randn(2, 5, 16)
    seen = []
    attn.attn_drop.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    out = attn(x)
    p = seen[0]  # (2, 2, 5, 5)
    assert torch.equal(p.diagonal(dim1=-2, dim2=-1), torch.zeros(2, 2, 5))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 5))
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * 8**-0.5
    for i in range(5):
        others = [j for j in range(5) if j != i]
        torch.testing.assert_close(p[..., i, others], logits[..., i, others].softmax(-1))
    # Unmasked, the same weights give other outputs.
    attn.self_mask = False
    assert not torch.allclose(attn(x), out)


def _fused_and_explicit_agree(kw):
    """The model with fused and with explicit attention, the same weights: equal logits and gradients.
    Returns the explicit one, the images and its logits."""
    torch.manual_seed(0)
    fused = VisionTransformer(**kw, fused_attn=True)
    explicit = VisionTransformer(**kw, fused_attn=False)
    explicit.load_state_dict(fused.state_dict(), strict=True)
    x, y = _images(kw), torch.tensor([0, 3, 4])
    outs = [m(x) for m in (fused, explicit)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    for out in outs:
        torch.nn.functional.cross_entropy(out, y).backward()
    for (name, p), q in zip(fused.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    return explicit, x, outs[1]


@pytest.mark.parametrize("kw", [dict(TINY), dict(TINY, class_token=False, global_pool="avg", reg_tokens=2)])
def test_self_mask_fused_equals_explicit_and_the_class_token_forward_equals_the_full_one(kw):
    kw = dict(kw, self_mask=True)
    explicit, x, out = _fused_and_explicit_agree(kw)
    # The class token's one-query last block masks the same diagonal entry as the full block does.
    torch.testing.assert_close(explicit(x), explicit.forward_head(explicit.forward_features(x)), atol=1e-6, rtol=0)
    # Switched off, the same weights are timm's model again (self_mask adds no parameters).
    plain = VisionTransformer(**dict(kw, self_mask=False))
    plain.load_state_dict(explicit.state_dict(), strict=True)
    assert not torch.allclose(plain(x), out)
    assert VisionTransformer(**explicit.config).config["self_mask"] is True


def test_self_mask_refuses_a_lone_token():
    m = VisionTransformer(**dict(TINY, img_size=4, class_token=False, global_pool="avg", self_mask=True))
    with pytest.raises(ValueError, match="self_mask needs at least 2 tokens"):
        m(torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("fused", [True, False])
def test_learned_temperature_starts_as_the_fixed_scale_and_scales_each_heads_logits(fused):
    kw = dict(TINY, learned_temperature=True, fused_attn=fused)
    torch.manual_seed(0)
    m = VisionTransformer(**kw)
    plain = VisionTransformer(**dict(kw, learned_temperature=False))
    weights = {k: v for k, v in m.state_dict().items() if not k.endswith("log_temperature")}
    plain.load_state_dict(weights, strict=True)  # the temperature is the one extra parameter
    x = _images(kw)
    torch.testing.assert_close(m(x), plain(x), atol=1e-6, rtol=0)
    # A temperature of twice the scale on every head is the plain model with its queries doubled.
    C = kw["embed_dim"]
    with torch.no_grad():
        for blk, pblk in zip(m.blocks, plain.blocks):
            blk.attn.log_temperature.fill_(math.log(2 * blk.attn.scale))
            pblk.attn.qkv.weight[:C] *= 2
            pblk.attn.qkv.bias[:C] *= 2
    torch.testing.assert_close(m(x), plain(x), atol=1e-5, rtol=0)
    # It learns: each head's temperature gets its own gradient, and no weight decay.
    torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 3, 4])).backward()
    g = m.blocks[0].attn.log_temperature.grad
    assert g.shape == (4,) and torch.all(g != 0) and len(set(g.tolist())) == 4
    _, (decay, no_decay) = param_groups(m, lr=1e-3, weight_decay=0.1)
    assert any(p is m.blocks[0].attn.log_temperature for p in no_decay["params"])
    assert not any(p is m.blocks[0].attn.log_temperature for p in decay["params"])


def test_learned_temperature_fused_equals_explicit_with_the_self_mask():
    kw = dict(TINY, learned_temperature=True, self_mask=True, class_token=False, global_pool="avg")
    torch.manual_seed(0)
    fused = VisionTransformer(**kw, fused_attn=True)
    with torch.no_grad():
        for blk in fused.blocks:
            blk.attn.log_temperature.uniform_(-2.0, 0.0)
    explicit = VisionTransformer(**kw, fused_attn=False)
    explicit.load_state_dict(fused.state_dict(), strict=True)
    x = _images(kw)
    outs = [m(x) for m in (fused, explicit)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    for out in outs:
        out.square().sum().backward()
    for (name, p), q in zip(fused.named_parameters(), explicit.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


# -- rotary positions (model.rope) -----------------------------------------------------------


def test_rope_logits_depend_on_the_offset_between_query_and_key_only():
    # The same query and key vector at every position of a 4 x 4 grid: after the rotations their
    # dot products depend on (dy, dx) = p_key - p_query alone, and every vector keeps its length.
    torch.manual_seed(0)
    rope = rope_2d((4, 4), head_dim=16, theta=100.0)
    q = torch.randn(16).expand(1, 1, 16, 16)  # (B, heads, N, head_dim)
    k = torch.randn(16).expand(1, 1, 16, 16)
    rq, rk = apply_rope(q, rope), apply_rope(k, rope)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    logits = (rq @ rk.transpose(-2, -1))[0, 0]  # (16, 16)
    by_offset = {}
    for i in range(16):
        for j in range(16):
            off = (j // 4 - i // 4, j % 4 - i % 4)
            by_offset.setdefault(off, []).append(logits[i, j])
    for off, vals in by_offset.items():
        torch.testing.assert_close(torch.stack(vals), vals[0].expand(len(vals)), atol=1e-5, rtol=0, msg=str(off))
    assert len({round(v[0].item(), 4) for v in by_offset.values()}) > 40  # offsets tell apart (49 of them)
    # Token 0 sits at (0, 0): no rotation; the next row turns the y half only.
    torch.testing.assert_close(rq[0, 0, 0], q[0, 0, 0])
    torch.testing.assert_close(rq[0, 0, 4, 8:], q[0, 0, 4, 8:])
    assert not torch.allclose(rq[0, 0, 4, :8], q[0, 0, 4, :8])


def test_rope_positions_on_a_smaller_grid_count_patches_of_the_built_one():
    # A 2 x 2 grid on a model built for 4 x 4 puts its patches at the centres 0.5 and 2.5 (as the
    # sin-cos embedding does): offsets between them are 2 built patches, the same image distance.
    sin, cos = rope_2d((2, 2), head_dim=8, theta=100.0, base_grid=(4, 4))
    ys = torch.tensor([0.5, 0.5, 2.5, 2.5])
    xs = torch.tensor([0.5, 2.5, 0.5, 2.5])
    omega = torch.tensor([1.0, 0.1])  # head_dim 8: 2 frequencies per axis, 1 and 100^-1/2
    torch.testing.assert_close(sin[:, :2], (ys[:, None] * omega).sin())
    torch.testing.assert_close(cos[:, 4:6], (xs[:, None] * omega).cos())


@pytest.mark.parametrize(
    "kw", [dict(TINY), dict(TINY, class_token=False, global_pool="avg", reg_tokens=2, pos_embed="sincos")]
)
def test_rope_model_fused_equals_explicit_keeps_prefix_tokens_and_rebuilds(kw):
    kw = dict(kw, rope=True, dynamic_img_size=True)
    explicit, x, out = _fused_and_explicit_agree(kw)  # strict state dicts: rope adds no parameters
    # The class token's one-query last block rotates the same rows the full block does.
    torch.testing.assert_close(explicit(x), explicit.forward_head(explicit.forward_features(x)), atol=1e-6, rtol=0)
    # Another image size runs (progressive resizing), and switched off the weights give other logits.
    assert explicit(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    plain = VisionTransformer(**dict(kw, rope=False))
    plain.load_state_dict(explicit.state_dict(), strict=True)
    assert not torch.allclose(plain(x), out)
    assert VisionTransformer(**explicit.config).config["rope"] is True


def test_rope_leaves_prefix_rows_and_rotates_patch_rows_in_the_steps_dtype():
    rope = rope_2d((2, 2), head_dim=8)
    t = torch.randn(1, 1, 2 + 4, 8, dtype=torch.bfloat16)
    out = apply_rope(t, rope, prefix=2)
    assert out.dtype == torch.bfloat16  # a float32 table would have promoted the step
    assert torch.equal(out[..., :2, :], t[..., :2, :])
    assert torch.equal(apply_rope(t[..., :1, :], rope, prefix=2), t[..., :1, :])  # queries of the class token only


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(TINY, rope=True, patch_drop_rate=0.5), "set patch_drop_rate=0 with rope=True"),
        (
            dict(TINY, rope=True, embed_dim=24, num_heads=4),
            r"rope needs head_dim divisible by 4 \(a pair per frequency per axis\), got 6",
        ),
        (dict(TINY, rope=True, rope_theta=0.0), "rope_theta must be > 0"),
        (dict(TINY, rope_theta=50.0), "rope=False does not use it"),
        (dict(TINY, rope=True, embed_dim=30), "embed_dim 30 is not divisible by num_heads 4"),  # not head_dim's
    ],
)
def test_rope_refuses_what_it_cannot_do(kw, match):
    with pytest.raises(ValueError, match=match):
        VisionTransformer(**kw)


def test_rope_refuses_patch_dropping_switched_on_later():
    m = VisionTransformer(**dict(TINY, rope=True))
    m.patch_drop.prob = 0.5  # what optim.patch_drop_schedule does during a run
    with pytest.raises(RuntimeError, match="switch patch dropping off"):
        m(_images(TINY))
    m.eval()  # patch dropping is identity in eval mode: fine
    assert m(_images(TINY)).shape == (3, 5)
