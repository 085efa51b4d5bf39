"""A parameter server: ``python -m byzsgd.roles.ps`` (the documented entry point).

Parses the node flags and runs :func:`byzsgd.roles.entry.run_role`; which class the PS of
each mode is, is :func:`byzsgd.roles.nodes.ParameterServer`.
"""
from __future__ import annotations

from byzsgd.roles.entry import main as entry_main
from byzsgd.roles.process import exit_now


def main(argv: list[str] | None = None) -> int:
    """``python -m byzsgd.roles.ps``."""
    return entry_main("ps", argv)


if __name__ == "__main__":
    exit_now(main())
