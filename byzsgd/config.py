"""The run configuration shared by every entry point: one object, its flags, its checks.

The flags are those of Garfield's ByzSGD ``trainer.py`` (``--master --rank --dataset --batch
--num_ps --num_workers --fw --fps --model --loss --optimizer --opt_args --num_iter --gar
--acc_freq --bench --log``) plus ours; each is declared once, in the metadata of its
:class:`RunConfig` field (see :mod:`byzsgd.flags`), with who sets it (the operator, or the
launcher once per rank).  Cheap checks run at construction (:mod:`byzsgd.config_checks`);
:meth:`RunConfig.validate` checks everything else (resilience bounds, the rule's and the
attack's arguments, mode-specific flags) so that a bad deployment is refused at start —
never at step 1000 — and returns a :class:`ValidatedConfig`, which nobody checks again.
Secrets and credentials are read by :mod:`byzsgd.identity`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from byzsgd.config_checks import MODES, check_resilience, check_values, paper_conditions
from byzsgd.device import check_device
from byzsgd.errors import ConfigError
from byzsgd.flags import (GARFIELD, PAPER, PER_RANK, add_flags, build_parser, default_of,
                          flag, flag_fields, flag_values, parse_bool, parse_json_object, read_values,
                          to_argv, values_from)
from byzsgd.identity import (CREDENTIALS_ENV, SECRET_ENV, SECRET_FILE_ENV, credentials_file,
                             load_identity, shared_secret)
from byzsgd.learning.catalog import dataset_help, loss_model_mismatch, model_help  # torch-free: --help stays fast

__all__ = ["RunConfig", "ValidatedConfig", "parse_bool", "parse_json_object", "parse_host_port", "node_parser",
           "config_from_args", "add_arguments", "SECRET_ENV", "SECRET_FILE_ENV", "CREDENTIALS_ENV",
           "MODES", "LossModelMismatch"]

DEFAULT_MASTER_PORT = 29500
#: the version of :meth:`RunConfig.to_json`'s document (a node refuses another)
CONFIG_FORMAT = 1


def parse_host_port(text: str, default_port: int = DEFAULT_MASTER_PORT) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ConfigError(f"bad address {text!r}: empty host")
    try:
        port_num = int(port) if port else default_port
    except ValueError:
        raise ConfigError(f"bad address {text!r}: port is not a number") from None
    if not 0 <= port_num <= 65535:
        raise ConfigError(f"bad address {text!r}: port out of range")
    return host, port_num


def _f(default: Any, help: str, **kw) -> Any:
    """A flag field (mutable defaults get a factory)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=flag(help, **kw))
    return field(default=default, metadata=flag(help, **kw))


def auto_gather_period(lr: float, l: float, num_iter: int) -> int:
    """The ByzSGD authors' gather period ``T = int(1 / (3 l lr))`` (their byzWorker.py, with
    the Lipschitz constant ``l``), floored at 1 and capped by the run length."""
    if not (lr > 0 and l > 0):
        raise ConfigError(f"--gather_period auto needs lr > 0 and --lipschitz_l > 0, got lr={lr}, l={l}")
    return max(1, min(int(num_iter), int(1.0 / (3.0 * l * lr))))


class LossModelMismatch(UserWarning):
    """``--loss`` does not fit the model's outputs (``nll`` on logits): the run would train
    badly without any error (:func:`byzsgd.learning.catalog.loss_model_mismatch`)."""


