"""Benchmark our VisionTransformer against timm's, side by side in one process.

Both models are built with the same keywords and weights, then measured interleaved
(ours, timm, ours, timm ... after warm-up); medians over rounds are reported, with ratios.

    python scripts/benchmark.py                        # CPU, the default CIFAR config, batch 128
    python scripts/benchmark.py --device cuda          # bf16 autocast on CUDA
    python scripts/benchmark.py --compile              # also torch.compile'd variants
    python scripts/benchmark.py --data-root $HOME/data/cifar10-jpeg   # data pipeline on real images

Prints a markdown table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.utils.flop_counter import FlopCounterMode

from vit.data import ImageDataModule
from vit.model import VisionTransformer

# The project's default CIFAR model (conf/model/vit_cifar.yaml).
DEFAULT = dict(
    img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, drop_path_rate=0.1
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_train_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device
) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step() -> None:
        with autocast(device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_infer_step(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast(device):
            model(x)

    return step


def time_steps(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / steps


def interleaved(fns: dict[str, Callable[[], None]], steps: int, rounds: int, warmup: int, device: torch.device) -> dict:
    """Seconds per step for each function: median over rounds, run A, B, A, B ..."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(time_steps(fn, steps, device))
    return {k: statistics.median(v) for k, v in times.items()}


def train_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of tensors autograd keeps for backward (distinct storages; parameters excluded):
    what a training step holds beyond weights, gradients and optimizer state, which are equal."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def cuda_peak_bytes(fn: Callable[[], None]) -> int:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def matmul_peak_gflops(device: torch.device, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        times.append(time_steps(lambda: a @ b, 1, device))
    return 2 * n**3 / statistics.median(times) / 1e9


def data_pipeline_rate(root: str | None, batch_size: int, num_workers: int, batches: int) -> float:
    """Images/second from the training loader (augmentation, batching) through normalization."""
    if root:
        dm = ImageDataModule(name="folder", root=root, num_workers=num_workers, batch_size=batch_size)
    else:
        dm = ImageDataModule(name="folder", root="unused", num_workers=num_workers, batch_size=batch_size)
        from vit.data import Augment, BatchPipeline, TensorImageDataset, build_train_transform

        images = torch.randint(0, 256, (45000, 3, 32, 32), dtype=torch.uint8)
        transform = build_train_transform((32, 32), Augment(crop_padding=4, hflip=True))
        dm.train_set = TensorImageDataset(images, torch.randint(0, 10, (45000,)), transform)
        dm.pipeline = BatchPipeline(mean=[0.5] * 3, std=[0.25] * 3)
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    next(loader)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        images, labels = dm.on_after_batch_transfer(next(loader), 0)
        n += len(images)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="add torch.compile'd variants of both")
    p.add_argument("--data-root", default=None, help="class-folder dataset for the data-pipeline figure")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--json", default="benchmark.json")
    for k, v in DEFAULT.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args()

    device = torch.device(args.device)
    kw = {k: getattr(args, k) for k in DEFAULT}
    torch.manual_seed(0)
    ours = VisionTransformer(**kw).to(device)
    timm = TimmViT(**kw).to(device)
    timm.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(args.batch_size, 3, kw["img_size"], kw["img_size"], device=device)
    y = torch.randint(0, kw["num_classes"], (args.batch_size,), device=device)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), timm.eval()(x), atol=1e-4), "models differ"
    ours.train(), timm.train()

    models: dict[str, torch.nn.Module] = {"ours": ours, "timm": timm}
    if args.compile:
        models["ours+compile"] = torch.compile(ours)
        models["timm+compile"] = torch.compile(timm)

    # Each model's own FLOPs per training step: ours computes only the class token in the last
    # block, so it executes fewer for the same logits.
    flops = {k: train_flops(m, x, y) for k, m in (("ours", ours), ("timm", timm))}
    flops.update({k: flops[k.split("+")[0]] for k in models})
    fwd_flops = flops["timm"] // 3  # backward is two matmuls per forward matmul
    train = interleaved(
        {k: make_train_step(m, x, y, device) for k, m in models.items()}, args.steps, args.rounds, args.warmup, device
    )
    for m in models.values():
        m.eval()
    infer = interleaved(
        {k: make_infer_step(m, x, device) for k, m in models.items()}, args.steps, args.rounds, args.warmup, device
    )
    for m in models.values():
        m.train()
    if device.type == "cuda":
        memory = {k: cuda_peak_bytes(make_train_step(m, x, y, device)) for k, m in models.items()}
        memory_kind = "peak CUDA memory, one training step"
    else:
        memory = {k: saved_activation_bytes(m, x, y) for k, m in models.items() if "compile" not in k}
        memory_kind = "activations saved for backward"
    peak = matmul_peak_gflops(device)
    data = data_pipeline_rate(args.data_root, args.batch_size, args.num_workers, batches=100)

    bs = args.batch_size
    rows = []
    for k in models:
        row = {
            "model": k,
            "train_img_s": bs / train[k],
            "infer_img_s": bs / infer[k],
            "train_gflop_per_step": flops[k] / 1e9,
            "train_gflop_s": flops[k] / train[k] / 1e9,
            "train_frac_of_matmul_peak": flops[k] / train[k] / 1e9 / peak,
            "memory_mib": memory[k] / 2**20 if k in memory else None,
        }
        rows.append(row)
    base = rows[1]
    result = {
        "device": str(device),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
        "threads": torch.get_num_threads(),
        "config": kw,
        "batch_size": bs,
        "forward_gflop_per_image": fwd_flops / bs / 1e9,
        "matmul_peak_gflop_s": peak,
        "memory_kind": memory_kind,
        "data_pipeline_img_s": data,
        "rows": rows,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\n{result['machine']}, {result['threads']} threads, batch {bs}, {device}")
    print(f"config {kw}; fp32 matmul peak {peak:.0f} GFLOP/s\n")
    print(
        "| model | train img/s | vs timm | infer img/s | vs timm | GFLOP per train step | "
        f"train GFLOP/s (of peak) | {memory_kind} MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mem = f"{r['memory_mib']:.1f}" if r["memory_mib"] is not None else "-"
        print(
            f"| {r['model']} | {r['train_img_s']:.1f} | {r['train_img_s'] / base['train_img_s']:.3f}x "
            f"| {r['infer_img_s']:.1f} | {r['infer_img_s'] / base['infer_img_s']:.3f}x "
            f"| {r['train_gflop_per_step']:.1f} | {r['train_gflop_s']:.1f} ({r['train_frac_of_matmul_peak']:.0%}) | {mem} |"
        )
    print(
        f"\ndata pipeline (crop+flip, batching, normalize; {args.num_workers} workers): {data:.0f} img/s "
        f"= {data / rows[0]['train_img_s']:.1f}x our training throughput"
    )


if __name__ == "__main__":
    main()
