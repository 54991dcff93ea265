"""What the entry points share: turning foreseeable mistakes into one clear message and exit 1."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger("vit")

# The Hydra configs live at the repository's top level (conf/); the project installs editable.
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")

F = TypeVar("F", bound=Callable[..., Any])

# Mistakes a user can make (bad data, bad config, bad checkpoint, bad image); anything else is
# a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FloatingPointError, OSError)


def user_errors_exit(fn: F) -> F:
    """Run `fn`; on a user error print `error: <message>` and exit with status 1.

    HYDRA_FULL_ERROR=1 (Hydra's own switch) keeps the full traceback instead.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            log.error("%s", e)
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a temporary name beside `path`, then rename it into place: a crash or a
    bad input never leaves a half-written file under the final name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