@dataclass
class RunConfig:
    """Everything one node (PS or worker) needs; cheap checks in ``__post_init__``, the rest
    in :meth:`validate`."""

    # -- Garfield's trainer.py flags (order: their --help)
    master: str = _f("127.0.0.1", "master (rank 0) address, host or host:port (port default "
                     "29500); used for the rendezvous when --peers is not given", group=GARFIELD,
                     scope=PER_RANK)
    rank: int = _f(0, "this node's rank; ranks below --num_ps are parameter servers", group=GARFIELD,
                   scope=PER_RANK)
    dataset: str = _f("mnist", dataset_help(), group=GARFIELD)
    batch: int = _f(32, "per-worker mini-batch size", group=GARFIELD)
    num_ps: int = _f(1, "number of parameter servers", group=GARFIELD)
    num_workers: int = _f(1, "number of workers", group=GARFIELD)
    fw: int = _f(0, "number of Byzantine workers tolerated", group=GARFIELD)
    fps: int = _f(0, "number of Byzantine parameter servers tolerated", group=GARFIELD)
    model: str = _f("convnet", model_help(), group=GARFIELD)
    loss: str = _f("nll", "nll or cross-entropy", group=GARFIELD)
    optimizer: str = _f("sgd", "sgd, adam, adamw, rmsprop, adagrad", group=GARFIELD)
    opt_args: dict[str, Any] = _f({"lr": 0.1}, "optimizer arguments as JSON, e.g. "
                                  '\'{"lr":"0.1","momentum":"0.9"}\'', group=GARFIELD)
    num_iter: int = _f(100, "number of training steps", group=GARFIELD)
    gar: str | None = _f(None, "aggregation rule of the gradients (default: median; mda in "
                         "--mode paper)", group=GARFIELD)
    acc_freq: int = _f(100, "evaluate the test accuracy every N steps", group=GARFIELD)
    bench: bool = _f(False, "true: a PS prints the time each step took, every step",
                     group=GARFIELD)
    log: bool = _f(False, "true: a PS prints each step's loss (mean over the gradients it "
                   "aggregated) and the loss accumulated so far (start-up, evaluations and "
                   "warnings are printed either way)", group=GARFIELD)
    # -- ours
    mode: str = _f("garfield", "garfield: each PS drives its own learning, models gathered every "
                   "step; paper: the full ByzSGD of El-Mhamdi et al.", choices=MODES)
    gar_args: dict[str, Any] = _f({}, "GAR parameters as JSON (checked against the rule's parameters)")
    model_gar: str | None = _f(None, "rule for the models (default: --gar; median in --mode paper)")
    pre_agg: str = _f("none", "PS: pre-aggregation of the gradients before --gar, stages applied in "
                      "order, e.g. 'nnm' or 'clipping:tau=5,nnm' (nnm, bucketing[:s=S], "
                      "clipping[:tau=T], arc; 'none': the rule alone); the whole pipeline's "
                      "resilience is checked at start at q_w with fw")
    model_pre_agg: str = _f("none", "PS: pre-aggregation of the gathered models before the model "
                            "rule (same syntax as --pre_agg; checked at q_ps with fps)")
    worker_momentum: float = _f(0.0, "PS: beta of a momentum the PS keeps per worker's gradient "
                                "stream (m <- beta m + g, PyTorch SGD's convention: same lr as "
                                "optimizer momentum beta) and aggregates instead of the raw "
                                "gradients; 0: off; --opt_args momentum must then be 0 or this "
                                "beta (moved to the workers, never applied twice)")
    wm_rows: str = _f("quorum", "PS, with --worker_momentum: which momentum rows enter the rule. "
                      "quorum: the quorum's senders only (fw of q_w may be Byzantine); recent: "
                      "every worker's row updated within --wm_staleness steps, the quorum's "
                      "fresh (fw of n_w: the adversary that orders messages can no longer shrink "
                      "the honest share; docs/worst_case.md)", choices=("quorum", "recent"))
    wm_staleness: int = _f(20, "PS, --wm_rows recent: steps a worker's momentum row may lag and "
                           "still enter the rule")
    check_gradients: int = _f(0, "PS, --mode garfield: recompute this many gradients of each quorum, "
                              "drawn at random, and ban a worker whose gradient is not the one its "
                              "seeded batch gives (a batch is a public function of the deployment); "
                              "0: off (docs/worst_case.md). python -m byzsgd.launch: 1 in garfield "
                              "mode, 0 in paper mode unless given (None below)")
    check_tolerance: float = _f(1e-3, "--check_gradients: the relative L2 distance above which a "
                                "gradient is a forgery (float rounding on other hardware stays far "
                                "below)")
    gather_period: str = _f("auto", "paper mode: steps T between gathers (DMC; in --sync the "
                            "workers pull every PS at t mod T == 0), or 'auto': the ByzSGD "
                            "authors' T = int(1 / (3 l lr)) (l: --lipschitz_l), at least 1 and at "
                            "most --num_iter", needs="paper")
    lipschitz_l: float = _f(1.0, "paper mode, --gather_period auto: the loss's Lipschitz constant l "
                            "(the authors' default 1)", needs="paper")
    peers: str | None = _f(None, "JSON peer directory (the deployment.json the launcher writes)",
                           scope=PER_RANK)
    data_root: str | None = _f(None, "extra dataset directory (torchvision layout)")
    split: str = _f("iid", "iid or dirichlet:<alpha>")
    seed: int = _f(0, "seed of the model, the shards and the attacks")
    eval_samples: int = _f(0, "test samples used by periodic evaluations (0: all); the last is "
                           "always full")
    metrics: str | None = _f(None, "JSON-lines metrics file (PS)", scope=PER_RANK)
    listen_host: str = _f("0.0.0.0", "address to listen on", scope=PER_RANK)
    advertise_host: str | None = _f(None, "address other nodes use to reach this one", scope=PER_RANK)
    port: int | None = _f(None, "port to listen on (default: directory's)", scope=PER_RANK)
    credentials: str | None = _f(None, f"this rank's credentials file (0600; else ${CREDENTIALS_ENV}): "
                                 f"its pairwise keys, written by the launchers; a node refuses to start "
                                 f"without it unless --insecure_shared_secret true", scope=PER_RANK)
    insecure_shared_secret: bool = _f(False, "INSECURE: authenticate with one shared secret "
                                      f"(--secret_file, ${SECRET_FILE_ENV} or ${SECRET_ENV}) instead "
                                      "of --credentials; it proves membership, not rank: any holder "
                                      "can pose as any rank")
    secret_file: str | None = _f(None, f"--insecure_shared_secret: file holding the shared secret "
                                 f"(else ${SECRET_FILE_ENV} or ${SECRET_ENV})", scope=PER_RANK)
    bind_address: bool = _f(True, "plain TCP: refuse a dialer that reached this node through another "
                            "address than its own view of it (false behind NAT / port forwarding, "
                            "where TLS must then bind the channel)")
    tls_cert: str | None = _f(None, "TLS certificate (PEM); enables TLS")
    tls_key: str | None = _f(None, "TLS private key (PEM)")
    tls_ca: str | None = _f(None, "CA bundle used to verify peers' certificates")
    step_timeout: float = _f(60.0, "seconds a quorum may take before the node reports a stall")
    resend_after: float = _f(2.0, "seconds after which an unanswered request is sent again")
    startup_timeout: float = _f(120.0, "seconds to wait for the rendezvous / first connections")
    attack: str | None = _f(None, "make this node Byzantine with this attack of the attack catalog "
                            "(value, PS or protocol; python -m byzsgd.attacks lists each one with "
                            "its roles, needs, arguments and defaults)", scope=PER_RANK)
    attack_args: dict[str, Any] = _f({}, "the attack's arguments as JSON (their names, defaults and "
                                     "checks: python -m byzsgd.attacks)", scope=PER_RANK)
    scheduled_byzantine: str | None = _f(
        None, "TEST HARNESS, not a protocol setting: emulates the asynchronous network's adversary, "
        "which orders the messages.  Comma-separated Byzantine worker ranks (each running --attack): "
        "every PS delivers their gradients at once, holds the correct workers' gradients of a step "
        "until each listed rank's gradient of that step arrived (at most --resend_after) and leaks "
        "the held ones to the listed ranks, which forge from them: the listed workers are in every "
        "gradient quorum and know its honest gradients (byzsgd.roles.adversary_schedule).  Set on "
        "every node by python -m byzsgd.launch --schedule adversarial; garfield mode only")
    threads: int = _f(1, "torch intra-op threads")
    device: str = _f("auto", "where the node trains / aggregates: auto (CUDA when available, the "
                     "rank's local index round-robin over the visible devices: $BYZSGD_LOCAL_INDEX "
                     "from the launchers, else $SLURM_LOCALID, else $LOCAL_RANK, else 0; the CPU "
                     "without CUDA), cpu, cuda (required, same mapping) or cuda:N (docs/gpu.md)")
    drop_nonfinite: bool = _f(True, "leave gradients/models holding NaN or Inf out of the "
                              "aggregation, the rule then tolerating that many fewer Byzantine "
                              "rows (false: hand them to the rule, to study the rule itself)")
    checkpoint_dir: str | None = _f(None, "PS: directory of atomic checkpoints (model, optimizer "
                                    "state, step)")
    checkpoint_every: int = _f(0, "PS: write a checkpoint every N steps (0: never)")
    resume: bool = _f(False, "PS: restart from the last checkpoint in --checkpoint_dir (true/false)")
    # -- paper mode (docs/design.md §3; El-Mhamdi et al., Distributed Computing 35, 2022)
    sync: bool = _f(False, "synchronous variant: a worker pulls one PS's model, checks it with the "
                    "Lipschitz and outliers filters, and pulls the next PS if it fails",
                    group=PAPER, needs="paper")
    lipschitz_quantile: float | None = _f(
        None, "--sync: a model passes the Lipschitz filter if its empirical Lipschitz coefficient "
        "is at most this quantile of the accepted ones (default: the paper's (n_ps - fps) / n_ps)",
        group=PAPER, needs="sync")
    lipschitz_history: str = _f(
        "authors", "--sync: the Lipschitz filter's history. authors: every coefficient, the current "
        "one included in the quantile, trimmed to the last 50 when it reaches 100 (byzWorker.py); "
        "window: the last --lipschitz_window earlier coefficients, after --lipschitz_warmup",
        choices=("authors", "window"), group=PAPER, needs="sync")
    lipschitz_warmup: int = _f(5, "--sync --lipschitz_history window: coefficients observed before "
                               "the Lipschitz filter rejects", group=PAPER, needs="sync")
    lipschitz_window: int = _f(20, "--sync --lipschitz_history window: the history is the last N "
                               "coefficients", group=PAPER, needs="sync")
    outliers_bound: str = _f(
        "update", "--sync: the outliers filter's bound. update (default): factor * lr * gap * "
        "||u'||, u' the worker's previous SGD update; authors: lr ||g|| ((3T + 2)(n_w - f_w) / "
        "(4 f_w) + 2 ((t - 1) mod T)), g the gradient just computed at the pulled model, checked "
        "only when f_w > 0 (the ByzSGD authors' byzWorker.py, which never acted on it: with "
        "T = 6 one equivocating PS took training to 9.8%%, against 94.9%% with update)",
        choices=("authors", "update"), group=PAPER, needs="sync")
    outliers_factor: float | None = _f(
        None, "--sync --outliers_bound update: a model passes if it lies within factor * lr * "
        "||u'|| of the model the worker expects (default 3T + 2, T = the gather period)",
        group=PAPER, needs="sync")
    pull_timeout: float = _f(1.0, "--sync: seconds a worker waits for a pulled model before the "
                             "next PS", group=PAPER, needs="sync")
    log_diameter: bool = _f(True, "PSes exchange their models after each gather to log the exact "
                            "diameter after it (one more model per peer and gather)", group=PAPER)
    strict_resilience: bool = _f(False, "also refuse deployments outside the journal theorem's "
                                 "n_ps > 3 fps + 1 (n_ps > 3 fps and n_w > 3 fw are always "
                                 "required)", group=PAPER)
    # -- not a flag: derived from --attack
    byzantine: bool = False

    def __post_init__(self) -> None:
        if self.attack:
            self.byzantine = True
        self.check_fields()

    def check_fields(self) -> None:
        """The checks that need nothing but the values (run at construction)."""
        check_values(self)

    # -- derived quantities -------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.num_ps + self.num_workers

    @property
    def is_ps(self) -> bool:
        return self.rank < self.num_ps

    @property
    def role(self) -> str:
        return "ps" if self.is_ps else "worker"

    @property
    def worker_index(self) -> int:
        return self.rank - self.num_ps

    @property
    def q_w(self) -> int:
        """Gradient quorum: the first n_w - fw distinct workers."""
        return self.num_workers - self.fw

    @property
    def q_ps(self) -> int:
        """Model quorum: n_ps - fps models, the PS's own included."""
        return self.num_ps - self.fps

    @property
    def ps_ranks(self) -> list[int]:
        return list(range(self.num_ps))

    @property
    def worker_ranks(self) -> list[int]:
        return list(range(self.num_ps, self.world_size))

    @property
    def scheduled_ranks(self) -> list[int]:
        """``--scheduled_byzantine`` as sorted ranks ([] when unset).  ConfigError unless they
        are distinct worker ranks, at most q_w of them (a quorum holds them all)."""
        if self.scheduled_byzantine is None:
            return []
        try:
            ranks = [int(x) for x in str(self.scheduled_byzantine).split(",")]
        except ValueError:
            raise ConfigError(f"--scheduled_byzantine must be comma-separated worker ranks, got "
                              f"{self.scheduled_byzantine!r}") from None
        bad = [r for r in ranks if not self.num_ps <= r < self.world_size]
        if bad or len(set(ranks)) != len(ranks) or not ranks:
            raise ConfigError(f"--scheduled_byzantine {self.scheduled_byzantine!r}: expected distinct "
                              f"worker ranks ({self.num_ps}..{self.world_size - 1})")
        if len(ranks) > self.q_w:
            raise ConfigError(f"--scheduled_byzantine lists {len(ranks)} ranks, more than the "
                              f"gradient quorum q_w = {self.q_w}")
        return sorted(ranks)

    @property
    def model_rule(self) -> str:
        if self.model_gar:
            return self.model_gar
        return "median" if self.mode == "paper" else self.gar

    @property
    def lipschitz_q(self) -> float:
        """The Lipschitz filter's quantile: the paper's (n_ps - fps) / n_ps by default."""
        if self.lipschitz_quantile is not None:
            return self.lipschitz_quantile
        return (self.num_ps - self.fps) / self.num_ps

    @property
    def gather_every(self) -> int:
        """T, the steps between gathers: the flag's integer, or with ``auto`` the ByzSGD
        authors' ``int(1 / (3 l lr))`` (byzWorker.py), at least 1 and at most --num_iter.
        Garfield mode gathers after every step: 1."""
        if self.mode != "paper":
            return 1
        if self.gather_period != "auto":
            return int(self.gather_period)
        lr = float(self.opt_args.get("lr", 0.1))
        return auto_gather_period(lr, self.lipschitz_l, self.num_iter)

    @property
    def step_window(self) -> int:
        """How far ahead of its own step a node keeps per-sender messages (gradients, models):
        PSes drift apart by up to T steps between gathers; capped, since a PS further behind
        jumps to its peers at the next gather and a window costs memory per sender."""
        return max(8, min(2 * self.gather_every + 2, 32))

    @property
    def outliers_k(self) -> float:
        """The outliers filter's factor (``--outliers_bound update``): 3T + 2 by default."""
        if self.outliers_factor is not None:
            return self.outliers_factor
        return 3.0 * self.gather_every + 2.0

    def paper_conditions(self) -> dict[str, bool]:
        """ByzSGD's resilience conditions, each with whether it holds (:mod:`byzsgd.config_checks`)."""
        return paper_conditions(self)

    def check_resilience(self) -> None:
        """Refuse a rule pipeline or a paper-mode deployment outside its resilience bounds."""
        check_resilience(self)

    def validate(self) -> "ValidatedConfig":
        """This configuration checked in full (:meth:`check_all`), as the
        :class:`ValidatedConfig` that roles take without checking it again; free on one."""
        return ValidatedConfig.of(self)

    def check_all(self) -> None:
        """Everything a node would refuse, refused now (before step 0): the fields, the
        mode-specific flags, the resilience bounds, ``gar_args`` against the rule's
        parameters, and the attack with its arguments.  Run by :class:`ValidatedConfig`."""
        from byzsgd import gars  # late: config must not drag torch into --help
        from byzsgd.attacks import catalog  # the attack catalog: names, roles, arguments
        from byzsgd.gars.worker_momentum import check_worker_momentum

        self.check_fields()
        check_device(self.device)  # cuda without CUDA, cuda:N out of range: refused now
        self.check_mode_flags()
        self.check_resilience()
        check_worker_momentum(self.worker_momentum, self.opt_args)
        gars.registry.check_params(self.gar, self.gar_args, what="--gar_args")
        catalog.check(self)
        why = loss_model_mismatch(self.model, self.loss)
        if why is not None:
            warnings.warn(why, LossModelMismatch, stacklevel=2)

    def check_mode_flags(self) -> None:
        """A flag of one mode set (to a non-default value) in another is refused: it would be
        silently ignored."""
        active = {"paper": self.mode == "paper", "sync": self.sync}
        for f, fl in flag_fields(type(self)):
            if fl.needs and not active[fl.needs] and getattr(self, f.name) != default_of(f):
                needed = "--mode paper" if fl.needs == "paper" else "--mode paper --sync true"
                raise ConfigError(f"--{f.name} {getattr(self, f.name)} needs {needed} "
                                  f"(it has no effect in {self.mode} mode"
                                  f"{' without --sync' if fl.needs == 'sync' and self.mode == 'paper' else ''})")

    # -- processes on other hosts / exec'd processes ---------------------------------------
    def to_argv(self) -> list[str]:
        """The flags that start this configuration in another process (``from_argv`` reads
        them back to an equal object)."""
        return to_argv(self)

    @classmethod
    def from_argv(cls, argv: list[str], *, prog: str = "byzsgd") -> "RunConfig":
        """Parse node flags (raises ConfigError on a bad one; never exits)."""
        return config_from_args(node_parser(prog, raising=True).parse_args(list(argv)))

    def secret(self) -> bytes:
        """The shared secret of ``--insecure_shared_secret`` (:func:`byzsgd.identity.shared_secret`)."""
        return shared_secret(self.secret_file)

    def credentials_path(self) -> str | None:
        """--credentials, else $BYZSGD_CREDENTIALS (None: neither)."""
        return credentials_file(self.credentials)

    def identity(self):
        """What proves this node's rank: its credentials, or the insecure shared secret."""
        return load_identity(rank=self.rank, world_size=self.world_size, credentials=self.credentials,
                             insecure_shared_secret=self.insecure_shared_secret, secret_file=self.secret_file)

    def to_json(self) -> str:
        """Every flag's value as JSON, None included (what a multi-host launcher ships to a
        node; no default of the node's own version involved): :meth:`from_json` reads it back."""
        return json.dumps({"byzsgd_config": CONFIG_FORMAT, "fields": flag_values(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "config") -> "RunConfig":
        """A configuration of :meth:`to_json` (cheap checks done; ConfigError on a bad one)."""
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or doc.get("byzsgd_config") != CONFIG_FORMAT:
            raise ConfigError(f"{source}: not a byzsgd configuration of format {CONFIG_FORMAT}")
        try:
            return cls(**read_values(cls, doc.get("fields")))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_UNSET = object()
#: the fields :meth:`RunConfig.check_all` never reads (a file's path, not what it holds)
FILE_FIELDS = frozenset({"peers", "metrics", "credentials"})


class ValidatedConfig(RunConfig):
    """A :class:`RunConfig` checked in full at construction (:meth:`RunConfig.check_all`), then
    immutable: a launcher validates a forked node's configuration once and the role does not
    check it again.  A change is a new object (``dataclasses.replace``), checked again."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_all()
        object.__setattr__(self, "_sealed", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_sealed", False) and getattr(self, name, _UNSET) != value:
            raise dataclasses.FrozenInstanceError(
                f"a ValidatedConfig cannot change ({name}): dataclasses.replace makes a checked copy")
        super().__setattr__(name, value)

    @classmethod
    def of(cls, cfg: RunConfig) -> "ValidatedConfig":
        """``cfg`` checked in full (itself when it already is a ValidatedConfig)."""
        if isinstance(cfg, cls):
            return cfg
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(RunConfig)})

    def validate(self) -> "ValidatedConfig":
        return self

    def check_resilience(self) -> None:
        """Checked at construction, free after (roles that also take a plain RunConfig call it)."""
        if not getattr(self, "_sealed", False):
            super().check_resilience()

    def with_files(self, **files: str | None) -> "ValidatedConfig":
        """A copy naming other files (:data:`FILE_FIELDS`: where a launcher put this rank's peers
        file, metrics, credentials), not checked in full again: the full checks read no path."""
        if not set(files) <= FILE_FIELDS:
            raise ValueError(f"with_files changes only {sorted(FILE_FIELDS)}, got {sorted(files)}")
        copy = RunConfig(**{**{f.name: getattr(self, f.name) for f in dataclasses.fields(RunConfig)},
                            **files})  # the cheap checks, as at every construction
        new = object.__new__(ValidatedConfig)
        new.__dict__.update(copy.__dict__, _sealed=True)
        return new


def node_parser(prog: str, description: str = "", *, defaults: dict[str, Any] | None = None,
                raising: bool = False) -> argparse.ArgumentParser:
    """The parser of a node's flags (every :class:`RunConfig` flag)."""
    return build_parser(prog, description, [RunConfig], defaults=defaults, raising=raising)


def add_arguments(parser: argparse.ArgumentParser, *, role: str | None = None) -> None:
    """Add the node flags to ``parser``; ``role=None`` (the trainer): no default rank."""
    add_flags(parser, [RunConfig], defaults=None if role else {"rank": None})


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The configuration of parsed node flags (cheap checks done; call ``validate()``)."""
    values = values_from(RunConfig, args)
    if "rank" not in values:
        raise ConfigError("--rank is required")
    return RunConfig(**values)
