"""The entry points' error policy, under Hydra's runs and sweeps.

`hydra_cli(task, config_name)` makes a console script: Hydra composes the config from `conf/`
(and runs `-m` sweeps); a `VitError` raised by `task` becomes `error: <message>` and the job fails;
any other exception is a bug and keeps its traceback (HYDRA_FULL_ERROR=1 keeps it for all). Nothing here ends the process from inside a
job, so in a sweep one failed job (a diverging trial, one bad value) is recorded as failed and the
sweeper goes on: the basic sweeper runs the other jobs, Optuna's counts the failure against its
`max_failure_rate`. The process then ends with status 1 and a line naming the failed jobs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig

from vit.config import CONFIG_DIR
from vit.errors import ConfigError, VitError

log = logging.getLogger("vit")


# Command-line choices that need a Hydra plugin from an optional extra: (plugin module, extra).
PLUGIN_CHOICES = {
    "hparams_search=optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    "hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep"),
    "hydra/launcher=submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "cluster"),
    "hydra/launcher=submitit_local": ("hydra_plugins.hydra_submitit_launcher", "cluster"),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported (find_spec raises when even its parent package is absent)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def check_plugins(args: list[str]) -> None:
    """ConfigError naming the extra to install when an override asks for a Hydra plugin that is
    not installed (Hydra itself would only say that the config group has no such option)."""
    for arg in args:
        module, extra = PLUGIN_CHOICES.get(arg.lstrip("+~").replace(" ", ""), (None, None))
        if module and not installed(module):
            raise ConfigError(
                f"{arg} needs the {extra} extra, which is not installed: pip install 'vit-cifar[{extra}]'"
            )


class JobFailed(CompactHydraException):
    """A job of a sweep ended with a VitError (already printed); Hydra prints this in one line."""


def hydra_cli(task: Callable[[DictConfig], Any], config_name: str) -> Callable[[], None]:
    """A console script that runs `task` on the composed config with the policy above."""
    failed: list[str] = []  # "#N (run folder)" of each sweep job that failed; "" for a single run
    jobs = [0]

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)
    def job(cfg: DictConfig) -> Any:
        jobs[0] += 1
        try:
            return task(cfg)
        except VitError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":  # Hydra's own switch: keep the traceback
                raise
            hc = HydraConfig.get()
            log.error("%s", e)
            if hc.mode != RunMode.MULTIRUN:
                print(f"error: {e}", file=sys.stderr, flush=True)
                failed.append("")
                return None
            print(f"error: {e} [job #{hc.job.num}: {' '.join(hc.overrides.task)}]", file=sys.stderr, flush=True)
            failed.append(f"#{hc.job.num} ({hc.runtime.output_dir})")
            raise JobFailed(f"job #{hc.job.num} failed: {e}") from e  # the sweeper marks this job failed

    def main() -> None:
        try:
            check_plugins(sys.argv[1:])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        try:
            job()
        finally:
            if any(failed):  # a sweep: name every failed job, however it ended
                print(
                    f"error: {len(failed)} of {jobs[0]} jobs failed: {', '.join(failed)}", file=sys.stderr, flush=True
                )
        if failed:
            sys.exit(1)

    main.__doc__ = task.__doc__
    return main
