"""Byzantine behaviours of the roles: what a lying worker or parameter server sends.

Worker attacks are those of :mod:`byzsgd.attacks` (pure tensor functions) plus
``label_flip`` (a data attack: the honest computation on flipped labels) and ``silent``
(never answers: a crashed or partitioned worker).  A Byzantine
worker acting alone estimates what it needs (mean, standard deviation) from gradients of
several of its own batches (``estimate_batches``, default 4); with ``"collude": true`` it is
the omniscient adversary of the literature and uses the honest gradients of the step of
every worker.

Parameter-server attacks act on the models a Byzantine PS sends, to workers (gradient
requests) and to other PSes (the gather): random, reverse, drop, nan, equivocate (a
different model to each recipient), stale (replay an old model), silent (never answers),
delay (answers late), crash (exits at a set step).
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
from typing import Any

import torch

from byzsgd import attacks
from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError

log = logging.getLogger("byzsgd.byzantine")

WORKER_ATTACKS_EXTRA = ("label_flip", "silent")
PS_ATTACKS = ("random", "reverse", "drop", "nan", "equivocate", "stale", "silent", "delay", "crash")

#: attacks that need an estimate of the honest distribution, not only one gradient
_NEEDS_ESTIMATE = ("alie", "ipm", "empire", "optimal_alie", "optimal_ipm", "mimic")


def worker_attack_names() -> list[str]:
    return sorted(set(attacks.names()) | set(WORKER_ATTACKS_EXTRA))


class WorkerAttack:
    """Turns the honest gradient of a step into what a Byzantine worker sends."""

    def __init__(self, cfg: RunConfig, replica: Any):
        name = cfg.attack
        self.name = name
        self.replica = replica
        params = dict(cfg.attack_args)
        self.estimate_batches = int(params.pop("estimate_batches", 4))
        # The omniscient (colluding) adversary: it knows every worker's honest gradient of
        # the step.  It computes them itself from the other workers' shards (the shards are
        # a seeded, public function of the deployment), which is exactly what a side
        # channel carrying the honest gradients would tell it.
        self.collude = bool(params.pop("collude", False))
        if self.estimate_batches < 1:
            raise ConfigError("attack argument estimate_batches must be >= 1")
        self.label_flip = name == "label_flip"
        self.silent = name == "silent"
        if not (self.label_flip or self.silent):
            spec = attacks.get(name)  # raises UnknownNameError listing the known attacks
            if spec.needs_rule:
                params.setdefault("gar", cfg.gar)
                params.setdefault("gar_f", cfg.fw)
            if "n" in spec.params:
                params.setdefault("n", cfg.num_workers)
            if "seed" in spec.params:
                params.setdefault("seed", cfg.seed * 1000 + cfg.rank)
        self.params = params
        self.f = max(1, cfg.fw)

    def forge(self, honest: torch.Tensor, step: int) -> torch.Tensor | None:
        if self.silent:
            return None
        if self.label_flip:
            return honest  # the replica already computed it on flipped labels
        rows = [honest]
        if self.collude:
            rows += self.replica.other_workers_gradients(step)
        elif self.name in _NEEDS_ESTIMATE and self.estimate_batches > 1:
            rows += self.replica.extra_gradients(step, self.estimate_batches - 1)
        known = torch.stack(rows)
        params = dict(self.params)
        if "seed" in params:
            params["seed"] = int(params["seed"]) + step
        return attacks.forge(self.name, known, self.f, **params)[0].contiguous()


def worker_behaviour(cfg: RunConfig, replica: Any) -> WorkerAttack:
    if cfg.attack == "label_flip":
        replica.flip_labels = True
    return WorkerAttack(cfg, replica)


class PSAttack:
    """Forges the models a Byzantine PS sends; may delay, stay silent or crash."""

    def __init__(self, cfg: RunConfig):
        if cfg.attack not in PS_ATTACKS:
            raise ConfigError(f"unknown PS attack {cfg.attack!r}; known: {', '.join(PS_ATTACKS)}")
        self.name = cfg.attack
        args = dict(cfg.attack_args)
        self.scale = float(args.pop("scale", 10.0))
        self.fraction = float(args.pop("fraction", 0.5))
        self.lag = int(args.pop("lag", 20))
        self.delay_s = float(args.pop("delay", 1.0))
        self.crash_step = int(args.pop("step", max(1, cfg.num_iter // 4)))
        self.seed = int(args.pop("seed", cfg.seed * 1000 + cfg.rank))
        if args:
            raise ConfigError(f"PS attack {self.name!r}: unknown arguments {sorted(args)}; known: "
                              "scale, fraction, lag, delay, step, seed")
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"PS attack {self.name!r}: fraction must be in [0, 1]")
        self.history: collections.deque[torch.Tensor] = collections.deque(maxlen=max(1, self.lag + 1))
        self._history_step = -1

    def before_step(self, step: int) -> bool:
        """True: stop training here (crash exits the process)."""
        if self.name == "crash" and step >= self.crash_step:
            log.warning("Byzantine PS crashing at step %d", step)
            logging.shutdown()
            os._exit(3)
        return False

    def _gen(self, step: int, rank: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + step * 1009 + rank) % (2**63))

    def model_for(self, rank: int, kind: str, step: int, state: torch.Tensor) -> torch.Tensor | None:
        name = self.name
        if name == "silent":
            return None
        if name == "reverse":
            return -self.scale * state
        if name == "random":
            return torch.randn(state.shape, generator=self._gen(step, rank), dtype=state.dtype) * self.scale
        if name == "nan":
            return torch.full_like(state, float("nan"))
        if name == "drop":
            mask = torch.rand(state.shape, generator=self._gen(step, 0)) < self.fraction
            return state.masked_fill(mask, 0.0)
        if name == "equivocate":
            # every recipient gets its own model: honest plus recipient-seeded noise, and
            # recipients of odd rank the reversed model
            noise = torch.randn(state.shape, generator=self._gen(step, rank), dtype=state.dtype)
            forged = state + self.scale * noise * (state.abs().mean() + 1e-3)
            return -forged if rank % 2 else forged
        if name == "stale":
            if step != self._history_step:
                self.history.append(state.clone())
                self._history_step = step
            return self.history[0]
        return state  # delay (sent late by send()) and anything honest-looking

    def send(self, node: Any, ranks, kind: str, step: int, state: torch.Tensor) -> None:
        outgoing = [(r, self.model_for(r, kind, step, state)) for r in ranks]
        outgoing = [(r, m) for r, m in outgoing if m is not None]
        if self.name == "delay":
            loop = asyncio.get_running_loop()
            for r, m in outgoing:
                loop.call_later(self.delay_s, node.send, r, kind, step, [m])
            return
        for r, m in outgoing:
            node.send(r, kind, step, [m])


def ps_behaviour(cfg: RunConfig) -> PSAttack:
    return PSAttack(cfg)
