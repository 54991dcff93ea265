"""Training under Hydra: config composition, a real tiny run, resume, multirun, checkpoints, errors."""

import csv
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.fabric.utilities.throughput import measure_flops
from omegaconf import OmegaConf

from tests.conftest import FAST, REPO, TINY_MODEL, compose_train, module_cmd, run_all, run_module, write_cifar_pickles
from vit.checkpoint import CheckpointError, load_checkpoint, load_model
from vit.config import CONFIG_DIR
from vit.data import ImageDataModule
from vit.errors import ConfigError, VitError
from vit.model import VisionTransformer
from vit.train import MODEL_RUN_OPTIONS, train

CONF = Path(CONFIG_DIR)


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in ("data", "model", "trainer", "logger", "callbacks") for o in _options(g)]
    + [f"experiment={o}" for o in _options("experiment")],
)
def test_every_config_option_composes(override, tmp_path):
    cfg = compose_train([override, "data.root=/nonexistent"], tmp_path)
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer"
    model_kw = {k: v for k, v in cfg.model.items() if k not in MODEL_RUN_OPTIONS}
    net = VisionTransformer(**model_kw, img_size=cfg.data.img_size or 32, num_classes=10)
    assert net.config["embed_dim"] == cfg.model.embed_dim


def test_trainer_keys_override_without_plus(tmp_path):
    cfg = compose_train(["trainer.max_epochs=3", "trainer.limit_train_batches=10", "seed=7"], tmp_path)
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.limit_train_batches == 10 and cfg.data.seed == 7


def test_callbacks_progress_null_leaves_no_progress_bar(tmp_path):
    # Lightning adds a default bar when none is given; a run logged to a file asked for none.
    from lightning.pytorch.callbacks import RichProgressBar

    from vit.train import build_trainer

    assert isinstance(build_trainer(compose_train([], tmp_path)).progress_bar_callback, RichProgressBar)
    assert build_trainer(compose_train(["callbacks.progress=null"], tmp_path)).progress_bar_callback is None


def test_unknown_key_is_rejected_by_hydra():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        with pytest.raises(Exception, match="model.embed_dimm"):
            compose(config_name="train", overrides=["model.embed_dimm=3"])
    GlobalHydra.instance().clear()


def test_fast_dev_run(folder_data, tmp_path):
    cfg = compose_train(
        [
            "data=folder",
            f"data.root={folder_data}",
            "data.img_size=16",
            "trainer.fast_dev_run=true",
            *TINY_MODEL,
            *FAST,
        ],
        tmp_path,
    )
    metrics = train(cfg)
    assert "train/loss_step" in metrics


# Each preset with the data it is written for, generated small: the real model shape, augmentation,
# batch mixing, precision and schedules run one training, validation and test batch.
PRESET_DATA = {
    "cpu_30min": lambda root: [f"data.root={write_cifar_pickles(root)}", "data.download=false", "data.val_size=50"],
    "cifar10_best": lambda root: [f"data.root={write_cifar_pickles(root)}", "data.download=false", "data.val_size=50"],
}


def test_every_preset_has_a_training_test():
    assert sorted(PRESET_DATA) == _options("experiment")


@pytest.mark.parametrize("preset", sorted(PRESET_DATA))
def test_preset_trains_a_batch(preset, tmp_path, monkeypatch):
    # Generated CIFAR pickles cannot match torchvision's md5 list; the rest is torchvision's code.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    overrides = [f"experiment={preset}", *PRESET_DATA[preset](tmp_path / "data"), "data.num_workers=0"]
    overrides += ["data.batch_size=16", "trainer.max_epochs=1", "callbacks.progress=null"]
    overrides += [f"trainer.limit_{s}_batches=1" for s in ("train", "val", "test")]
    metrics = train(compose_train(overrides, tmp_path / "run"))
    assert math.isfinite(metrics["train/loss_epoch"]) and 0 <= metrics["test/acc"] <= 1
    if preset == "cpu_30min":  # its final test reports accuracy with and without TTA
        assert 0 <= metrics["test/acc_tta"] <= 1
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").is_file()


