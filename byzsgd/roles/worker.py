"""A worker: ``python -m byzsgd.roles.worker`` (the documented entry point).

Parses the node flags and runs :func:`byzsgd.roles.entry.run_role`; which class the worker of
each mode is, is :func:`byzsgd.roles.nodes.Worker`.
"""
from __future__ import annotations

from byzsgd.roles.entry import main as entry_main
from byzsgd.roles.process import exit_now


def main(argv: list[str] | None = None) -> int:
    """``python -m byzsgd.roles.worker``."""
    return entry_main("worker", argv)


if __name__ == "__main__":
    exit_now(main())
