"""vit-export (ONNX checked with onnxruntime, TorchScript) and vit-predict."""

import json

import onnxruntime as ort
import pytest
import torch
import torchvision

from tests.conftest import run_all
from vit.checkpoint import load_checkpoint
from vit.data import normalize
from vit.export import export, predict


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch(trained_run, tmp_path, fmt):
    ckpt_path = trained_run / "checkpoints" / "best.ckpt"
    path, diff = export(str(ckpt_path), fmt, tmp_path / "model")
    assert diff < 1e-4
    meta = json.loads(path.with_suffix(".json").read_text())
    ckpt = load_checkpoint(ckpt_path)
    assert meta["class_names"] == ckpt.class_names and meta["preprocessing"]["mean"] == ckpt.mean
    x = torch.randn(5, 3, 16, 16)  # another batch size than the export example
    with torch.no_grad():
        expected = ckpt.model(x)
    if fmt == "onnx":
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    else:
        got = torch.jit.load(str(path))(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_export_rejects_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format=.tflite. must be one of"):
        export(str(tmp_path / "x.ckpt"), "tflite", tmp_path / "m")


@pytest.mark.slow
def test_predict_resizes_and_ranks(trained_run, tmp_path):
    ckpt = load_checkpoint(trained_run / "checkpoints" / "best.ckpt")
    big = tmp_path / "big.png"
    img = torch.zeros(3, 48, 40, dtype=torch.uint8)
    img[1] = 230  # green: class_1 in the generated data
    torchvision.io.write_png(img, str(big))
    [res] = predict(ckpt, [str(big)], topk=2)
    assert res["original_size"] == [48, 40] and len(res["top"]) == 2
    assert res["top"][0]["probability"] >= res["top"][1]["probability"]
    small = torch.nn.functional.interpolate(img[None].float(), size=(16, 16), mode="bilinear", antialias=True)
    expected = ckpt.model(normalize(small.round().clamp(0, 255).to(torch.uint8), ckpt.mean, ckpt.std)).softmax(1)
    assert res["top"][0]["label"] == ckpt.class_names[int(expected.argmax())]

    out = tmp_path / "preds.json"
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    ckpt_arg = f"ckpt_path={trained_run}/checkpoints/best.ckpt"
    r, refused = run_all(
        [
            ["vit-predict", ckpt_arg, f"images=[{big}]", "topk=1", f"output={out}", f"hydra.run.dir={tmp_path}/p"],
            ["vit-predict", ckpt_arg, f"images=[{bad}]", f"hydra.run.dir={tmp_path}/q"],
        ],
        tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(out.read_text())[0]["top"][0]["label"] == res["top"][0]["label"]
    assert "big.png:" in r.stdout
    assert refused.returncode == 1 and "cannot decode image" in refused.stderr and "Traceback" not in refused.stderr
