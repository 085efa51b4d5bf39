"""Command-line flags and the validated run configuration shared by every entry point.

The flags are those of Garfield's ByzSGD ``trainer.py`` (``--master --rank --dataset --batch
--num_ps --num_workers --fw --fps --model --loss --optimizer --opt_args --num_iter --gar
--acc_freq --bench --log``) plus ours.  Everything is checked at construction so that a bad
deployment is refused at start — never at step 1000.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from byzsgd.errors import ConfigError

SECRET_ENV = "BYZSGD_SECRET"
SECRET_FILE_ENV = "BYZSGD_SECRET_FILE"
DEFAULT_MASTER_PORT = 29500
INSECURE_DEFAULT_SECRET = b"byzsgd-public-default-secret"
MODES = ("garfield", "paper")


def parse_bool(text: str | bool) -> bool:
    """Parse a boolean flag value properly ("false" is False, unlike ``bool("false")``)."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "t", "yes", "y", "on"):
        return True
    if value in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def parse_json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {text!r} ({exc.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


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


@dataclass
class RunConfig:
    """Everything one node (PS or worker) needs; validated in ``__post_init__``."""

    rank: int = 0
    num_ps: int = 1
    num_workers: int = 1
    fw: int = 0
    fps: int = 0
    master: str = "127.0.0.1"
    peers: str | None = None  # JSON directory file written by the launcher
    dataset: str = "mnist"
    data_root: str | None = None
    split: str = "iid"
    batch: int = 32
    model: str = "convnet"
    loss: str = "nll"
    optimizer: str = "sgd"
    opt_args: dict[str, Any] = field(default_factory=lambda: {"lr": 0.1})
    num_iter: int = 100
    gar: str | None = None  # None: median in garfield mode, mda in paper mode
    gar_args: dict[str, Any] = field(default_factory=dict)
    model_gar: str | None = None  # paper mode / override: the rule applied to models
    acc_freq: int = 100
    eval_samples: int = 0  # 0: the whole test set; else a fixed prefix for periodic evaluations
    bench: bool = False
    log: bool = True
    mode: str = "garfield"
    gather_period: int = 1
    seed: int = 0
    metrics: str | None = None
    listen_host: str = "0.0.0.0"
    advertise_host: str | None = None
    port: int | None = None
    secret_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    step_timeout: float = 60.0
    resend_after: float = 2.0
    startup_timeout: float = 120.0
    attack: str | None = None
    attack_args: dict[str, Any] = field(default_factory=dict)
    byzantine: bool = False
    threads: int = 1
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    drop_nonfinite: bool = True
    # paper mode (docs/design.md §3; El-Mhamdi et al., Distributed Computing 35, 2022)
    sync: bool = False
    lipschitz_quantile: float | None = None  # None: (n_ps - fps) / n_ps, the paper's
    lipschitz_warmup: int = 5
    lipschitz_window: int = 20
    outliers_factor: float | None = None  # None: 3T + 2 (T = gather_period), the paper's
    pull_timeout: float = 1.0
    log_diameter: bool = True
    strict_resilience: bool = False

    def __post_init__(self) -> None:
        ints = ("rank", "num_ps", "num_workers", "fw", "fps", "batch", "num_iter", "acc_freq",
                "gather_period", "seed", "threads", "eval_samples", "checkpoint_every",
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
        for name in ("batch", "num_iter", "acc_freq", "gather_period", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.resume and not self.checkpoint_dir:
            raise ConfigError("--resume needs --checkpoint_dir")
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
    def outliers_k(self) -> float:
        """The outliers filter's factor: the paper's 3T + 2 by default (T: gather period)."""
        if self.outliers_factor is not None:
            return self.outliers_factor
        return 3.0 * self.gather_period + 2.0

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
        """Refuse, at start, a GAR that cannot tolerate f Byzantine inputs at the quorum size,
        and in paper mode a deployment outside the paper's resilience conditions."""
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
        gars.check(self.gar, self.q_w, self.fw)
        if self.num_ps > 1:
            gars.check(self.model_rule, self.q_ps, self.fps)

    def secret(self) -> bytes:
        """The cluster secret: --secret_file, $BYZSGD_SECRET_FILE or $BYZSGD_SECRET."""
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
        # Garfield's flags carry no secret: run, but say loudly that anyone can join.
        import logging
        logging.getLogger("byzsgd.config").warning(
            "no cluster secret given ($%s, $%s or --secret_file): using "
            "the public default secret, so anybody who can reach the ports can join; the "
            "launchers generate a real one", SECRET_ENV, SECRET_FILE_ENV)
        return INSECURE_DEFAULT_SECRET

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_arguments(parser: argparse.ArgumentParser, *, role: str | None = None) -> None:
    """Add the trainer flags (Garfield's, then ours) to ``parser``."""
    g = parser.add_argument_group("Garfield trainer.py flags")
    g.add_argument("--master", default="127.0.0.1",
                   help="master (rank 0) address, host or host:port (port default 29500); "
                        "used for the rendezvous when --peers is not given")
    g.add_argument("--rank", type=int, default=None if role is None else 0,
                   help="this node's rank; ranks below --num_ps are parameter servers")
    g.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist, cifar10 or synthetic:CxHxW:K")
    g.add_argument("--batch", type=int, default=32, help="per-worker mini-batch size")
    g.add_argument("--num_ps", type=int, default=1, help="number of parameter servers")
    g.add_argument("--num_workers", type=int, default=1, help="number of workers")
    g.add_argument("--fw", type=int, default=0, help="number of Byzantine workers tolerated")
    g.add_argument("--fps", type=int, default=0, help="number of Byzantine parameter servers tolerated")
    g.add_argument("--model", default="convnet", help="convnet, cifarnet, resnet18 or a torchvision model")
    g.add_argument("--loss", default="nll", help="nll or cross-entropy")
    g.add_argument("--optimizer", default="sgd", help="sgd, adam, adamw, rmsprop, adagrad")
    g.add_argument("--opt_args", type=parse_json_object, default={"lr": "0.1"},
                   help='optimizer arguments as JSON, e.g. \'{"lr":"0.1","momentum":"0.9"}\'')
    g.add_argument("--num_iter", type=int, default=100, help="number of training steps")
    g.add_argument("--gar", default=None,
                   help="aggregation rule of the gradients (default: median; mda in --mode paper)")
    g.add_argument("--acc_freq", type=int, default=100, help="evaluate the test accuracy every N steps")
    g.add_argument("--bench", type=parse_bool, default=False, help="print step timings (true/false)")
    g.add_argument("--log", type=parse_bool, default=True, help="log progress (true/false)")

    o = parser.add_argument_group("byzsgd flags")
    o.add_argument("--mode", choices=MODES, default="garfield",
                   help="garfield: each PS drives its own learning, models gathered every step; "
                        "paper: the full ByzSGD of El-Mhamdi et al.")
    o.add_argument("--gar_args", type=parse_json_object, default={}, help="GAR parameters as JSON")
    o.add_argument("--model_gar", default=None, help="rule for the models (default: --gar)")
    o.add_argument("--gather_period", type=int, default=1, help="paper mode: steps between gathers")
    o.add_argument("--peers", default=None, help="JSON peer directory (written by the launcher)")
    o.add_argument("--data_root", default=None, help="extra dataset directory (torchvision layout)")
    o.add_argument("--split", default="iid", help="iid or dirichlet:<alpha>")
    o.add_argument("--seed", type=int, default=0, help="seed of the model, the shards and the attacks")
    o.add_argument("--eval_samples", type=int, default=0,
                   help="test samples used by periodic evaluations (0: all); the last is always full")
    o.add_argument("--metrics", default=None, help="JSON-lines metrics file (PS)")
    o.add_argument("--listen_host", default="0.0.0.0", help="address to listen on")
    o.add_argument("--advertise_host", default=None, help="address other nodes use to reach this one")
    o.add_argument("--port", type=int, default=None, help="port to listen on (default: directory's)")
    o.add_argument("--secret_file", default=None,
                   help=f"file holding the cluster secret (else ${SECRET_FILE_ENV} or ${SECRET_ENV})")
    o.add_argument("--tls_cert", default=None, help="TLS certificate (PEM); enables TLS")
    o.add_argument("--tls_key", default=None, help="TLS private key (PEM)")
    o.add_argument("--tls_ca", default=None, help="CA bundle used to verify peers' certificates")
    o.add_argument("--step_timeout", type=float, default=60.0,
                   help="seconds a quorum may take before the node reports a stall")
    o.add_argument("--resend_after", type=float, default=2.0,
                   help="seconds after which an unanswered request is sent again")
    o.add_argument("--startup_timeout", type=float, default=120.0,
                   help="seconds to wait for the rendezvous / first connections")
    o.add_argument("--attack", default=None, help="make this node Byzantine with this attack")
    o.add_argument("--attack_args", type=parse_json_object, default={}, help="attack parameters as JSON")
    o.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    o.add_argument("--drop_nonfinite", type=parse_bool, default=True,
                   help="leave gradients/models holding NaN or Inf out of the aggregation, the rule "
                        "then tolerating that many fewer Byzantine rows (false: hand them to the "
                        "rule, to study the rule itself)")
    p = parser.add_argument_group("paper mode (--mode paper)")
    p.add_argument("--sync", type=parse_bool, default=False,
                   help="synchronous variant: a worker pulls one PS's model, checks it with the "
                        "Lipschitz and outliers filters, and pulls the next PS if it fails")
    p.add_argument("--lipschitz_quantile", type=float, default=None,
                   help="--sync: a model passes the Lipschitz filter if its empirical Lipschitz "
                        "coefficient is at most this quantile of the accepted ones "
                        "(default: the paper's (n_ps - fps) / n_ps)")
    p.add_argument("--lipschitz_warmup", type=int, default=5,
                   help="--sync: coefficients observed before the Lipschitz filter rejects")
    p.add_argument("--lipschitz_window", type=int, default=20,
                   help="--sync: the Lipschitz filter's history is the last N coefficients "
                        "(the coefficient drifts as training goes; a short window follows it)")
    p.add_argument("--outliers_factor", type=float, default=None,
                   help="--sync: a model passes the outliers filter if it lies within "
                        "factor * lr * ||update|| of the model the worker expects "
                        "(default: the paper's 3T + 2, T = --gather_period)")
    p.add_argument("--pull_timeout", type=float, default=1.0,
                   help="--sync: seconds a worker waits for a pulled model before the next PS")
    p.add_argument("--log_diameter", type=parse_bool, default=True,
                   help="PSes exchange their models after each gather to log the exact "
                        "diameter after it (one more model per peer and gather)")
    p.add_argument("--strict_resilience", type=parse_bool, default=False,
                   help="also refuse deployments outside the journal theorem's n_ps > 3 fps + 1 "
                        "(n_ps > 3 fps and n_w > 3 fw are always required)")
    o.add_argument("--checkpoint_dir", default=None,
                   help="PS: directory of atomic checkpoints (model, optimizer state, step)")
    o.add_argument("--checkpoint_every", type=int, default=0,
                   help="PS: write a checkpoint every N steps (0: never)")
    o.add_argument("--resume", type=parse_bool, default=False,
                   help="PS: restart from the last checkpoint in --checkpoint_dir (true/false)")


CONFIG_FIELDS = {f for f in RunConfig.__dataclass_fields__}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = {k: v for k, v in vars(args).items() if k in CONFIG_FIELDS and v is not None}
    if values.get("attack"):
        values["byzantine"] = True
    if "rank" not in values:
        raise ConfigError("--rank is required")
    return RunConfig(**values)
