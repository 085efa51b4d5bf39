"""Garfield's ByzSGD ``trainer.py`` interface: ``python -m byzsgd.trainer``.

Same flags as the seed (``--master --rank --dataset --batch --num_ps --num_workers --fw --fps
--model --loss --optimizer --opt_args --num_iter --gar --acc_freq --bench --log``); a rank
below ``--num_ps`` is a parameter server, the others are workers.  Nodes find each other
through a rendezvous at ``--master`` (rank 0; ``host`` or ``host:port``, port 29500 by
default), or through a ``--peers`` file.  Under SLURM or torchrun-style environments the
rank and master come from the environment when the flags are absent.
"""
from __future__ import annotations

import argparse
import os
import sys

from byzsgd.config import config_from_args, node_parser
from byzsgd.errors import ByzSGDError


def build_parser() -> argparse.ArgumentParser:
    # rank and master None: not given, the environment may say
    return node_parser("python -m byzsgd.trainer",
                       "Run one ByzSGD node with Garfield's trainer.py flags: rank < num_ps is a "
                       "parameter server, the others are workers.",
                       defaults={"rank": None, "master": None})


def environment_rank_and_master(args: argparse.Namespace, environ=os.environ) -> None:
    """Fill --rank / --master from torchrun (RANK, MASTER_ADDR, MASTER_PORT) or SLURM."""
    if args.rank is None:
        for var in ("RANK", "SLURM_PROCID"):
            if environ.get(var, "").isdigit():
                args.rank = int(environ[var])
                break
    if args.master is None:
        port = environ.get("MASTER_PORT")
        addr = environ.get("MASTER_ADDR") or environ.get("BYZSGD_MASTER")
        args.master = (addr + (f":{port}" if port else "")) if addr else "127.0.0.1"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    environment_rank_and_master(args)
    if args.rank is None:
        parser.error("--rank is required (or RANK / SLURM_PROCID in the environment)")
    expected = args.num_ps + args.num_workers
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) != expected:
            parser.error(f"{var}={value} but --num_ps {args.num_ps} + --num_workers "
                         f"{args.num_workers} = {expected} nodes: they must agree")
    from byzsgd.deploy.preflight import check_node
    from byzsgd.roles.entry import run_role

    try:
        cfg = config_from_args(args).validate()  # checked once: run_role takes it as is
        check_node(cfg)  # before any socket: data, model, optimizer, credentials, port
    except ByzSGDError as exc:
        print(f"byzsgd.trainer: error: {exc}", file=sys.stderr)
        return 2
    return run_role(cfg)


if __name__ == "__main__":
    code = main()  # first: --help and flag errors must not import torch (byzsgd.roles does)
    from byzsgd.roles.process import exit_now

    exit_now(code)
