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
rendezvous_lie, linger) keep the values honest and abuse the wire instead: see
:mod:`byzsgd.roles.protocol_attacks`.

Every attack's name, roles, arguments (defaults, checks) and needs are entries of the attack
catalog (:mod:`byzsgd.attacks.catalog`); the classes here are only the behaviours, and find
what they run in the catalog by name.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
from typing import Any

import torch

from byzsgd import attacks
from byzsgd.attacks import catalog
from byzsgd.attacks.momentum_aware import MomentumAwareWorker
from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError
from byzsgd.roles.messages import KIND_MODEL, KIND_PS_MODEL

log = logging.getLogger("byzsgd.byzantine")

#: views of the catalog that scripts and tests list (read from it, not kept here)
WORKER_ATTACKS_EXTRA = tuple(catalog.names("worker", kinds=("worker",)))
#: attack_args a Byzantine worker takes besides its attack's own parameters
WORKER_ROLE_ARGS = tuple(a.name for a in catalog.common_args("value"))
PS_ATTACKS = tuple(e.name for e in catalog.entries() if e.kind == "ps")


def worker_attack_names() -> list[str]:
    return catalog.names("worker", kinds=("value", "worker"))


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
        self.name = cfg.attack
        self.spec = spec = catalog.get(cfg.attack, "worker")
        if spec.kind == "protocol":
            raise ConfigError(f"{cfg.attack!r} is a protocol attack, not a value attack")
        self.replica = replica
        params = catalog.parse(cfg)  # the attack's and the role's arguments, with defaults, checked
        self.estimate_batches = params.pop("estimate_batches")
        self.estimate = params.pop("estimate")
        self.search_every = params.pop("search_every")
        # The omniscient (colluding) adversary: it knows every worker's honest gradient of
        # the step.  It computes them itself from the other workers' shards (the shards are
        # a seeded, public function of the deployment), which is exactly what a side
        # channel carrying the honest gradients would tell it.
        self.collude = params.pop("collude")
        # the adversarial schedule's worker (test harness): the PSes leak the step's honest
        # gradients to it (byzsgd.roles.scheduled_attacker), no need to compute them
        self.scheduled = cfg.rank in cfg.scheduled_ranks
        # (the catalog checked it: --worker_momentum > 0, collude or scheduled, a forging attack)
        self.momentum_aware = params.pop("momentum_aware")
        self.meta = params.pop("meta")
        # what the worker loop asks (from the entry's declarations, not its name)
        self.silent = spec.sends == "nothing"
        self.label_flip = "labels" in spec.needs
        self.honest = spec.sends == "honest" and not self.label_flip
        # the rule, pipeline, quorum and seed an attack needs are its arguments' defaults
        self.params = params
        self.f = max(1, cfg.fw)
        # the attack aims at the PS's per-worker momentum rows (byzsgd.attacks.momentum_aware)
        self._momentum = None
        if self.momentum_aware:
            self._momentum = MomentumAwareWorker(cfg.worker_momentum, self.name, self.f)
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
        if "estimate" not in self.spec.needs or need == 0:
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
        if self.spec.sends == "nothing":
            return None
        if self.spec.sends == "honest":
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
        if self.spec.search is not None:  # (factor search, attack, its argument): optimal_*
            search, attack, argument = self.spec.search
            if self._factor_step is None or step - self._factor_step >= self.search_every or step < self._factor_step:
                self._factor = search(known, self.f, **params)
                self._factor_step = step
            return attacks.forge(attack, known, self.f, **{argument: self._factor})
        return attacks.forge(self.name, known, self.f, **params)


def worker_behaviour(cfg: RunConfig, replica: Any) -> WorkerAttack | None:
    """The value attack of a Byzantine worker; None for a protocol attack (honest values,
    :mod:`byzsgd.roles.protocol_attacks` plays with the wire instead)."""
    spec = catalog.get(cfg.attack, "worker")
    if spec.kind == "protocol":
        return None
    if "labels" in spec.needs:
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
        self.spec = spec = catalog.get(cfg.attack, "ps")
        if spec.kind != "ps":
            raise ConfigError(f"{cfg.attack!r} is a protocol attack, not a PS value attack")
        self.name = cfg.attack
        self.args = args = catalog.parse(cfg)
        self.delay_s = args["delay"]
        self.crash_step = args["step"]
        self.eager = args["eager"] and cfg.mode == "garfield" and spec.sends == "forged"
        self.peers = [r for r in cfg.ps_ranks if r != cfg.rank]
        self._memory: dict = {}  # what the attack keeps between models (stale's history)

    def before_step(self, step: int) -> bool:
        """True: stop training here (crash exits the process)."""
        if self.spec.timing == "exit" and step >= self.crash_step:
            log.warning("Byzantine PS crashing at step %d", step)
            logging.shutdown()
            os._exit(3)
        return False

    def model_for(self, rank: int, kind: str, step: int, state: torch.Tensor) -> torch.Tensor | None:
        """The model sent to ``rank`` (None: nothing): the catalog's forgery (byzsgd.attacks.ps)."""
        return self.spec.fn(state, rank, step, self.args, self._memory)

    def send(self, node: Any, ranks, kind: str, step: int, state: torch.Tensor) -> None:
        outgoing = [(r, kind, self.model_for(r, kind, step, state)) for r in ranks]
        if self.eager and kind == KIND_MODEL:  # the peers get step t's forged model now
            outgoing += [(r, KIND_PS_MODEL, self.model_for(r, KIND_PS_MODEL, step, state)) for r in self.peers]
        outgoing = [(r, k, m) for r, k, m in outgoing if m is not None]
        if self.spec.timing == "late":
            loop = asyncio.get_running_loop()
            for r, k, m in outgoing:
                loop.call_later(self.delay_s, node.send, r, k, step, [m])
            return
        for r, k, m in outgoing:
            node.send(r, k, step, [m])


def ps_behaviour(cfg: RunConfig) -> PSAttack | None:
    """The value attack of a Byzantine PS; None for a protocol attack (see worker_behaviour)."""
    if catalog.get(cfg.attack, "ps").kind == "protocol":
        return None
    return PSAttack(cfg)


def check_attack(cfg: RunConfig) -> None:
    """Refuse, before step 0, an unknown attack or an argument the node would refuse (the
    catalog's check, :func:`byzsgd.attacks.catalog.check`, which the behaviours parse with)."""
    catalog.check(cfg)
