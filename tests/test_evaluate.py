"""vit-eval and vit-attention: metrics against a direct computation, the train -> eval -> attention
round trip through the CLIs, and bad input (one message, exit 1, no output that looks valid)."""

import csv
import json
from pathlib import Path

import pytest
import torch
import torchvision
from torchmetrics.classification import MulticlassCalibrationError

from tests.conftest import FAST, TINY_MODEL, as_written_before_the_redesign, compose_train, module_cmd, run_all
from vit.checkpoint import load_checkpoint
from vit.errors import CheckpointError
from vit.evaluate import compute_metrics, reliability


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
    best = f"ckpt_path={trained_run}/checkpoints/best.ckpt"
    # The test split; the val split, rebuilt from what the checkpoint recorded (same size as in
    # training); the val split with test-time augmentation.
    r, val, with_tta = run_all(
        [
            module_cmd("vit.evaluate", [best, "hydra.run.dir=eval"]),
            module_cmd("vit.evaluate", [best, "split=val", "hydra.run.dir=ev"]),
            module_cmd("vit.evaluate", [best, "split=val", "tta=true", "hydra.run.dir=tta"]),
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["top1"] == pytest.approx(test_acc, abs=1e-3)
    assert metrics["num_samples"] == 30 and metrics["split"] == "test"
    assert set(metrics["per_class_accuracy"]) == {"class_0", "class_1", "class_2"}
    assert 0.0 <= metrics["ece"] <= 1.0 and metrics["top5"] == 1.0  # 3 classes: top-5 covers all
    for png in ("confusion_matrix.png", "reliability.png"):
        assert (tmp_path / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    assert "top1" in r.stdout
    assert val.returncode == 0, val.stderr[-3000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_samples"] == 30
    # With test-time augmentation both accuracies are reported.
    assert with_tta.returncode == 0, with_tta.stderr[-3000:]
    tta = json.loads((tmp_path / "tta" / "metrics.json").read_text())
    assert tta["tta"] == "hflip" and 0 <= tta["top1"] <= 1 and 0 <= tta["top1_without_tta"] <= 1
    assert tta["top1_without_tta"] == json.loads((tmp_path / "ev" / "metrics.json").read_text())["top1"]


@pytest.mark.slow
def test_attention_cli_images_and_split(trained_run, tmp_path):
    big = tmp_path / "big.png"
    torchvision.io.write_png(torch.randint(0, 255, (3, 40, 24), dtype=torch.uint8), str(big))
    gray = tmp_path / "gray.png"
    torchvision.io.write_png(torch.randint(0, 255, (1, 16, 16), dtype=torch.uint8), str(gray))
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    on_files = [f"ckpt_path={ckpt}", f"images=[{big},{gray}]", "gradient=true", "hydra.run.dir=a"]
    on_split = [
        f"ckpt_path={ckpt}",
        "split=val",
        "num_images=2",
        "head_fusion=max",
        "discard_ratio=0.5",
        "hydra.run.dir=b",
    ]
    images, split = run_all([module_cmd("vit.attention", on_files), module_cmd("vit.attention", on_split)], tmp_path)
    assert images.returncode == 0, images.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "a").glob("*.png")) == ["attention_big.png", "attention_gray.png"]
    assert split.returncode == 0, split.stderr[-3000:]
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
def test_bad_checkpoints_fail_cleanly(trained_run, tmp_path):
    # Every tool reads checkpoints through vit.checkpoint; vit-attention is checked once as well.
    bad = _corrupt_checkpoints(trained_run, tmp_path)
    cases = [(kind, "vit.evaluate", path, message) for kind, (path, message) in bad.items()]
    cases.append(("truncated", "vit.attention", *bad["truncated"]))
    cmds = [
        module_cmd(module, [f"ckpt_path={path}", f"hydra.run.dir=out{i}", "split=val"])
        for i, (_, module, path, _) in enumerate(cases)
    ]
    for i, ((kind, module, _, message), r) in enumerate(zip(cases, run_all(cmds, tmp_path), strict=True)):
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (
            kind,
            module,
            r.stderr[-2000:],
        )
        assert not list((tmp_path / f"out{i}").glob("*.png"))
        assert not (tmp_path / f"out{i}" / "metrics.json").exists()


@pytest.mark.slow
def test_bad_images_fail_before_any_figure(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "best.ckpt"
    good = tmp_path / "ok.png"
    torchvision.io.write_png(torch.zeros(3, 16, 16, dtype=torch.uint8), str(good))
    notimg = tmp_path / "notes.png"
    notimg.write_text("hello")
    cases = [(tmp_path / "missing.png", "image not found"), (notimg, "cannot decode image")]
    cmds = [
        module_cmd("vit.attention", [f"ckpt_path={ckpt}", f"images=[{good},{bad}]", f"hydra.run.dir=out{i}"])
        for i, (bad, _) in enumerate(cases)
    ]
    for i, ((_, message), r) in enumerate(zip(cases, run_all(cmds, tmp_path), strict=True)):
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert not list((tmp_path / f"out{i}").glob("*.png"))


def test_reliability_diagram_and_ece_come_from_the_same_bins():
    # Bug (f): the diagram binned by hand while the ECE came from torchmetrics, which gives a
    # confidence of exactly 1.0 a bin of its own: the two disagreed on confident models.
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.95, 0.05], [0.95, 0.05]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 0])
    rel = reliability(probs, labels, num_bins=10)
    assert rel["count"][-1] == 4 and sum(rel["count"]) == 4
    assert rel["accuracy"][-1] == 0.75 and rel["confidence"][-1] == pytest.approx(0.975)
    from_bins = sum(c / 4 * abs(a - f) for c, a, f in zip(rel["count"], rel["accuracy"], rel["confidence"]))
    assert rel["ece"] == pytest.approx(from_bins) == pytest.approx(0.225)
    # With continuous confidences (no sample at exactly 1.0) it is torchmetrics' ECE.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 6, generator=g) * 2
    labels = torch.randint(0, 6, (500,), generator=g)
    metrics = compute_metrics(logits, labels, [str(i) for i in range(6)], num_bins=15)
    expected = MulticlassCalibrationError(num_classes=6, n_bins=15, norm="l1")(logits.softmax(1), labels)
    assert metrics["ece"] == pytest.approx(float(expected), abs=1e-6)
    rel = metrics["reliability"]
    assert metrics["ece"] == pytest.approx(
        sum(c / 500 * abs(a - f) for c, a, f in zip(rel["count"], rel["accuracy"], rel["confidence"])), abs=1e-6
    )


