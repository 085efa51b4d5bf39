"""Where a node computes: ``--device auto|cpu|cuda|cuda:N`` parsed, checked and resolved.

* ``cpu``: host memory, as every node did before this flag.
* ``cuda``: a CUDA device is required (refused at start without one); which one is the
  rank's *local index* round-robin over the visible devices (as ``auto``).
* ``cuda:N``: that device; refused at start when N is not below the number of visible devices.
* ``auto`` (the default): CUDA when available, on device ``local_index % device_count``;
  else the CPU.

The local index of a rank is its position among the ranks of its host: the explicit one a
launcher gives (``byzsgd.launch`` and ``scripts/run_exp.sh`` set ``$BYZSGD_LOCAL_INDEX`` per
rank), else SLURM's ``$SLURM_LOCALID``, else torchrun's ``$LOCAL_RANK``, else 0.

Nothing here initialises CUDA when it is not used: the count of devices comes from
``torch.cuda.device_count()``, which asks NVML first and so does not poison a later
``fork`` (the launcher validates configurations before it forks the nodes).  Only
:func:`resolve` with a CUDA answer touches the CUDA runtime, in the node itself.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

from byzsgd.errors import ConfigError

__all__ = ["DEVICE_CHOICES_HELP", "LOCAL_INDEX_ENV", "parse_device", "local_index", "cuda_count",
           "check_device", "resolve", "describe", "mapping", "cuda_initialized"]

LOCAL_INDEX_ENV = "BYZSGD_LOCAL_INDEX"
#: the environment variables that give a rank's local index, in the order they are trusted
INDEX_VARS = (LOCAL_INDEX_ENV, "SLURM_LOCALID", "LOCAL_RANK")
DEVICE_CHOICES_HELP = "auto, cpu, cuda or cuda:N"
_CUDA_N = re.compile(r"^cuda:(\d+)$")


def parse_device(text: str) -> str:
    """The canonical spelling of a device flag (``auto``, ``cpu``, ``cuda``, ``cuda:N``);
    ConfigError for anything else.  Pure syntax: CUDA is not asked."""
    spec = str(text).strip().lower()
    if spec in ("auto", "cpu", "cuda") or _CUDA_N.match(spec):
        if spec.startswith("cuda:"):
            spec = f"cuda:{int(spec[5:])}"
        return spec
    raise ConfigError(f"--device must be {DEVICE_CHOICES_HELP}, got {text!r}")


def local_index(explicit: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """This rank's index among the ranks of its host: ``explicit`` > $BYZSGD_LOCAL_INDEX >
    $SLURM_LOCALID > $LOCAL_RANK > 0.  A variable that is not a non-negative integer is
    refused (ConfigError), never silently read as 0."""
    if explicit is not None:
        if isinstance(explicit, bool) or not isinstance(explicit, int) or explicit < 0:
            raise ConfigError(f"the local index must be an integer >= 0, got {explicit!r}")
        return explicit
    env = os.environ if env is None else env
    for var in INDEX_VARS:
        value = env.get(var)
        if value is None or not str(value).strip():
            continue
        text = str(value).strip()
        if not text.isdigit():
            raise ConfigError(f"${var}={value!r} is not a local index (an integer >= 0)")
        return int(text)
    return 0


def cuda_count() -> int:
    """Visible CUDA devices (0 without CUDA); NVML-based, so a later fork stays safe."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0
    try:
        if not torch.backends.cuda.is_built():
            return 0
        return int(torch.cuda.device_count())
    except Exception:  # a broken driver is "no CUDA", said by check_device
        return 0


def check_device(spec: str, *, count: int | None = None) -> str:
    """Refuse, at start, a device this machine does not have: ``cuda`` without CUDA,
    ``cuda:N`` with N out of range.  ``auto`` always passes (CPU without CUDA).  Returns the
    canonical spelling."""
    spec = parse_device(spec)
    if spec in ("auto", "cpu"):
        return spec
    n = cuda_count() if count is None else count
    if n == 0:
        raise ConfigError(f"--device {spec}: CUDA is not available on this machine (no visible "
                          f"CUDA device, or torch built without CUDA); use --device cpu or auto")
    m = _CUDA_N.match(spec)
    if m and int(m.group(1)) >= n:
        raise ConfigError(f"--device {spec}: only {n} CUDA device{'s' if n != 1 else ''} visible "
                          f"(cuda:0..cuda:{n - 1}; $CUDA_VISIBLE_DEVICES="
                          f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    return spec


def resolve(spec: str, index: int | None = None, *, count: int | None = None,
            env: Mapping[str, str] | None = None):
    """The ``torch.device`` of ``spec`` for a rank of local index ``index`` (default: from
    the environment, :func:`local_index`): ``auto``/``cuda`` round-robin over the visible
    devices (``auto``: the CPU without CUDA)."""
    import torch

    spec = check_device(spec, count=count)
    if spec == "cpu":
        return torch.device("cpu")
    n = cuda_count() if count is None else count
    if spec == "auto" and n == 0:
        return torch.device("cpu")
    m = _CUDA_N.match(spec)
    if m:
        return torch.device("cuda", int(m.group(1)))
    return torch.device("cuda", local_index(index, env) % n)


def cuda_initialized() -> bool:
    """Whether this process initialised CUDA (a child forked from it then cannot use CUDA)."""
    import sys

    torch = sys.modules.get("torch")
    try:
        return bool(torch is not None and torch.cuda.is_initialized())
    except Exception:  # pragma: no cover
        return False


def mapping(spec: str, indices, *, count: int | None = None) -> str:
    """The launcher's start-up line: which device each local index gets (``cpu`` /
    ``cuda:0 <- ranks 0,2,4; cuda:1 <- ranks 1,3``), without initialising CUDA."""
    n = cuda_count() if count is None else count
    groups: dict[str, list[int]] = {}
    for i in indices:
        groups.setdefault(str(resolve(spec, i, count=n)), []).append(i)
    return "; ".join(f"{d} <- rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}"
                     for d, r in groups.items())


def describe(device) -> str:
    """``cpu`` or ``cuda:N (name)`` for the start-up line."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    try:
        return f"{device} ({torch.cuda.get_device_name(device)})"
    except Exception:  # pragma: no cover - the name is decoration
        return str(device)
