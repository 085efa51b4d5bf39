"""Checks made once, before any node starts: a run that cannot work fails in one line, exit 2.

Without them a missing dataset or an unparsable ``--opt_args`` value surfaced only after every
node had started (and four ``final accuracy n/a`` lines), a port in use as a raw traceback in
a node's log, and credentials of another deployment as ``directory incomplete after 20.0s``
with the cause in WARNING lines.  What is checked:

- the data: the dataset loads (train and test, as the nodes load it) and the model accepts
  its inputs (one forward pass of two samples) and the loss its outputs;
- the optimizer: ``--optimizer`` and every ``--opt_args`` key and value parse, and torch
  accepts them (its own range checks: ``lr`` < 0 ...), as the PS builds them;
- the credentials (a trainer): the file is this rank's, of this world size, and of the same
  deployment as the other ranks' files beside it (their headers only: never their keys);
- the ports: each port a node of this machine will listen on can be bound now.

Used by the launcher (:func:`check_launch`, before :func:`byzsgd.deploy.local.plan` creates the
run directory), the Garfield trainer (:func:`check_node`) and ``scripts/run_exp.sh``
(``python -m byzsgd.deploy.preflight run_exp ARGS``, before the cluster launcher: the hosts'
runner, and the checks that can be made here).
"""
from __future__ import annotations

import errno
import ipaddress
import os
import re
import socket
import sys
from pathlib import Path

from byzsgd.config import RunConfig, parse_host_port
from byzsgd.errors import ConfigError

__all__ = ["PreflightError", "check_data", "check_optimizer", "check_credentials", "check_port",
           "check_node", "check_launch", "is_this_machine", "run_exp", "main"]


class PreflightError(ConfigError):
    """A run that cannot work, found before any node started (one line: the cause)."""


# ----------------------------------------------------------------------------- data and model
def check_data(cfg: RunConfig, splits: tuple[bool, ...] = (True, False)) -> None:
    """The dataset is there (``splits``, train True / test False: a deployment's nodes load
    both, a PS only the test split, a worker only the train split), the model takes its inputs
    and the loss its outputs.  Imports torch."""
    import torch

    from byzsgd.learning import data, losses, models

    try:
        train = [data.load_dataset(cfg.dataset, train=t, root=cfg.data_root) for t in splits][0]
    except ConfigError as exc:
        raise PreflightError(f"--dataset {cfg.dataset}: {_one_line(exc)}") from None
    try:
        model = models.build_model(cfg.model, dataset_info=train, seed=cfg.seed)
    except ConfigError as exc:
        raise PreflightError(f"--model {cfg.model}: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - a factory refusing the shape (torchvision's own checks)
        raise PreflightError(f"--model {cfg.model} cannot be built for --dataset {cfg.dataset} "
                             f"(inputs {tuple(train.input_shape)}, {train.num_classes} classes): "
                             f"{_one_line(exc)}") from None
    n = min(2, len(train))
    inputs = train.take(torch.arange(n))
    labels = train.labels[:n]
    try:
        with torch.no_grad():
            model.eval()  # BatchNorm on two samples: no statistics needed to check the shapes
            out = model(inputs)
            losses.build_loss(cfg.loss)(out, labels)
    except Exception as exc:  # noqa: BLE001 - shape mismatches are RuntimeErrors of any layer
        raise PreflightError(f"--model {cfg.model} does not accept --dataset {cfg.dataset} "
                             f"(inputs {tuple(train.input_shape)}, {train.num_classes} classes): "
                             f"{_one_line(exc)}") from None


def check_optimizer(cfg: RunConfig) -> None:
    """``--optimizer`` and ``--opt_args`` as the PS builds them (keys, values, torch's ranges)."""
    from byzsgd.gars.worker_momentum import optimizer_args
    from byzsgd.learning import optim as training

    try:
        training.check_optimizer_args(cfg.optimizer, optimizer_args(cfg.worker_momentum, cfg.opt_args))
    except ConfigError as exc:
        raise PreflightError(f"--optimizer {cfg.optimizer} --opt_args "
                             f"'{_json(cfg.opt_args)}': {_one_line(exc)}") from None


def _json(value) -> str:
    import json

    return value if isinstance(value, str) else json.dumps(value)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 400 else text[:397] + "..."


# ----------------------------------------------------------------------------- credentials
_HEADER = re.compile(rb'"(rank|world_size|deployment)"\s*:\s*("?)([0-9A-Za-z_-]{1,64})\2')


def credentials_header(path: str | os.PathLike) -> dict:
    """``rank``, ``world_size`` and ``deployment`` of a credentials file, read from its header
    only: reading stops at ``"keys"`` (the writer puts them last), so another rank's keys
    never enter this process.  {} when the file cannot be read or holds no such header."""
    head = b""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return {}
    try:
        while b'"keys"' not in head and len(head) < 512:
            chunk = os.read(fd, 8)
            if not chunk:
                break
            head += chunk
    finally:
        os.close(fd)
    head = head.split(b'"keys"')[0]
    out = {}
    for key, _, value in _HEADER.findall(head):
        text = value.decode()
        out[key.decode()] = int(text) if key != b"deployment" and text.isdigit() else text
    return out


def check_credentials(cfg: RunConfig) -> None:
    """The node's credentials are this rank's and this world's (loaded as the node loads
    them), and of the same deployment as the other ranks' files in the same directory: a file
    left from an earlier provisioning would otherwise fail every handshake, seen only as a
    rendezvous timeout."""
    if cfg.insecure_shared_secret:
        return
    path = cfg.credentials_path()
    if not path:
        cfg.identity()  # its own ConfigError: no credentials, and how to get some
        return
    from byzsgd.net.credentials import RankCredentials

    try:
        own = RankCredentials.load(path, rank=cfg.rank, world_size=cfg.world_size)
    except ConfigError as exc:
        raise PreflightError(_one_line(exc)) from None
    others: dict[str, list[str]] = {}
    for sibling in sorted(Path(path).parent.glob("rank*.cred")):
        if sibling.resolve() == Path(path).resolve():
            continue
        head = credentials_header(sibling)
        if head.get("world_size") == cfg.world_size and "deployment" in head:
            others.setdefault(head["deployment"], []).append(sibling.name)
    foreign = {d: names for d, names in others.items() if d != own.deployment}
    if foreign:
        ours = len(others.get(own.deployment, []))
        names = sorted(n for ns in foreign.values() for n in ns)
        raise PreflightError(
            f"credentials {path} (rank {cfg.rank}) are of deployment {own.deployment}, but "
            f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''} beside it "
            f"{'are' if len(names) > 1 else 'is'} of deployment {', '.join(sorted(foreign))} "
            f"({ours} other file(s) of {own.deployment}): the files come from different "
            f"provisionings and will refuse each other's handshakes; provision them again, once, "
            f"for all {cfg.world_size} ranks")


