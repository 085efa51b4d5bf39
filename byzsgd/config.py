"""The run configuration shared by every entry point: one object, its flags, its checks.

The flags are those of Garfield's ByzSGD ``trainer.py`` (``--master --rank --dataset --batch
--num_ps --num_workers --fw --fps --model --loss --optimizer --opt_args --num_iter --gar
--acc_freq --bench --log``) plus ours; each is declared once, in the metadata of its
:class:`RunConfig` field (see :mod:`byzsgd.flags`).  Cheap checks run at construction;
:meth:`RunConfig.validate` checks everything else (resilience bounds, the rule's and the
attack's arguments, mode-specific flags) so that a bad deployment is refused at start —
never at step 1000.
"""
from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from byzsgd.device import check_device, parse_device
from byzsgd.errors import ConfigError
from byzsgd.flags import (BYZSGD, GARFIELD, PAPER, add_flags, build_parser, default_of, flag,
                          flag_fields, parse_bool, parse_json_object, to_argv, values_from)
from byzsgd.learning.catalog import dataset_help, loss_model_mismatch, model_help  # torch-free: --help stays fast

__all__ = ["RunConfig", "parse_bool", "parse_json_object", "parse_host_port", "node_parser",
           "config_from_args", "add_arguments", "SECRET_ENV", "SECRET_FILE_ENV", "CREDENTIALS_ENV",
           "MODES", "LossModelMismatch"]

