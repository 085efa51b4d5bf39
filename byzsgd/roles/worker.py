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

import argparse
import asyncio
import sys

import torch

from byzsgd.config import RunConfig, add_arguments, config_from_args
from byzsgd.errors import ByzSGDError
from byzsgd.net import install_event_loop
from byzsgd.roles.common import exit_now, setup_logging
from byzsgd.roles.departure import LINGER_S  # noqa: F401  (public name)
from byzsgd.roles.garfield import GarfieldWorker
from byzsgd.roles.paper import PaperWorker
from byzsgd.roles.paper_sync import SKIP_AFTER, PaperSyncWorker  # noqa: F401  (public name)
from byzsgd.roles.worker_base import WorkerBase


def Worker(cfg: RunConfig) -> WorkerBase:  # noqa: N802  (the constructor's name, kept)
    """The worker of ``cfg``'s mode; ``await worker.run()`` is the exit code."""
    if cfg.mode == "paper":
        return PaperSyncWorker(cfg) if cfg.sync else PaperWorker(cfg)
    return GarfieldWorker(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m byzsgd.roles.worker",
        description="A ByzSGD worker (one process). Its --rank is num_ps + worker index. "
                    "With --attack NAME it is a Byzantine worker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, role="worker")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        setup_logging(cfg)
        torch.set_num_threads(cfg.threads)
        worker = Worker(cfg)
    except ByzSGDError as exc:
        print(f"byzsgd.roles.worker: error: {exc}", file=sys.stderr)
        return 2
    install_event_loop()
    return asyncio.run(worker.run())


if __name__ == "__main__":
    exit_now(main())
