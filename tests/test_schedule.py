"""The run's one measure of progress and the schedules that read it, with numbers; then the clock
inside real Trainer runs (steps only, a step limit without an epoch count, the world size)."""

import csv
import math

import lightning as L
import pytest

from tests.conftest import FAST, TINY_MODEL, compose_train
from vit.checkpoint import load_checkpoint
from vit.config import check_train_config
from vit.errors import ConfigError
from vit.model import Block, PatchDropout
from vit.module import ViTClassifier
from vit.schedule import (
    img_size_at,
    lr_factor,
    parse_crop_padding_schedule,
    parse_depth_schedule,
    parse_img_size_schedule,
    parse_patch_drop_schedule,
    run_fraction,
    value_at,
)
from vit.train import train


def test_run_fraction_counts_steps_or_the_time_budget_whichever_is_further():
    assert run_fraction(0, 100) == 0.0
    assert run_fraction(25, 100) == 0.25
    assert run_fraction(25, 100, elapsed_s=90, budget_s=120) == 0.75  # the clock is further along
    assert run_fraction(80, 100, elapsed_s=30, budget_s=120) == 0.8  # the steps are
    assert run_fraction(25, 100, elapsed_s=90) == 0.25  # no budget: time does not count
    assert run_fraction(150, 100) == 1.0 and run_fraction(1, 100, elapsed_s=500, budget_s=120) == 1.0
    assert run_fraction(10, math.inf, elapsed_s=60, budget_s=120) == 0.5  # no step limit: time alone


def test_lr_factor_warms_up_linearly_then_follows_a_half_cosine():
    warmup, floor = 0.1, 0.01
    assert lr_factor(0.0, warmup, floor) == 0.0
    assert lr_factor(0.05, warmup, floor) == pytest.approx(0.5)
    assert lr_factor(0.1, warmup, floor) == pytest.approx(1.0)
    assert lr_factor(0.55, warmup, floor) == pytest.approx(floor + (1 - floor) * 0.5)  # half way down
    assert lr_factor(1.0, warmup, floor) == pytest.approx(floor)
    quarter = 0.1 + 0.9 * 0.25
    assert lr_factor(quarter, warmup, floor) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(0.0, 0.0, 0.0) == 1.0 and lr_factor(1.0, 0.0, 0.0) == pytest.approx(0.0)
    assert lr_factor(0.5, 1.0, 0.0) == 0.5  # all warmup: never decays


def test_lr_factor_linear_decay_falls_in_a_straight_line_after_the_same_warmup():
    warmup, floor = 0.2, 0.1
    assert lr_factor(0.1, warmup, floor, "linear") == pytest.approx(0.5)  # the warmup is shared
    assert lr_factor(0.2, warmup, floor, "linear") == pytest.approx(1.0)
    assert lr_factor(0.4, warmup, floor, "linear") == pytest.approx(floor + (1 - floor) * 0.75)
    assert lr_factor(0.6, warmup, floor, "linear") == pytest.approx(floor + (1 - floor) * 0.5)
    assert lr_factor(1.0, warmup, floor, "linear") == pytest.approx(floor)
    # Below the cosine in the first half of the decay, above it in the second.
    assert lr_factor(0.3, warmup, floor, "linear") < lr_factor(0.3, warmup, floor, "cosine")
    assert lr_factor(0.9, warmup, floor, "linear") > lr_factor(0.9, warmup, floor, "cosine")
    with pytest.raises(ConfigError, match="optim.lr_decay='step' is not one of"):
        lr_factor(0.5, warmup, floor, "step")


def test_img_size_at_follows_the_schedule():
    schedule = parse_img_size_schedule([[0.7, 32], [0, 16], [0.4, 24]])  # any order in the config
    assert schedule == [(0.0, 16), (0.4, 24), (0.7, 32)]
    assert [img_size_at(f, schedule) for f in (0.0, 0.39, 0.4, 0.69, 0.7, 1.0)] == [16, 16, 24, 24, 32, 32]
    assert img_size_at(0.5, []) is None
    for bad, match in (([[0.2, 8]], "must start at fraction 0"), ([[0, 8], [1.0, 16]], "below 1"), ([8, 16], "pairs")):
        with pytest.raises(ConfigError, match=match):
            parse_img_size_schedule(bad)


def test_crop_padding_schedule_parses_integer_paddings_and_refuses_bad_ones():
    assert parse_crop_padding_schedule([[0.5, 4], [0, 0]]) == [(0.0, 0), (0.5, 4)]
    for bad in ([[0, -1]], [[0, 2.5]], [[0, True]], [[0.1, 2]], [[0, 2], [1.0, 4]]):
        with pytest.raises(ConfigError, match="data.crop_padding_schedule"):
            parse_crop_padding_schedule(bad)


