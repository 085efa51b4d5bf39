"""The worst-case screen: one PS step after another under the strongest adversary, in one process.

Why a screen beside the deployments: in a deployment the arrival order decides whether a
Byzantine worker reaches the rule at all, and an attacker that computes a lot arrives late.
The asynchronous model allows worse: the adversary orders the messages, so its fw workers
are in **every** gradient quorum and know the step's honest gradients.  The screen plays
exactly that, with the deployment's own code:

* the PS is a real :class:`byzsgd.roles.replica.Replica` (model, FlatSGD / torch.optim
  optimizer, test set) and steps with the deployed PS's own :class:`byzsgd.roles.ps_step.PSStep`
  (the spot checks, then :class:`byzsgd.roles.gradient_aggregation.GradientAggregation`:
  non-finite rows, the per-worker momentum stage, which rows enter, ``--pre_agg``, ``--gar``),
  configured from a :class:`byzsgd.config.RunConfig` (the launcher's defaults unless
  overridden);
* every worker is a real worker replica (its shard, its batches, its seeded forward pass);
* each step the quorum is the fw Byzantine workers plus ``q_w - fw`` correct ones drawn at
  random (seeded): the Byzantine share of the quorums is 1 by construction;
* the Byzantine workers forge with the attack registry (:func:`byzsgd.attacks.forge`) from
  their own gradient and the quorum's honest gradients (omniscient).  Rule-aware attacks get
  the rule, f, the number of rows the rule sees and the deployed pipeline.  With
  ``momentum_aware`` the attack runs on the **momentum rows** the PS aggregates (the
  attacker tracks them exactly, as it can from the honest gradients it sees) and each
  Byzantine worker sends the gradient that makes its own row at the PS equal to the forged
  row (:class:`byzsgd.attacks.momentum_aware.MomentumAwareAttacker`).

What it leaves out: the gather between PSes (one PS alone; a Byzantine PS is the
deployments' job) and the network's timing.  Accuracy is on the full test set unless
``eval_samples`` says otherwise.
"""
from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from byzsgd import attacks
from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError
from byzsgd.roles.gradient_aggregation import GradientAggregation
from byzsgd.roles.ps_step import PSStep
from byzsgd.roles.replica import Replica

__all__ = ["Cell", "Screen", "screen_config", "DEFAULT_ATTACK_ARGS"]

#: attack arguments strong enough to bite (as the deployment scripts): alie z = 100, ipm
#: epsilon = 10; the tuned attacks search their factor themselves
DEFAULT_ATTACK_ARGS: dict[str, dict] = {"alie": {"z": 100}, "ipm": {"epsilon": 10}}
#: attacks that are not value forgeries of the registry
DATA_ATTACKS = ("label_flip", "silent")


@dataclass(frozen=True)
class Cell:
    """One screen run: an attack (or ``none``) with fw Byzantine workers, on a configuration."""

    attack: str = "none"
    fw: int = 1
    seed: int = 0
    steps: int = 300
    attack_args: dict = field(default_factory=dict)
    momentum_aware: bool = False
    overrides: dict = field(default_factory=dict)  # RunConfig fields (gar, pre_agg, ...)
    #: correct gradients in each quorum besides the fw Byzantine ones: None is the worst
    #: case, q_w - fw; up to n_w - fw models a PS that waits a grace for late correct ones
    honest_in_quorum: int | None = None

    @property
    def label(self) -> str:
        name = self.attack + ("+mom" if self.momentum_aware else "")
        if self.attack_args:
            name += "(" + ",".join(f"{k}={v}" for k, v in sorted(self.attack_args.items())) + ")"
        return name


def screen_config(overrides: dict | None = None, **fields) -> RunConfig:
    """The launcher's default configuration with ``overrides``: what the main job runs."""
    from byzsgd.deploy.options import LAUNCH_DEFAULTS

    cfg = RunConfig(**{**LAUNCH_DEFAULTS, **(overrides or {}), **fields})
    cfg.check_resilience()
    return cfg


