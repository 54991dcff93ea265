"""DDP on CPU (2 processes, gloo), bf16-mixed and torch.compile, sweeps (basic and Optuna),
starting from a timm checkpoint."""

import csv
import json
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from tests.conftest import FAST, TINY_MODEL, compose_train, run_module
from vit.model import VisionTransformer
from vit.train import build_datamodule, build_module, train


@pytest.mark.slow
def test_ddp_two_cpu_processes(folder_data, tmp_path):
    r = run_module(
        "vit.train",
        [
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.accelerator=cpu",
            "trainer.max_epochs=2",
            "data=folder",
            f"data.root={folder_data}",
            "data.img_size=16",
            "optim.lr=3e-3",
            "test=false",
            *TINY_MODEL,
            *FAST,
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs  # Hydra made one run directory, not one per rank
    run = runs[0]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    # Each rank saw half of each global batch: 90 train images / (16 x 2) -> 2 steps per epoch.
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 * 2
    # val/acc is synchronised over both ranks: it equals an evaluation of the whole val split.
    rows = [r for r in csv.DictReader(open(run / "csv" / "metrics.csv")) if r.get("val/acc")]
    best_logged = max(float(r["val/acc"]) for r in rows)
    e = run_module(
        "vit.evaluate", [f"ckpt_path={run}/checkpoints/best.ckpt", "split=val", "hydra.run.dir=ev"], tmp_path
    )
    assert e.returncode == 0, e.stderr[-2000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["top1"] == pytest.approx(best_logged, abs=1e-6)


@pytest.mark.slow
def test_bf16_mixed_trains_on_cpu_and_matches_fp32(folder_data, tmp_path):
    metrics = train(
        compose_train(
            [
                "data=folder",
                f"data.root={folder_data}",
                "data.img_size=16",
                "trainer.max_epochs=1",
                "trainer.precision=bf16-mixed",
                "test=false",
                *TINY_MODEL,
                *FAST,
            ],
            tmp_path,
        )
    )
    assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, num_classes=3, embed_dim=32, depth=2, num_heads=2).eval()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x).float()
    # bf16 keeps 8 bits of mantissa: logits of size ~1 agree to a few 1e-2.
    torch.testing.assert_close(low, ref, atol=5e-2, rtol=5e-2)


@pytest.mark.slow
def test_compile_trains_and_computes_the_same_function(folder_data, tmp_path):
    cfg = compose_train(
        [
            "data=folder",
            f"data.root={folder_data}",
            "data.img_size=16",
            "trainer.fast_dev_run=true",
            "model.compile=true",
            "model.dynamic_img_size=true",
            *TINY_MODEL,
            *FAST,
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm).eval()
    assert module._compiled is not None
    assert not any(k.startswith("_compiled") or "_orig_mod" in k for k in module.state_dict())
    # One static graph per shape: a new image size and a new batch size compile again and agree.
    for shape in [(4, 3, 16, 16), (4, 3, 24, 24), (3, 3, 16, 16)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            torch.testing.assert_close(module(x), module.net(x), atol=1e-5, rtol=1e-5)
    assert torch._dynamo.config.recompile_limit >= 32


@pytest.mark.slow
def test_optuna_sweep_prints_best_parameters(folder_data, tmp_path):
    r = run_module(
        "vit.train",
        [
            "hparams_search=optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "data=folder",
            f"data.root={folder_data}",
            "data.img_size=16",
            "trainer=debug",
            "test=false",
            f"paths.sweep_dir={tmp_path}/multirun",
            *TINY_MODEL,
            *FAST,
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Best parameters" in r.stdout + r.stderr
    results = list((tmp_path / "multirun").glob("*/*/optimization_results.yaml"))
    assert len(results) == 1 and "best_params" in results[0].read_text()


def test_pretrained_timm_checkpoint_is_loaded(folder_data, tmp_path):
    torch.manual_seed(0)
    src = TimmViT(img_size=64, patch_size=16, num_classes=1000, embed_dim=32, depth=2, num_heads=2)
    path = tmp_path / "timm.pth"
    torch.save(src.state_dict(), path)
    cfg = compose_train(
        ["data=folder", f"data.root={folder_data}", "data.img_size=16", f"model.pretrained={path}", *TINY_MODEL, *FAST],
        tmp_path,
    )
    module = build_module(cfg, build_datamodule(cfg))
    torch.testing.assert_close(module.net.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    assert module.net.head.weight.shape == (3, 32)  # 1000-class head replaced for 3 classes
    assert Path(path).exists()
