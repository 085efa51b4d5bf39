"""A parameter server: ``python -m byzsgd.roles.ps``.

:func:`ParameterServer` builds the PS of the configured mode; each is a class of its own
over :class:`byzsgd.roles.ps_base.PSBase` (the step loop they share):

* ``garfield`` — :class:`byzsgd.roles.garfield.GarfieldPS`: pushes its model to every worker,
  gathers after every step;
* ``paper`` — :class:`byzsgd.roles.paper.PaperPS`: gathers every --gather_period steps (DMC)
  and measures the diameter (:mod:`byzsgd.roles.diameter`);
* ``paper --sync`` — :class:`byzsgd.roles.paper_sync.PaperSyncPS`: the workers pull its model.
"""
from __future__ import annotations

from byzsgd.config import RunConfig
from byzsgd.roles.common import exit_now
from byzsgd.roles.garfield import GarfieldPS
from byzsgd.roles.paper import PaperPS
from byzsgd.roles.paper_sync import PULLS_PER_STEP, PaperSyncPS  # noqa: F401  (public name)
from byzsgd.roles.ps_base import PSBase


def ParameterServer(cfg: RunConfig) -> PSBase:  # noqa: N802  (the constructor's name, kept)
    """The parameter server of ``cfg``'s mode; ``await ps.run()`` is the exit code."""
    if cfg.mode == "paper":
        return PaperSyncPS(cfg) if cfg.sync else PaperPS(cfg)
    return GarfieldPS(cfg)


def main(argv: list[str] | None = None) -> int:
    """``python -m byzsgd.roles.ps`` (see :func:`byzsgd.roles.entry.run_role`)."""
    from byzsgd.roles.entry import main as entry_main

    return entry_main("ps", argv)


if __name__ == "__main__":
    exit_now(main())