SECRET_ENV = "BYZSGD_SECRET"
SECRET_FILE_ENV = "BYZSGD_SECRET_FILE"
CREDENTIALS_ENV = "BYZSGD_CREDENTIALS"
DEFAULT_MASTER_PORT = 29500
INSECURE_DEFAULT_SECRET = b"byzsgd-public-default-secret"
MODES = ("garfield", "paper")


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
                     "29500); used for the rendezvous when --peers is not given", group=GARFIELD)
    rank: int = _f(0, "this node's rank; ranks below --num_ps are parameter servers", group=GARFIELD)
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
    peers: str | None = _f(None, "JSON peer directory (the deployment.json the launcher writes)")
    data_root: str | None = _f(None, "extra dataset directory (torchvision layout)")
    split: str = _f("iid", "iid or dirichlet:<alpha>")
    seed: int = _f(0, "seed of the model, the shards and the attacks")
    eval_samples: int = _f(0, "test samples used by periodic evaluations (0: all); the last is "
                           "always full")
    metrics: str | None = _f(None, "JSON-lines metrics file (PS)")
    listen_host: str = _f("0.0.0.0", "address to listen on")
    advertise_host: str | None = _f(None, "address other nodes use to reach this one")
    port: int | None = _f(None, "port to listen on (default: directory's)")
    credentials: str | None = _f(None, f"this rank's credentials file (0600; else ${CREDENTIALS_ENV}): "
                                 f"its pairwise keys, written by the launchers; a node refuses to start "
                                 f"without it unless --insecure_shared_secret true")
    insecure_shared_secret: bool = _f(False, "INSECURE: authenticate with one shared secret "
                                      f"(--secret_file, ${SECRET_FILE_ENV} or ${SECRET_ENV}) instead "
                                      "of --credentials; it proves membership, not rank: any holder "
                                      "can pose as any rank")
    secret_file: str | None = _f(None, f"--insecure_shared_secret: file holding the shared secret "
                                 f"(else ${SECRET_FILE_ENV} or ${SECRET_ENV})")
    bind_address: bool = _f(True, "plain TCP: refuse a dialer that reached this node through another "
                            "address than its own view of it (false behind NAT / port forwarding, "
                            "where TLS must then bind the channel)")
    tls_cert: str | None = _f(None, "TLS certificate (PEM); enables TLS")
    tls_key: str | None = _f(None, "TLS private key (PEM)")
    tls_ca: str | None = _f(None, "CA bundle used to verify peers' certificates")
    step_timeout: float = _f(60.0, "seconds a quorum may take before the node reports a stall")
    resend_after: float = _f(2.0, "seconds after which an unanswered request is sent again")
    startup_timeout: float = _f(120.0, "seconds to wait for the rendezvous / first connections")
    attack: str | None = _f(None, "make this node Byzantine with this attack")
    attack_args: dict[str, Any] = _f({}, "attack parameters as JSON")
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
        ints = ("rank", "num_ps", "num_workers", "fw", "fps", "batch", "num_iter", "acc_freq",
                "seed", "threads", "eval_samples", "checkpoint_every",
                "lipschitz_warmup", "lipschitz_window")
        for name in ints:
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise ConfigError(f"--{name} must be an integer, got {getattr(self, name)!r}")
        if self.num_ps < 1:
            raise ConfigError(f"--num_ps must be >= 1, got {self.num_ps}")
        if self.num_workers < 1:
            raise ConfigError(f"--num_workers must be >= 1, got {self.num_workers}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"--rank {self.rank} out of range for {self.num_ps} PS + "
                              f"{self.num_workers} workers (0..{self.world_size - 1})")
        if not 0 <= self.fw < self.num_workers:
            raise ConfigError(f"--fw must be in [0, num_workers), got fw={self.fw} with "
                              f"num_workers={self.num_workers}")
        if not 0 <= self.fps < self.num_ps:
            raise ConfigError(f"--fps must be in [0, num_ps), got fps={self.fps} with "
                              f"num_ps={self.num_ps}")
        self.gather_period = str(self.gather_period).strip().lower()
        if self.gather_period != "auto":
            try:
                if int(self.gather_period) < 1:
                    raise ValueError
            except ValueError:
                raise ConfigError(f"--gather_period must be an integer >= 1 or 'auto', got "
                                  f"{self.gather_period!r}") from None
            self.gather_period = str(int(self.gather_period))
        if not self.lipschitz_l > 0:
            raise ConfigError(f"--lipschitz_l must be > 0, got {self.lipschitz_l}")
        for name in ("batch", "num_iter", "acc_freq", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("--resume needs --checkpoint_dir")
        if isinstance(self.worker_momentum, bool) or not isinstance(self.worker_momentum, (int, float)) \
                or not 0.0 <= self.worker_momentum < 1.0:
            raise ConfigError(f"--worker_momentum must be in [0, 1), got {self.worker_momentum!r}")
        if isinstance(self.check_gradients, bool) or not isinstance(self.check_gradients, int) \
                or self.check_gradients < 0:
            raise ConfigError(f"--check_gradients must be an int >= 0, got {self.check_gradients!r}")
        if self.check_gradients:
            if self.mode != "garfield":
                raise ConfigError("--check_gradients needs --mode garfield: in paper mode a worker's "
                                  "gradient is computed on the median of the models it gathered, "
                                  "which the PS cannot know")
            if self.check_gradients > self.num_workers - self.fw:
                raise ConfigError(f"--check_gradients {self.check_gradients}: at most q_w = "
                                  f"{self.num_workers - self.fw} rows per quorum")
        if not (isinstance(self.check_tolerance, (int, float)) and self.check_tolerance > 0):
            raise ConfigError(f"--check_tolerance must be > 0, got {self.check_tolerance!r}")
        if self.wm_rows not in ("quorum", "recent"):
            raise ConfigError(f"--wm_rows must be quorum or recent, got {self.wm_rows!r}")
        if isinstance(self.wm_staleness, bool) or not isinstance(self.wm_staleness, int) \
                or self.wm_staleness < 0:
            raise ConfigError(f"--wm_staleness must be an int >= 0, got {self.wm_staleness!r}")
        self.device = parse_device(self.device)
        if self.eval_samples < 0:
            raise ConfigError(f"--eval_samples must be >= 0, got {self.eval_samples}")
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.gar is None:
            self.gar = "mda" if self.mode == "paper" else "median"
        if self.sync and self.mode != "paper":
            raise ConfigError("--sync is a variant of --mode paper (add --mode paper)")
        if self.sync and self.optimizer.lower() != "sgd":
            raise ConfigError(f"--sync: the outliers filter models the SGD step (lr, momentum); "
                              f"--optimizer {self.optimizer} is not supported with it")
        if self.lipschitz_quantile is not None and not 0.0 < self.lipschitz_quantile <= 1.0:
            raise ConfigError(f"--lipschitz_quantile must be in (0, 1], got {self.lipschitz_quantile}")
        if not 1 <= self.lipschitz_warmup <= self.lipschitz_window:
            raise ConfigError(f"need 1 <= --lipschitz_warmup <= --lipschitz_window, got "
                              f"{self.lipschitz_warmup} and {self.lipschitz_window}")
        if self.outliers_factor is not None and not self.outliers_factor > 0:
            raise ConfigError(f"--outliers_factor must be > 0, got {self.outliers_factor}")
        for name in ("step_timeout", "resend_after", "startup_timeout", "pull_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name} must be > 0, got {getattr(self, name)}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls_cert and --tls_key go together")
        if self.credentials and self.insecure_shared_secret:
            raise ConfigError("--credentials and --insecure_shared_secret true exclude each other: "
                              "per-rank credentials prove the rank, a shared secret does not")
        if self.scheduled_byzantine is not None:
            ranks = self.scheduled_ranks  # parsed and checked: worker ranks, distinct, <= q_w
            if self.mode != "garfield":
                raise ConfigError("--scheduled_byzantine (the adversarial schedule test harness) is "
                                  "implemented for --mode garfield only")
            if self.rank in ranks and not self.attack:
                raise ConfigError(f"--scheduled_byzantine lists rank {self.rank}, which runs no "
                                  "--attack: the schedule is for Byzantine workers")


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
        """The resilience conditions of ByzSGD (paper mode), each with whether it holds.

        ``n_ps > 3 fps`` and ``n_w > 3 fw`` are what the algorithm's parts need: the median
        of q_ps = n_ps - fps models (workers' pull, DMC) has a correct majority only if
        q_ps > 2 fps, and MDA over q_w = n_w - fw gradients needs q_w > 2 fw.  The journal
        version's theorem states ``n_ps > 3 fps + 1`` (its proof of DMC's contraction uses
        the extra server); 4 PS with fps = 1 meets the first and not the second."""
        return {"n_ps > 3 fps": self.num_ps > 3 * self.fps,
                "n_w > 3 fw": self.num_workers > 3 * self.fw,
                "n_ps > 3 fps + 1 (journal theorem)": self.num_ps > 3 * self.fps + 1 or self.fps == 0}

    def check_resilience(self) -> None:
        """Refuse, at start, a GAR (after its --pre_agg / --model_pre_agg pipeline: every stage
        and the rule, each at what the stages before it output) that cannot tolerate fw of q_w
        gradients / fps of q_ps models, and in paper mode a deployment outside the paper's
        resilience conditions."""
        from byzsgd import gars  # late: config must not drag the GARs into --help

        if self.mode == "paper":
            conds = self.paper_conditions()
            required = ["n_ps > 3 fps", "n_w > 3 fw"]
            if self.strict_resilience:
                required.append("n_ps > 3 fps + 1 (journal theorem)")
            broken = [c for c in required if not conds[c]]
            if broken:
                raise ConfigError(
                    f"paper mode needs {' and '.join(broken)} (El-Mhamdi et al., ByzSGD), got "
                    f"n_ps={self.num_ps} fps={self.fps}, n_w={self.num_workers} fw={self.fw}")
        from byzsgd.gars.pipeline import Pipeline

        Pipeline.parse(self.pre_agg).check(self.gar, self.q_w, self.fw)
        if self.num_ps > 1:
            Pipeline.parse(self.model_pre_agg).check(self.model_rule, self.q_ps, self.fps)

    def validate(self) -> "RunConfig":
        """Everything a node would refuse, refused now (before step 0): the fields, the
        mode-specific flags, the resilience bounds, ``gar_args`` against the rule's
        parameters, and the attack with its arguments.  Returns ``self``."""
        from byzsgd import gars  # late: config must not drag torch into --help
        from byzsgd.gars.worker_momentum import check_worker_momentum
        from byzsgd.roles import byzantine

        self.check_fields()
        check_device(self.device)  # cuda without CUDA, cuda:N out of range: refused now
        self.check_mode_flags()
        self.check_resilience()
        check_worker_momentum(self.worker_momentum, self.opt_args)
        gars.registry.check_params(self.gar, self.gar_args, what="--gar_args")
        if self.attack:
            byzantine.check_attack(self)
        why = loss_model_mismatch(self.model, self.loss)
        if why is not None:
            warnings.warn(why, LossModelMismatch, stacklevel=2)
        return self

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
        """The shared secret of ``--insecure_shared_secret``: --secret_file,
        $BYZSGD_SECRET_FILE or $BYZSGD_SECRET, else the public default (logged loudly)."""
        path = self.secret_file or os.environ.get(SECRET_FILE_ENV)
        if path:
            try:
                data = Path(path).read_bytes().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read the secret file {path}: {exc}") from None
            if not data:
                raise ConfigError(f"the secret file {path} is empty")
            return data
        env = os.environ.get(SECRET_ENV)
        if env:
            return env.encode()
        import logging
        logging.getLogger("byzsgd.config").warning(
            "no shared secret given ($%s, $%s or --secret_file): using the PUBLIC default "
            "secret, so anybody who can reach the ports can join, as any rank", SECRET_ENV,
            SECRET_FILE_ENV)
        return INSECURE_DEFAULT_SECRET

    def credentials_path(self) -> str | None:
        """--credentials, else $BYZSGD_CREDENTIALS (None: neither)."""
        return self.credentials or os.environ.get(CREDENTIALS_ENV) or None

    def identity(self):
        """What proves this node's rank to its peers (see byzsgd.net.credentials): its
        :class:`~byzsgd.net.RankCredentials`, loaded from --credentials / $BYZSGD_CREDENTIALS and
        checked against --rank and the world size; or, with --insecure_shared_secret true only,
        the shared secret (bytes), logged loudly.  ConfigError when there is neither: a node
        never starts without a proof of its rank by accident."""
        import logging

        from byzsgd.net.credentials import RankCredentials

        path = self.credentials_path()
        if self.insecure_shared_secret:
            if self.credentials is None and path:
                raise ConfigError(f"${CREDENTIALS_ENV} is set and --insecure_shared_secret true: "
                                  f"choose one (unset ${CREDENTIALS_ENV})")
            secret = self.secret()
            logging.getLogger("byzsgd.config").warning(
                "INSECURE: --insecure_shared_secret true: rank %d authenticates with a shared "
                "secret; ranks are NOT proven (any holder of the secret can pose as any rank, "
                "including this one)", self.rank)
            return secret
        if not path:
            raise ConfigError(
                f"no credentials: pass --credentials FILE (or set ${CREDENTIALS_ENV}) with this "
                f"rank's file; the launchers (python -m byzsgd.launch, scripts/run_exp.sh, "
                f"scripts/slurm_byzsgd.sbatch) provision one per rank.  To run with one shared "
                f"secret that proves membership but not rank, pass --insecure_shared_secret true")
        return RankCredentials.load(path, rank=self.rank, world_size=self.world_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