def test_the_newcomers_first_command_is_the_cpu_preset_on_torchvision_cifar10(tmp_path):
    # README's first command, `vit-train experiment=cpu_30min`, needs no other value: torchvision's
    # CIFAR-10 (downloaded into data/cifar10), its test split scored with and without 10-view TTA.
    cfg = compose_train(["experiment=cpu_30min"], tmp_path)
    assert OmegaConf.missing_keys({k: cfg[k] for k in cfg if k != "hydra"}) == set()
    assert (cfg.data.name, cfg.data.root, cfg.data.download) == ("cifar10", "data/cifar10", True)
    assert cfg.test and cfg.test_tta == "hflip_translate" and cfg.trainer.max_time == "00:00:30:00"
    assert cfg.model.weight_init == "mimetic" and cfg.model.whiten_patches  # measured better in 30 minutes (README)
    assert cfg.model.mlp_ratio == 2.0  # more steps in the 30 minutes than ratio 4 or 3, measured better (README)
    assert cfg.trainer.max_epochs == 100  # the 30 minutes, not an epoch bound, lead the schedules (README)
    assert (cfg.data.batch_size, cfg.optim.lr) == (256, 2.8e-3)  # better than 1.4e-3 or 2e-3 at 256 (README)
    readme = (REPO / "README.md").read_text()
    assert "&& vit-train experiment=cpu_30min\n" in readme


def test_the_final_evaluations_report_accuracy_with_and_without_tta(folder_data, tmp_path):
    from vit.evaluate import build_eval_data, predict_logits

    overrides = ["data=folder", f"data.root={folder_data}", "data.img_size=16", "trainer.max_epochs=2"]
    metrics = train(compose_train([*overrides, *TINY_MODEL, *FAST, "test_tta=hflip_translate"], tmp_path))
    # The same numbers from the best checkpoint, computed apart from the Trainer: test and validation.
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "best.ckpt")
    images, labels = ImageDataModule(name="folder", root=str(folder_data), img_size=16)._load(train=False)[:2]
    plain, tta = predict_logits(ckpt, images, 64, torch.device("cpu"), "hflip_translate")
    assert metrics["test/acc"] == pytest.approx((plain.argmax(1) == labels).float().mean().item())
    assert metrics["test/acc_tta"] == pytest.approx((tta.argmax(1) == labels).float().mean().item())
    val = build_eval_data(ckpt, None, "val").val_set
    plain, tta = predict_logits(ckpt, val.images, 64, torch.device("cpu"), "hflip_translate")
    assert metrics["val/acc_best"] == pytest.approx((plain.argmax(1) == val.labels).float().mean().item())
    assert metrics["val/acc_tta"] == pytest.approx((tta.argmax(1) == val.labels).float().mean().item())
    # That last validation adds val/acc_tta alone: the epochs' curves keep one row each.
    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    assert len([r for r in rows if r.get("val/acc")]) == len([r for r in rows if r.get("time/minutes")]) == 2
    assert len([r for r in rows if r.get("val/acc_tta")]) == 1


@pytest.mark.slow
def test_tiny_run_learns_then_resumes_and_checkpoint_is_self_describing(folder_data, tmp_path):
    common = [
        "data=folder",
        f"data.root={folder_data}",
        "data.img_size=16",
        "data.val_size=30",
        "optim.lr=3e-3",
        "optim.warmup_epochs=0.5",
        *TINY_MODEL,
        *FAST,
    ]
    run1 = tmp_path / "run1"
    metrics = train(compose_train([*common, "trainer.max_epochs=4", "logger=many"], run1))
    # Chance is 1/3; the colour cue is easy to learn.
    assert metrics["val/acc_best"] >= 0.9, metrics
    assert metrics["test/acc"] >= 0.9, metrics
    best, last = run1 / "checkpoints" / "best.ckpt", run1 / "checkpoints" / "last.ckpt"
    assert best.is_file() and last.is_file()
    assert (run1 / "csv" / "metrics.csv").is_file() and any((run1 / "tensorboard").iterdir())

    # Self-describing: weights_only load, rebuild from the file alone, same logits as in training.
    raw = torch.load(last, map_location="cpu", weights_only=True)
    assert raw["epoch"] == 3 and raw["ImageDataModule"]["class_names"] == ["class_0", "class_1", "class_2"]
    ckpt = load_checkpoint(best)
    model = load_model(best)
    assert not model.training and model.config == ckpt.model.config
    assert ckpt.img_size == (16, 16) and len(ckpt.mean) == 3

    # Resume: epochs and optimizer state continue from last.ckpt.
    run2 = tmp_path / "run2"
    train(compose_train([*common, "trainer.max_epochs=5", f"ckpt_path={last}"], run2))
    resumed = torch.load(run2 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 4
    assert resumed["global_step"] == raw["global_step"] * 5 // 4
    assert resumed["optimizer_states"][0]["state"][0]["step"] > raw["optimizer_states"][0]["state"][0]["step"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"hello")
    with pytest.raises(CheckpointError, match="cannot load checkpoint"):
        load_checkpoint(junk)
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="not a checkpoint written by vit-train"):
        load_checkpoint(plain)


