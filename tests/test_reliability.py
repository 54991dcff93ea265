"""Reliability: a SIGKILLed run resumes; interrupted or failed checkpoint writes keep the previous
file; a NaN loss stops with the step named; malicious checkpoints are refused; runs are
deterministic when asked."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST, TINY_MODEL, cli_env, compose_train, write_folder
from vit.checkpoint import CheckpointError, load_checkpoint
from vit.train import train


def _common(root: Path) -> list[str]:
    return ["data=folder", f"data.root={root}", "data.img_size=16", "optim.lr=3e-3", *TINY_MODEL, *FAST]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_the_configured_epochs(tmp_path):
    root = write_folder(
        tmp_path / "data", n_train=100, n_test=0
    )  # 270 train images, batch 16, drop_last: 16 steps per epoch
    run = tmp_path / "killed"
    args = [*_common(root), "trainer.max_epochs=4", "callbacks.last_checkpoint.every_n_train_steps=4", "test=false"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vit.train", *args, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "stderr.txt", "w"),
    )
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not (last.exists() and torch.load(last, weights_only=True)["global_step"] >= 6):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    assert last.exists(), (tmp_path / "stderr.txt").read_text()[-3000:]
    killed = torch.load(last, map_location="cpu", weights_only=True)  # what survived loads
    assert 6 <= killed["global_step"] < 4 * 16

    resumed = tmp_path / "resumed"
    metrics = train(compose_train([*args, f"ckpt_path={last}"], resumed))
    final = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["epoch"] == 3 and final["global_step"] == 4 * 16
    assert metrics["val/acc_best"] >= 0.9  # within noise of an uninterrupted run on this easy task


@pytest.mark.slow
def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch, folder_data):
    run = tmp_path / "run"
    train(compose_train([*_common(folder_data), "trainer.max_epochs=1", "test=false"], run))
    last = run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    # The disk fills half-way through the next write.
    from fsspec.implementations.local import LocalFileOpener

    original = LocalFileOpener.write

    def half_then_enospc(self, data):
        original(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(LocalFileOpener, "write", half_then_enospc)
    with pytest.raises(OSError, match="No space left on device"):
        train(compose_train([*_common(folder_data), "trainer.max_epochs=2", f"ckpt_path={last}", "test=false"], run))
    assert last.read_bytes() == before  # intact, still the previous epoch
    assert load_checkpoint(last).model is not None


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, folder_data):
    import vit.module

    real_ce = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, target, **kw):
        loss = real_ce(logits, target, **kw)
        if torch.is_grad_enabled():  # training steps only
            calls["n"] += 1
            if calls["n"] == 8:  # global step 7, in the second epoch (5 steps per epoch)
                return loss * float("nan")
        return loss

    monkeypatch.setattr(vit.module.F, "cross_entropy", poisoned)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match="non-finite training loss .* at global step 7"):
        train(compose_train([*_common(folder_data), "trainer.max_epochs=3"], run))
    good = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert good["global_step"] == 5
    assert all(torch.isfinite(v).all() for v in good["state_dict"].values() if v.is_floating_point())


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_checkpoint_is_refused_and_runs_nothing(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "vit": {"model_config": {}}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_checkpoint(path)
    r = subprocess.run(
        [sys.executable, "-m", "vit.evaluate", f"ckpt_path={path}", "hydra.run.dir=out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert r.returncode == 1 and "refused for safety" in r.stderr
    assert not _Evil.marker.exists()


@pytest.mark.slow
def test_deterministic_runs_give_identical_metrics(tmp_path, folder_data):
    args = [
        *_common(folder_data),
        "trainer.max_epochs=2",
        "trainer.deterministic=true",
        "seed=123",
        "model.drop_path_rate=0.1",
        "data.augment.auto_augment=trivialaugment",
        "data.mix.mixup_alpha=0.5",
    ]
    a = train(compose_train(args, tmp_path / "a"))
    b = train(compose_train(args, tmp_path / "b"))
    assert a.pop("time/minutes") > 0 and b.pop("time/minutes") > 0  # the wall clock is the one thing that may differ
    assert a == b
    wa = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
