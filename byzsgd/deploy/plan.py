"""The plan of a multi-host deployment: hosts files, trainer flags, ranks, ports, directories.

``make_plan`` turns ``run``'s arguments (the ``servers`` / ``workers`` hosts files, the config
file of trainer flags, TLS files, ports, runner) into a :class:`Plan`: one :class:`Rank` per
line of the hosts files, each with its host, port, run directory on the host and its
configuration: the trainer flags' shared :class:`~byzsgd.config.RunConfig` with the per-rank
fields (those declared ``scope=PER_RANK``) filled in.  That configuration is what a host
receives, as JSON (:meth:`RunConfig.to_json`), and its node loads
(:mod:`byzsgd.deploy.shipped`): no argv is rebuilt on the way.  Nothing is started here
(:mod:`byzsgd.deploy.cluster` does; the per-host shell scripts are
:mod:`byzsgd.deploy.host_scripts`, which read a plan: this module imports none of them).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from byzsgd.config import RunConfig
from byzsgd import rundir
from byzsgd.errors import ConfigError
from byzsgd.flags import PER_RANK, scoped, split_argv
from byzsgd.net.credentials import credentials_path

DEFAULT_RUNNER = "ssh -o BatchMode=yes"
RUNNER_ENV = "BYZSGD_RUNNER"
#: the trainer flags ``run`` reads when --config is not given: this file beside --servers
DEFAULT_CONFIG = "exp.conf"
HOST_KEYS = ("addr", "python", "repo", "dir", "listen")
#: trainer flags the deployment sets per rank (declared so): refused in the config
OWNED_FLAGS = scoped(RunConfig, PER_RANK)
TLS_FLAGS = ("tls_cert", "tls_key", "tls_ca")
#: what a host runs per rank, followed by the rank's configuration file
NODE_COMMAND = ("-m", "byzsgd.deploy.shipped")
#: what a host runs once, under ``--spawn fork``, to fork its ranks (byzsgd.deploy.fork_server)
FORK_SERVER_COMMAND = ("-m", "byzsgd.deploy.fork_server")
#: ``--spawn``: how a host starts its ranks (named as byzsgd-launch's option)
SPAWN_CHOICES = ("fork", "exec")
DEFAULT_SPAWN = "fork"


# ----------------------------------------------------------------------------- parsing
@dataclass
class Host:
    name: str
    addr: str
    python: str | None = None
    repo: str | None = None
    dir: str | None = None
    listen: str = "0.0.0.0"
    line: str = ""



def without_tls(flags: list[str]) -> list[str]:
    """Trainer flags minus the TLS files (``--tls_cert x`` or ``--tls_cert=x``): the cluster
    launcher ships those files itself."""
    kept, i = [], 0
    while i < len(flags):
        name = flags[i][2:].partition("=")[0] if flags[i].startswith("--") else None
        if name in TLS_FLAGS:
            i += 1 if "=" in flags[i] else 2
            continue
        kept.append(flags[i])
        i += 1
    return kept

def parse_hosts(text: str, source: str = "hosts") -> list[Host]:
    """One rank per non-empty line: ``HOST [key=value ...]``; ``#`` comments."""
    hosts = []
    for number, raw in enumerate(text.splitlines(), 1):
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as exc:
            raise ConfigError(f"{source}:{number}: {exc}") from None
        if not words:
            continue
        name, opts = words[0], {}
        if "=" in name:
            raise ConfigError(f"{source}:{number}: a line starts with the host, got {name!r}")
        for word in words[1:]:
            key, sep, value = word.partition("=")
            if not sep or key not in HOST_KEYS:
                raise ConfigError(f"{source}:{number}: unknown setting {word!r} (known: "
                                  f"{', '.join(k + '=' for k in HOST_KEYS)})")
            if not value:
                raise ConfigError(f"{source}:{number}: empty {key}=")
            opts[key] = value
        addr = opts.pop("addr", name.rpartition("@")[2])
        hosts.append(Host(name=name, addr=addr, line=raw.strip(), **opts))
    return hosts


def read_hosts(path: str | os.PathLike) -> list[Host]:
    if not Path(path).exists():
        raise ConfigError(f"no hosts file {Path(path).resolve()}: write one host per line (the "
                          f"first server is the master; see scripts/servers.example), or name "
                          f"it with --servers / --workers")
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the hosts file {path}: {exc}") from None
    hosts = parse_hosts(text, str(path))
    if not hosts:
        raise ConfigError(f"the hosts file {path} lists no host")
    return hosts


def read_config(path: str | os.PathLike | None) -> list[str]:
    """Trainer flags of a config file: shell words (quotes, ``#`` comments), any layout."""
    if not path:
        return []
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc}") from None
    try:
        return shlex.split(text, comments=True)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def default_config(servers: str | os.PathLike) -> Path | None:
    """The config file used when --config is not given: ``exp.conf`` beside the servers file
    (Garfield kept its trainer parameters in run_exp.sh, run from that directory)."""
    path = Path(servers).resolve().parent / DEFAULT_CONFIG
    return path if path.is_file() else None