class Screen:
    """Runs :class:`Cell` s; the datasets and worker shards are built once per seed."""

    def __init__(self, *, eval_samples: int = 0, threads: int = 1):
        self.eval_samples = eval_samples
        torch.set_num_threads(threads)

    def run(self, cell: Cell) -> dict[str, Any]:
        started = time.perf_counter()
        cfg = screen_config(cell.overrides, fw=cell.fw, seed=cell.seed, num_iter=cell.steps,
                            eval_samples=self.eval_samples)
        attack = None if cell.attack == "none" else cell.attack
        byz = cfg.worker_ranks[len(cfg.worker_ranks) - cfg.fw:] if attack else []
        honest_ranks = [r for r in cfg.worker_ranks if r not in byz]
        ps = Replica(dataclasses.replace(cfg, rank=0), with_test_set=True)
        workers = {r: Replica(dataclasses.replace(cfg, rank=r), with_train_shard=True)
                   for r in cfg.worker_ranks}
        for r in byz:
            workers[r].flip_labels = attack == "label_flip"
        ps_step = PSStep(cfg, ps, rng=random.Random(cfg.seed))  # the deployed PS's step
        agg = ps_step.gradients
        forger = _Forger(cfg, attack, cell, agg, byz) if attack and attack != "silent" else None
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + 17)
        q_honest = cfg.q_w - (len(byz) if attack != "silent" else 0)
        if cell.honest_in_quorum is not None:
            if not q_honest <= cell.honest_in_quorum <= len(honest_ranks):
                raise ConfigError(f"honest_in_quorum must be in [{q_honest}, {len(honest_ranks)}]")
            q_honest = cell.honest_in_quorum
        losses: list[float] = []
        banned_at: dict[int, int] = {}
        quorums_with_byz = eligible = 0
        for t in range(cfg.num_iter):
            state = ps.state_vector()
            order = torch.randperm(len(honest_ranks), generator=gen).tolist()
            active = [r for r in byz if r not in agg.banned]  # a banned worker's gradients are not taken
            take = q_honest + len(byz) - len(active) if attack != "silent" else q_honest
            quorum = sorted(honest_ranks[i] for i in order[:take])
            grads: dict[int, torch.Tensor] = {}
            for r in quorum:
                g, _, loss = workers[r].gradient_at(state, t)
                grads[r] = g.clone()
                losses.append(loss)
            if forger is not None and active:
                own = {r: workers[r].gradient_at(state, t)[0].clone() for r in byz}
                forged = forger.forge(t, own, grads)
                grads.update({r: forged[r] for r in active})
            senders = sorted(grads)
            rows = torch.stack([grads[s] for s in senders])
            for r in ps_step(t, state, senders, rows).banned:
                banned_at.setdefault(r, t)
            if active:  # a step with a Byzantine worker not yet banned: were they all in?
                eligible += 1
                quorums_with_byz += set(active) <= set(senders)
        accuracy, test_loss = ps.evaluate(full=not self.eval_samples)
        return {"attack": cell.label, "fw": cfg.fw, "seed": cfg.seed, "steps": cfg.num_iter,
                "config": _describe(cfg), "accuracy": round(accuracy, 2),
                "test_loss": round(test_loss, 4) if math.isfinite(test_loss) else None,
                # as the scheduled deployments': among the steps with a Byzantine worker not
                # yet banned (byz_steps), the share whose quorum held every such worker
                "byz_share": round(quorums_with_byz / eligible, 3) if eligible else 0.0,
                "byz_steps": eligible,
                "banned_at": {str(r): s for r, s in sorted(banned_at.items())},
                "false_bans": sorted(r for r in agg.banned if r not in byz),
                "train_loss_last": round(statistics.fmean(losses[-50:]), 4) if losses else None,
                "wall_s": round(time.perf_counter() - started, 1)}


def _describe(cfg: RunConfig) -> str:
    parts = [cfg.gar]
    if cfg.pre_agg not in ("", "none"):
        parts.append(f"pre_agg={cfg.pre_agg}")
    if cfg.worker_momentum:
        parts.append(f"wm={cfg.worker_momentum}:{cfg.wm_rows}")
    parts.append(f"lr={cfg.opt_args.get('lr', '?')}")
    if cfg.check_gradients:
        parts.append(f"check={cfg.check_gradients}")
    return " ".join(parts)