def test_patch_drop_schedule_parses_rates_and_refuses_bad_ones():
    assert parse_patch_drop_schedule([[0.5, 0], [0, 0.5]]) == [(0.0, 0.5), (0.5, 0.0)]
    assert value_at(0.49, [(0.0, 0.5), (0.5, 0.0)]) == 0.5 and value_at(0.5, [(0.0, 0.5), (0.5, 0.0)]) == 0.0
    for bad in ([[0, 1.0]], [[0, -0.1]], [[0.1, 0.5]], [[0, True]]):
        with pytest.raises(ConfigError, match="optim.patch_drop_schedule"):
            parse_patch_drop_schedule(bad)


def test_patch_drop_follows_its_schedule_in_training_and_never_in_evaluation(folder_data, tmp_path, monkeypatch):
    # 90 training images at 16 a batch: 5 steps an epoch, 10 in all; half the tokens dropped for
    # the first half of the run, none after. 16 px at patch 4: 16 patches -> 8 kept, + the class token.
    seen = []
    real = PatchDropout.forward

    def record(self, x):
        out = real(self, x)
        if x.device.type != "meta":  # not the FLOP count's copy of the network
            seen.append((self.training, out.shape[1]))
        return out

    monkeypatch.setattr(PatchDropout, "forward", record)
    overrides = ["data=folder", f"data.root={folder_data}", "data.img_size=16", "test=false", *TINY_MODEL, *FAST]
    overrides += [
        "trainer.max_epochs=2",
        "trainer.num_sanity_val_steps=0",
        "optim.patch_drop_schedule=[[0,0.5],[0.5,0]]",
    ]
    train(compose_train(overrides, tmp_path))
    training = [n for is_training, n in seen if is_training]
    assert training == [1 + 8] * 5 + [1 + 16] * 5
    assert {n for is_training, n in seen if not is_training} == {1 + 16}  # validation: every token


def test_depth_schedule_parses_growing_block_counts_and_refuses_bad_ones():
    assert parse_depth_schedule([[0.5, 3], [0, 2]], depth=3) == [(0.0, 2), (0.5, 3)]
    assert parse_depth_schedule(None, depth=3) == []
    bad = (
        [[0, 0], [0.5, 3]],  # no block
        [[0, 4]],  # more than the model has
        [[0, 2.5], [0.5, 3]],
        [[0, True], [0.5, 3]],
        [[0.1, 3]],  # not from the start
        [[0, 3], [0.5, 2]],  # a trained block taken out
        [[0, 1], [0.5, 2]],  # never the whole model
    )
    for schedule in bad:
        with pytest.raises(ConfigError, match="optim.depth_schedule"):
            parse_depth_schedule(schedule, depth=3)


def test_rope_beside_patch_dropping_is_refused_at_compose_time(tmp_path):
    check_train_config(compose_train(["model.rope=true"], tmp_path))
    for drop in ("optim.patch_drop_schedule=[[0,0.5],[0.5,0]]", "model.patch_drop_rate=0.25"):
        with pytest.raises(ConfigError, match="model.rope rotates each patch token"):
            check_train_config(compose_train(["model.rope=true", drop], tmp_path))


def test_depth_schedule_is_refused_at_compose_time_beside_ddp_that_waits_for_every_gradient(tmp_path):
    ok = compose_train(["model.depth=3", "optim.depth_schedule=[[0,2],[0.5,3]]"], tmp_path)
    check_train_config(ok)
    with pytest.raises(ConfigError, match="optim.depth_schedule"):
        check_train_config(compose_train(["model.depth=3", "optim.depth_schedule=[[0,2],[0.5,4]]"], tmp_path))
    with pytest.raises(ConfigError, match="ddp_find_unused_parameters_true"):
        check_train_config(
            compose_train(["trainer=ddp", "model.depth=3", "optim.depth_schedule=[[0,2],[0.5,3]]"], tmp_path)
        )
    check_train_config(
        compose_train(
            [
                "trainer=ddp",
                "trainer.strategy=ddp_find_unused_parameters_true",
                "model.depth=3",
                "optim.depth_schedule=[[0,2],[0.5,3]]",
            ],
            tmp_path,
        )
    )