@pytest.mark.slow
def test_multirun_two_jobs(folder_data, tmp_path):
    r = run_module(
        "vit.train",
        [
            "-m",
            "model.depth=1,2",
            "data=folder",
            f"data.root={folder_data}",
            "data.img_size=16",
            "trainer=debug",
            "test=false",
            "model.embed_dim=16",
            "model.num_heads=2",
            *FAST,
            f"paths.sweep_dir={tmp_path}/multirun",
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ckpts = sorted((tmp_path / "multirun").glob("*/*/*/checkpoints/last.ckpt"))
    assert len(ckpts) == 2
    depths = sorted(load_model(c).config["depth"] for c in ckpts)
    assert depths == [1, 2]


def _narrow_run(folder_data) -> list[str]:
    """A 32-wide model on the generated folder data: the base of the bad-override cases below."""
    return ["data=folder", f"data.root={folder_data}", "model.embed_dim=32", "model.num_heads=2", *FAST]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.num_heads=5"], "embed_dim 32 is not divisible by num_heads 5"),
        (["data.root=/does/not/exist"], "data.root=/does/not/exist does not exist"),
        (["data.val_size=100000"], "data.val_size=100000 must be in"),
        (["model.mlp_layer=geglu"], "mlp_layer must be one of ('mlp', 'swiglu'), got 'geglu'"),
        (["model.mlp_layer=swiglu", "model.mlp_ratio=1.53125"], "splits fc1's 49 features into gate and value"),
        (["model.whiten_patches=true", "model.pretrained=/w.pth"], "model.whiten_patches=true would overwrite"),
        (
            ["model.depth=2", "model.pretrained=/w.pth", "optim.depth_schedule=[[0,1],[0.5,2]]"],
            "would discard model.pretrained's weights",
        ),
    ],
)
def test_bad_overrides_fail_before_training(folder_data, tmp_path, overrides, message):
    # In-process (a subprocess costs seconds of imports); the CLI's one-line form is the next test.
    with pytest.raises(VitError, match=re.escape(message)):
        train(compose_train([*_narrow_run(folder_data), *overrides, "print_config=false"], tmp_path))
    assert not (tmp_path / "checkpoints").exists()  # nothing was trained


def test_a_bad_override_is_one_line_from_the_cli_and_nothing_is_trained(folder_data, tmp_path):
    r = run_module("vit.train", [*_narrow_run(folder_data), "model.num_heads=5"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: embed_dim 32 is not divisible by num_heads 5" in r.stderr
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))


def test_resume_from_another_model_configuration_is_refused(trained_run, folder_data, tmp_path):
    last = trained_run / "checkpoints" / "last.ckpt"
    data = ["data=folder", f"data.root={folder_data}"]
    r, missing = run_all(
        [
            module_cmd(
                "vit.train",
                [
                    *data,
                    "data.img_size=16",
                    *TINY_MODEL,
                    *FAST,
                    "model.depth=3",
                    f"ckpt_path={last}",
                    "hydra.run.dir=a",
                ],
            ),
            module_cmd("vit.train", [*data, f"ckpt_path={tmp_path}/missing.ckpt", "hydra.run.dir=b"]),
        ],
        tmp_path,
    )
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "was trained with another model configuration (depth: checkpoint 2, now 3)" in r.stderr
    assert missing.returncode == 1 and "checkpoint not found" in missing.stderr


