"""Every attack a Byzantine node may run, in one catalog (:mod:`byzsgd.attacks.catalog`).

Public API::

    forge(name, honest, f, **params) -> Tensor[f, d]   # honest: Tensor[k, d]
    catalog.get(name, role) / catalog.check(cfg) / catalog.parse(cfg)

Value attacks are pure functions of what a Byzantine worker can see: ``honest`` is its own
gradient(s) when acting alone, or the step's honest gradients when colluding (the omniscient
adversary).  Modules: simple, statistical (ALIE, IPM), optimal (factor searched against the
defence), adaptive (Min-Max, Min-Sum), fang (Fang et al.'s trimmed-mean/median attack),
defence (the simulated PS aggregation the searches maximise against), momentum_aware (the
gradient that puts a forged row into the PS's per-worker momentum), stealth (a forgery inside
the gradient check's tolerance); worker (the arguments
every worker attack takes; label_flip, silent, honest), ps (the models a Byzantine PS
sends), protocol (the wire attacks' declarations).  Registering an attack: one module, and
its import below.
"""
from __future__ import annotations

import torch

from byzsgd.attacks import catalog, registry
from byzsgd.attacks.catalog import Attack
from byzsgd.attacks.registry import forge, get, names
from byzsgd.errors import ConfigError

from byzsgd.attacks import simple, statistical, optimal  # noqa: F401,E402
from byzsgd.attacks import defence, adaptive, fang, momentum_aware, stealth  # noqa: F401,E402
from byzsgd.attacks import worker, ps, protocol  # noqa: F401,E402

__all__ = ["forge", "get", "names", "Attack", "catalog"]
