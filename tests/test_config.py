"""Every number a user can set is checked before any data is read: one ConfigError that names the
key, the value and the allowed range (bug g); the project's errors share one base class."""

import re

import pytest
import torch
from omegaconf import OmegaConf

import vit.config
from tests.conftest import FAST, TINY_MODEL, compose_train, module_cmd, run_all, run_module
from vit.config import EVAL_RULES, check_rules, check_train_config
from vit.errors import CheckpointError, ConfigError, DataError, DivergedError, ExportError, VitError

# Plausible mistakes a new user makes in overrides (each: the override, the key the error names).
BAD = [
    ("data.batch_size=0", "data.batch_size=0"),
    ("data.batch_size=-8", "data.batch_size=-8"),
    ("data.eval_batch_size=0", "data.eval_batch_size=0"),
    ("data.val_size=-1", "data.val_size=-1"),
    ("data.num_workers=-2", "data.num_workers=-2"),
    ("data.img_size=0", "data.img_size=0"),
    ("data.augment.crop_padding=-1", "data.augment.crop_padding=-1"),
    ("data.augment.crop_padding=32", "data.augment.crop_padding=32"),
    ("data.augment.random_erasing=1.5", "data.augment.random_erasing=1.5"),
    ("data.augment.randaugment_magnitude=40", "data.augment.randaugment_magnitude=40"),
    ("data.augment.randaugment_num_ops=-1", "data.augment.randaugment_num_ops=-1"),
    ("data.mix.mixup_alpha=-0.2", "data.mix.mixup_alpha=-0.2"),
    ("data.mix.cutmix_alpha=-1", "data.mix.cutmix_alpha=-1"),
    ("data.std=[0.2,0,0.2]", "data.std=[0.2, 0, 0.2]"),
    ("data.mean=[0.5,0.5]", "data.mean=[0.5, 0.5]"),
    ("model.depth=0", "model.depth=0"),
    ("model.embed_dim=-32", "model.embed_dim=-32"),
    ("model.mlp_ratio=0", "model.mlp_ratio=0"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate=1.0"),
    ("model.attn_drop_rate=-0.1", "model.attn_drop_rate=-0.1"),
    ("model.patch_size=5", "data.img_size=32 is not divisible by model.patch_size=5"),
    ("optim.lr=0", "optim.lr=0"),
    ("optim.lr=-1e-3", "optim.lr=-0.001"),
    ("optim.lr=fast", "optim.lr='fast'"),
    ("optim.weight_decay=-0.05", "optim.weight_decay=-0.05"),
    ("optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs=-1"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2"),
    ("optim.lr_decay=step", "optim.lr_decay='step'"),
    ("optim.label_smoothing=1.0", "optim.label_smoothing=1.0"),
    ("optim.lookahead_k=0", "optim.lookahead_k=0"),
    ("optim.lookahead_decay=1.0", "optim.lookahead_decay=1.0"),
    ("optim.lookahead_power=0", "optim.lookahead_power=0"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1"),
    ("trainer.limit_train_batches=1.5", "trainer.limit_train_batches=1.5"),
    ("trainer.max_time=30min", "trainer.max_time='30min'"),
    ("trainer.max_epochs=-1", "trainer.max_epochs=-1 and trainer.max_steps=-1"),
    ("test_tta=crops", "test_tta='crops' is out of range: it must be false, true (hflip) or one of"),
]


@pytest.mark.parametrize("override, named", BAD, ids=[b[0] for b in BAD])
def test_out_of_range_values_are_one_config_error_naming_key_value_and_range(override, named, tmp_path):
    cfg = compose_train([override], tmp_path)
    with pytest.raises(ConfigError) as e:
        check_train_config(cfg)
    assert named in str(e.value)


def test_a_callback_value_out_of_range_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"callbacks.ema.decay=1.5 is out of range: it must be a number in \(0, 1\)"):
        check_train_config(compose_train(["callbacks=ema", "callbacks.ema.decay=1.5"], tmp_path))


def test_every_shipped_config_passes_the_checks(tmp_path):
    for override in (
        "experiment=cpu_30min",
        "experiment=cifar10_best",
        "trainer=ddp",
        "callbacks=ema",
        "model=vit_small",
    ):
        check_train_config(compose_train([override, "data.root=/x"], tmp_path))


@pytest.mark.parametrize("bf16", [True, False], ids=["bf16-cpu", "fp32-cpu"])
def test_the_cpu_preset_trains_in_bf16_with_explicit_attention_only_where_the_cpu_multiplies_bf16(
    bf16, tmp_path, monkeypatch
):
    # ${vit.if_cpu_bf16:A,B} asks the CPU when the config is resolved; the preset's precision, attention
    # path and width follow it together (bf16 autocast with the fused attention's CPU backward is the slow case).
    monkeypatch.setattr(vit.config, "cpu_has_bf16_matmul", lambda: bf16)
    cfg = compose_train(["experiment=cpu_30min"], tmp_path)
    assert cfg.trainer.precision == ("bf16-mixed" if bf16 else "32-true")
    assert cfg.model.fused_attn is (not bf16) and cfg.model.embed_dim == (128 if bf16 else 112)
    check_train_config(cfg)
    # An override still wins, on any CPU.
    cfg = compose_train(["experiment=cpu_30min", "trainer.precision=32-true", "model.fused_attn=true"], tmp_path)
    assert (cfg.trainer.precision, cfg.model.fused_attn) == ("32-true", True)


@pytest.mark.parametrize(
    "bf16, compiler, compiled",
    [(True, True, True), (True, False, False), (False, True, False), (False, False, False)],
    ids=["bf16-with-compiler", "bf16-without", "fp32-with-compiler", "fp32-without"],
)
def test_the_cpu_preset_compiles_its_bf16_step_only_where_a_cpp_compiler_is_found(
    bf16, compiler, compiled, tmp_path, monkeypatch
):
    monkeypatch.setattr(vit.config, "cpu_has_bf16_matmul", lambda: bf16)
    monkeypatch.setattr(vit.config, "cpp_compiler_found", lambda: compiler)
    cfg = compose_train(["experiment=cpu_30min"], tmp_path)
    assert cfg.model.compile is compiled and cfg.model.shifted_patches is True
    check_train_config(cfg)
    assert compose_train(["experiment=cpu_30min", "model.compile=false"], tmp_path).model.compile is False


def test_cpp_compiler_found_asks_torch_for_the_compiler_it_would_use(monkeypatch):
    import torch._inductor.cpp_builder as cpp_builder
    from torch._inductor.exc import InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", lambda: "g++")
    assert vit.config.cpp_compiler_found() is True

    def missing() -> str:
        raise InvalidCxxCompiler()

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    assert vit.config.cpp_compiler_found() is False


@pytest.mark.parametrize(
    "amx, avx512_bf16, expected",
    [(True, False, True), (False, True, True), (True, True, True), (False, False, False)],
    ids=["amx", "avx512-bf16", "both", "neither"],
)
def test_bf16_counts_as_hardware_with_amx_tiles_or_avx512_bf16(amx, avx512_bf16, expected, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert vit.config.cpu_has_amx() is amx
    assert vit.config.cpu_has_bf16_matmul() is expected
    # Run folders saved before the change name ${vit.if_amx:A,B}: it still resolves, by AMX alone.
    cfg = OmegaConf.create({"precision": "${vit.if_amx:bf16-mixed,32-true}"})
    assert cfg.precision == ("bf16-mixed" if amx else "32-true")


def test_an_out_of_range_value_stops_the_cli_before_any_data_is_read(tmp_path):
    # The rules themselves are checked in-process above; this is the path a user sees (one
    # subprocess: each costs seconds of imports).
    args = ["data=folder", "data.root=/does/not/exist", *TINY_MODEL, *FAST, "optim.weight_decay=-0.1"]
    r = run_module("vit.train", args, tmp_path)
    message = "error: optim.weight_decay=-0.1 is out of range: it must be a number >= 0"
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "does not exist" not in r.stderr  # the data was never looked at


TOOL_OPTIONS = [
    ("vit.evaluate", ["batch_size=0"], "batch_size=0 is out of range"),
    ("vit.evaluate", ["split=train"], "split='train' must be 'test' or 'val'"),
    ("vit.attention", ["discard_ratio=1.5"], "discard_ratio=1.5 is out of range"),
    ("vit.attention", ["head_fusion=median"], "head_fusion='median' must be one of"),
]


def test_tool_options_are_checked_before_the_checkpoint_is_read(tmp_path):
    cmds = [
        module_cmd(module, ["ckpt_path=/no/such.ckpt", f"hydra.run.dir=out{i}", *args])
        for i, (module, args, _) in enumerate(TOOL_OPTIONS)
    ]
    for (module, args, message), r in zip(TOOL_OPTIONS, run_all(cmds, tmp_path), strict=True):
        assert r.returncode == 1 and f"error: {message}" in r.stderr and "Traceback" not in r.stderr, (
            module,
            args,
            r.stderr[-2000:],
        )


@pytest.mark.parametrize(
    "config_name, override, message",
    [
        ("eval", "num_bins=0", "num_bins=0 is out of range: it must be an integer >= 1"),
        ("eval", "tta=5crop", "tta='5crop' is out of range: it must be false, true (hflip) or one of"),
        ("attention", "num_images=0", "num_images=0 is out of range: it must be an integer >= 1"),
        ("attention", "discard_ratio=-0.5", "discard_ratio=-0.5 is out of range"),
        ("predict", "topk=0", "topk=0 is out of range: it must be an integer >= 1"),
    ],
)
def test_tool_option_rules_on_the_shipped_configs(config_name, override, message, tmp_path):
    # In-process: the same rules the tools apply first (the subprocess cases above show the wiring).
    cfg = compose_train([override, "ckpt_path=/no/such.ckpt"], tmp_path, config_name=config_name)
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_rules(cfg, EVAL_RULES)


def test_the_projects_errors_share_one_base_class():
    for cls in (ConfigError, DataError, CheckpointError, DivergedError, ExportError):
        assert issubclass(cls, VitError)
    # ... and stay what Python callers expect to catch.
    assert issubclass(ConfigError, ValueError) and issubclass(DivergedError, FloatingPointError)


def test_a_run_prints_its_resolved_config_as_a_tree_unless_told_not_to(tmp_path):
    args = ["data=folder", "data.root=/does/not/exist", *TINY_MODEL, *FAST, "optim.lr=-1"]
    shown, quiet = run_all(
        [
            module_cmd("vit.train", [*args, "hydra.run.dir=shown"]),
            module_cmd("vit.train", [*args, "print_config=false"]),
        ],
        tmp_path,
    )
    assert "optim" in shown.stdout and "lr: -1" in shown.stdout and "embed_dim: 32" in shown.stdout
    assert shown.returncode == 1 and "error: optim.lr=-1 is out of range" in shown.stderr
    assert "embed_dim" not in quiet.stdout and quiet.returncode == 1