# ----------------------------------------------------------------------------- ports and hosts
def check_port(host: str, port: int, what: str) -> None:
    """``port`` can be bound on ``host`` now (as the node will, SO_REUSEADDR on)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PreflightError(f"{what}: port {port} on {host} is in use (another run, or "
                                     f"another program: `ss -ltnp 'sport = :{port}'` shows "
                                     f"which)") from None
            raise PreflightError(f"{what}: cannot listen on {host}:{port}: "
                                 f"{exc.strerror or exc}") from None


def _addresses(host: str) -> set[str]:
    try:
        return {info[4][0] for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, UnicodeError):
        return set()


def is_this_machine(host: str) -> bool:
    """Whether ``host`` (``user@`` allowed) names this machine: a loopback address,
    ``localhost``, this machine's name, or a name/address this machine can listen on."""
    name = host.rpartition("@")[2].strip("[]")
    if not name:
        return False
    if name.lower() in ("localhost", socket.gethostname().lower(), socket.getfqdn().lower()):
        return True
    addrs = _addresses(name)
    if not addrs:
        return False
    for addr in addrs:
        try:
            ip = ipaddress.ip_address(addr.split("%")[0])
        except ValueError:
            return False
        if ip.is_loopback:
            continue
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((addr, 0))  # only an address of one of this machine's interfaces binds
            except OSError:
                return False
    return True


# ----------------------------------------------------------------------------- entry points
def check_node(cfg: RunConfig) -> None:
    """A trainer's checks, before it opens any socket: configuration, optimizer,
    credentials, its listening port, its data and model."""
    try:
        cfg.validate()
    except ConfigError as exc:
        raise PreflightError(_one_line(exc)) from None
    check_optimizer(cfg)
    check_credentials(cfg)
    port = _listen_port(cfg)
    if port:
        check_port(cfg.listen_host, port, f"rank {cfg.rank}")
    check_data(cfg, (cfg.role != "ps",))  # the split this node loads anyway (a PS: the test set)


def _listen_port(cfg: RunConfig) -> int | None:
    """The fixed port this node will listen on (None: one the kernel picks, or --peers')."""
    if cfg.port is not None:
        return cfg.port or None
    if cfg.peers:
        return None  # the directory's; the launcher that wrote it picked it free
    return parse_host_port(cfg.master)[1] if cfg.rank == 0 else None


def check_launch(lc) -> None:
    """The one-machine launcher's checks (a :class:`~byzsgd.deploy.options.LaunchConfig`),
    before its run directory exists: the configuration (what every node would refuse), the
    optimizer, the loopback address, then the data and model, in a forked child when the nodes
    will be forked (the launcher keeps no decoded dataset nor torch thread pool)."""
    lc.validate()
    cfg = lc.run
    check_optimizer(cfg)
    check_port(lc.host, 0, f"--host {lc.host}")
    _in_child(check_data, cfg, fork=lc.spawn == "fork")


