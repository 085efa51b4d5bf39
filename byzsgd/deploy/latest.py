"""The latest run: where ``scripts/run_exp.sh`` records the run directory it started, so that
``scripts/kill.sh`` (and ``wait``, ``status``, ...) with no argument find it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from byzsgd import rundir
from byzsgd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
#: where ``run`` records its run directory, for ``kill.sh`` with no argument (see latest_pointer)
LATEST_ENV = "BYZSGD_LATEST_RUN"


def latest_pointer() -> Path:
    """``$BYZSGD_LATEST_RUN``, else ``<checkout>/runs/latest``: a symlink to the run directory
    of the latest ``run`` started from this checkout.  In the checkout, not the working
    directory, so that ``kill.sh`` finds the run whichever directory either script ran from
    (each experiment directory holding its own servers / workers / exp.conf); a symlink so that
    ``runs/latest/ps0.log`` works, replaced atomically (``os.replace``) so that a reader never
    sees half a record, and holding an absolute path (``--run_dir`` may be anywhere).  An
    installed byzsgd (no checkout around it) records in ``$XDG_STATE_HOME/byzsgd/latest``
    (``~/.local/state``) instead of its site-packages."""
    if os.environ.get(LATEST_ENV):
        return Path(os.environ[LATEST_ENV])
    if (REPO / "scripts" / "run_exp.sh").is_file():
        return REPO / "runs" / "latest"
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "byzsgd" / "latest"


def record_latest(run_dir: Path) -> Path | None:
    """Point :func:`latest_pointer` at ``run_dir``; a pointer that cannot be written (a
    read-only checkout) is a warning, not a failed start."""
    pointer = latest_pointer()
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}")
    try:
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(Path(run_dir).resolve(), tmp)
        os.replace(tmp, pointer)
    except OSError as exc:
        print(f"byzsgd.cluster: warning: cannot record the latest run in {pointer} ({exc}); "
              f"scripts/kill.sh will need the run directory", file=sys.stderr)
        return None
    return pointer


def latest_run() -> Path:
    """The run directory :func:`record_latest` recorded, or a ConfigError saying why none."""
    pointer = latest_pointer()
    if not pointer.is_symlink():
        raise ConfigError(f"no run recorded in {pointer} (scripts/run_exp.sh records each run it "
                          f"starts there): give the run directory")
    target = Path(os.readlink(pointer))
    if not rundir.deployment_path(target).exists():
        raise ConfigError(f"the latest run, {target} ({pointer}), holds no deployment.json any "
                          f"more: give the run directory")
    return target