#: ``--name value`` pairs of an argv (see byzsgd.flags.split_argv)
split_flags = split_argv


def runs_on_this_machine(runner: str) -> bool:
    """Runners whose "hosts" are this machine (plain local, network namespaces): there the
    default interpreter is the one running the launcher, whatever environment it lives in."""
    words = " ".join(shlex.split(runner))
    return words in ("", "local") or words.startswith("ip netns exec")


def default_python(runner: str) -> str | None:
    """The interpreter a host runs when neither its ``python=`` nor ``--python`` says:
    this very interpreter where the hosts are this machine, else None (the host picks
    ``$REPO/.venv/bin/python``, else ``python3``)."""
    return sys.executable if runs_on_this_machine(runner) else None


# ----------------------------------------------------------------------------- the plan
@dataclass
class Rank:
    rank: int
    role: str
    host: Host
    port: int | None
    dir: str
    config: RunConfig | None = None  # what the rank runs: shipped to its host as JSON
    pid: int | None = None
    pgid: int | None = None

    @property
    def stem(self) -> str:
        return f"{self.role}{self.rank}"

    def remote(self, suffix: str) -> str:
        return f"{self.dir}/{self.stem}{suffix}"

    @property
    def remote_config(self) -> str:
        """Where the rank's configuration (JSON) is written on its host."""
        return self.remote(".config.json")

    @property
    def remote_metrics(self) -> str | None:
        return f"{self.dir}/metrics-{self.stem}.jsonl" if self.role == "ps" else None


@dataclass
class Plan:
    run_dir: Path
    run_id: str
    runner: str
    base_port: int
    ports: str
    num_ps: int
    num_workers: int
    flags: list[str]
    ranks: list[Rank]
    tls: dict[str, str]
    secret_file: Path | None  # --insecure_shared_secret only
    started: float = 0.0
    shared: dict[str, bool] = field(default_factory=dict)  # host -> run dir shared with us
    spawn: str = DEFAULT_SPAWN  # fork: one fork server per (Linux) host; exec: one interpreter a rank
    servers: dict[str, int] = field(default_factory=dict)  # host -> its fork server's pid

    @property
    def master(self) -> str:
        addr = self.ranks[0].host.addr
        return f"[{addr}]:{self.base_port}" if ":" in addr else f"{addr}:{self.base_port}"

    def hosts(self) -> dict[str, list[Rank]]:
        """Ranks grouped by (runner host, run directory), in rank order."""
        out: dict[str, list[Rank]] = {}
        for r in self.ranks:
            out.setdefault(r.host.name, []).append(r)
        return out

    @property
    def insecure(self) -> bool:
        return self.secret_file is not None

    def cred_dir(self, r: Rank) -> str:
        """Where rank ``r``'s credentials file goes on its host."""
        return f"{r.dir}/{rundir.CREDENTIALS}"

    def local(self, r: Rank, what: str) -> Path:
        return rundir.rank_file(self.run_dir, r.role, r.rank, what)

    def describe(self) -> dict:
        ranks = []
        for r in self.ranks:
            ranks.append(dict(
                rank=r.rank, role=r.role, host=r.host.name, addr=r.host.addr, port=r.port,
                pid=r.pid, pgid=r.pgid, byzantine=False, attack=None, attack_args={},
                log=str(self.local(r, "log")),
                metrics=str(self.local(r, "metrics")) if r.role == "ps" else None,
                remote_dir=r.dir, remote_log=r.remote(".log"), remote_metrics=r.remote_metrics,
                python=r.host.python, repo=r.host.repo, config=r.remote_config,
                cmd=[r.host.python or "<repo>/.venv/bin/python|python3", *NODE_COMMAND, r.remote_config]))
        return dict(num_ps=self.num_ps, num_workers=self.num_workers, kind="multihost",
                    run_dir=str(self.run_dir), run_id=self.run_id, runner=self.runner,
                    master=self.master, base_port=self.base_port, ports=self.ports,
                    launcher_pid=os.getpid(), started=self.started,
                    credentials=None if self.insecure else "per host: <dir>/credentials",
                    secret_file=str(self.secret_file) if self.insecure else None, flags=self.flags,
                    tls=bool(self.tls), shared_dirs=self.shared, spawn=self.spawn,
                    fork_servers=self.servers, byzantine_ranks=[], ranks=ranks)

    def write_description(self) -> Path:
        return rundir.write_deployment(self.run_dir, self.describe())


