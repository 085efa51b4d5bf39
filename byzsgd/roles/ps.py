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

import argparse
import asyncio
import sys

import torch

from byzsgd.config import RunConfig, add_arguments, config_from_args
from byzsgd.errors import ByzSGDError
from byzsgd.net import install_event_loop
from byzsgd.roles.common import exit_now, setup_logging
from byzsgd.roles.garfield import GarfieldPS
from byzsgd.roles.paper import PaperPS
from byzsgd.roles.paper_sync import PULLS_PER_STEP, PaperSyncPS  # noqa: F401  (public name)
from byzsgd.roles.ps_base import PSBase


def ParameterServer(cfg: RunConfig) -> PSBase:  # noqa: N802  (the constructor's name, kept)
    """The parameter server of ``cfg``'s mode; ``await ps.run()`` is the exit code."""
    if cfg.mode == "paper":
        return PaperSyncPS(cfg) if cfg.sync else PaperPS(cfg)
    return GarfieldPS(cfg)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m byzsgd.roles.ps",
        description="A ByzSGD parameter server (one process). Ranks 0..num_ps-1 are parameter "
                    "servers; workers follow. See README.md for a whole local deployment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, role="ps")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        setup_logging(cfg)
        torch.set_num_threads(cfg.threads)
        ps = ParameterServer(cfg)
    except ByzSGDError as exc:
        print(f"byzsgd.roles.ps: error: {exc}", file=sys.stderr)
        return 2
    install_event_loop()
    return asyncio.run(ps.run())


if __name__ == "__main__":
    exit_now(main())
