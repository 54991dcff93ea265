"""The Hydra configs (`conf/`) and the checks every composed config passes before anything runs.

Each number a user can set is checked against its allowed range here, before any data is read or
any process is started, and a value out of range is a `ConfigError` that names the key, the value
and the range. Checks that need the model (does num_heads divide embed_dim?) happen when the
network is built, also before any image is decoded.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vit.errors import ConfigError
from vit.schedule import LR_DECAYS, parse_crop_padding_schedule, parse_depth_schedule, parse_img_size_schedule
from vit.tta import TTA_MODES

# The Hydra configs: installed beside this module as vit/conf by a regular or wheel install; in an
# editable install (or a checkout on PYTHONPATH), the repository's top-level conf/.
_INSTALLED = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = str(_INSTALLED if (_INSTALLED / "train.yaml").is_file() else Path(__file__).resolve().parents[1] / "conf")


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tile units (Intel Xeon since Sapphire Rapids: bfloat16 matrix
    products in hardware)."""
    import torch

    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware: AMX tiles, or AVX512-BF16's dot
    products (AMD EPYC since Zen 4, Intel since Cooper Lake). There the 30-minute preset's training step
    under bf16 autocast, with the attention's explicit maths, ran 1.4-1.5x float32's (an Intel Xeon with
    AMX) and 1.79-1.88x (an AMD EPYC Zen 4 without). Elsewhere (AVX2, or AVX-512 without BF16) there
    are no bf16 instructions, and the preset stays in float32 (README)."""
    import torch

    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return cpu_has_amx() or bool(avx512_bf16())


def cpp_compiler_found() -> bool:
    """Whether torch.compile's CPU backend (Inductor) finds the C++ compiler that it builds its
    kernels with (g++ by default, or $CXX): without one a compiled model fails at its first step."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception:  # torch raises InvalidCxxCompiler when none of its candidates runs
        return False
    return True


# `${vit.if_cpu_bf16:A,B}` in a config: A on a CPU that multiplies bf16 in hardware, B elsewhere
# (conf/experiment/cpu_30min.yaml picks its precision, attention path and width so);
# `${vit.if_cpp_compiler:A,B}`: A where torch.compile finds a C++ compiler for CPU kernels. `${vit.if_amx:A,B}`
# (AMX alone) is what run folders saved before 2026-12-05 name. Registered on import: every entry point
# composes its config through here. The lambdas look the functions up when called, so tests can patch them.
if not OmegaConf.has_resolver("vit.if_cpu_bf16"):
    OmegaConf.register_new_resolver("vit.if_cpu_bf16", lambda yes, no: yes if cpu_has_bf16_matmul() else no)
if not OmegaConf.has_resolver("vit.if_cpp_compiler"):
    OmegaConf.register_new_resolver("vit.if_cpp_compiler", lambda yes, no: yes if cpp_compiler_found() else no)
if not OmegaConf.has_resolver("vit.if_amx"):
    OmegaConf.register_new_resolver("vit.if_amx", lambda yes, no: yes if cpu_has_amx() else no)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# (predicate, allowed values in words)
