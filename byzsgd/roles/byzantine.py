"""Byzantine behaviours of the roles: what a lying worker or parameter server sends.

Worker attacks are those of :mod:`byzsgd.attacks` (pure tensor functions) plus
``label_flip`` (a data attack: the honest computation on flipped labels), ``silent``
(never answers: a crashed or partitioned worker) and ``honest`` (the honest gradient: with
``meta``, a worker that lies only in its metadata).  Any worker attack takes
``"meta": {field: value}``: fields its gradients' metadata carry instead of the honest ones
(``{"loss": 1e308}``, NaN, a string: what the PS must contain, docs/design.md §3).  A
Byzantine worker acting alone estimates what it needs (mean, standard deviation) from
``estimate_batches`` (default 4) gradients of its own: by default (``estimate: "history"``)
the current one and those of its previous steps, which cost nothing more; ``estimate:
"fresh"`` computes extra batches on the current model instead.  With ``"collude": true`` it
is the omniscient adversary of the literature and uses the honest gradients of the step of
every worker.  Whatever an attack computes beyond the honest gradient is paid once per step
(see :class:`WorkerAttack`): a Byzantine worker slower than the honest ones would miss the
PSes' quorums (the first n_w - fw gradients) and harm nobody.  Besides the attack's own parameters, ``attack_args``
takes ``estimate``, ``estimate_batches``, ``collude``, ``search_every`` (optimal_*), ``meta`` and
``momentum_aware`` (with ``collude`` and ``--worker_momentum``: the attack runs on the honest
momentum rows and the gradient sent puts the forged row into the PS's momentum, see
:class:`byzsgd.attacks.momentum_aware.MomentumAwareWorker`).  A worker listed in the test
harness's ``--scheduled_byzantine`` forges instead from the honest gradients the PSes leak to it
(:mod:`byzsgd.roles.scheduled_attacker`).  Rule-aware attacks get the
deployed ``--gar``, fw, ``--gar_args`` and, when they take one, the ``--pre_agg`` pipeline.
A forging Byzantine PS sends its forged model to its peers as soon as a step starts
(``eager``, see :class:`PSAttack`), not after its own gradient quorum.

Parameter-server attacks act on the models a Byzantine PS sends, to workers (gradient
requests) and to other PSes (the gather): random, reverse, drop, nan, equivocate (a
different model to each recipient), stale (replay an old model), silent (never answers),
delay (answers late), crash (exits at a set step).

Protocol attacks (impersonate, request_flood, huge_step, far_future, withhold_from,
rendezvous_lie) keep the values honest and abuse the wire instead: see
:mod:`byzsgd.roles.protocol_attacks`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
from typing import Any

import torch

from byzsgd import attacks
from byzsgd.attacks.momentum_aware import MomentumAwareWorker
from byzsgd.attacks.optimal import optimal_alie_factor, optimal_ipm_factor
from byzsgd.attacks.statistical import alie_strength
from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError
from byzsgd.roles import protocol_attacks
from byzsgd.roles.common import KIND_MODEL, KIND_PS_MODEL

log = logging.getLogger("byzsgd.byzantine")

WORKER_ATTACKS_EXTRA = ("label_flip", "silent", "honest")
#: attack_args a Byzantine worker takes besides its attack's own parameters
WORKER_ROLE_ARGS = ("estimate", "estimate_batches", "collude", "search_every", "meta", "momentum_aware")
PS_ATTACKS = ("random", "reverse", "drop", "nan", "equivocate", "stale", "silent", "delay", "crash")
#: PS attacks that forge models (the others withhold, delay or stop them)
_FORGING_PS = ("random", "reverse", "drop", "nan", "equivocate", "stale")

#: attacks that need an estimate of the honest distribution, not only one gradient
_NEEDS_ESTIMATE = ("alie", "ipm", "empire", "optimal_alie", "optimal_ipm", "mimic", "minmax", "minsum",
                   "fang")


def worker_attack_names() -> list[str]:
    return sorted(set(attacks.names()) | set(WORKER_ATTACKS_EXTRA))


class WorkerAttack:
    """Turns the honest gradient of a step into what a Byzantine worker sends.

    In garfield mode a worker answers every PS separately (one gradient per PS and step, on
    that PS's model), and each PS keeps only the first q_w = n_w - fw gradients that arrive:
    a Byzantine worker slower than the honest ones is simply left out of the quorums, i.e.
    harmless.  So whatever an attack needs beyond the honest gradient is paid for at most
    once per step and reused for the step's other requests:

    * ``estimate: "history"`` (default; lone attacker): the rows are its honest gradient and
      its own gradients of the ``estimate_batches - 1`` previous steps (other batches, which
      it computed anyway: no extra cost; until it has them, fresh extra batches fill in);
    * ``estimate: "fresh"``: gradients of ``estimate_batches - 1`` other batches on the
      current model, computed at the step's first request;
    * ``collude: true``: every other worker's honest gradient of the step, computed at the
      step's first request.
    Cached rows are kept as offsets from the honest gradient of that first request and added
    to each later request's honest gradient (first order: the PSes' models of a step are close).
    ``optimal_alie`` / ``optimal_ipm`` run their line search (~70 evaluations of the rule, tens
    of ms: several gradients' worth) every ``search_every`` steps (default 10) and in between
    reuse the factor found with the step's own statistics.
    """

    def __init__(self, cfg: RunConfig, replica: Any):
        name = cfg.attack
        self.name = name
        self.replica = replica
        params = dict(cfg.attack_args)
        self.estimate_batches = int(params.pop("estimate_batches", 4))
        self.estimate = str(params.pop("estimate", "history"))
        self.search_every = int(params.pop("search_every", 10))
        # The omniscient (colluding) adversary: it knows every worker's honest gradient of
        # the step.  It computes them itself from the other workers' shards (the shards are
        # a seeded, public function of the deployment), which is exactly what a side
        # channel carrying the honest gradients would tell it.
        self.collude = bool(params.pop("collude", False))
        # the adversarial schedule's worker (test harness): the PSes leak the step's honest
        # gradients to it (byzsgd.roles.scheduled_attacker), no need to compute them
        self.scheduled = cfg.rank in cfg.scheduled_ranks
        self.momentum_aware = momentum_aware = bool(params.pop("momentum_aware", False))
        self.meta = _forged_meta(params.pop("meta", {}))
        if self.estimate_batches < 1:
            raise ConfigError("attack argument estimate_batches must be >= 1")
        if self.estimate not in ("history", "fresh"):
            raise ConfigError(f"attack argument estimate must be 'history' or 'fresh', got {self.estimate!r}")
        if self.search_every < 1:
            raise ConfigError("attack argument search_every must be >= 1")
        self.label_flip = name == "label_flip"
        self.silent = name == "silent"
        self.honest = name == "honest"
        if not (self.label_flip or self.silent or self.honest):
            spec = attacks.get(name)  # raises UnknownNameError listing the known attacks
            if spec.needs_rule:
                params.setdefault("gar", cfg.gar)
                params.setdefault("gar_f", cfg.fw)
                if cfg.gar_args:
                    params.setdefault("gar_params", dict(cfg.gar_args))
            if "pipeline" in spec.params:  # search against the deployed pipeline, not the rule alone
                params.setdefault("pipeline", cfg.pre_agg)
            if "n" in spec.params:
                # the rows the rule sees: the quorum's, or every worker's (--wm_rows recent)
                params.setdefault("n", cfg.num_workers if cfg.worker_momentum and cfg.wm_rows == "recent"
                                  else cfg.q_w)
            if "seed" in spec.params:  # scheduled (coordinated) workers forge the same rows
                params.setdefault("seed", cfg.seed * 1000 + (0 if self.scheduled else cfg.rank))
            unknown = set(params) - set(spec.params)
            if unknown:
                raise ConfigError(f"worker attack {name!r}: unknown arguments {sorted(unknown)}; known: "
                                  f"{', '.join(spec.params + WORKER_ROLE_ARGS)}")
        if name == "alie" and "z" in params:
            alie_strength(params["z"])  # a bad z fails at start, not at the first forged gradient
        self.params = params
        self.f = max(1, cfg.fw)
        # the attack aims at the PS's per-worker momentum rows (byzsgd.attacks.momentum_aware)
        self._momentum = None
        if momentum_aware:
            if not (cfg.worker_momentum > 0 and (self.collude or self.scheduled)) or self.label_flip \
                    or self.silent or self.honest:
                raise ConfigError("attack argument momentum_aware needs --worker_momentum > 0, "
                                  "collude: true or the adversarial schedule (it tracks the honest "
                                  "momentums from the honest gradients) and a forging attack")
            self._momentum = MomentumAwareWorker(cfg.worker_momentum, name, self.f)
        self._history: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._offsets_step: int | None = None
        self._offsets: list[torch.Tensor] = []
        self._factor_step: int | None = None
        self._factor = 0.0

    # -- what the attacker knows ------------------------------------------------------
    def _cached(self, step: int, honest: torch.Tensor, compute) -> list[torch.Tensor]:
        """Rows computed once per step (``compute()`` on the current model), as offsets from
        that request's honest gradient; later requests of the step get ``honest + offset``."""
        if self._offsets_step != step:
            self._offsets = [row - honest for row in compute()]
            self._offsets_step = step
        return [honest + d for d in self._offsets]

    def _remember(self, step: int, honest: torch.Tensor) -> None:
        if step not in self._history:
            self._history[step] = honest.clone()
            while len(self._history) > self.estimate_batches + 2:
                self._history.popitem(last=False)

    def known_rows(self, honest: torch.Tensor, step: int) -> torch.Tensor:
        """What the attacker knows at ``step``: a [k, d] tensor whose first row is ``honest``."""
        if self.collude:
            others = self._cached(step, honest, lambda: self.replica.other_workers_gradients(step))
            return torch.stack([honest, *others])
        need = self.estimate_batches - 1
        if self.name not in _NEEDS_ESTIMATE or need == 0:
            return honest.unsqueeze(0)
        if self.estimate == "fresh":
            extra = self._cached(step, honest, lambda: self.replica.extra_gradients(step, need))
        else:
            extra = [g for s, g in sorted(self._history.items()) if s < step][-need:]
            self._remember(step, honest)
            missing = need - len(extra)
            if missing:  # the first steps: no history yet
                extra += self._cached(step, honest, lambda: self.replica.extra_gradients(step, missing))
        return torch.stack([honest, *extra])

    def forge(self, honest: torch.Tensor, step: int) -> torch.Tensor | None:
        if self.silent:
            return None
        if self.label_flip or self.honest:
            return honest  # label_flip: the replica already computed it on flipped labels
        # ``honest`` is the replica's reusable gradient buffer: extra gradients overwrite it
        honest = honest.clone()
        known = self.known_rows(honest, step)
        if self._momentum is not None:  # the attack runs on the honest momentum rows
            return self._momentum.gradient(step, known, self.step_params(step))
        return self.forge_rows(known, step)[0].contiguous()

    def step_params(self, step: int) -> dict:
        """The attack's parameters at ``step`` (a seeded attack draws anew each step)."""
        params = dict(self.params)
        if "seed" in params:
            params["seed"] = int(params["seed"]) + step
        return params

    def forge_rows(self, known: torch.Tensor, step: int) -> torch.Tensor:
        """The f rows [f, d] the attack forges at ``step`` from the known rows [k, d]
        (:meth:`known_rows`, or what the adversarial schedule leaked)."""
        params = self.step_params(step)
        if self.name in ("optimal_alie", "optimal_ipm"):
            if self._factor_step is None or step - self._factor_step >= self.search_every or step < self._factor_step:
                search = optimal_alie_factor if self.name == "optimal_alie" else optimal_ipm_factor
                self._factor = search(known, self.f, **params)
                self._factor_step = step
            if self.name == "optimal_alie":
                return attacks.forge("alie", known, self.f, z=self._factor)
            return attacks.forge("ipm", known, self.f, epsilon=self._factor)
        return attacks.forge(self.name, known, self.f, **params)


def _forged_meta(meta: Any) -> dict:
    """The ``meta`` attack argument: a map of str to what a frame's meta may carry (None,
    bool, a 64-bit int, float, str), so that the attack fails at start, not at its first
    send."""
    if not isinstance(meta, dict):
        raise ConfigError(f"attack argument meta must be a JSON object, got {meta!r}")
    if len(meta) > 32:  # a frame's meta holds at most 64 (MAX_META_ITEMS), the loss included
        raise ConfigError(f"attack argument meta: {len(meta)} fields, at most 32")
    for key, value in meta.items():
        ok = value is None or type(value) in (bool, float, str) or (
            type(value) is int and -(1 << 63) <= value < (1 << 64))
        if not isinstance(key, str) or not ok:
            raise ConfigError(f"attack argument meta: {key!r}: {value!r} is not a frame's meta "
                              "value (null, bool, 64-bit int, float or string)")
    return dict(meta)


def worker_behaviour(cfg: RunConfig, replica: Any) -> WorkerAttack | None:
    """The value attack of a Byzantine worker; None for a protocol attack (honest values,
    :mod:`byzsgd.roles.protocol_attacks` plays with the wire instead)."""
    if protocol_attacks.is_protocol_attack(cfg.attack):
        return None
    if cfg.attack == "label_flip":
        replica.flip_labels = True
    return WorkerAttack(cfg, replica)


class PSAttack:
    """Forges the models a Byzantine PS sends; may delay, stay silent or crash.

    ``eager`` (default true in garfield mode): a forging PS sends its forged model of step t
    to its peers as soon as it asks the workers for step t's gradients, instead of after its
    own gradient quorum.  It has nothing to wait for, and waiting would make it harmless: the
    correct PSes take the *first* q_ps - 1 peer models, and a PS that finishes its step last
    (as the highest rank, served last by the workers, does) is almost never among them
    (measured: in 1-5% of the gathers).  ``"eager": false`` keeps the forged model in the
    honest PS's schedule.
    """

    def __init__(self, cfg: RunConfig):
        if cfg.attack not in PS_ATTACKS:
            raise ConfigError(f"unknown PS attack {cfg.attack!r}; known: {', '.join(PS_ATTACKS)}; "
                              f"protocol attacks: {', '.join(protocol_attacks.names('ps'))}")
        self.name = cfg.attack
        args = dict(cfg.attack_args)
        self.scale = float(args.pop("scale", 10.0))
        self.fraction = float(args.pop("fraction", 0.5))
        self.lag = int(args.pop("lag", 20))
        self.delay_s = float(args.pop("delay", 1.0))
        self.crash_step = int(args.pop("step", max(1, cfg.num_iter // 4)))
        self.seed = int(args.pop("seed", cfg.seed * 1000 + cfg.rank))
        self.eager = bool(args.pop("eager", True)) and cfg.mode == "garfield" and self.name in _FORGING_PS
        if args:
            raise ConfigError(f"PS attack {self.name!r}: unknown arguments {sorted(args)}; known: "
                              "scale, fraction, lag, delay, step, seed, eager")
        self.peers = [r for r in cfg.ps_ranks if r != cfg.rank]
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
            return torch.randn(state.shape, generator=self._gen(step, rank), dtype=state.dtype).to(state.device) * self.scale
        if name == "nan":
            return torch.full_like(state, float("nan"))
        if name == "drop":
            mask = (torch.rand(state.shape, generator=self._gen(step, 0)) < self.fraction).to(state.device)
            return state.masked_fill(mask, 0.0)
        if name == "equivocate":
            # every recipient gets its own model: honest plus recipient-seeded noise, and
            # recipients of odd rank the reversed model
            noise = torch.randn(state.shape, generator=self._gen(step, rank), dtype=state.dtype).to(state.device)
            forged = state + self.scale * noise * (state.abs().mean() + 1e-3)
            return -forged if rank % 2 else forged
        if name == "stale":
            if step != self._history_step:
                self.history.append(state.clone())
                self._history_step = step
            return self.history[0]
        return state  # delay (sent late by send()) and anything honest-looking

    def send(self, node: Any, ranks, kind: str, step: int, state: torch.Tensor) -> None:
        outgoing = [(r, kind, self.model_for(r, kind, step, state)) for r in ranks]
        if self.eager and kind == KIND_MODEL:  # the peers get step t's forged model now
            outgoing += [(r, KIND_PS_MODEL, self.model_for(r, KIND_PS_MODEL, step, state)) for r in self.peers]
        outgoing = [(r, k, m) for r, k, m in outgoing if m is not None]
        if self.name == "delay":
            loop = asyncio.get_running_loop()
            for r, k, m in outgoing:
                loop.call_later(self.delay_s, node.send, r, k, step, [m])
            return
        for r, k, m in outgoing:
            node.send(r, k, step, [m])


def ps_behaviour(cfg: RunConfig) -> PSAttack | None:
    """The value attack of a Byzantine PS; None for a protocol attack (see worker_behaviour)."""
    if protocol_attacks.is_protocol_attack(cfg.attack):
        return None
    return PSAttack(cfg)


def check_attack(cfg: RunConfig) -> None:
    """Refuse, before step 0, an unknown attack or an argument the node would refuse: the
    same constructors the node runs (nothing is computed), so the launcher and the
    experiment harness accept exactly what a node accepts."""
    if not cfg.attack:
        return
    role = "PS" if cfg.is_ps else "worker"
    if protocol_attacks.is_protocol_attack(cfg.attack):
        protocol_attacks.parse_args(cfg)
        return
    try:
        if cfg.is_ps:
            PSAttack(cfg)
            return
        if cfg.attack not in worker_attack_names():
            raise ConfigError(f"unknown worker attack {cfg.attack!r}; known: "
                              f"{', '.join(worker_attack_names())}; protocol attacks: "
                              f"{', '.join(protocol_attacks.names('worker'))}")
        if cfg.attack in WORKER_ATTACKS_EXTRA:
            extra = sorted(set(cfg.attack_args) - set(WORKER_ROLE_ARGS))
            if extra:
                raise ConfigError(f"worker attack {cfg.attack!r}: unknown arguments {extra}; "
                                  f"known: {', '.join(WORKER_ROLE_ARGS)}")
        WorkerAttack(cfg, replica=None)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. {"lag": "soon"}
        raise ConfigError(f"{role} attack {cfg.attack!r}: bad argument in "
                          f"{cfg.attack_args}: {exc}") from None
