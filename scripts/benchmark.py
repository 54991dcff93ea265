"""Benchmark our VisionTransformer against timm's, side by side in one process.

Both models are built with the same keywords and weights, then measured interleaved
(ours, timm, ours, timm ... after warm-up); medians over rounds are reported, with ratios.

    python scripts/benchmark.py                        # CPU, the default CIFAR config, batch 128
    python scripts/benchmark.py --device cuda          # bf16 autocast on CUDA
    python scripts/benchmark.py --precision bf16       # bf16 autocast on the CPU too
    python scripts/benchmark.py --compile              # also torch.compile'd variants
    python scripts/benchmark.py --data-root $HOME/data/cifar10-jpeg   # data pipeline on real images
    python scripts/benchmark.py --loop --data-root $HOME/data/cifar10-jpeg --img-size-at 16
    python scripts/benchmark.py --variant num_heads=8 --img-size-at 32 --steps 8 --rounds 5
    python scripts/benchmark.py --loader --experiment cifar10_best --data-root $HOME/data/cifar10-jpeg --loader-workers 8,16

Prints a markdown table and writes JSON (--json).

`--loop` measures the training loop instead of the model: vit-train's step (Lightning's Trainer
with the experiment's callbacks, metrics and logging, as `vit-train experiment=cpu_30min` builds
it) against a bare PyTorch step over the same model, optimizer, loader and batch pipeline, at one
training size, interleaved; the ratio is the share of the bare loop's speed that vit-train keeps.

`--loader` times the experiment's training loader alone (workers, per-image augmentation,
collation), for each of `--loader-workers`: set beside the model's training speed, it says whether
the loader or the model bounds a run.

`--variant KEY=VALUE` times a bare training step of the experiment's model (cpu_30min's by default)
against the same model with those keywords changed (`patch_drop_rate=0.5`, `num_heads=8`,
`class_token=true --variant global_pool=token`, `precision=bf16` for autocast, or `compile=true` for
torch.compile as vit-train's `model.compile=true` does it), interleaved.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast, or plain fp32 (--precision)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def config_precision(cfg) -> str:
    """bf16 or fp32: the autocast that a composed config's trainer.precision gives vit-train."""
    return "bf16" if str(cfg.trainer.precision).startswith("bf16") else "fp32"


def make_train_step(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, precision: str
) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step() -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_infer_step(
    model: torch.nn.Module, x: torch.Tensor, device: torch.device, precision: str
) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), autocast(device, precision):
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


def epochs(dm: ImageDataModule) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training loader's batches, epoch after epoch, as training would draw them."""
    while True:
        yield from dm.train_dataloader()


def data_pipeline_rate(
    root: str | None, batch_size: int, num_workers: int, batches: int, num_images: int = 45000
) -> float:
    """Images/second from the training loader (augmentation, batching) through normalization;
    without `root`, over `num_images` random images. Epoch after epoch, as training would: at
    batch 1024, 100 batches are more than one pass over 45,000 images."""
    if root:
        dm = ImageDataModule(name="folder", root=root, num_workers=num_workers, batch_size=batch_size)
    else:
        dm = ImageDataModule(name="folder", root="unused", num_workers=num_workers, batch_size=batch_size)
        from vit.data import Augment, BatchPipeline, TensorImageDataset, build_train_transform

        images = torch.randint(0, 256, (num_images, 3, 32, 32), dtype=torch.uint8)
        transform = build_train_transform((32, 32), Augment(crop_padding=4, hflip=True))
        dm.train_set = TensorImageDataset(images, torch.randint(0, 10, (num_images,)), transform)
        dm.pipeline = BatchPipeline(mean=[0.5] * 3, std=[0.25] * 3)
    dm.setup("fit")
    loader = epochs(dm)
    next(loader)
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        images, labels = dm.on_after_batch_transfer(next(loader), 0)
        n += len(images)
    return n / (time.perf_counter() - t)


