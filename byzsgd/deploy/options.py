"""The one-machine launcher's configuration: a :class:`RunConfig` plus the deployment.

``LaunchConfig`` is what ``python -m byzsgd.launch`` parses and what the experiment harness
builds per grid cell; :meth:`LaunchConfig.validate` refuses whatever a node would refuse
(every rank's configuration checked in full, each Byzantine rank's attack on its own), and
:meth:`LaunchConfig.node_configs` are the :class:`~byzsgd.config.ValidatedConfig` the ranks run
with — handed over in memory to a forked node, which does not check it again, as argv to an
exec'd one.  Every field of ``LaunchConfig`` is declared ``scope=LAUNCHER``: it never reaches
a node.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byzsgd.config import RunConfig, ValidatedConfig, config_from_args
from byzsgd.errors import ConfigError
from byzsgd.flags import DEPLOYMENT, LAUNCHER, build_parser, coerce, flag, to_argv, values_from

#: the main job's settings, chosen by their worst case over worker and PS attacks (docs/
#: worst_case.md): median after nearest-neighbour mixing of per-worker momentums 0.9 (the
#: optimizer's momentum 0.9 moved to the workers' streams: same lr); the rules alone (old
#: default) fall to one optimal_alie worker.  The trainer keeps Garfield's defaults.
LAUNCH_DEFAULTS = dict(num_ps=4, num_workers=7, fw=1, fps=1, num_iter=1000, acc_freq=100, batch=48,
                       opt_args={"lr": "0.05", "momentum": "0.9"}, pre_agg="nnm",
                       worker_momentum=0.9, wm_rows="recent", check_gradients=1, rank=0,
                       eval_samples=2000, log=False)
DESCRIPTION = ("Start a whole ByzSGD deployment on this machine (loopback): every PS and worker a "
               "process. Default: MNIST convnet, 4 PS (fps=1), 7 workers (fw=1), median after "
               "--pre_agg nnm of per-worker momentums (--worker_momentum 0.9), batch 48, SGD lr "
               "0.05 (momentum 0.9, taken per worker), each PS spot-checking one gradient per step "
               "(--check_gradients 1), 1,000 steps; --mode paper: momentums 0.99, lr 0.005, no check.")


#: ``--mode paper``'s main-job settings where they differ, chosen by their worst case too
#: (docs/worst_case.md, "--mode paper"): no gradient check there (a worker's model is the
#: median of those it gathered, which the PS does not know), so the rule alone must hold, and
#: the momentum that shrinks the honest spread most does best: β = 0.99 at lr 0.005 (worst
#: run 90.0% at fw = 2 of 7 in the screen, 1,000 steps; β = 0.9 at lr 0.05 falls to 11.7%)
PAPER_DEFAULTS = dict(check_gradients=0, worker_momentum=0.99,
                      opt_args={"lr": "0.005", "momentum": "0.99"})
#: the launcher's flags whose default depends on --mode (None in the parser: "not given")
MODE_DEPENDENT = tuple(PAPER_DEFAULTS)


def mode_default(name: str, mode: str) -> Any:
    """The main job's default of ``name`` (one of :data:`MODE_DEPENDENT`) in ``mode``."""
    if mode == "paper":
        return PAPER_DEFAULTS[name]
    value = LAUNCH_DEFAULTS[name]
    return dict(value) if isinstance(value, dict) else value


def _check_default(mode: str) -> int:
    """The main job's --check_gradients: 1 where a PS can recompute a worker's gradient
    (garfield mode), 0 in paper mode (a worker's model is the median of those it gathered)."""
    return mode_default("check_gradients", mode)


def _spawn_default() -> str:
    from byzsgd.deploy.spawn import FORK_AVAILABLE

    return "fork" if FORK_AVAILABLE else "exec"


