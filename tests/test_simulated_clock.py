"""scripts/simulated_clock.py: the run's clock advanced by a CPU's step costs instead of the wall clock."""

import argparse
import importlib.util
from types import SimpleNamespace

import pytest

from tests.conftest import REPO
from vit.errors import ConfigError


def _load():
    spec = importlib.util.spec_from_file_location("simulated_clock_script", REPO / "scripts" / "simulated_clock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sim = _load()


def _trainer(schedule, global_step=0):
    """What the clock reads of a Trainer: steps, the data module's size schedule, should_stop."""
    dm = SimpleNamespace(img_size_schedule=schedule, img_size=(32, 32))
    return SimpleNamespace(
        global_step=global_step,
        datamodule=dm,
        should_stop=False,
        estimated_stepping_batches=10_000,
        num_training_batches=100,
        accumulate_grad_batches=1,
        world_size=1,
    )


def _run_until_stop(clock, trainer, limit=1000):
    """Step the trainer as Lightning would (refresh after each optimizer step) until the clock stops it."""
    sizes = []
    while not trainer.should_stop and trainer.global_step < limit:
        sizes.append(clock._size(trainer))  # the size this step's batch is resized to
        trainer.global_step += 1
        clock.refresh(trainer, sync=False)
    return sizes


def test_steps_cost_their_size_and_the_run_stops_when_the_budget_is_spent():
    # 1 ms a step at 16 px until half the 0.1 s budget (50 steps), then 4 ms at 32 px: 13 more steps
    # (12.5 fill the budget; the 13th crosses it).
    clock = sim.SimulatedClock({16: 1.0, 32: 4.0}, budget_s=0.1)
    trainer = _trainer([(0.0, 16), (0.5, 32)])
    clock.on_train_start(trainer, None)
    assert clock.fraction == 0.0
    sizes = _run_until_stop(clock, trainer)
    assert sizes == [16] * 50 + [32] * 13
    assert trainer.should_stop and clock.fraction == 1.0
    assert clock.spent_ms == pytest.approx(50 * 1.0 + 13 * 4.0)


def test_without_a_schedule_every_step_costs_the_data_size():
    clock = sim.SimulatedClock({32: 2.0}, budget_s=0.01)
    trainer = _trainer([])
    clock.on_train_start(trainer, None)
    assert _run_until_stop(clock, trainer) == [32] * 5


def test_a_size_without_a_cost_is_refused_before_training():
    clock = sim.SimulatedClock({16: 1.0}, budget_s=1.0)
    with pytest.raises(ConfigError, match=r"\[20\] px .* costs for \[16\]"):
        clock.on_train_start(_trainer([(0.0, 16), (0.5, 20)]), None)


def test_a_resumed_run_continues_its_simulated_time():
    first = sim.SimulatedClock({16: 1.0, 32: 4.0}, budget_s=0.1)
    trainer = _trainer([(0.0, 16), (0.5, 32)])
    first.on_train_start(trainer, None)
    for _ in range(30):
        trainer.global_step += 1
        first.refresh(trainer, sync=False)
    resumed = sim.SimulatedClock({16: 1.0, 32: 4.0}, budget_s=0.1)
    resumed.load_state_dict(first.state_dict())  # as Lightning restores it from last.ckpt
    trainer = _trainer([(0.0, 16), (0.5, 32)], global_step=30)
    resumed.on_train_start(trainer, None)
    assert resumed.fraction == pytest.approx(0.3)  # the 30 steps done are not counted again
    assert _run_until_stop(resumed, trainer) == [16] * 20 + [32] * 13


@pytest.mark.parametrize("text", ["16", "16=x", "16=1,a=2", "16=0"])
def test_step_costs_must_be_size_ms_pairs(text):
    with pytest.raises(argparse.ArgumentTypeError):
        sim.parse_step_ms(text)
    assert sim.parse_step_ms("16=75.2,32=320") == {16: 75.2, 32: 320.0}


def test_bad_command_lines_exit_with_a_message(capsys):
    for argv in (["--step-ms", "16"], ["--budget-s", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            sim.main(argv)
        assert exit_info.value.code == 2
    assert "SIZE=MS" in capsys.readouterr().err


def test_the_default_costs_refuse_a_model_they_were_not_measured_for():
    # The default costs are the fp32 112-wide preset's; a host whose CPU multiplies bf16 resolves the
    # preset to 128 wide, which would silently take 112 wide's steps.
    config = dict(sim.FAST_CPU_SHAPE, embed_dim=128, qkv_bias=True)
    module = SimpleNamespace(net=SimpleNamespace(config=config))
    clock = sim.SimulatedClock(sim.FAST_CPU_STEP_MS, budget_s=1.0, shape=sim.FAST_CPU_SHAPE)
    with pytest.raises(ConfigError, match=r"builds model.embed_dim=128: override model.embed_dim=112"):
        clock.on_train_start(_trainer([(0.0, 16)]), module)
    module.net.config["embed_dim"] = 112
    clock.on_train_start(_trainer([(0.0, 16)]), module)  # the model they were measured for
    assert clock.fraction == 0.0
    # With its own costs (no shape), any model runs.
    sim.SimulatedClock({16: 1.0}, budget_s=1.0).on_train_start(_trainer([(0.0, 16)]), None)