def test_bad_model_override_fails_before_any_data_is_read(tmp_path):
    # The default dataset is absent and may not be downloaded: the model error must come first.
    r = run_module("vit.train", ["model.num_heads=5", "data.download=false", f"data.root={tmp_path}/none"], tmp_path)
    assert r.returncode == 1 and "error: embed_dim 192 is not divisible by num_heads 5" in r.stderr
    assert "CIFAR-10" not in r.stderr


def test_offline_cifar_without_data_gives_clear_error(tmp_path):
    r = run_module("vit.train", ["data.download=false", f"data.root={tmp_path}/cifar"], tmp_path)
    assert r.returncode == 1
    assert "CIFAR-10 (train split) is not in" in r.stderr and "data=folder" in r.stderr


def test_schedule_by_time_ends_the_decay_when_the_budget_ends(folder_data, tmp_path):
    # max_epochs is out of reach, so only the 4-second budget can stop the run; with the time-aware
    # schedule the last step's learning rate is at the floor (min_lr_ratio) instead of near the top.
    common = [
        "data=folder",
        f"data.root={folder_data}",
        "data.img_size=16",
        "trainer.max_epochs=100000",
        "trainer.max_time=00:00:00:04",
        "trainer.log_every_n_steps=1",
        "optim.warmup_epochs=0",
        "optim.min_lr_ratio=0",
        "optim.lr=1e-3",
        *TINY_MODEL,
        *FAST,
    ]
    timed = train(compose_train([*common, "optim.schedule_by_time=true"], tmp_path / "timed"))
    by_steps = train(compose_train(common, tmp_path / "steps"))
    assert timed["lr-AdamW/pg1"] < 0.05 * 1e-3, timed
    assert by_steps["lr-AdamW/pg1"] > 0.95 * 1e-3, by_steps


