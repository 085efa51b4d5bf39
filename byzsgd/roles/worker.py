"""A worker: ``python -m byzsgd.roles.worker``.

:func:`Worker` builds the worker of the configured mode; each is a class of its own over
:class:`byzsgd.roles.worker_base.WorkerBase` (gradients, sending, leaving):

* ``garfield`` — :class:`byzsgd.roles.garfield.GarfieldWorker`: serves each PS's requests;
* ``paper`` — :class:`byzsgd.roles.paper.PaperWorker`: the median of q_ps PS models, one
  gradient to every PS;
* ``paper --sync`` — :class:`byzsgd.roles.paper_sync.PaperSyncWorker`: pulls one PS's model
  and checks it with the filters.

A Byzantine worker (``--attack NAME``) computes its honest gradient, then sends what the
attack forges instead (see :mod:`byzsgd.roles.byzantine`).
"""
from __future__ import annotations

from byzsgd.config import RunConfig
from byzsgd.roles.common import exit_now
from byzsgd.roles.departure import LEAVE_BY_S, LINGER_S  # noqa: F401  (public names)
from byzsgd.roles.garfield import GarfieldWorker
from byzsgd.roles.paper import PaperWorker
from byzsgd.roles.paper_sync import SKIP_AFTER, PaperSyncWorker  # noqa: F401  (public name)
from byzsgd.roles.worker_base import WorkerBase


def Worker(cfg: RunConfig) -> WorkerBase:  # noqa: N802  (the constructor's name, kept)
    """The worker of ``cfg``'s mode; ``await worker.run()`` is the exit code."""
    if cfg.mode == "paper":
        return PaperSyncWorker(cfg) if cfg.sync else PaperWorker(cfg)
    return GarfieldWorker(cfg)


def main(argv: list[str] | None = None) -> int:
    """``python -m byzsgd.roles.worker`` (see :func:`byzsgd.roles.entry.run_role`)."""
    from byzsgd.roles.entry import main as entry_main

    return entry_main("worker", argv)


if __name__ == "__main__":
    exit_now(main())