def _in_child(fn, cfg, *, fork: bool) -> None:
    """``fn(cfg)`` in a forked child (its PreflightError's line comes back through a pipe),
    or here when not forking."""
    if not fork or not hasattr(os, "fork"):
        fn(cfg)
        return
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's side (its exit code and pipe are checked)
        code = 0
        try:
            os.close(read_fd)
            fn(cfg)
        except PreflightError as exc:
            os.write(write_fd, str(exc).encode()[:4000])
            code = 2
        except BaseException as exc:  # noqa: BLE001 - reported by the parent, one line
            os.write(write_fd, f"check failed: {type(exc).__name__}: {_one_line(exc)}".encode()[:4000])
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        message = fh.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise PreflightError(message or f"the data check died ({os.waitstatus_to_exitcode(status)})")


def run_exp(argv: list[str]) -> str:
    """``scripts/run_exp.sh``'s checks (the arguments of ``cluster run``).  Returns the runner
    to use: ``local`` when neither ``--runner`` nor ``$BYZSGD_RUNNER`` is given and every host
    is this machine, else "" (the cluster launcher's own choice).  Raises PreflightError for
    a run that cannot start here; argument errors are left to the cluster launcher."""
    from byzsgd.deploy.cluster_args import build_parser

    if any(a in ("-h", "--help") for a in argv):
        return ""
    try:
        args = build_parser().parse_args(["run", *argv])
    except SystemExit:
        return ""  # the cluster launcher says what is wrong with its arguments
    if args.trainer_flags and args.trainer_flags[0] == "--":
        args.trainer_flags = args.trainer_flags[1:]
    return check_run(args)


def check_run(args) -> str:
    """:func:`run_exp` on ``cluster run``'s parsed arguments (``trainer_flags`` without a
    leading ``--``): what ``cluster run --preflight`` calls, in the launcher's own process."""
    from byzsgd.deploy import plan

    servers, workers = plan.read_hosts(args.servers), plan.read_hosts(args.workers)
    ranks = servers + workers
    runner = args.runner if args.runner is not None else os.environ.get(plan.RUNNER_ENV)
    chosen = ""
    if runner is None:  # the default, ssh: hosts that are this machine need no ssh server
        local = {name: is_this_machine(name) for name in {h.name for h in ranks}}
        mine = [local[h.name] for h in ranks]
        if mine and all(mine):
            chosen = runner = "local"
            print("byzsgd.cluster: every host is this machine: runner local (set BYZSGD_RUNNER or "
                  "--runner to use ssh anyway)", file=sys.stderr)
        elif any(mine):
            print(f"byzsgd.cluster: hint: {', '.join(sorted(n for n, m in local.items() if m))} "
                  f"is this machine, reached over ssh here; without an ssh server on it, "
                  f"BYZSGD_RUNNER=local runs a deployment whose hosts are all this machine",
                  file=sys.stderr)
    else:  # a runner given: its hosts are this machine only when it is the local one
        mine = [runner.strip() in ("", "local")] * len(ranks)
    if args.dry_run:
        return chosen
    flags = plan.read_config(args.config or plan.default_config(args.servers)) + list(args.trainer_flags)
    try:
        cfg = plan.check_flags(plan.without_tls(flags), len(servers), len(workers))
    except ConfigError:
        return chosen  # the cluster launcher reports the bad flags itself
    try:
        import torch  # noqa: F401
    except ImportError:  # a launching machine without torch: the nodes check themselves
        return chosen
    check_optimizer(cfg)
    for rank, (host, here) in enumerate(zip(ranks, mine)):
        if here and (rank == 0 or args.ports == "fixed"):
            check_port(host.listen, args.base_port + rank, f"rank {rank} ({host.name}, --base_port "
                       f"{args.base_port} + {rank})")
    if mine and all(mine):  # the data the nodes will read is this machine's
        check_data(cfg)
    return chosen


def main(argv: list[str] | None = None) -> int:
    """``python -m byzsgd.deploy.preflight run_exp ARGS``: prints the runner to use (or
    nothing); one line on stderr and exit 2 for a run that cannot start."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "run_exp":
        print("usage: python -m byzsgd.deploy.preflight run_exp [cluster run arguments]", file=sys.stderr)
        return 2
    try:
        runner = run_exp(argv[1:])
    except ConfigError as exc:
        print(f"byzsgd.cluster: error: {exc}", file=sys.stderr)
        return 2
    if runner:
        print(runner)
    return 0


if __name__ == "__main__":
    sys.exit(main())