Rule = tuple[Callable[[Any], bool], str]
INT_GE0: Rule = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
INT_GE1: Rule = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
POSITIVE: Rule = (lambda v: _is_num(v) and v > 0, "a number > 0")
NON_NEGATIVE: Rule = (lambda v: _is_num(v) and v >= 0, "a number >= 0")
PROBABILITY: Rule = (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
RATE: Rule = (lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)")
BOOL: Rule = (lambda v: isinstance(v, bool), "true or false")
TTA: Rule = (
    lambda v: v is None or isinstance(v, bool) or v in TTA_MODES,
    f"false, true (hflip) or one of {list(TTA_MODES)}",
)
STEPS_OR_OFF: Rule = (lambda v: _is_int(v) and (v == -1 or v >= 1), "-1 (no limit) or an integer >= 1")
BATCH_LIMIT: Rule = (
    lambda v: (_is_int(v) and v >= 0) or (_is_num(v) and 0 <= v <= 1),
    "a fraction in [0, 1] or a number of batches >= 0",
)


def _optional(rule: Rule) -> Rule:
    return (lambda v: v is None or rule[0](v), f"null or {rule[1]}")


def _sequence(n: int, rule: Rule) -> Rule:
    return (lambda v: isinstance(v, (list, tuple)) and len(v) == n and all(rule[0](x) for x in v), f"{n} x {rule[1]}")


TRAIN_RULES: dict[str, Rule] = {
    "seed": (_is_int, "an integer"),
    "test_tta": TTA,
    "data.img_size": _optional(INT_GE1),
    "data.val_size": INT_GE0,
    "data.batch_size": INT_GE1,
    "data.eval_batch_size": INT_GE1,
    "data.num_workers": INT_GE0,
    "data.mean": _optional(_sequence(3, (_is_num, "a number"))),
    "data.std": _optional(_sequence(3, POSITIVE)),
    "data.augment.crop_padding": INT_GE0,
    "data.augment.hflip": BOOL,
    "data.augment.alternate_flip": BOOL,
    "data.augment.randaugment_num_ops": INT_GE0,
    "data.augment.randaugment_magnitude": (lambda v: _is_int(v) and 0 <= v <= 30, "an integer in [0, 30]"),
    "data.augment.random_erasing": PROBABILITY,
    "data.augment.on_batch": BOOL,
    "data.mix.mixup_alpha": NON_NEGATIVE,
    "data.mix.cutmix_alpha": NON_NEGATIVE,
    "model.patch_size": INT_GE1,
    "model.embed_dim": INT_GE1,
    "model.depth": INT_GE1,
    "model.num_heads": INT_GE1,
    "model.reg_tokens": INT_GE0,
    "model.mlp_ratio": POSITIVE,
    "model.init_values": _optional(POSITIVE),
    "model.drop_rate": RATE,
    "model.pos_drop_rate": RATE,
    "model.patch_drop_rate": RATE,
    "model.qk_norm": BOOL,
    "model.self_mask": BOOL,
    "model.learned_temperature": BOOL,
    "model.rope": BOOL,
    "model.rope_theta": POSITIVE,
    "model.shifted_patches": BOOL,
    "model.whiten_patches": BOOL,
    "model.proj_drop_rate": RATE,
    "model.attn_drop_rate": RATE,
    "model.drop_path_rate": RATE,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.betas": _sequence(2, RATE),
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.min_lr_ratio": PROBABILITY,
    "optim.lr_decay": (lambda v: v in LR_DECAYS, f"one of {list(LR_DECAYS)}"),
    "optim.label_smoothing": RATE,
    "optim.schedule_by_time": BOOL,
    "optim.scale_lr_with_world_size": BOOL,
    "optim.muon_lr": _optional(POSITIVE),
    "optim.muon_momentum": RATE,
    "optim.muon_weight_decay": NON_NEGATIVE,
    "optim.fused": BOOL,
    "optim.lookahead_k": _optional(INT_GE1),
    "optim.lookahead_decay": RATE,
    "optim.lookahead_power": POSITIVE,
    "trainer.max_epochs": STEPS_OR_OFF,
    "trainer.max_steps": STEPS_OR_OFF,
    "trainer.num_nodes": INT_GE1,
    "trainer.accumulate_grad_batches": INT_GE1,
    "trainer.log_every_n_steps": INT_GE1,
    "trainer.check_val_every_n_epoch": _optional(INT_GE1),
    "trainer.num_sanity_val_steps": (lambda v: _is_int(v) and v >= -1, "-1 (all) or an integer >= 0"),
    "trainer.gradient_clip_val": _optional(NON_NEGATIVE),
    "trainer.limit_train_batches": _optional(BATCH_LIMIT),
    "trainer.limit_val_batches": _optional(BATCH_LIMIT),
    "trainer.limit_test_batches": _optional(BATCH_LIMIT),
    "callbacks.ema.decay": (lambda v: _is_num(v) and 0 < v < 1, "a number in (0, 1)"),
    "callbacks.last_checkpoint.every_n_train_steps": _optional(INT_GE1),
    "callbacks.throughput.window_size": INT_GE1,
    "callbacks.attention.every_n_epochs": INT_GE1,
    "callbacks.attention.num_images": INT_GE1,
    "callbacks.attention.discard_ratio": RATE,
}

EVAL_RULES: dict[str, Rule] = {
    "batch_size": INT_GE1,
    "tta": TTA,
    "num_bins": INT_GE1,
    "num_images": INT_GE1,
    "discard_ratio": RATE,
    "topk": INT_GE1,
    "components": INT_GE1,
}


def check_rules(cfg: DictConfig, rules: dict[str, Rule]) -> None:
    """ConfigError for the first key of `rules` present in `cfg` whose value is out of range."""
    for key, (ok, allowed) in rules.items():
        node = OmegaConf.select(cfg, key, default="__absent__", throw_on_missing=False)
        if isinstance(node, str) and node == "__absent__":
            continue
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is out of range: it must be {allowed}")


# Loggers whose package is optional: (importable modules, any one will do; what to install).
OPTIONAL_LOGGERS = {
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "pip install 'vit-cifar[tensorboard]'"),
    "WandbLogger": (("wandb",), "pip install wandb"),
    "MLFlowLogger": (("mlflow",), "pip install mlflow"),
}