def test_the_network_grows_on_the_run_clock_and_its_checkpoint_is_the_whole_model(folder_data, tmp_path, monkeypatch):
    # 90 training images at 16 a batch: 5 steps an epoch, 10 in all; the first block alone for the
    # first half of the run, both after. Block 1 is the identity (zero residuals) until it joins.
    nets, runs, joined_at = [], [], []
    real_forward, real_callbacks = Block.forward, ViTClassifier.configure_callbacks

    def record(self, x, *args, **kwargs):
        if x.device.type != "meta" and self.training:  # not the FLOP count's copy, not validation
            index = list(nets[0].blocks).index(self)
            if index == 1 and not joined_at:
                joined_at.append(
                    float(self.mlp.fc2.weight.detach().abs().max() + self.attn.proj.weight.detach().abs().max())
                )
            runs.append(index)
        return real_forward(self, x, *args, **kwargs)

    def capture(self):
        nets.append(self.net)
        return real_callbacks(self)

    monkeypatch.setattr(Block, "forward", record)
    monkeypatch.setattr(ViTClassifier, "configure_callbacks", capture)
    overrides = ["data=folder", f"data.root={folder_data}", "data.img_size=16", "test=false", *TINY_MODEL, *FAST]
    overrides += ["trainer.max_epochs=2", "trainer.num_sanity_val_steps=0", "optim.depth_schedule=[[0,1],[0.5,2]]"]
    train(compose_train(overrides, tmp_path))
    assert runs == [0] * 5 + [0, 1] * 5
    assert joined_at == [0.0]
    # The last checkpoint is the whole grown model, block 1 trained; it runs every block.
    model = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt").model
    assert model.active_blocks is None and len(model.blocks) == 2
    assert model.blocks[1].mlp.fc2.weight.abs().max() > 0


def _lrs(run_dir):
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    return [(int(r["step"]), float(r["lr-AdamW/pg1"])) for r in rows if r.get("lr-AdamW/pg1")]


@pytest.mark.slow
@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_a_step_limit_without_epochs_warms_up_then_decays(decay, folder_data, tmp_path):
    # Bug (a): with max_epochs=-1 the warmup was derived from max_epochs and spanned the whole run.
    # 90 training images at 16 a batch: 5 steps an epoch; warmup 0.4 epochs = 2 of the 20 steps.
    overrides = ["data=folder", f"data.root={folder_data}", "data.img_size=16", "test=false", *TINY_MODEL, *FAST]
    overrides += ["trainer.max_epochs=-1", "trainer.max_steps=20", "trainer.log_every_n_steps=1"]
    overrides += ["optim.lr=1e-3", "optim.warmup_epochs=0.4", "optim.min_lr_ratio=0", f"optim.lr_decay={decay}"]
    train(compose_train(overrides, tmp_path))
    lrs = dict(_lrs(tmp_path))
    assert sorted(lrs) == list(range(20))
    # The learning rate of step k is lr_factor(k / 20, 2 / 20, 0, decay) x 1e-3, exactly as the unit test computes.
    for step, lr in lrs.items():
        assert lr == pytest.approx(1e-3 * lr_factor(step / 20, 0.1, 0.0, decay), rel=1e-6, abs=1e-12), step
    # Warm at step 2, and near the floor one step from the end (cosine: 0.8% of the peak, linear: 5.6%).
    assert lrs[2] == pytest.approx(1e-3) and lrs[19] < 0.06 * 1e-3


@pytest.mark.parametrize("devices, num_nodes, world", [(2, 1, 2), (2, 2, 4), (1, 1, 1)])
def test_lr_scales_with_the_trainers_world_size(devices, num_nodes, world):
    # Bug (b): the world size was read from trainer.devices in the config (-1 gave a negative
    # learning rate, "auto" or a list counted 1). The Trainer knows how many processes there are.
    trainer = L.Trainer(accelerator="cpu", devices=devices, num_nodes=num_nodes, strategy="ddp", logger=False)
    module = ViTClassifier(
        model=dict(img_size=16, patch_size=4, num_classes=3, embed_dim=16, depth=1, num_heads=2),
        lr=1e-3,
        scale_lr_with_world_size=True,
    )
    module.trainer = trainer
    optimizer = module.configure_optimizers()
    assert trainer.world_size == world
    assert [g["peak_lr"] for g in optimizer.param_groups] == [pytest.approx(1e-3 * world)] * 2


def test_prepare_data_is_left_to_lightning(folder_data, tmp_path, monkeypatch):
    # Bug (c): prepare_data() was called by hand on every DDP rank before the Trainer existed, so
    # several processes could download into one folder at once. Lightning calls it once per node.
    from vit.data import ImageDataModule

    calls = []
    real = ImageDataModule.prepare_data

    def record(self):
        calls.append(self.trainer is not None and self.trainer.local_rank == 0)
        real(self)

    monkeypatch.setattr(ImageDataModule, "prepare_data", record)
    overrides = ["data=folder", f"data.root={folder_data}", "data.img_size=16", "trainer.fast_dev_run=true"]
    train(compose_train([*overrides, *TINY_MODEL, *FAST], tmp_path))
    assert calls == [True]
