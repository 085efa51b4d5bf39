"""``python -m byzsgd.deploy.shipped FILE``: a node started from the configuration a launcher
shipped to its host (:meth:`RunConfig.to_json`).

Multi-host deployments ship the configuration itself rather than an argv rebuilt from it: the
node runs with exactly the object the launcher planned (no quoting, no default of the host's
own version in between).  The multi-host plan ships one file per rank, per-rank fields filled
in (:mod:`byzsgd.deploy.host_scripts`); SLURM ships one shared file
(``--write FILE -- TRAINER FLAGS``, checked once on the batch host) and each task fills its own
per-rank fields (``FILE --rank R --metrics ...``: only flags declared ``scope=PER_RANK`` are
accepted).  The node validates the result in full, once, before it starts (the device and
resilience checks hold on *its* host), runs the trainer's pre-start checks
(:func:`byzsgd.deploy.preflight.check_node`) and hands the :class:`~byzsgd.config.ValidatedConfig`
to its role, which does not check it again.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from byzsgd.config import RunConfig
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.flags import PER_RANK, add_flags, scoped

PROG = "python -m byzsgd.deploy.shipped"


def load(path: str) -> RunConfig:
    """The configuration in ``path`` (ConfigError when unreadable or not one)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration {path}: {exc}") from None
    return RunConfig.from_json(text, source=path)


def write_shared(path: str, flags: list[str], **per_rank) -> RunConfig:
    """The configuration every rank of ``flags`` (trainer flags) shares, checked once here
    (:func:`byzsgd.deploy.plan.check_flags`: per-rank flags refused), with ``per_rank``
    values common to all (the master), written to ``path``."""
    from byzsgd.deploy.plan import check_flags

    cfg = dataclasses.replace(check_flags(flags), **per_rank)
    Path(path).write_text(cfg.to_json() + "\n")
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run one ByzSGD node with the configuration a launcher wrote "
        "(JSON), its per-rank fields given here or already in the file; or, with --write, write "
        "that file from trainer flags.")
    parser.add_argument("config", help="the configuration file (JSON)")
    parser.add_argument("--write", action="store_true", help="write the configuration of the "
                        "trainer flags after -- (and of the per-rank flags given) to the file, "
                        "checked; run nothing")
    add_flags(parser, [RunConfig], scope=PER_RANK, defaults=dict.fromkeys(scoped(RunConfig, PER_RANK)))
    return parser


def main(argv: list[str] | None = None) -> int:
    """``FILE [PER-RANK FLAGS]``: run the node; ``--write FILE [PER-RANK FLAGS] -- TRAINER FLAGS``:
    write the file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    argv, flags = argv[:cut], argv[cut + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.write and flags:
        parser.error("trainer flags (after --) go with --write only: a node reads them from the file")
    given = {n: getattr(args, n) for n in scoped(RunConfig, PER_RANK) if getattr(args, n) is not None}
    try:
        if args.write:
            write_shared(args.config, flags, **given)
            return 0
        cfg = dataclasses.replace(load(args.config), **given).validate()  # once, on this host
        from byzsgd.deploy.preflight import check_node

        check_node(cfg)  # the trainer's checks before any socket: data, model, credentials, port
    except ByzSGDError as exc:
        print(f"byzsgd.deploy.shipped: error: {exc}", file=sys.stderr)
        return 2
    from byzsgd.roles.entry import run_role  # torch: after the configuration errors

    return run_role(cfg, prog="byzsgd.deploy.shipped")


if __name__ == "__main__":
    code = main()
    from byzsgd.roles.process import exit_now

    exit_now(code)