def test_img_size_schedule_trains_small_then_full_size_and_validates_at_full_size(folder_data, tmp_path):
    from vit.train import build_datamodule, build_module, build_trainer

    cfg = compose_train(
        [
            "data=folder",
            f"data.root={folder_data}",
            "data.img_size=16",
            "trainer.max_epochs=2",
            "model.dynamic_img_size=true",
            "data.img_size_schedule=[[0,8],[0.5,16]]",
            "test=false",
            *TINY_MODEL,
            *FAST,
        ],
        tmp_path,
    )
    dm = build_datamodule(cfg)
    module = build_module(cfg, dm)
    trainer = build_trainer(cfg)
    seen: list[tuple[bool, int]] = []
    module.net.register_forward_pre_hook(lambda m, args: seen.append((m.training, args[0].shape[-1])))
    flops: list[int] = []

    class ReadFlops(L.Callback):  # reads what ThroughputMonitor reads after each step
        def on_train_batch_end(self, trainer, pl_module, *args):
            flops.append(pl_module.flops_per_batch)

    trainer.callbacks.append(ReadFlops())
    trainer.fit(module, datamodule=dm)
    train_sizes = [size for training, size in seen if training]
    steps = trainer.global_step  # 120 - 30 val = 90 images at 16 a batch: 5 steps an epoch, 10 in all
    assert train_sizes == [8] * (steps // 2) + [16] * (steps - steps // 2)
    # The FLOP count follows the size: 16 patch tokens + class token at 8 px, 64 + 1 at 16 px.
    with torch.device("meta"):
        net = VisionTransformer(**module.net.config)
    at = {
        s: measure_flops(net, lambda s=s: net(torch.empty(16, 3, s, s, device="meta")), torch.Tensor.sum)
        for s in (8, 16)
    }
    assert at[8] < at[16] and flops == [at[size] for size in train_sizes]
    assert {size for training, size in seen if not training} == {16}
    # Checkpoints rebuild the full-size model.
    assert load_model(tmp_path / "checkpoints" / "last.ckpt")(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.img_size_schedule=[[0,8]]"], "needs model.dynamic_img_size=true"),
        (["model.dynamic_img_size=true", "data.img_size_schedule=[[0,6]]"], "multiples of the patch size"),
        (["model.dynamic_img_size=true", "data.img_size_schedule=[[0.2,8]]"], "must start at fraction 0"),
        (["model.dynamic_img_size=true", "data.img_size_schedule=[8,16]"], "are [fraction, size] pairs"),
        (["optim.schedule_by_time=true"], "needs a time budget: set trainer.max_time"),
        (["data.crop_padding_schedule=[[0,2]]"], "needs data.augment.on_batch=true"),
        (
            ["data.augment.on_batch=true", "data.crop_padding_schedule=[[0,2],[0.5,40]]"],
            "paddings [40] must be below 32",
        ),
        (["data.augment.on_batch=true", "data.crop_padding_schedule=[[0,-2]]"], "non-negative integer paddings"),
        (["data.augment.hflip=false", "data.augment.alternate_flip=true"], "alternate_flip=true needs"),
    ],
)
def test_bad_schedule_overrides_fail_before_any_data_is_read(tmp_path, overrides, message):
    # data.root does not exist: reading the data first would raise that error instead.
    args = ["data=folder", "data.root=/does/not/exist", *TINY_MODEL, *overrides, "print_config=false"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(compose_train(args, tmp_path))


def test_compile_on_a_cpu_without_a_cpp_compiler_stops_before_any_data_is_read(tmp_path, monkeypatch):
    # torch.compile's CPU kernels are C++ built at the first step: without a compiler the run would
    # die there, after the data was read and the patch embedding whitened.
    import vit.train

    monkeypatch.setattr(vit.train, "cpp_compiler_found", lambda: False)
    args = ["data=folder", "data.root=/does/not/exist", *TINY_MODEL, "trainer.accelerator=cpu", "print_config=false"]
    with pytest.raises(ConfigError, match=re.escape("model.compile=true: on a CPU torch.compile builds")):
        train(compose_train([*args, "model.compile=true"], tmp_path))
    with pytest.raises(VitError, match="does not exist"):  # without compile the same run gets as far as the data
        train(compose_train(args, tmp_path))


def test_resume_accepts_a_checkpoint_from_before_dynamic_img_size(trained_run, tmp_path):
    from vit.module import ViTClassifier
    from vit.train import check_resumable

    raw = torch.load(trained_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    config = dict(raw["hyper_parameters"]["model"])
    del raw["hyper_parameters"]["model"]["dynamic_img_size"]  # as written before the option existed
    old = tmp_path / "old.ckpt"
    torch.save(raw, old)
    check_resumable(str(old), ViTClassifier(model=config))  # missing key = its default: accepted
    check_resumable(str(old), ViTClassifier(model=dict(config, dynamic_img_size=True)))  # a runtime switch
    with pytest.raises(CheckpointError, match="depth: checkpoint 2, now 3"):
        check_resumable(str(old), ViTClassifier(model=dict(config, depth=3)))


def test_whiten_patches_starts_the_embedding_from_the_training_patches_and_not_on_resume(folder_data, tmp_path):
    from vit.train import build_datamodule, build_module

    def build(*extra):
        cfg = compose_train(
            [
                "data=folder",
                f"data.root={folder_data}",
                "data.img_size=16",
                *TINY_MODEL,
                "model.patch_size=2",
                *FAST,
                *extra,
            ],
            tmp_path,
        )
        L.seed_everything(cfg.seed)
        dm = build_datamodule(cfg)
        return build_module(cfg, dm), dm

    plain, dm = build()
    white, _ = build("model.whiten_patches=true")
    resumed, _ = build("model.whiten_patches=true", f"ckpt_path={tmp_path}/last.ckpt")
    dm.setup("fit")
    x = dm.pipeline.normalize(dm.train_set.images)

    def spread(module):  # max / min variance of the tokens along the 12 patch directions (3 x 2 x 2)
        with torch.no_grad():
            t = module.net.patch_embed(x).reshape(-1, 32).double()
        lam = torch.linalg.eigvalsh(torch.cov(t.T))[-12:]
        return (lam.max() / lam.min()).item()

    assert spread(white) < 0.2 * spread(plain)
    torch.testing.assert_close(resumed.net.patch_embed.proj.weight, plain.net.patch_embed.proj.weight, atol=0, rtol=0)
