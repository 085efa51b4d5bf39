"""The one way a node starts: ``run_role(cfg)`` — from a command line, a fork or the trainer.

``python -m byzsgd.roles.ps``, ``python -m byzsgd.roles.worker`` and ``python -m
byzsgd.trainer`` parse their flags into a :class:`~byzsgd.config.RunConfig` (:func:`main`);
the launcher's forked children hold theirs already and call :func:`run_role` directly.
Either way the configuration is validated in full before the node is built, and a
configuration error is one line on stderr and exit code 2.
"""
from __future__ import annotations

import asyncio
import sys

from byzsgd.config import RunConfig, config_from_args, node_parser
from byzsgd.errors import ByzSGDError

ROLES = ("ps", "worker")
DESCRIPTIONS = {
    "ps": "A ByzSGD parameter server (one process). Ranks 0..num_ps-1 are parameter servers; "
          "workers follow. See README.md for a whole local deployment.",
    "worker": "A ByzSGD worker (one process). Its --rank is num_ps + worker index. With "
              "--attack NAME it is a Byzantine worker.",
}


def run_role(cfg: RunConfig, role: str | None = None, *, prog: str | None = None) -> int:
    """Validate ``cfg``, build the node of ``role`` (default: what its rank is) and run it
    to the end; returns the process exit code."""
    import torch

    from byzsgd.net import install_event_loop
    from byzsgd.roles.process import setup_logging

    role = role or cfg.role
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    prog = prog or f"byzsgd.roles.{role}"
    try:
        cfg = cfg.validate()  # a ValidatedConfig: the role does not check it again
        setup_logging(cfg)
        torch.set_num_threads(cfg.threads)
        from byzsgd.roles.nodes import ParameterServer, Worker  # torch: after the flag errors

        node = ParameterServer(cfg) if role == "ps" else Worker(cfg)
    except ByzSGDError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    install_event_loop()
    return asyncio.run(node.run())


def main(role: str, argv: list[str] | None = None) -> int:
    """``python -m byzsgd.roles.<role>``: parse the node flags, then :func:`run_role`."""
    prog = f"python -m byzsgd.roles.{role}"
    args = node_parser(prog, DESCRIPTIONS[role], defaults={"rank": 0}).parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ByzSGDError as exc:
        print(f"byzsgd.roles.{role}: error: {exc}", file=sys.stderr)
        return 2
    return run_role(cfg, role, prog=f"byzsgd.roles.{role}")
