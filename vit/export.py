"""`vit-export` (ONNX / TorchScript) and `vit-predict` (top-k labels for image files).

    vit-export ckpt_path=.../best.ckpt format=onnx            # model.onnx + model.json beside it
    vit-export ckpt_path=.../best.ckpt format=torchscript     # model.pt + model.json
    vit-predict ckpt_path=.../best.ckpt images=[cat.png,ship.jpg] topk=3 output=preds.json

The exported file takes normalized float images (B, C, H, W) and returns logits; the JSON beside
it records the class names, input size and normalization a runtime needs. After writing, the
export is run once and compared with PyTorch (max |difference| must stay under 1e-4).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from vit.checkpoint import Checkpoint, load_checkpoint
from vit.cli import hydra_cli
from vit.config import EVAL_RULES, check_rules
from vit.data import read_image
from vit.errors import ConfigError, DataError, ExportError
from vit.model import VisionTransformer
from vit.outputs import write_atomic

log = logging.getLogger("vit")
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4


def _export_model(ckpt: Checkpoint) -> VisionTransformer:
    """The same weights through the explicit attention path, which every exporter handles."""
    model = VisionTransformer(**{**ckpt.model.config, "fused_attn": False})
    model.load_state_dict(ckpt.model.state_dict())
    return model.eval()


def export(ckpt_path: str, fmt: str, output: str | os.PathLike) -> tuple[Path, float]:
    """Write the model in `fmt` to `output` (+ `.json` metadata); returns the path and the max
    |difference| from PyTorch's logits on a random batch."""
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r} must be one of {sorted(FORMATS)}")
    ckpt = load_checkpoint(ckpt_path)
    ckpt.check_normalization()  # the metadata must tell a runtime how to prepare inputs
    model = _export_model(ckpt)
    out = Path(output)
    if out.suffix != FORMATS[fmt]:
        out = out.with_suffix(FORMATS[fmt])
    out.parent.mkdir(parents=True, exist_ok=True)
    C = model.patch_embed.in_chans
    H, W = model.patch_embed.img_size
    example = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(example)

    if fmt == "torchscript":
        scripted = torch.jit.trace(model, example)
        write_atomic(out, lambda p: scripted.save(str(p)))
        with torch.no_grad():
            got = torch.jit.load(str(out))(example)
    else:
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
        write_atomic(out, lambda p: program.save(str(p)))
        import onnxruntime as ort

        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: example.numpy()})[0])
    diff = float((got - expected).abs().max())
    if diff > TOLERANCE:
        out.unlink(missing_ok=True)
        raise ExportError(f"exported {fmt} model differs from PyTorch by {diff:.2e} (> {TOLERANCE}); nothing written")
    meta = {
        "format": fmt,
        "file": out.name,
        "input": {"shape": ["batch", C, H, W], "dtype": "float32", "layout": "NCHW, RGB"},
        "preprocessing": {"resize_to": [H, W], "scale": 1 / 255, "mean": ckpt.mean, "std": ckpt.std},
        "class_names": ckpt.class_names,
        "model_config": ckpt.model.config,
        "max_abs_diff_vs_pytorch": diff,
    }
    write_atomic(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(meta, indent=2)))
    return out, diff


def predict(ckpt: Checkpoint, paths: list[str], topk: int = 5) -> list[dict[str, Any]]:
    """Top-k classes with probabilities for each image file (resized as the checkpoint says)."""
    if topk < 1:
        raise ConfigError(f"topk={topk} is out of range: it must be an integer >= 1")
    k = min(topk, len(ckpt.class_names))
    images, notes = [], []
    for p in paths:
        img, original = read_image(os.path.expanduser(str(p)), ckpt.img_size)
        if img.shape[0] != ckpt.model.patch_embed.in_chans:
            raise DataError(f"{p}: the model expects {ckpt.model.patch_embed.in_chans} channels")
        images.append(img)
        notes.append(list(original))
    if not images:
        raise DataError("no images given: images=[a.png,b.jpg]")
    with torch.inference_mode():
        probs = ckpt.model(ckpt.normalize(torch.stack(images))).softmax(dim=1)
    top = probs.topk(k, dim=1)
    return [
        {
            "image": str(p),
            "original_size": size,
            "top": [{"label": ckpt.class_names[int(i)], "probability": float(v)} for v, i in zip(vals, idx)],
        }
        for p, size, vals, idx in zip(paths, notes, top.values, top.indices)
    ]


def run_export(cfg: DictConfig) -> None:
    output = cfg.output or Path(cfg.paths.output_dir) / "model"
    path, diff = export(os.path.expanduser(cfg.ckpt_path), cfg.format, output)
    log.info("wrote %s and %s (max |diff| vs PyTorch %.1e)", path, path.with_suffix(".json"), diff)
    print(path)


def run_predict(cfg: DictConfig) -> None:
    check_rules(cfg, EVAL_RULES)
    if not cfg.images:
        raise DataError("no images given: images=[a.png,b.jpg]")
    ckpt = load_checkpoint(os.path.expanduser(cfg.ckpt_path))
    results = predict(ckpt, list(cfg.images), cfg.topk)
    for r in results:
        top = ", ".join(f"{t['label']} {t['probability']:.1%}" for t in r["top"])
        print(f"{r['image']}: {top}")
    if cfg.output:
        out = Path(cfg.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda p: p.write_text(json.dumps(results, indent=2)))
        log.info("wrote %s", out)


export_main = hydra_cli(run_export, config_name="export")
predict_main = hydra_cli(run_predict, config_name="predict")
