"""The ViT paper's views on constructed cases with known answers, registers in the attention
tools, the attention callback, and vit-views on a trained checkpoint."""

import json
import math

import pytest
import torch

from tests.conftest import FAST, TINY_MODEL, compose_train, module_cmd, run_all
from vit.attention import attention_figure, attention_maps, rollout
from vit.model import VisionTransformer, sincos_pos_embed_2d
from vit.train import train
from vit.views import mean_attention_distance, patch_embedding_components, position_similarity


def test_patch_components_recover_the_one_direction_the_filters_vary_along():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(3, 4, 4, generator=g)
    weight = torch.randn(32, generator=g)[:, None, None, None] * v + 5.0  # 32 filters on one line (+ an offset)
    comps, explained = patch_embedding_components(weight, k=5)
    assert comps.shape == (5, 3, 4, 4) and explained[0] == pytest.approx(1.0, abs=1e-6)
    unit = v / v.norm()
    assert min((comps[0] - unit).norm(), (comps[0] + unit).norm()) < 1e-5  # the direction, up to sign
    assert torch.allclose(comps.flatten(1).norm(dim=1)[:1], torch.ones(1))


def test_position_similarity_of_a_position_with_itself_is_one():
    pos = sincos_pos_embed_2d((4, 4), 32)
    sim = position_similarity(pos, (4, 4))
    assert sim.shape == (4, 4, 4, 4)
    torch.testing.assert_close(torch.stack([sim[i, j, i, j] for i in range(4) for j in range(4)]), torch.ones(16))
    torch.testing.assert_close(sim, sim.permute(2, 3, 0, 1))  # symmetric
    assert sim[0, 0, 0, 1] > sim[0, 0, 0, 3]  # sin-cos: nearer positions are more alike
    one_hot = torch.eye(6)  # orthogonal embeddings: similar to themselves only
    torch.testing.assert_close(position_similarity(one_hot, (2, 3)).reshape(6, 6), torch.eye(6))


def _brute_force_uniform_distance(gh: int, gw: int, p: int) -> float:
    cells = [(i, j) for i in range(gh) for j in range(gw)]
    per_query = [sum(math.hypot(p * (a - c), p * (b - d)) for c, d in cells) / len(cells) for a, b in cells]
    return sum(per_query) / len(per_query)


def test_mean_attention_distance_on_known_attention():
    grid, patch, prefix = (3, 4), (4, 4), 1
    n = prefix + 12
    identity = torch.eye(n).expand(2, 5, 3, n, n)  # (depth 2, 5 images, 3 heads, N, N)
    torch.testing.assert_close(mean_attention_distance(identity, grid, patch, prefix), torch.zeros(2, 3))
    uniform = torch.full((1, 2, 4, n, n), 1 / n)  # attention to the class token is left out
    expected = _brute_force_uniform_distance(3, 4, 4)
    torch.testing.assert_close(mean_attention_distance(uniform, grid, patch, prefix), torch.full((1, 4), expected))
    # One head looks at its right-hand neighbour (one patch, 4 px away), the other at itself.
    shift = torch.zeros(12, 12)
    for q in range(12):
        shift[q, q + 1 if q % 4 < 3 else q] = 1.0
    maps = torch.stack([shift, torch.eye(12)])[None, None]  # (1, 1, 2, 12, 12)
    torch.testing.assert_close(mean_attention_distance(maps, grid, patch, 0), torch.tensor([[4.0 * 9 / 12, 0.0]]))


def test_rollout_and_figures_skip_registers():
    torch.manual_seed(0)
    model = VisionTransformer(
        img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=2, reg_tokens=2
    )
    x = torch.randn(1, 3, 16, 16)
    maps = attention_maps(model, x)
    assert maps.shape == (2, 1, 2, 19, 19)
    heat = rollout(maps, num_prefix_tokens=3, grid_size=(4, 4))
    assert heat.shape == (1, 4, 4) and (heat >= 0).all()
    fig = attention_figure(torch.zeros(3, 16, 16, dtype=torch.uint8), maps[:, 0], model, "t")
    assert "2 register tokens skipped" in fig._suptitle.get_text()
    # Registers without a class token: the map is the mean of the patch rows.
    avg = VisionTransformer(
        img_size=16,
        patch_size=4,
        num_classes=3,
        embed_dim=32,
        depth=1,
        num_heads=2,
        reg_tokens=1,
        class_token=False,
        global_pool="avg",
    )
    maps = attention_maps(avg, x)
    heat = rollout(maps, num_prefix_tokens=1, grid_size=(4, 4), class_token=False)
    a = (maps[0, 0].mean(0) + torch.eye(17)) / 2
    a = a / a.sum(-1, keepdim=True)
    torch.testing.assert_close(heat[0], a[1:, 1:].mean(0).reshape(4, 4))


@pytest.mark.slow
def test_registers_attention_callback_views_and_export_on_a_trained_model(folder_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vit.export import export

    run = tmp_path / "run"
    overrides = ["data=folder", f"data.root={folder_data}", "data.img_size=16", "trainer.max_epochs=2", "test=false"]
    overrides += ["model.reg_tokens=2", "callbacks=attention", "callbacks.attention.num_images=4", "logger=many"]
    train(compose_train([*overrides, *TINY_MODEL, *FAST], run))
    assert sorted(p.name for p in (run / "csv" / "attention").iterdir()) == [
        "rollout_epoch000.png",
        "rollout_epoch001.png",
    ]
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert len(events.Images("attention/rollout")) == 2

    ckpt = run / "checkpoints" / "last.ckpt"
    r, att = run_all(
        [
            module_cmd("vit.views", [f"ckpt_path={ckpt}", "num_images=8", "components=6", "hydra.run.dir=views"]),
            module_cmd("vit.attention", [f"ckpt_path={ckpt}", "num_images=1", "hydra.run.dir=att"]),
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    numbers = json.loads((tmp_path / "views" / "views.json").read_text())
    assert len(numbers["mean_attention_distance_px"]) == 2 and len(numbers["mean_attention_distance_px"][0]) == 2
    assert numbers["num_register_tokens"] == 2 and numbers["num_images"] == 8
    assert len(numbers["patch_components_explained_variance"]) == 6
    for png in ("patch_embedding_components.png", "position_similarity.png", "attention_distance.png"):
        assert (tmp_path / "views" / png).read_bytes()[:4] == b"\x89PNG"
    assert att.returncode == 0 and len(list((tmp_path / "att").glob("*.png"))) == 1, att.stderr[-3000:]
    for fmt in ("onnx", "torchscript"):
        _, diff = export(str(ckpt), fmt, tmp_path / "model")
        assert diff < 1e-4