def _d(default: Any, help: str, **kw) -> Any:
    """A launcher-only flag field."""
    meta = flag(help, group=DEPLOYMENT, scope=LAUNCHER, **kw)
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LaunchConfig:
    """A whole local deployment: the nodes' shared configuration and who is Byzantine."""

    run: RunConfig = field(default_factory=lambda: RunConfig(**LAUNCH_DEFAULTS))
    run_dir: str | None = _d(None, "run directory (default: runs/<date>-<time>)")
    host: str = _d("127.0.0.1", "loopback address the nodes use")
    byz_workers: int = _d(0, "how many workers are Byzantine")
    worker_attack: str | None = _d(None, "attack of the Byzantine workers")
    worker_attack_args: dict[str, Any] = _d({}, "JSON parameters of the worker attack")
    byz_ps: int = _d(0, "how many parameter servers are Byzantine")
    ps_attack: str | None = _d(None, "attack of the Byzantine parameter servers")
    ps_attack_args: dict[str, Any] = _d({}, "JSON parameters of the PS attack")
    schedule: str = _d("none", "adversarial: TEST HARNESS emulating the asynchronous network's "
                       "adversary: every PS delivers the Byzantine workers' gradients first, holds "
                       "the correct ones until those are in (at most --resend_after) and leaks them "
                       "to the Byzantine workers, which forge from them: the Byzantine workers are in "
                       "every gradient quorum and know its honest gradients (sets "
                       "--scheduled_byzantine on every node; needs --byz_workers, garfield mode); "
                       "none: the network's own order", choices=("none", "adversarial"))
    timeout: float = _d(0.0, "kill the deployment after N s (0: never)")
    json: bool = _d(False, "print a JSON summary as the last line", switch=True)
    quiet: bool = _d(False, "no progress bar", switch=True)
    node_log: bool = _d(False, "same as --log true: each PS logs every step's loss", switch=True)
    spawn: str = _d(_spawn_default(), "fork: nodes are forked from the launcher after one import "
                    "of torch (fast start); exec: each node a fresh interpreter",
                    choices=("fork", "exec"))

    # -- flags ------------------------------------------------------------------------------
    @staticmethod
    def parser(prog: str = "python -m byzsgd.launch", *, raising: bool = False) -> argparse.ArgumentParser:
        """The launcher's parser: every node flag (main-job defaults), then the deployment's."""
        # the flags whose main-job default depends on --mode (PAPER_DEFAULTS) are resolved
        # in from_args, once the mode is known
        parser = build_parser(prog, DESCRIPTION, [RunConfig, LaunchConfig],
                              defaults={**LAUNCH_DEFAULTS, **dict.fromkeys(MODE_DEPENDENT)},
                              raising=raising)
        for action in parser._actions:
            if action.dest in MODE_DEPENDENT:  # "(default: None)" would hide both defaults
                shown = {m: json.dumps(mode_default(action.dest, m)) if action.dest == "opt_args"
                         else mode_default(action.dest, m) for m in ("garfield", "paper")}
                action.help = ((action.help or "") + f" (default: {shown['garfield']}; in --mode "
                               f"paper {shown['paper']})%(default).0s").replace("%%(", "%(")
        return parser

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "LaunchConfig":
        for name in MODE_DEPENDENT:
            if getattr(args, name, 0) is None:
                setattr(args, name, mode_default(name, args.mode))
        return cls(run=config_from_args(args), **values_from(cls, args))

    @classmethod
    def from_argv(cls, argv: list[str]) -> "LaunchConfig":
        """Parse launcher flags (ConfigError on a bad one; never exits)."""
        return cls.from_args(cls.parser(raising=True).parse_args(list(argv)))

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> "LaunchConfig":
        """From field values of a config file (experiment grids): node and deployment fields
        mixed, text parsed like the flag's text, unknown names refused."""
        run_names = {f.name for f in dataclasses.fields(RunConfig)}
        run_values, own = dict(LAUNCH_DEFAULTS), {}
        for name, value in values.items():
            target = RunConfig if name in run_names else cls
            (run_values if target is RunConfig else own)[name] = coerce(target, name, value)
        for name in MODE_DEPENDENT:
            if name not in values:
                run_values[name] = mode_default(name, run_values.get("mode", "garfield"))
        return cls(run=RunConfig(**{k: v for k, v in run_values.items() if v is not None}),
                   **{k: v for k, v in own.items() if v is not None})

    def to_argv(self, *, skip: set[str] = frozenset(), only: set[str] | None = None) -> list[str]:
        """Launcher flags that start this deployment from a fresh ``python -m byzsgd.launch``."""
        return to_argv(self.run, skip=skip, only=only) + to_argv(self, skip=skip, only=only)

    # -- checks -----------------------------------------------------------------------------
    def validate(self) -> "LaunchConfig":
        """Everything the nodes would refuse, refused before anything starts."""
        self.node_configs()
        return self

    def node_configs(self, run_dir: Path | None = None) -> list[ValidatedConfig]:
        """Every rank's configuration (:meth:`node_config`; ``run_dir``: with the run's files),
        each checked in full once: the deployment's own flags first, then each rank's (a
        Byzantine rank's attack on its own rank).  The pre-start check and the layout of the
        same deployment share the checks (the files are not part of them)."""
        key = tuple(self.to_argv())
        if getattr(self, "_checked", (None,))[0] != key:
            self._checked = (key, self._check_nodes())
        nodes = self._checked[1]
        if run_dir is None:
            return list(nodes)
        return [n.with_files(**self._files(n.rank, run_dir)) for n in nodes]

    def _check_nodes(self) -> list[ValidatedConfig]:
        cfg = self.run
        if not 0 <= self.byz_workers <= cfg.num_workers:
            raise ConfigError(f"--byz_workers must be in [0, {cfg.num_workers}]")
        if not 0 <= self.byz_ps < cfg.num_ps:
            raise ConfigError(f"--byz_ps must be in [0, {cfg.num_ps})")
        if self.byz_workers and not self.worker_attack:
            raise ConfigError("--byz_workers needs --worker_attack")
        if self.byz_ps and not self.ps_attack:
            raise ConfigError("--byz_ps needs --ps_attack")
        if self.timeout < 0:
            raise ConfigError(f"--timeout must be >= 0, got {self.timeout}")
        if cfg.scheduled_byzantine is not None:
            raise ConfigError("--scheduled_byzantine is the nodes' side of the test harness: give the "
                              "launcher --schedule adversarial (it lists the Byzantine workers itself)")
        if self.schedule == "adversarial":
            from byzsgd.roles import protocol_attacks

            if not self.byz_workers:
                raise ConfigError("--schedule adversarial orders the Byzantine workers' gradients "
                                  "first: it needs --byz_workers >= 1")
            if protocol_attacks.is_protocol_attack(self.worker_attack):
                raise ConfigError(f"--schedule adversarial needs a value attack; --worker_attack "
                                  f"{self.worker_attack} is a protocol attack")
        if self.worker_attack and not self.byz_workers:  # still checked, on the last worker
            self.node_config(cfg.world_size - 1, byzantine=True).validate()
        if self.ps_attack and not self.byz_ps:
            self.node_config(cfg.num_ps - 1, byzantine=True).validate()
        return [self.node_config(rank).validate() for rank in range(cfg.world_size)]

    # -- the ranks ----------------------------------------------------------------------------
    def byzantine_worker_ranks(self) -> list[int]:
        """The Byzantine workers: the last ``byz_workers`` ranks."""
        cfg = self.run
        return list(range(cfg.world_size - self.byz_workers, cfg.world_size))

    def byzantine_ranks(self) -> set[int]:
        """The last ranks of each role are the Byzantine ones."""
        cfg = self.run
        return (set(range(cfg.num_ps - self.byz_ps, cfg.num_ps))
                | set(range(cfg.world_size - self.byz_workers, cfg.world_size)))

    def node_config(self, rank: int, *, byzantine: bool | None = None, run_dir: Path | None = None) -> RunConfig:
        """The configuration rank ``rank`` runs with (``run_dir``: its peers file, metrics and
        credentials file)."""
        cfg = self.run
        is_ps = rank < cfg.num_ps
        byz = rank in self.byzantine_ranks() if byzantine is None else byzantine
        attack = (self.ps_attack if is_ps else self.worker_attack) if byz else None
        changes: dict[str, Any] = dict(rank=rank, log=self.node_log or cfg.log, attack=attack,
                                       attack_args=dict((self.ps_attack_args if is_ps else
                                                         self.worker_attack_args) if attack else {}),
                                       byzantine=bool(attack))
        if self.schedule == "adversarial" and self.byz_workers:  # every node: the PSes order, the
            changes["scheduled_byzantine"] = ",".join(map(str, self.byzantine_worker_ranks()))  # workers forge
        if run_dir is not None:
            changes.update(self._files(rank, run_dir))
        return dataclasses.replace(cfg, **changes)

    def _files(self, rank: int, run_dir: Path) -> dict[str, str]:
        """Rank ``rank``'s files in ``run_dir``: the peers file, its own credentials file
        (launch.start provisions them) and, for a PS, its metrics."""
        from byzsgd import rundir
        from byzsgd.net.credentials import credentials_path

        files = dict(peers=str(rundir.deployment_path(run_dir)))
        if not self.run.insecure_shared_secret:
            files["credentials"] = str(credentials_path(rundir.credentials_dir(run_dir), rank))
        if rank < self.run.num_ps:
            files["metrics"] = str(rundir.rank_file(run_dir, "ps", rank, "metrics"))
        return files
