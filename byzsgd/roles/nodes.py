"""Which class is the node of a configuration: :func:`ParameterServer` and :func:`Worker`.

Each mode's PS and worker is a class of its own over :class:`byzsgd.roles.ps_base.PSBase`
(the step loop they share) or :class:`byzsgd.roles.worker_base.WorkerBase` (gradients,
sending, leaving):

* ``garfield`` — :class:`byzsgd.roles.garfield.GarfieldPS` pushes its model to every worker
  and gathers after every step; :class:`~byzsgd.roles.garfield.GarfieldWorker` serves each
  PS's requests;
* ``paper`` — :class:`byzsgd.roles.paper.PaperPS` gathers every --gather_period steps (DMC)
  and measures the diameter (:mod:`byzsgd.roles.diameter`);
  :class:`~byzsgd.roles.paper.PaperWorker` takes the median of q_ps PS models and sends one
  gradient to every PS;
* ``paper --sync`` — :class:`byzsgd.roles.paper_sync.PaperSyncPS`: the workers pull its model;
  :class:`~byzsgd.roles.paper_sync.PaperSyncWorker` pulls one PS's model and checks it with
  the filters.

A Byzantine worker (``--attack NAME``) computes its honest gradient, then sends what the
attack forges instead (see :mod:`byzsgd.roles.byzantine`).  This module sits below
:mod:`byzsgd.roles.entry` (which builds a node from a configuration) and the ``python -m``
modules :mod:`byzsgd.roles.ps` / :mod:`byzsgd.roles.worker`, so that none imports back up.
"""
from __future__ import annotations

from byzsgd.config import RunConfig
from byzsgd.roles.garfield import GarfieldPS, GarfieldWorker
from byzsgd.roles.paper import PaperPS, PaperWorker
from byzsgd.roles.paper_sync import PaperSyncPS, PaperSyncWorker
from byzsgd.roles.ps_base import PSBase
from byzsgd.roles.worker_base import WorkerBase


def ParameterServer(cfg: RunConfig) -> PSBase:  # noqa: N802  (the constructor's name, kept)
    """The parameter server of ``cfg``'s mode; ``await ps.run()`` is the exit code."""
    if cfg.mode == "paper":
        return PaperSyncPS(cfg) if cfg.sync else PaperPS(cfg)
    return GarfieldPS(cfg)


def Worker(cfg: RunConfig) -> WorkerBase:  # noqa: N802  (the constructor's name, kept)
    """The worker of ``cfg``'s mode; ``await worker.run()`` is the exit code."""
    if cfg.mode == "paper":
        return PaperSyncWorker(cfg) if cfg.sync else PaperWorker(cfg)
    return GarfieldWorker(cfg)