def check_flags(flags: list[str], num_ps: int | None = None, num_workers: int | None = None) -> RunConfig:
    """Refuse flags the deployment owns; parse and validate the rest (the trainer's flags)
    into the configuration every rank shares (rank 0's; the per-rank fields are filled per
    rank).  ``num_ps`` / ``num_workers``: the hosts files' counts, which the flags must match."""
    given = split_argv(flags)
    for name in OWNED_FLAGS:
        if name in given:
            raise ConfigError(f"--{name} is set per rank by the deployment; remove it from the "
                              f"config / command line")
    counts: list[str] = []
    for name, count, what in (("num_ps", num_ps, "servers"), ("num_workers", num_workers, "workers")):
        if count is None:
            continue
        if name in given and given[name] != str(count):
            raise ConfigError(f"--{name} {given[name]} but the {what} file lists {count} "
                              f"rank{'s' if count != 1 else ''}")
        counts += [f"--{name}", str(count)]
    try:
        cfg = RunConfig.from_argv(list(flags) + ["--rank", "0", *counts],
                                  prog="python -m byzsgd.trainer")
    except ConfigError as exc:
        raise ConfigError(f"bad trainer flags {' '.join(flags)!r}: {exc}") from None
    try:
        import torch  # noqa: F401  (the GAR check needs it; the launching machine may lack it)
    except ImportError:
        return cfg
    cfg.validate()
    return cfg


def make_plan(args: argparse.Namespace) -> Plan:
    servers = read_hosts(args.servers)
    workers = read_hosts(args.workers)
    flags = read_config(args.config or default_config(args.servers)) + list(args.trainer_flags)
    # TLS files given as trainer flags are local files shipped like the secret.
    given = split_flags(flags)
    tls = {k: getattr(args, k) for k in TLS_FLAGS if getattr(args, k, None)}
    for k in TLS_FLAGS:
        if k in given:
            tls.setdefault(k, given[k])
    flags = without_tls(flags)
    if bool(tls.get("tls_cert")) != bool(tls.get("tls_key")):
        raise ConfigError("--tls_cert and --tls_key go together")
    for k, path in tls.items():
        if not Path(path).is_file():
            raise ConfigError(f"--{k} {path}: no such file")
    shared = check_flags(flags, len(servers), len(workers))
    if args.ports not in ("fixed", "ephemeral"):
        raise ConfigError(f"--ports must be fixed or ephemeral, got {args.ports!r}")
    spawn = getattr(args, "spawn", None) or DEFAULT_SPAWN
    if spawn not in SPAWN_CHOICES:
        raise ConfigError(f"--spawn must be {' or '.join(SPAWN_CHOICES)}, got {spawn!r}")
    world = len(servers) + len(workers)
    if not 1 <= args.base_port <= 65535 - (world if args.ports == "fixed" else 0):
        raise ConfigError(f"--base_port {args.base_port}: ports up to base_port + {world - 1} must exist")
    run_dir = Path(args.run_dir or Path("runs") / time.strftime("multihost-%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    if rundir.deployment_path(run_dir).exists() and not args.force:
        raise ConfigError(f"{run_dir} already holds a deployment (deployment.json); pick another "
                          f"--run_dir, or --force")
    runner = args.runner if args.runner is not None else os.environ.get(RUNNER_ENV, DEFAULT_RUNNER)
    if shared.insecure_shared_secret:
        secret_file = Path(args.secret_file or os.environ.get("BYZSGD_SECRET_FILE") or run_dir / rundir.SECRET)
    elif args.secret_file:
        raise ConfigError("--secret_file is for --insecure_shared_secret true only: by default each "
                          "rank gets its own credentials, provisioned from a fresh operator secret")
    else:
        secret_file = None
    plan = Plan(run_dir=run_dir, run_id=f"{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(4)}",
                runner=runner, base_port=args.base_port, ports=args.ports, num_ps=len(servers),
                num_workers=len(workers), flags=flags, ranks=[], tls=tls, secret_file=secret_file,
                spawn=spawn)
    for rank, host in enumerate(servers + workers):
        host.repo = host.repo or args.repo
        host.python = host.python or args.python or default_python(runner)
        role = "ps" if rank < len(servers) else "worker"
        port = args.base_port + rank if (args.ports == "fixed" or rank == 0) else None
        r = Rank(rank, role, host, port, (host.dir or args.remote_dir or str(run_dir)).rstrip("/") or "/")
        plan.ranks.append(r)
    for r in plan.ranks:  # each rank's configuration: shipped as JSON to its host
        own = dict(rank=r.rank, master=plan.master, port=r.port or 0, listen_host=r.host.listen,
                   advertise_host=r.host.addr, metrics=r.remote_metrics,
                   secret_file=f"{r.dir}/{rundir.SECRET}" if plan.insecure else None,
                   credentials=None if plan.insecure else str(credentials_path(plan.cred_dir(r), r.rank)),
                   **{k: f"{r.dir}/{k.replace('_', '-')}.pem" if k in tls else None for k in TLS_FLAGS})
        r.config = dataclasses.replace(shared, **own)
    return plan
