"""vit-eval and vit-attention: metrics against a direct computation, the train -> eval -> attention
round trip through the CLIs, and bad input (one message, exit 1, no output that looks valid)."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torchvision

from tests.conftest import run_module
from vit.evaluate import compute_metrics


def test_compute_metrics_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g) * 3
    labels = torch.randint(0, 7, (200,), generator=g)
    m = compute_metrics(logits, labels, [f"c{i}" for i in range(7)], num_bins=10)
    pred = logits.argmax(1)
    assert m["num_samples"] == 200
    assert m["top1"] == pytest.approx((pred == labels).float().mean().item())
    top5 = logits.topk(5, dim=1).indices
    assert m["top5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())
    for c in range(7):
        sel = labels == c
        assert m["per_class_accuracy"][f"c{c}"] == pytest.approx((pred[sel] == c).float().mean().item())
    cm = torch.zeros(7, 7, dtype=torch.long)
    for t, p in zip(labels.tolist(), pred.tolist()):
        cm[t, p] += 1
    assert m["confusion_matrix"] == cm.tolist()
    # Expected calibration error: sum over bins of |accuracy - confidence| weighted by bin size.
    conf = logits.softmax(1).max(1).values
    ece = 0.0
    for b in range(10):
        lo, hi = b / 10, (b + 1) / 10
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.float().mean() * ((pred[sel] == labels[sel]).float().mean() - conf[sel].mean()).abs()
    assert m["ece"] == pytest.approx(float(ece), abs=1e-5)
    assert sum(m["reliability"]["count"]) == 200


@pytest.mark.slow
def test_eval_reproduces_the_runs_test_accuracy(trained_run, tmp_path):
    rows = list(csv.DictReader(open(trained_run / "csv" / "metrics.csv")))
    test_acc = float(next(r["test/acc"] for r in rows if r.get("test/acc")))
    r = run_module("vit.evaluate", [f"ckpt_path={trained_run}/checkpoints/best.ckpt", "hydra.run.dir=eval"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(test_acc, abs=1e-3)
    assert metrics["num_samples"] == 30 and metrics["split"] == "test"
    assert set(metrics["per_class_accuracy"]) == {"class_0", "class_1", "class_2"}
    assert 0.0 <= metrics["ece"] <= 1.0 and metrics["top5"] == 1.0  # 3 classes: top-5 covers all
    for png in ("confusion_matrix.png", "reliability.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    assert "top1" in r.stdout
    # The val split is rebuilt from what the checkpoint recorded (same size as in training).
    r = run_module(
        "vit.evaluate", [f"ckpt_path={trained_run}/checkpoints/best.ckpt", "split=val", "hydra.run.dir=ev"], tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_samples"] == 30


@pytest.mark.slow
def test_attention_cli_images_and_split(trained_run, tmp_path):
    big = tmp_path / "big.png"
    torchvision.io.write_png(torch.randint(0, 255, (3, 40, 24), dtype=torch.uint8), str(big))
    gray = tmp_path / "gray.png"
    torchvision.io.write_png(torch.randint(0, 255, (1, 16, 16), dtype=torch.uint8), str(gray))
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    r = run_module(
        "vit.attention", [f"ckpt_path={ckpt}", f"images=[{big},{gray}]", "gradient=true", "hydra.run.dir=a"], tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["attention_big.png", "attention_gray.png"]
    r = run_module(
        "vit.attention",
        [f"ckpt_path={ckpt}", "split=val", "num_images=2", "head_fusion=max", "discard_ratio=0.5", "hydra.run.dir=b"],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(list((tmp_path / "b").glob("attention_val_*.png"))) == 2


def _corrupt_checkpoints(trained_run: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    good = trained_run / "checkpoints" / "best.ckpt"
    data = good.read_bytes()
    truncated = tmp / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp / "notes.ckpt"
    text.write_text("not a checkpoint")
    mismatched = tmp / "mismatched.ckpt"
    ckpt = torch.load(good, weights_only=True)
    ckpt["hyper_parameters"]["model"]["depth"] = 5
    torch.save(ckpt, mismatched)
    return {
        "missing": (tmp / "nope.ckpt", "checkpoint not found"),
        "truncated": (truncated, "cannot load checkpoint"),
        "text": (text, "cannot load checkpoint"),
        "mismatched": (mismatched, "weights do not fit the recorded model config"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "truncated", "text", "mismatched"])
def test_bad_checkpoints_fail_cleanly(trained_run, tmp_path, kind):
    path, message = _corrupt_checkpoints(trained_run, tmp_path)[kind]
    # Every tool reads checkpoints through vit.checkpoint; vit-attention is checked once as well.
    modules = ["vit.evaluate", "vit.attention"] if kind == "truncated" else ["vit.evaluate"]
    for module in modules:
        r = run_module(module, [f"ckpt_path={path}", "hydra.run.dir=out", "split=val"], tmp_path)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (module, r.stderr[-2000:])
        assert not list((tmp_path / "out").glob("*.png"))
        assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_bad_images_fail_before_any_figure(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    good = tmp_path / "ok.png"
    torchvision.io.write_png(torch.zeros(3, 16, 16, dtype=torch.uint8), str(good))
    notimg = tmp_path / "notes.png"
    notimg.write_text("hello")
    for bad, message in ((tmp_path / "missing.png", "image not found"), (notimg, "cannot decode image")):
        r = run_module("vit.attention", [f"ckpt_path={ckpt}", f"images=[{good},{bad}]", "hydra.run.dir=out"], tmp_path)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not list((tmp_path / "out").glob("*.png"))