@pytest.mark.slow
def test_a_checkpoint_without_normalization_is_refused_not_guessed(trained_run, tmp_path):
    # Bug (d): missing mean/std silently became 0.5 / 0.5 and predictions were wrong without a word.
    raw = torch.load(trained_run / "checkpoints" / "best.ckpt", weights_only=True)
    del raw["ImageDataModule"]["mean"], raw["ImageDataModule"]["std"]
    path = tmp_path / "no_norm.ckpt"
    torch.save(raw, path)
    ckpt = load_checkpoint(path)  # the network alone still loads (vit.load_model needs no preprocessing)
    with pytest.raises(CheckpointError, match="records no input normalization"):
        ckpt.normalize(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    img = tmp_path / "a.png"
    torchvision.io.write_png(torch.zeros(3, 16, 16, dtype=torch.uint8), str(img))
    predict = ["vit-predict", f"ckpt_path={path}", f"images=[{img}]", "hydra.run.dir=p"]
    evaluate = module_cmd("vit.evaluate", [f"ckpt_path={path}", "split=val", "hydra.run.dir=e"])
    for r in run_all([predict, evaluate], tmp_path, timeout=120):
        assert r.returncode == 1 and "records no input normalization" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_checkpoints_in_the_earlier_layout_load_in_every_tool(trained_run, tmp_path):
    new = trained_run / "checkpoints" / "best.ckpt"
    old = as_written_before_the_redesign(new, tmp_path / "old.ckpt")
    raw = torch.load(old, weights_only=True)
    assert "vit" in raw and "ImageDataModule" not in raw
    a, b = load_checkpoint(new), load_checkpoint(old)
    assert (a.class_names, a.mean, a.std, a.data, a.model.config) == (
        b.class_names,
        b.mean,
        b.std,
        b.data,
        b.model.config,
    )
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(a.model(a.normalize(x)), b.model(b.normalize(x)))

    img = tmp_path / "a.png"
    torchvision.io.write_png(x[0], str(img))
    ev, at, *tools = run_all(
        [
            module_cmd("vit.evaluate", [f"ckpt_path={old}", "split=val", "hydra.run.dir=ev"]),
            module_cmd("vit.attention", [f"ckpt_path={old}", "split=val", "num_images=1", "hydra.run.dir=at"]),
            ["vit-export", "format=torchscript", f"ckpt_path={old}", "hydra.run.dir=export"],
            ["vit-predict", f"images=[{img}]", f"ckpt_path={old}", "hydra.run.dir=predict"],
        ],
        tmp_path,
    )
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["num_samples"] == 30
    assert at.returncode == 0 and len(list((tmp_path / "at").glob("attention_*.png"))) == 1, at.stderr[-3000:]
    for r in tools:
        assert r.returncode == 0, (r.args, r.stderr[-2000:])

    # Resuming from it is accepted, and training continues from its step.
    from vit.train import train

    root = a.data["root"]
    overrides = ["data=folder", f"data.root={root}", "data.img_size=16", "trainer.max_epochs=4", "optim.lr=3e-3"]
    train(compose_train([*overrides, *TINY_MODEL, *FAST, f"ckpt_path={old}", "test=false"], tmp_path / "resumed"))
    resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["epoch"] == 3 and resumed["global_step"] > raw["global_step"]