def check_loggers(cfg: DictConfig) -> None:
    """ConfigError naming what to install when a configured logger's package is missing."""
    for name, logger in (cfg.get("logger") or {}).items():
        if logger is None:
            continue
        modules, install = OPTIONAL_LOGGERS.get(str(logger.get("_target_", "")).rsplit(".", 1)[-1], ((), ""))
        if modules and not any(importlib.util.find_spec(m) for m in modules):
            raise ConfigError(f"logger {name!r} needs the {modules[0]} package, which is not installed: {install}")


def check_train_config(cfg: DictConfig) -> None:
    """Everything that can be checked from the config alone, before any data is read."""
    check_rules(cfg, TRAIN_RULES)
    check_loggers(cfg)
    data, model, optim, trainer = cfg.data, cfg.model, cfg.get("optim") or {}, cfg.trainer
    img_size = data.get("img_size")
    if img_size is not None:
        if data.augment.get("crop_padding", 0) >= img_size:
            raise ConfigError(
                f"data.augment.crop_padding={data.augment.crop_padding} is out of range: it must be in "
                f"[0, {img_size}) for {img_size} px images (reflect padding takes at most image size - 1 pixels)"
            )
        if img_size % model.patch_size:
            raise ConfigError(
                f"data.img_size={img_size} is not divisible by model.patch_size={model.patch_size}; "
                "pick a patch size that tiles the image"
            )
    schedule = parse_img_size_schedule(
        OmegaConf.to_container(data.img_size_schedule) if data.get("img_size_schedule") else None
    )
    if schedule:
        if not model.get("dynamic_img_size"):
            raise ConfigError("data.img_size_schedule needs model.dynamic_img_size=true")
        bad = [size for _, size in schedule if size % model.patch_size]
        if bad:
            raise ConfigError(
                f"data.img_size_schedule sizes {bad} are not multiples of the patch size {model.patch_size}"
            )
    paddings = parse_crop_padding_schedule(
        OmegaConf.to_container(data.crop_padding_schedule) if data.get("crop_padding_schedule") else None
    )
    if paddings:
        if not data.augment.get("on_batch"):
            raise ConfigError("data.crop_padding_schedule needs data.augment.on_batch=true")
        too_wide = [p for _, p in paddings if img_size is not None and p >= img_size]
        if too_wide:
            raise ConfigError(
                f"data.crop_padding_schedule paddings {too_wide} must be below {img_size} for {img_size} px images "
                "(reflect padding takes at most image size - 1 pixels)"
            )
    if model.get("rope") and (optim.get("patch_drop_schedule") or model.get("patch_drop_rate")):
        raise ConfigError(
            "model.rope rotates each patch token by its grid position, which patch dropping discards: "
            "drop optim.patch_drop_schedule / model.patch_drop_rate, or set model.rope=false"
        )
    depths = parse_depth_schedule(
        OmegaConf.to_container(optim.depth_schedule) if optim.get("depth_schedule") else None, model.depth
    )
    strategy = str(trainer.get("strategy") or "")
    if depths and strategy.startswith("ddp") and "find_unused_parameters_true" not in strategy:
        # DDP waits for a gradient of every parameter each step; held-back blocks have none.
        raise ConfigError(
            f"optim.depth_schedule trains only some blocks in its first steps, which trainer.strategy={strategy} "
            "does not allow; use trainer.strategy=ddp_find_unused_parameters_true"
        )
    max_time = trainer.get("max_time")
    if max_time is not None and not (isinstance(max_time, str) and re.fullmatch(r"\d+:\d\d:\d\d:\d\d", max_time)):
        raise ConfigError(f"trainer.max_time={max_time!r} must be a duration DD:HH:MM:SS, e.g. 00:00:30:00")
    if optim.get("schedule_by_time") and not max_time:
        raise ConfigError("optim.schedule_by_time=true needs a time budget: set trainer.max_time (DD:HH:MM:SS)")
    if trainer.get("max_epochs") == -1 and trainer.get("max_steps") == -1:
        raise ConfigError(
            "trainer.max_epochs=-1 and trainer.max_steps=-1 give the run no end for its schedules to follow; "
            "set trainer.max_steps or trainer.max_epochs (trainer.max_time may still end it sooner)"
        )


def print_config_tree(cfg: DictConfig) -> None:
    """The resolved config as a tree, one branch per group (as lightning-hydra-template prints it);
    the same config is saved in the run folder as .hydra/config.yaml."""
    import rich
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        if key == "hydra":
            continue
        text = OmegaConf.to_yaml(value, resolve=True) if OmegaConf.is_config(value) else f"{value}\n"
        tree.add(str(key)).add(Syntax(text.rstrip(), "yaml", background_color="default"))
    rich.print(tree)