class StepTimes(Callback):
    """perf_counter() at the start of every training batch: what a step costs between two
    batches, loader, transfer hook, callbacks and logging included."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args: object) -> None:
        self.times.append(time.perf_counter())


def seconds_per_step(times: list[float], skip: int) -> float:
    """Median of the gaps between consecutive batch starts, after `skip` warm-up steps."""
    return statistics.median(b - a for a, b in zip(times[skip:], times[skip + 1 :]))


def loop_comparison(args: argparse.Namespace) -> dict:
    """vit-train's Trainer step against a bare step, same model, optimizer, loader and pipeline."""
    from hydra import compose, initialize_config_dir

    from vit.config import CONFIG_DIR
    from vit.train import build_datamodule, build_module, build_trainer

    out = tempfile.mkdtemp(prefix="loop-benchmark-")
    steps = args.loop_steps + args.loop_skip + 1
    overrides = [
        f"experiment={args.experiment}",
        "data=folder",
        f"data.root={args.data_root}",
        "data.num_workers=0",
        f"data.img_size_schedule=[[0,{args.img_size_at}]]",  # one training size for the whole run
        f"paths.output_dir={out}",
        f"trainer.max_steps={steps}",
        "trainer.max_time=null",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "optim.schedule_by_time=false",
        "callbacks.progress=null",  # vit-train runs logged to a file keep this off
        *args.override,
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    dm = build_datamodule(cfg)
    dm.prepare_data()
    dm.setup("fit")
    ls, precision = cfg.optim.label_smoothing, config_precision(cfg)

    def trainer_step() -> float:
        torch.manual_seed(0)
        module, timer = build_module(cfg, dm), StepTimes()
        trainer = build_trainer(cfg)
        trainer.callbacks.append(timer)
        trainer.fit(module, datamodule=dm)
        return seconds_per_step(timer.times, args.loop_skip)

    def bare_step() -> float:
        torch.manual_seed(0)
        module = build_module(cfg, dm)
        # The module's forward: its network, compiled where model.compile says so, as vit-train calls it.
        net, opt = module.train(), module.configure_optimizers()
        times: list[float] = []
        while len(times) <= steps:  # epochs after epochs, as the Trainer would
            for images, labels in dm.train_dataloader():
                times.append(time.perf_counter())
                if len(times) > steps:
                    break
                x, y = dm.pipeline.train(images, labels, 0.0)
                with autocast(torch.device("cpu"), precision):  # as the Trainer's trainer.precision
                    loss = F.cross_entropy(net(x), y, label_smoothing=ls)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return seconds_per_step(times, args.loop_skip)

    runs: dict[str, list[float]] = {"vit-train": [], "bare": []}
    for _ in range(args.rounds):
        runs["vit-train"].append(trainer_step())
        runs["bare"].append(bare_step())
    bs = cfg.data.batch_size
    result = {
        "experiment": args.experiment,
        "img_size": args.img_size_at,
        "batch_size": bs,
        "steps_per_round": args.loop_steps,
        "rounds": args.rounds,
        "img_s": {k: [bs / t for t in v] for k, v in runs.items()},
        "median_img_s": {k: bs / statistics.median(v) for k, v in runs.items()},
    }
    result["ratio"] = result["median_img_s"]["vit-train"] / result["median_img_s"]["bare"]
    return result


def loader_rates(args: argparse.Namespace) -> dict:
    """Images/second that the experiment's training loader delivers alone (its workers' per-image
    augmentation and collation, as vit-train builds it), for each worker count in --loader-workers.
    Beside the model's training speed it says which of the two bounds a run."""
    from hydra import compose, initialize_config_dir

    from vit.config import CONFIG_DIR
    from vit.train import build_datamodule

    rates, bs = {}, None
    for workers in args.loader_workers or [None]:
        overrides = [f"experiment={args.experiment}", "data=folder", f"data.root={args.data_root}", *args.override]
        if workers is not None:
            overrides.append(f"data.num_workers={workers}")
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        dm = build_datamodule(cfg)
        dm.prepare_data()
        dm.setup("fit")
        batches = epochs(dm)
        for _ in range(args.loop_skip):  # the workers start and fill their queues
            next(batches)
        t, n = time.perf_counter(), 0
        for _ in range(args.loop_steps):
            n += len(next(batches)[0])
        rates[str(cfg.data.num_workers)] = n / (time.perf_counter() - t)
        bs = cfg.data.batch_size
    return {"experiment": args.experiment, "batch_size": bs, "batches": args.loop_steps, "img_s_by_workers": rates}


def variant_comparison(args: argparse.Namespace) -> dict:
    """Our model as --experiment builds it against the same model with --variant keywords changed:
    a bare training step of each (AdamW, a batch of random images at --img-size-at px), interleaved.
    The key `precision` (bf16 or fp32) changes a model's autocast instead of a keyword."""
    import yaml
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from vit.config import CONFIG_DIR
    from vit.module import compile_static
    from vit.train import MODEL_RUN_OPTIONS

    changes: dict = {}
    for item in args.variant:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --variant {item!r} must be KEY=VALUE, e.g. num_heads=8")
        changes[key] = yaml.safe_load(value)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={args.experiment}", *args.override])
    base_precision = args.precision or config_precision(cfg)  # the experiment's own unless --precision
    precision = {"base": base_precision, "variant": changes.pop("precision", base_precision)}
    if precision["variant"] not in ("bf16", "fp32"):
        raise SystemExit(f"error: --variant precision={precision['variant']!r}: bf16 or fp32")
    # model.compile is vit-train's option, not a keyword: the experiment's own, or what --variant says.
    compiled = {"base": bool(cfg.model.get("compile", False))}
    compiled["variant"] = changes.pop("compile", compiled["base"])
    if not isinstance(compiled["variant"], bool):
        raise SystemExit(f"error: --variant compile={compiled['variant']!r}: true or false")
    unknown = set(changes) - set(inspect.signature(VisionTransformer).parameters)
    if unknown:
        raise SystemExit(f"error: --variant {', '.join(sorted(unknown))}: not a VisionTransformer keyword")
    base = OmegaConf.to_container(cfg.model, resolve=True)
    for key in MODEL_RUN_OPTIONS:  # vit-train's options, not the network's keywords
        base.pop(key, None)
    base["num_classes"] = 10

    def build(kw: dict) -> VisionTransformer:
        # As vit-train builds it: for data.img_size, run at the scheduled size when dynamic.
        return VisionTransformer(**kw, img_size=cfg.data.img_size if kw.get("dynamic_img_size") else args.img_size_at)

    device, s = torch.device(args.device), args.img_size_at
    torch.manual_seed(0)
    try:
        models = {"base": build(base), "variant": build({**base, **changes})}
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: --variant {' '.join(args.variant)}: {e}") from e
    x = torch.randn(args.batch_size, 3, s, s, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    nets = {k: m.to(device).train() for k, m in models.items()}
    # Compiled as vit-train compiles it (one static graph): the warm-up steps compile.
    nets = {k: compile_static(m) if compiled[k] else m for k, m in nets.items()}
    steps = {k: make_train_step(m, x, y, device, precision[k]) for k, m in nets.items()}
    times = interleaved(steps, args.steps, args.rounds, args.warmup, device)
    img_s = {k: args.batch_size / t for k, t in times.items()}
    return {
        "experiment": args.experiment,
        "variant": changes
        | ({"precision": precision["variant"]} if precision["variant"] != precision["base"] else {})
        | ({"compile": compiled["variant"]} if compiled["variant"] != compiled["base"] else {}),
        "compiled": compiled,
        "img_size": s,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "median_img_s": img_s,
        "ratio": img_s["variant"] / img_s["base"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision",
        choices=("bf16", "fp32"),
        default=None,
        help="autocast dtype (default: bf16 on CUDA, fp32 on CPU)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="add torch.compile'd variants of both")
    p.add_argument("--data-root", default=None, help="class-folder dataset for the data-pipeline figure")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--json", default="benchmark.json")
    p.add_argument("--loop", action="store_true", help="vit-train's step against a bare loop (needs --data-root)")
    p.add_argument(
        "--loader",
        action="store_true",
        help="the experiment's training loader alone, in img/s (needs --data-root); --loop-steps batches",
    )
    p.add_argument(
        "--loader-workers",
        type=lambda v: [int(w) for w in v.split(",")],
        default=None,
        help="--loader: worker counts to time, e.g. 8,16 (default: the experiment's data.num_workers)",
    )
    p.add_argument(
        "--experiment",
        default="cpu_30min",
        help="--loop, --loader, --variant: the experiment whose training, loader or model is measured",
    )
    p.add_argument("--img-size-at", type=int, default=16, help="--loop, --variant: the training size (px)")
    p.add_argument("--loop-steps", type=int, default=100, help="--loop: timed steps per round; --loader: timed batches")
    p.add_argument(
        "--loop-skip",
        type=int,
        default=10,
        help="--loop: warm-up steps per round, --loader: warm-up batches, not timed",
    )
    p.add_argument(
        "--override", action="append", default=[], help="--loop, --loader, --variant: a vit-train override (repeatable)"
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="KEY=VALUE (repeatable): time the experiment's model against itself with these keywords changed",
    )
    for k, v in DEFAULT.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=v)
    args = p.parse_args()
    if args.loader:
        if not args.data_root:
            raise SystemExit("error: --loader needs --data-root (a class-folder dataset, e.g. $HOME/data/cifar10-jpeg)")
        result = loader_rates(args)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        for workers, rate in result["img_s_by_workers"].items():
            print(
                f"{args.experiment}'s training loader, batch {result['batch_size']}, {workers} workers: {rate:.0f} img/s"
            )
        return
    if args.loop or args.variant:  # one size, two steps interleaved: JSON and two lines
        if args.loop and not args.data_root:
            raise SystemExit("error: --loop needs --data-root (a class-folder dataset, e.g. $HOME/data/cifar10-jpeg)")
        result = loop_comparison(args) if args.loop else variant_comparison(args)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        m, what = result["median_img_s"], args.experiment + ("" if args.loop else "'s model")
        print(f"\n{what} at {args.img_size_at} px, batch {result['batch_size']}, {args.rounds} rounds interleaved")
        if args.loop:
            print(f"vit-train {m['vit-train']:.0f} img/s, bare loop {m['bare']:.0f} img/s: {result['ratio']:.3f}x")
        else:
            print(f"base {m['base']:.0f} img/s, {result['variant']} {m['variant']:.0f} img/s: {result['ratio']:.3f}x")
        return

    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
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
        {k: make_train_step(m, x, y, device, precision) for k, m in models.items()},
        args.steps,
        args.rounds,
        args.warmup,
        device,
    )
    for m in models.values():
        m.eval()
    infer = interleaved(
        {k: make_infer_step(m, x, device, precision) for k, m in models.items()},
        args.steps,
        args.rounds,
        args.warmup,
        device,
    )
    for m in models.values():
        m.train()
    if device.type == "cuda":
        memory = {k: cuda_peak_bytes(make_train_step(m, x, y, device, precision)) for k, m in models.items()}
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
        "precision": precision,
        "forward_gflop_per_image": fwd_flops / bs / 1e9,
        "matmul_peak_gflop_s": peak,
        "memory_kind": memory_kind,
        "data_pipeline_img_s": data,
        "rows": rows,
    }
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\n{result['machine']}, {result['threads']} threads, batch {bs}, {device}, {precision}")
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
