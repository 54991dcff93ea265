"""Attention maps (hooks, explicit path, equal to timm's) and rollout on hand-built tensors."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vit.attention import attention_maps, attention_maps_and_grads, rollout
from vit.model import VisionTransformer

KW = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=3, num_heads=4)


def _maps(*layers):
    """Stack per-layer (heads, N, N) lists into (depth, 1, heads, N, N)."""
    return torch.stack([torch.tensor(layer, dtype=torch.float64)[None] for layer in layers])


def test_rollout_identity_attention_gives_zero_patch_map():
    maps = _maps([torch.eye(5).tolist()])
    torch.testing.assert_close(rollout(maps), torch.zeros(1, 2, 2, dtype=torch.float64))


def test_rollout_uniform_attention():
    n = 5  # class token + 2x2 patches
    maps = _maps([torch.full((n, n), 1 / n).tolist()])
    # (U + I) / 2: the class token's row puts 1/(2n) on each patch.
    torch.testing.assert_close(rollout(maps), torch.full((1, 2, 2), 1 / (2 * n), dtype=torch.float64))


def test_rollout_two_layers_multiplies():
    swap = [[0.0, 1.0], [1.0, 0.0]]  # class token and the single patch attend to each other
    # one layer: (W + I)/2 = [[.5,.5],[.5,.5]]; two layers: the same matrix squared, still .5
    assert rollout(_maps([swap]), grid_size=(1, 1)).item() == pytest.approx(0.5)
    assert rollout(_maps([swap], [swap]), grid_size=(1, 1)).item() == pytest.approx(0.5)
    keep = [[1.0, 0.0], [0.0, 1.0]]
    # identity then swap: [[.5,.5],[.5,.5]] @ I -> .5; swap's rows after identity layer
    assert rollout(_maps([keep], [swap]), grid_size=(1, 1)).item() == pytest.approx(0.5)


def test_rollout_head_fusion_and_row_renormalization_with_keepdim():
    h1 = [[1.0, 0.0], [1.0, 0.0]]
    h2 = [[0.5, 0.5], [0.0, 1.0]]
    maps = torch.tensor([h1, h2], dtype=torch.float64)[None, None]  # (1, 1, 2 heads, 2, 2)
    # max: [[1, .5], [1, 1]]; + I, /2: [[1, .25], [.5, 1]]; rows / (1.25, 1.5): class row [.8, .2].
    # (Dividing by the un-kept sum would broadcast over columns and give .25/1.5 = .1667.)
    assert rollout(maps, "max", grid_size=(1, 1)).item() == pytest.approx(0.2)
    # min: [[.5, 0], [0, 0]]; + I, /2: [[.75, 0], [0, .5]] -> class row on the patch: 0.
    assert rollout(maps, "min", grid_size=(1, 1)).item() == pytest.approx(0.0)
    # mean: [[.75, .25], [.5, .5]]; + I, /2: [[.875, .125], [.25, .75]] -> .125
    assert rollout(maps, "mean", grid_size=(1, 1)).item() == pytest.approx(0.125)


def test_rollout_discard_keeps_the_class_token_column():
    # Class token column holds the smallest weights; discarding must not touch it.
    layer = [
        [0.01, 0.59, 0.40],
        [0.02, 0.28, 0.70],
        [0.03, 0.67, 0.30],
    ]
    maps = _maps([layer])
    # Patch columns hold 6 weights; discard_ratio 0.5 zeroes the 3 smallest: .28, .30, .40.
    # Class row becomes [.01, .59, 0]; + I, /2 -> [.505, .295, 0]; / .8 -> patches [.36875, 0]
    out = rollout(maps, discard_ratio=0.5, grid_size=(1, 2))
    torch.testing.assert_close(out, torch.tensor([[[0.36875, 0.0]]], dtype=torch.float64))


def test_rollout_without_class_token_averages_rows():
    n = 4
    maps = _maps([torch.eye(n).tolist()])
    torch.testing.assert_close(rollout(maps, num_prefix_tokens=0), torch.full((1, 2, 2), 0.25, dtype=torch.float64))


def test_rollout_bad_arguments():
    maps = _maps([torch.eye(5).tolist()])
    with pytest.raises(ValueError, match="head_fusion"):
        rollout(maps, "median")
    with pytest.raises(ValueError, match="discard_ratio"):
        rollout(maps, discard_ratio=1.0)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_maps_equal_timm_probabilities(fused):
    torch.manual_seed(0)
    # Dropout configured: maps must come from eval mode, and fused models must still be recorded.
    ours = VisionTransformer(**KW, attn_drop_rate=0.3, proj_drop_rate=0.1, fused_attn=fused).train()
    timm = TimmViT(**KW, attn_drop_rate=0.3, proj_drop_rate=0.1).eval()
    timm.load_state_dict(ours.state_dict(), strict=True)
    captured = []
    for blk in timm.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_pre_hook(lambda m, inp: captured.append(inp[0]))
    x = torch.randn(2, 3, 16, 16)
    maps = attention_maps(ours, x)
    with torch.no_grad():
        timm(x)
    assert maps.shape == (3, 2, 4, 17, 17)
    torch.testing.assert_close(maps, torch.stack(captured), atol=1e-6, rtol=0)
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 2, 4, 17))
    # The model is left as it was: same mode, same attention path, no hooks.
    assert ours.training
    assert all(b.attn.fused_attn == fused for b in ours.blocks)
    assert all(not b.attn.attn_drop._forward_pre_hooks for b in ours.blocks)


def test_attention_maps_and_grads():
    torch.manual_seed(0)
    model = VisionTransformer(**KW).eval()
    x = torch.randn(2, 3, 16, 16)
    maps, grads, logits = attention_maps_and_grads(model, x, target=1)
    assert maps.shape == grads.shape == (3, 2, 4, 17, 17)
    assert grads.abs().sum() > 0
    torch.testing.assert_close(maps, attention_maps(model, x))
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))
    assert all(p.grad is None for p in model.parameters())
    out = rollout(maps, grads=grads)
    assert out.shape == (2, 4, 4) and (out >= 0).all()
