"""Installs as users make them: a built wheel carries every Hydra config and its CLIs compose from
the installed package, from any working directory; optional extras are named when missing; a
sweep runs through Hydra's submitit launcher."""

import importlib.util
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import FAST, REPO, TINY_MODEL, cli_env, compose_train, run_all, run_module
from vit.checkpoint import load_model
from vit.cli import check_plugins, installed
from vit.config import check_train_config
from vit.errors import ConfigError

CLIS = ["vit-train", "vit-eval", "vit-attention", "vit-export", "vit-predict"]


@pytest.mark.slow
def test_the_wheel_carries_every_config_and_its_clis_compose_from_it(tmp_path):
    dist, site = tmp_path / "dist", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-w", str(dist)], check=True)
    [wheel] = dist.glob("vit_cifar-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(REPO / "conf").as_posix() for p in (REPO / "conf").rglob("*.yaml"))
    assert configs and all(f"vit/conf/{c}" in names for c in configs), sorted(n for n in names if "/conf/" in n)

    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    env = dict(cli_env(), PYTHONPATH=str(site))  # the installed copy, not the checkout
    work = tmp_path / "elsewhere"
    work.mkdir()
    where_cmd = [sys.executable, "-c", "import vit.config as c; print(c.CONFIG_DIR)"]
    where, *composed = run_all([where_cmd, *([str(site / "bin" / cli), "--cfg", "job"] for cli in CLIS)], work, env=env)
    assert where.stdout.strip() == str(site / "vit" / "conf"), where.stderr
    for cli, r in zip(CLIS, composed, strict=True):
        assert r.returncode == 0 and "task_name:" in r.stdout, (cli, r.stderr[-2000:])


def test_a_choice_that_needs_a_missing_extra_names_the_extra(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    missing = (
        "tensorboard",
        "tensorboardX",
        "hydra_plugins.hydra_optuna_sweeper",
        "hydra_plugins.hydra_submitit_launcher",
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a))
    with pytest.raises(
        ConfigError,
        match=r"needs the tensorboard package, which is not installed: pip install 'vit-cifar\[tensorboard\]'",
    ):
        check_train_config(compose_train(["logger=tensorboard"], tmp_path))
    with pytest.raises(
        ConfigError, match=r"hparams_search=optuna needs the sweep extra.*pip install 'vit-cifar\[sweep\]'"
    ):
        check_plugins(["trainer=debug", "hparams_search=optuna"])
    with pytest.raises(ConfigError, match=r"needs the cluster extra.*vit-cifar\[cluster\]"):
        check_plugins(["-m", "hydra/launcher=submitit_slurm"])
    check_plugins(["logger=csv", "model.depth=3"])  # nothing optional asked for
    # Without the extra, not even the plugins' parent package exists: find_spec itself raises.
    assert not installed("no_such_plugins_package.hydra_optuna_sweeper") and installed("vit.cli")


def test_the_cli_names_the_missing_extra_in_one_line(tmp_path):
    code = (
        "import importlib.util as u, sys; real = u.find_spec; "
        "u.find_spec = lambda n, *a: None if n.startswith('hydra_plugins.hydra_optuna') else real(n, *a); "
        "sys.argv = ['vit-train', 'hparams_search=optuna']; from vit.train import main; main()"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        == "error: hparams_search=optuna needs the sweep extra, which is not installed: pip install 'vit-cifar[sweep]'"
    )


@pytest.mark.slow
def test_a_sweep_runs_each_job_through_the_submitit_launcher(folder_data, tmp_path):
    args = [
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "model.depth=1,2",
        "data=folder",
        f"data.root={folder_data}",
        "data.img_size=16",
        "trainer=debug",
        "test=false",
        f"paths.sweep_dir={tmp_path}/multirun",
        *[a for a in TINY_MODEL if not a.startswith("model.depth")],
        *FAST,
    ]
    r = run_module("vit.train", args, tmp_path, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    [sweep] = (tmp_path / "multirun").glob("*/*")
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit
    runs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    assert [load_model(p / "checkpoints" / "last.ckpt").config["depth"] for p in runs] == [1, 2]
    assert all((p / ".hydra" / "config.yaml").is_file() and (p / "csv" / "metrics.csv").is_file() for p in runs)