class _Forger:
    """The fw colluding Byzantine workers of a screen run (see the module docstring)."""

    def __init__(self, cfg: RunConfig, attack: str, cell: Cell, agg: GradientAggregation, byz: list[int]):
        self.cfg, self.name, self.agg, self.byz = cfg, attack, agg, byz
        self.label_flip = attack == "label_flip"
        params = {**DEFAULT_ATTACK_ARGS.get(attack, {}), **cell.attack_args}
        # the attacker that knows of --check_gradients: it forges only at a random share of
        # the steps (a forged row is checked with probability k / q_w) and is honest otherwise
        self.forge_probability = float(params.pop("forge_probability", 1.0))
        if not 0.0 < self.forge_probability <= 1.0:
            raise ConfigError("forge_probability must be in (0, 1]")
        self.coin = random.Random(cfg.seed * 31 + 7)
        self.own_row = False
        if not self.label_flip:
            spec = attacks.get(attack)
            self.own_row = "own" in spec.needs
            if spec.needs_rule:
                params.setdefault("gar", cfg.gar)
                params.setdefault("gar_f", cfg.fw)
                if cfg.gar_args:
                    params.setdefault("gar_params", dict(cfg.gar_args))
            if "pipeline" in spec.params:
                params.setdefault("pipeline", cfg.pre_agg)
            if "check_tolerance" in spec.params:  # the PSes' tolerance: public configuration
                params.setdefault("check_tolerance", cfg.check_tolerance)
            unknown = set(params) - set(spec.params) - {"n"}
            if unknown:
                raise ConfigError(f"screen attack {attack!r}: unknown arguments {sorted(unknown)}")
            self.wants_n = "n" in spec.params
        self.params = params
        self.momentum_aware = cell.momentum_aware
        if self.momentum_aware:
            if agg.momentum is None:
                raise ConfigError("momentum_aware needs --worker_momentum > 0")
            from byzsgd.attacks.momentum_aware import MomentumAwareAttacker

            self.tracker = MomentumAwareAttacker(agg.momentum.beta)

    def forge(self, step: int, own_by_rank: dict[int, torch.Tensor],
              honest: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """The Byzantine workers' gradients of ``step`` (rank -> row); ``own_by_rank``: each
        one's own honest gradient (on flipped labels for label_flip)."""
        if self.label_flip:  # the honest computation on flipped labels
            return dict(own_by_rank)
        if self.forge_probability < 1.0 and self.coin.random() >= self.forge_probability:
            if self.momentum_aware:  # honest this step: its rows move as correct ones'
                self.tracker.observe(honest)
                self.tracker.observe(own_by_rank)
            return dict(own_by_rank)
        own = own_by_rank[self.byz[0]]
        params = dict(self.params)
        if "seed" in params and params["seed"] is not None:
            params["seed"] = int(params["seed"]) + step
        elif "seed" in attacks.get(self.name).params:
            params["seed"] = self.cfg.seed * 1000 + step
        if not self.momentum_aware:
            if self.wants_n:
                params.setdefault("n", len(honest) + len(self.byz))
            if self.own_row:  # each forges around its own gradient, as in a deployment
                return {r: attacks.forge(self.name, torch.stack([own_by_rank[r], *honest.values()]), 1,
                                         **params)[0].contiguous() for r in self.byz}
            known = torch.stack([own, *honest.values()])
            forged = attacks.forge(self.name, known, len(self.byz), **params)
            return {r: forged[i].contiguous() for i, r in enumerate(self.byz)}
        # momentum-aware: the attack runs on the honest momentum rows the rule will see
        tracker = self.tracker
        tracker.observe(honest)  # the PS's honest momentums after this step's update
        entering = [r for r in self.agg.rows_entering(step, sorted([*honest, *self.byz]))
                    if r not in self.byz]
        rows = tracker.honest_rows(entering)
        if self.wants_n:
            params.setdefault("n", len(entering) + len(self.byz))
        target = attacks.forge(self.name, rows, len(self.byz), **params)
        return {r: tracker.gradient_for(r, target[i]) for i, r in enumerate(self.byz)}


# -- the menu and the command line ------------------------------------------------------------
#: value attacks whose forgery is computed from the honest rows: they get a momentum-aware
#: variant (``+mom``) when the PS keeps worker momentums
ADAPTIVE = ("alie", "ipm", "empire", "mimic", "optimal_alie", "optimal_ipm", "minmax", "minsum", "fang")
#: extra cells beyond one per attack: the other perturbation directions (minmax, minsum,
#: stealth), and the search of minmax's factor against the deployed pipeline instead of the
#: paper's distance constraint
VARIANTS = ("minmax:direction=unit", "minmax:direction=sign", "minsum:direction=unit",
            "minsum:direction=sign", "minmax+mom:direction=unit", "minmax+mom:direction=sign",
            "minsum+mom:direction=unit", "minsum+mom:direction=sign", "minmax+mom:search=defence",
            "minsum+mom:forge_probability=0.1", "stealth:direction=sign")


def menu(momentum_aware: bool = True) -> list[str]:
    """Every worker attack of the registry (and label_flip, silent), the variants, and the
    momentum-aware variant of each adaptive attack: the cells the default must hold."""
    cells = sorted(set(attacks.names()) | set(DATA_ATTACKS))
    cells += [v for v in VARIANTS if _known(v) and (momentum_aware or "+mom" not in v)]
    if momentum_aware:
        cells += [f"{a}+mom" for a in ADAPTIVE if _known(a)]
    return cells


def _known(cell: str) -> bool:
    name = cell.split(":")[0].split("+")[0]
    return name in attacks.names() or name in DATA_ATTACKS


def parse_cell(spec: str, *, fw: int, seed: int, steps: int, overrides: dict) -> Cell:
    """``attack[+mom][:key=value,...]`` (values parsed as JSON when they parse, else strings)."""
    import json

    head, _, args = spec.partition(":")
    name, _, flag = head.partition("+")
    if flag not in ("", "mom"):
        raise ConfigError(f"screen cell {spec!r}: the only variant is +mom")
    attack_args = {}
    for item in filter(None, args.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"screen cell {spec!r}: expected key=value, got {item!r}")
        try:
            attack_args[key] = json.loads(value)
        except ValueError:
            attack_args[key] = value
    if name != "none" and not _known(name):
        raise ConfigError(f"screen cell {spec!r}: unknown attack {name!r}")
    return Cell(attack=name, fw=fw, seed=seed, steps=steps, attack_args=attack_args,
                momentum_aware=flag == "mom", overrides=overrides)


def main(argv=None) -> int:
    import argparse
    import json

    p = argparse.ArgumentParser(
        prog="python -m byzsgd.experiments.screen",
        description="The worst-case screen: the PS's own aggregation under fw Byzantine workers in "
                    "every quorum, omniscient (module docstring). One JSON line per cell.")
    p.add_argument("--cells", default="menu",
                   help="comma-separated cells attack[+mom][:k=v;...] ('none' is the baseline), or "
                        "'menu' (every attack and variant: see --list)")
    p.add_argument("--fw", default="1,2", help="comma-separated numbers of Byzantine workers")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--config", default="{}", help="RunConfig fields as JSON over the launcher's "
                   "defaults, e.g. '{\"wm_rows\": \"quorum\"}'")
    p.add_argument("--eval_samples", type=int, default=0, help="test images (0: all)")
    p.add_argument("--out", help="append the JSON lines to this file too")
    p.add_argument("--list", action="store_true", help="print the menu and exit")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(menu()))
        return 0
    overrides = json.loads(a.config)
    specs = menu() if a.cells == "menu" else [c.replace(";", ",") for c in a.cells.split(",") if c]
    if "none" not in specs:
        specs = ["none"] + specs
    cells = [parse_cell(s, fw=int(fw), seed=int(seed), steps=a.steps, overrides=overrides)
             for seed in a.seeds.split(",") for fw in a.fw.split(",") for s in specs]
    for c in cells:  # refuse a bad configuration before training anything
        screen_config(c.overrides, fw=c.fw, seed=c.seed)
    screen = Screen(eval_samples=a.eval_samples)
    out = open(a.out, "a") if a.out else None
    done_none: set[tuple[int, int]] = set()
    for c in cells:
        if c.attack == "none":  # one baseline per seed (fw changes only q_w)
            if (c.seed, c.fw) in done_none:
                continue
            done_none.add((c.seed, c.fw))
        row = screen.run(c)
        row["overrides"] = overrides
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()
    if out:
        out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
