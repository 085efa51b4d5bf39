"""What an experiment is: its cells and its settings, the data :mod:`byzsgd.experiments.grid`
builds from a config file and :mod:`byzsgd.experiments.runner` runs.

Kept apart so that the runner needs nothing of the loader (and the loader's CLI may call the
runner): imports run grid -> runner -> spec, never back.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byzsgd.config import RunConfig
from byzsgd.deploy.options import LaunchConfig
from byzsgd.flags import LAUNCHER, PER_RANK, scoped, to_argv

ROOT = Path(__file__).resolve().parents[2]

#: launcher flags the harness sets itself (per cell) or that make no sense in a grid: the
#: launcher's per-run ones, and every per-rank node flag (declared so in byzsgd.config)
HARNESS_FLAGS = {"help", "run_dir", "json", "quiet", "timeout", "host"} | set(scoped(RunConfig, PER_RANK))
#: launcher flags that are not trainer flags (declared ``scope=LAUNCHER``: a multi-host cell
#: cannot use them)
LAUNCHER_ONLY = scoped(LaunchConfig, LAUNCHER)


def canonical_key(values: dict[str, Any]) -> str:
    """A cell's identity in the results file: its values as sorted, compact JSON."""
    return json.dumps(values, sort_keys=True, separators=(",", ":"))


def short(value: Any) -> str:
    """A value as label text (a dict as compact JSON)."""
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


@dataclass
class Cell:
    index: int
    values: dict[str, Any]           # canonical: the fields of this cell (axes + scalars)
    axes: dict[str, Any]             # the values of the list-valued fields only
    config: LaunchConfig | None      # the cell's deployment (None only while describing)
    key: str
    label: str

    @property
    def flags(self) -> list[str]:
        """Launcher flags of the whole configuration (a cell is exec'd as byzsgd.launch)."""
        return self.config.to_argv(skip=HARNESS_FLAGS)

    @property
    def trainer_flags(self) -> list[str]:
        """Multi-host: the byzsgd.trainer flags of the fields the cell sets."""
        return to_argv(self.config.run, only=set(self.values) - set(LAUNCHER_ONLY))

    def describe(self) -> str:
        return " ".join(f"{k}={short(v)}" for k, v in self.axes.items()) or "(single cell)"


@dataclass
class Experiment:
    name: str
    results: Path
    runs_dir: Path
    timeout: float
    cells: list[Cell]
    axes: list[str]
    remote: dict[str, str] = field(default_factory=dict)  # servers + workers [+ run_exp]
    source: str = ""
