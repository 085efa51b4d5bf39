"""The checks of a run configuration's values, kept apart from its declaration (byzsgd.config).

:func:`check_values` needs nothing but the values and runs at every construction, so a bad
flag is refused where it is parsed; the resilience bounds (:func:`paper_conditions`,
:func:`check_resilience`) need the rules and run in the full validation, once.  Each takes the
configuration as an argument and imports nothing of :mod:`byzsgd.config`: the declaration
depends on its checks, never the reverse.
"""
from __future__ import annotations

from typing import Any

from byzsgd.device import parse_device
from byzsgd.errors import ConfigError

MODES = ("garfield", "paper")


def check_values(cfg: Any) -> None:
    """The checks that need nothing but the values of ``cfg`` (a RunConfig; run at every
    construction); normalises ``gather_period``, ``device`` and the default ``gar``."""
    ints = ("rank", "num_ps", "num_workers", "fw", "fps", "batch", "num_iter", "acc_freq",
            "seed", "threads", "eval_samples", "checkpoint_every",
            "lipschitz_warmup", "lipschitz_window")
    for name in ints:
        if not isinstance(getattr(cfg, name), int) or isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"--{name} must be an integer, got {getattr(cfg, name)!r}")
    if cfg.num_ps < 1:
        raise ConfigError(f"--num_ps must be >= 1, got {cfg.num_ps}")
    if cfg.num_workers < 1:
        raise ConfigError(f"--num_workers must be >= 1, got {cfg.num_workers}")
    if not 0 <= cfg.rank < cfg.world_size:
        raise ConfigError(f"--rank {cfg.rank} out of range for {cfg.num_ps} PS + "
                          f"{cfg.num_workers} workers (0..{cfg.world_size - 1})")
    if not 0 <= cfg.fw < cfg.num_workers:
        raise ConfigError(f"--fw must be in [0, num_workers), got fw={cfg.fw} with "
                          f"num_workers={cfg.num_workers}")
    if not 0 <= cfg.fps < cfg.num_ps:
        raise ConfigError(f"--fps must be in [0, num_ps), got fps={cfg.fps} with "
                          f"num_ps={cfg.num_ps}")
    cfg.gather_period = str(cfg.gather_period).strip().lower()
    if cfg.gather_period != "auto":
        try:
            if int(cfg.gather_period) < 1:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--gather_period must be an integer >= 1 or 'auto', got "
                              f"{cfg.gather_period!r}") from None
        cfg.gather_period = str(int(cfg.gather_period))
    if not cfg.lipschitz_l > 0:
        raise ConfigError(f"--lipschitz_l must be > 0, got {cfg.lipschitz_l}")
    for name in ("batch", "num_iter", "acc_freq", "threads"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.checkpoint_every < 0:
        raise ConfigError(f"--checkpoint_every must be >= 0, got {cfg.checkpoint_every}")
    if cfg.resume and not cfg.checkpoint_dir:
        raise ConfigError("--resume needs --checkpoint_dir")
    if isinstance(cfg.worker_momentum, bool) or not isinstance(cfg.worker_momentum, (int, float)) \
            or not 0.0 <= cfg.worker_momentum < 1.0:
        raise ConfigError(f"--worker_momentum must be in [0, 1), got {cfg.worker_momentum!r}")
    if isinstance(cfg.check_gradients, bool) or not isinstance(cfg.check_gradients, int) \
            or cfg.check_gradients < 0:
        raise ConfigError(f"--check_gradients must be an int >= 0, got {cfg.check_gradients!r}")
    if cfg.check_gradients:
        if cfg.mode != "garfield":
            raise ConfigError("--check_gradients needs --mode garfield: in paper mode a worker's "
                              "gradient is computed on the median of the models it gathered, "
                              "which the PS cannot know")
        if cfg.check_gradients > cfg.num_workers - cfg.fw:
            raise ConfigError(f"--check_gradients {cfg.check_gradients}: at most q_w = "
                              f"{cfg.num_workers - cfg.fw} rows per quorum")
    if not (isinstance(cfg.check_tolerance, (int, float)) and cfg.check_tolerance > 0):
        raise ConfigError(f"--check_tolerance must be > 0, got {cfg.check_tolerance!r}")
    if cfg.wm_rows not in ("quorum", "recent"):
        raise ConfigError(f"--wm_rows must be quorum or recent, got {cfg.wm_rows!r}")
    if isinstance(cfg.wm_staleness, bool) or not isinstance(cfg.wm_staleness, int) \
            or cfg.wm_staleness < 0:
        raise ConfigError(f"--wm_staleness must be an int >= 0, got {cfg.wm_staleness!r}")
    cfg.device = parse_device(cfg.device)
    if cfg.eval_samples < 0:
        raise ConfigError(f"--eval_samples must be >= 0, got {cfg.eval_samples}")
    if cfg.mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.gar is None:
        cfg.gar = "mda" if cfg.mode == "paper" else "median"
    if cfg.sync and cfg.mode != "paper":
        raise ConfigError("--sync is a variant of --mode paper (add --mode paper)")
    if cfg.sync and cfg.optimizer.lower() != "sgd":
        raise ConfigError(f"--sync: the outliers filter models the SGD step (lr, momentum); "
                          f"--optimizer {cfg.optimizer} is not supported with it")
    if cfg.lipschitz_quantile is not None and not 0.0 < cfg.lipschitz_quantile <= 1.0:
        raise ConfigError(f"--lipschitz_quantile must be in (0, 1], got {cfg.lipschitz_quantile}")
    if not 1 <= cfg.lipschitz_warmup <= cfg.lipschitz_window:
        raise ConfigError(f"need 1 <= --lipschitz_warmup <= --lipschitz_window, got "
                          f"{cfg.lipschitz_warmup} and {cfg.lipschitz_window}")
    if cfg.outliers_factor is not None and not cfg.outliers_factor > 0:
        raise ConfigError(f"--outliers_factor must be > 0, got {cfg.outliers_factor}")
    for name in ("step_timeout", "resend_after", "startup_timeout", "pull_timeout"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"--{name} must be > 0, got {getattr(cfg, name)}")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("--tls_cert and --tls_key go together")
    if cfg.credentials and cfg.insecure_shared_secret:
        raise ConfigError("--credentials and --insecure_shared_secret true exclude each other: "
                          "per-rank credentials prove the rank, a shared secret does not")
    if cfg.scheduled_byzantine is not None:
        ranks = cfg.scheduled_ranks  # parsed and checked: worker ranks, distinct, <= q_w
        if cfg.mode != "garfield":
            raise ConfigError("--scheduled_byzantine (the adversarial schedule test harness) is "
                              "implemented for --mode garfield only")
        if cfg.rank in ranks and not cfg.attack:
            raise ConfigError(f"--scheduled_byzantine lists rank {cfg.rank}, which runs no "
                              "--attack: the schedule is for Byzantine workers")


def paper_conditions(cfg: Any) -> dict[str, bool]:
    """The resilience conditions of ByzSGD (paper mode), each with whether it holds.

    ``n_ps > 3 fps`` and ``n_w > 3 fw`` are what the algorithm's parts need: the median
    of q_ps = n_ps - fps models (workers' pull, DMC) has a correct majority only if
    q_ps > 2 fps, and MDA over q_w = n_w - fw gradients needs q_w > 2 fw.  The journal
    version's theorem states ``n_ps > 3 fps + 1`` (its proof of DMC's contraction uses
    the extra server); 4 PS with fps = 1 meets the first and not the second."""
    return {"n_ps > 3 fps": cfg.num_ps > 3 * cfg.fps,
            "n_w > 3 fw": cfg.num_workers > 3 * cfg.fw,
            "n_ps > 3 fps + 1 (journal theorem)": cfg.num_ps > 3 * cfg.fps + 1 or cfg.fps == 0}

def check_resilience(cfg: Any) -> None:
    """Refuse, at start, a GAR (after its --pre_agg / --model_pre_agg pipeline: every stage
    and the rule, each at what the stages before it output) that cannot tolerate fw of q_w
    gradients / fps of q_ps models, and in paper mode a deployment outside the paper's
    resilience conditions."""
    from byzsgd import gars  # late: config must not drag the GARs into --help

    if cfg.mode == "paper":
        conds = paper_conditions(cfg)
        required = ["n_ps > 3 fps", "n_w > 3 fw"]
        if cfg.strict_resilience:
            required.append("n_ps > 3 fps + 1 (journal theorem)")
        broken = [c for c in required if not conds[c]]
        if broken:
            raise ConfigError(
                f"paper mode needs {' and '.join(broken)} (El-Mhamdi et al., ByzSGD), got "
                f"n_ps={cfg.num_ps} fps={cfg.fps}, n_w={cfg.num_workers} fw={cfg.fw}")
    from byzsgd.gars.pipeline import Pipeline

    Pipeline.parse(cfg.pre_agg).check(cfg.gar, cfg.q_w, cfg.fw)
    if cfg.num_ps > 1:
        Pipeline.parse(cfg.model_pre_agg).check(cfg.model_rule, cfg.q_ps, cfg.fps)
