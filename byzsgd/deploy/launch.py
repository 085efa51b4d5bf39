"""One-machine launcher: a whole ByzSGD deployment on loopback — ``python -m byzsgd.launch``.

Every PS and worker is a separate process; ports are picked free, a cluster secret is
generated (handed over in a 0600 file, never on a command line), and the run directory
holds each node's log and metrics plus ``deployment.json``: each rank's role, host:port,
pid, Byzantine or not, log and metrics paths — what the fault-injection scripts and the
experiment harness read.  Progress (step, loss, accuracy) is read from the PSes' metrics
files; children are cleaned up on Ctrl-C or when a correct node fails.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byzsgd.config import (SECRET_FILE_ENV, RunConfig, add_arguments, config_from_args, parse_json_object)
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.metrics import gather_diameters, read_metrics
from byzsgd.deploy.spawn import FORK_AVAILABLE, fork_node, preload_roles

#: flags forwarded verbatim from the launcher to every node
FORWARDED = ("dataset", "batch", "num_ps", "num_workers", "fw", "fps", "model", "loss", "optimizer",
             "opt_args", "num_iter", "gar", "gar_args", "model_gar", "acc_freq", "bench", "log",
             "mode", "gather_period", "data_root", "split", "seed", "eval_samples", "step_timeout",
             "resend_after", "startup_timeout", "threads", "checkpoint_dir", "checkpoint_every", "resume", "drop_nonfinite",
             "sync", "lipschitz_quantile", "lipschitz_warmup", "lipschitz_window", "outliers_factor", "pull_timeout",
             "log_diameter", "strict_resilience")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free right now (all bound at once, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


@dataclass
class NodeProcess:
    rank: int
    role: str
    port: int
    byzantine: bool
    attack: str | None
    attack_args: dict
    log_path: Path
    metrics_path: Path | None
    cmd: list[str]
    proc: subprocess.Popen | None = None
    progress: dict = field(default_factory=lambda: {"offset": 0, "last": None, "acc": None, "done": None})
    returncode: int | None = None

    def describe(self, host: str) -> dict:
        return dict(rank=self.rank, role=self.role, host=host, port=self.port,
                    pid=self.proc.pid if self.proc else None, byzantine=self.byzantine,
                    attack=self.attack, attack_args=self.attack_args, log=str(self.log_path),
                    metrics=str(self.metrics_path) if self.metrics_path else None,
                    cmd=self.cmd)


@dataclass
class Deployment:
    cfg: RunConfig
    run_dir: Path
    host: str
    nodes: list[NodeProcess] = field(default_factory=list)
    started: float = 0.0

    @property
    def correct_ps(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.role == "ps" and not n.byzantine]

    @property
    def correct(self) -> list[NodeProcess]:
        return [n for n in self.nodes if not n.byzantine]

    def write_description(self) -> Path:
        doc = dict(num_ps=self.cfg.num_ps, num_workers=self.cfg.num_workers, host=self.host,
                   run_dir=str(self.run_dir), launcher_pid=os.getpid(), started=self.started,
                   secret_file=str(self.run_dir / "secret"),
                   config={k: getattr(self.cfg, k) for k in FORWARDED},
                   byzantine_ranks=[n.rank for n in self.nodes if n.byzantine],
                   ranks=[n.describe(self.host) for n in self.nodes])
        restarted = read_faults(self.run_dir)[1]
        for r in doc["ranks"]:  # a node restarted by scripts/fault.py runs under a new pid
            r["pid"] = restarted.get(r["rank"], r["pid"])
        path = self.run_dir / "deployment.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
        return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m byzsgd.launch",
        description="Start a whole ByzSGD deployment on this machine (loopback): every PS and "
                    "worker a process. Default: MNIST convnet, 4 PS (fps=1), 7 workers (fw=1), median, "
                    "batch 48, SGD lr 0.05 momentum 0.9, 1,000 steps.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p, role="launch")
    # The main job: >= 97% MNIST accuracy on every PS within 1,000 steps (measured 97.7%).
    p.set_defaults(num_ps=4, num_workers=7, fw=1, fps=1, num_iter=1000, acc_freq=100,
                   batch=48, opt_args={"lr": "0.05", "momentum": "0.9"}, rank=0, eval_samples=2000,
                   log=False)
    d = p.add_argument_group("deployment")
    d.add_argument("--run_dir", default=None, help="run directory (default: runs/<date>-<time>)")
    d.add_argument("--host", default="127.0.0.1", help="loopback address the nodes use")
    d.add_argument("--byz_workers", type=int, default=0, help="how many workers are Byzantine")
    d.add_argument("--worker_attack", default=None, help="attack of the Byzantine workers")
    d.add_argument("--worker_attack_args", type=parse_json_object, default={},
                   help="JSON parameters of the worker attack")
    d.add_argument("--byz_ps", type=int, default=0, help="how many parameter servers are Byzantine")
    d.add_argument("--ps_attack", default=None, help="attack of the Byzantine parameter servers")
    d.add_argument("--ps_attack_args", type=parse_json_object, default={},
                   help="JSON parameters of the PS attack")
    d.add_argument("--timeout", type=float, default=0, help="kill the deployment after N s (0: never)")
    d.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument("--node_log", action="store_true", help="nodes log at INFO level")
    d.add_argument("--spawn", choices=("fork", "exec"), default="fork" if FORK_AVAILABLE else "exec",
                   help="fork: nodes are forked from the launcher after one import of torch "
                        "(fast start); exec: each node a fresh interpreter")
    return p


def plan(args: argparse.Namespace) -> Deployment:
    """Validate the configuration and lay out the ranks, ports and files (nothing started)."""
    cfg = config_from_args(args)
    cfg.check_resilience()
    if not 0 <= args.byz_workers <= cfg.num_workers:
        raise ConfigError(f"--byz_workers must be in [0, {cfg.num_workers}]")
    if not 0 <= args.byz_ps < cfg.num_ps:
        raise ConfigError(f"--byz_ps must be in [0, {cfg.num_ps})")
    if args.byz_workers and not args.worker_attack:
        raise ConfigError("--byz_workers needs --worker_attack")
    if args.byz_ps and not args.ps_attack:
        raise ConfigError("--byz_ps needs --ps_attack")
    if args.worker_attack:
        from byzsgd.roles.byzantine import worker_attack_names
        if args.worker_attack not in worker_attack_names():
            raise ConfigError(f"unknown worker attack {args.worker_attack!r}; known: "
                              f"{', '.join(worker_attack_names())}")
    if args.ps_attack:
        from byzsgd.roles.byzantine import PS_ATTACKS
        if args.ps_attack not in PS_ATTACKS:
            raise ConfigError(f"unknown PS attack {args.ps_attack!r}; known: {', '.join(PS_ATTACKS)}")
    run_dir = Path(args.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    dep = Deployment(cfg, run_dir, args.host)
    ports = free_ports(cfg.world_size, args.host)
    # The last ranks of each role are the Byzantine ones.
    byz_ps = set(range(cfg.num_ps - args.byz_ps, cfg.num_ps))
    byz_w = set(range(cfg.world_size - args.byz_workers, cfg.world_size))
    base = [sys.executable, "-m"]
    for rank in range(cfg.world_size):
        is_ps = rank < cfg.num_ps
        role = "ps" if is_ps else "worker"
        byz = rank in (byz_ps if is_ps else byz_w)
        attack = (args.ps_attack if is_ps else args.worker_attack) if byz else None
        attack_args = (args.ps_attack_args if is_ps else args.worker_attack_args) if byz else {}
        metrics = run_dir / f"metrics-{role}{rank}.jsonl" if is_ps else None
        cmd = base + [f"byzsgd.roles.{role}", "--rank", str(rank), "--peers",
                      str(run_dir / "deployment.json")]
        for name in FORWARDED:
            value = getattr(cfg, name)
            if value is None:
                continue
            if name == "log":
                value = bool(args.node_log)
            cmd += [f"--{name}", _flag_value(value)]
        if metrics:
            cmd += ["--metrics", str(metrics)]
        if attack:
            cmd += ["--attack", attack, "--attack_args", json.dumps(attack_args)]
        dep.nodes.append(NodeProcess(rank, role, ports[rank], byz, attack, attack_args,
                                     run_dir / f"{role}{rank}.log", metrics, cmd))
    return dep


def start(dep: Deployment, spawn: str = "exec") -> None:
    """Start every node: ``exec`` (a fresh interpreter each) or ``fork`` (see byzsgd.deploy.spawn)."""
    secret_path = dep.run_dir / "secret"
    fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    env = dict(os.environ)
    env.pop("BYZSGD_SECRET", None)
    env.update({SECRET_FILE_ENV: str(secret_path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1"})
    dep.started = time.time()
    dep.write_description()  # ports are needed by every node before it starts
    if spawn == "fork":
        preload_roles()
    for node in dep.nodes:
        if spawn == "fork":
            node.proc = fork_node(f"byzsgd.roles.{node.role}", node.cmd[3:], str(node.log_path), env)
        else:
            with open(node.log_path, "ab") as log:
                node.proc = subprocess.Popen(node.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        (dep.run_dir / f"{node.role}{node.rank}.pid").write_text(str(node.proc.pid))
    dep.write_description()


def _signal_node(node: NodeProcess, sig: int) -> None:
    """Signal the node's process group (its own session), or the process if it has none yet."""
    try:
        os.killpg(node.proc.pid, sig)
    except ProcessLookupError:
        try:
            os.kill(node.proc.pid, sig)
        except ProcessLookupError:
            pass


def stop_all(dep: Deployment, grace: float = 3.0) -> None:
    """SIGTERM every live child, then SIGKILL what is left after ``grace`` seconds."""
    live = [n for n in dep.nodes if n.proc and n.proc.poll() is None]
    for n in live:
        _signal_node(n, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for n in live:
        try:
            n.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_node(n, signal.SIGKILL)
            n.proc.wait()
    for n in dep.nodes:
        if n.proc:
            n.returncode = n.proc.returncode


def _follow(node: NodeProcess) -> dict:
    """The node's newest step record, newest accuracy and done record, reading only the
    lines appended to its metrics file since the last call (the launcher polls it)."""
    state = node.progress
    try:
        with open(node.metrics_path, "rb") as fh:
            fh.seek(state["offset"])
            chunk = fh.read()
    except OSError:
        return state
    complete = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits
    state["offset"] += len(complete)
    for line in complete.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "step" in rec and "event" not in rec:
            state["last"] = rec
            if rec.get("accuracy") is not None:
                state["acc"] = rec
        if rec.get("event") == "done":
            state["done"] = rec
    return state


def progress(dep: Deployment) -> dict[int, dict]:
    """The newest step record and the newest accuracy of each correct PS."""
    return {n.rank: {k: v for k, v in _follow(n).items() if k != "offset"} for n in dep.correct_ps}


def _bar(dep: Deployment, prog: dict[int, dict], width: int = 30) -> str:
    steps = [p["last"]["step"] + 1 if p["last"] else 0 for p in prog.values()]
    step = min(steps) if steps else 0
    total = dep.cfg.num_iter
    filled = int(width * step / total)
    losses = [p["last"]["loss"] for p in prog.values() if p["last"] and p["last"].get("loss") is not None]
    accs = [p["acc"]["accuracy"] for p in prog.values() if p["acc"]]
    loss = f"{sum(losses) / len(losses):.4f}" if losses else "-"
    acc = f"{min(accs):.2f}%" if accs else "-"
    elapsed = time.time() - dep.started
    return (f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{total} loss {loss} "
            f"acc(min over correct PS) {acc} {elapsed:.0f}s")


def read_faults(run_dir: Path) -> tuple[set[int], dict[int, int]]:
    """``run_dir/faults.json``, written by scripts/fault.py before it kills, pauses or
    restarts a node: the ranks that fail on purpose, and the pids of restarted ranks."""
    try:
        doc = json.loads((run_dir / "faults.json").read_text())
        return ({int(r) for r in doc.get("faulty", [])},
                {int(r): int(pid) for r, pid in doc.get("restarted", {}).items()})
    except (OSError, ValueError, TypeError, AttributeError):
        return set(), {}


def pid_alive(pid: int) -> bool:
    """A live process that is not a zombie (a restarted node is not our child)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2:].split()[0] not in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
            return not Path("/proc").is_dir()
        except OSError:
            return False


def _ps_finished(n: NodeProcess, faulty: set[int], restarted: dict[int, int]) -> bool:
    if n.rank in restarted:  # restarted on purpose: wait for the new process
        return not pid_alive(restarted[n.rank])
    if n.rank in faulty:  # killed on purpose: not waited for
        n.proc.poll()  # reaps it once dead
        return True
    return n.proc.poll() == 0


def stop_restarted(dep: Deployment, grace: float = 3.0) -> None:
    """Stop the nodes scripts/fault.py restarted (not our children): SIGTERM, then SIGKILL."""
    live = []
    for rank, pid in read_faults(dep.run_dir)[1].items():
        try:  # each is a session leader running its rank's argv: never a recycled pid
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            ok = (pid_alive(pid) and os.getsid(pid) == pid and b"--rank" in cmd
                  and cmd[cmd.index(b"--rank") + 1:][:1] == [str(rank).encode()])
        except OSError:
            ok = False
        if ok:
            os.killpg(pid, signal.SIGTERM)
            live.append(pid)
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in live) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in live:
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


#: how long a restarted PS (scripts/fault.py) is waited for once every other correct PS is done
RESTARTED_GRACE_S = 30.0


def monitor(dep: Deployment, *, quiet: bool, timeout: float) -> str:
    """Wait until every correct PS is done; returns 'ok', 'failed:<rank>' or 'timeout'.
    Ranks listed in ``faults.json`` (scripts/fault.py) failed on purpose: their exit is not
    fatal and they are not waited for, except a restarted PS (its new process is)."""
    tty = sys.stderr.isatty()
    last_print = 0.0
    others_done_at = None
    while True:
        time.sleep(0.5)  # the launcher only watches files; the nodes never poll
        faulty, restarted = read_faults(dep.run_dir)
        for n in dep.correct:
            code = n.proc.poll()
            if code is not None and code != 0 and n.rank not in faulty:
                return f"failed:{n.rank}"
        if all(_ps_finished(n, faulty, restarted) for n in dep.correct_ps):
            return "ok"
        # A restarted PS that is still running when all the others are done can only finish
        # with their last models; it is not waited for beyond RESTARTED_GRACE_S.
        if restarted and all(_ps_finished(n, faulty, {}) for n in dep.correct_ps if n.rank not in restarted):
            others_done_at = others_done_at or time.monotonic()
            if time.monotonic() - others_done_at > RESTARTED_GRACE_S:
                return "ok"
        if timeout and time.time() - dep.started > timeout:
            return "timeout"
        if not quiet and (tty or time.time() - last_print > 10):
            line = _bar(dep, progress(dep))
            if tty:
                print("\r" + line, end="", file=sys.stderr, flush=True)
            else:
                print(line, file=sys.stderr, flush=True)
            last_print = time.time()


def summarize(dep: Deployment, outcome: str) -> dict:
    prog = progress(dep)
    final = {}
    for rank, p in prog.items():
        done = p["done"]
        final[rank] = done.get("final_accuracy") if done else (p["acc"]["accuracy"] if p["acc"] else None)
    times = [p["done"]["median_step_time"] for p in prog.values() if p["done"]]
    faulty, restarted = read_faults(dep.run_dir)
    # a PS killed on purpose (and not restarted) does not count in the minimum
    accs = [a for r, a in final.items() if a is not None and (r not in faulty or r in restarted)]
    extra = {}
    if dep.cfg.mode == "paper" and dep.cfg.num_ps > 1:
        extra["diameter"] = _diameter_summary(dep, faulty)
    return dict(outcome=outcome, run_dir=str(dep.run_dir), steps=dep.cfg.num_iter,
                final_accuracy={str(k): v for k, v in final.items()},
                min_accuracy=min(accs) if accs else None,
                median_step_time=sorted(times)[len(times) // 2] if times else None,
                wall_time=time.time() - dep.started,
                byzantine_ranks=[n.rank for n in dep.nodes if n.byzantine],
                faulty_ranks=sorted(faulty), restarted_ranks=sorted(restarted),
                returncodes={str(n.rank): n.returncode for n in dep.nodes}, **extra)


def _diameter_summary(dep: Deployment, faulty: set[int]) -> dict:
    """Paper mode: the correct PSes' diameter before/after the gathers (``diameters.json``
    in the run directory holds every gather)."""
    correct = [n.rank for n in dep.correct_ps if n.rank not in faulty]
    records = {n.rank: list(read_metrics(n.metrics_path)) for n in dep.correct_ps if n.metrics_path}
    rows = gather_diameters(records, correct)
    (dep.run_dir / "diameters.json").write_text(json.dumps(rows))
    full = [r for r in rows if r["before"] is not None and r["after"] is not None
            and r["pairs_before"] == r["pairs"] == r["pairs_after"]]
    mean = lambda key: sum(r[key] for r in full) / len(full) if full else None  # noqa: E731
    return dict(gathers=len(rows), measured=len(full), shrank=sum(r["after"] < r["before"] or r["after"] == r["before"] == 0 for r in full),
                mean_before=mean("before"), mean_after=mean("after"))


def run(args: argparse.Namespace) -> int:
    dep = plan(args)
    byz = [f"{n.role}{n.rank}({n.attack})" for n in dep.nodes if n.byzantine]
    print(f"byzsgd: {dep.cfg.num_ps} PS (fps={dep.cfg.fps}) + {dep.cfg.num_workers} workers "
          f"(fw={dep.cfg.fw}), gar={dep.cfg.gar}, {dep.cfg.mode} mode, {dep.cfg.dataset}/{dep.cfg.model}, "
          f"{dep.cfg.num_iter} steps; run dir {dep.run_dir}", file=sys.stderr)
    print(f"byzsgd: Byzantine nodes: {', '.join(byz) if byz else 'none'}", file=sys.stderr)
    interrupted = False

    def _terminate(signum, frame):  # SIGTERM (kill, timeout): clean up like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    try:
        start(dep, args.spawn)
        outcome = monitor(dep, quiet=args.quiet, timeout=args.timeout)
        if outcome == "ok":
            # Correct workers leave once every PS said done; give them a moment.
            deadline = time.monotonic() + 10
            for n in dep.correct:
                try:
                    n.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
    except KeyboardInterrupt:
        interrupted, outcome = True, "interrupted"
    finally:
        stop_all(dep)
        stop_restarted(dep)
        dep.write_description()
    if not args.quiet and sys.stderr.isatty():
        print(file=sys.stderr)
    summary = summarize(dep, outcome)
    (dep.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    for rank, acc in summary["final_accuracy"].items():
        acc_s = f"{acc:.2f}%" if isinstance(acc, (int, float)) else "n/a"
        print(f"byzsgd: PS {rank} final accuracy {acc_s}", file=sys.stderr)
    if summary["median_step_time"] is not None:
        print(f"byzsgd: median step time {summary['median_step_time']:.4f} s, wall time "
              f"{summary['wall_time']:.1f} s", file=sys.stderr)
    diam = summary.get("diameter")
    if diam and diam["measured"]:
        print(f"byzsgd: correct PSes' diameter: mean {diam['mean_before']:.4g} before a gather, "
              f"{diam['mean_after']:.4g} after; shrank at {diam['shrank']} of the {diam['measured']} "
              f"gathers measured ({dep.run_dir / 'diameters.json'})", file=sys.stderr)
    if outcome.startswith("failed"):
        rank = int(outcome.split(":")[1])
        node = dep.nodes[rank]
        print(f"byzsgd: {node.role} {rank} failed (exit {node.returncode}); its log: {node.log_path}",
              file=sys.stderr)
        try:
            tail = node.log_path.read_text(errors="replace").splitlines()[-15:]
            print("\n".join("  | " + line for line in tail), file=sys.stderr)
        except OSError:
            pass
    if args.json:
        print(json.dumps(summary))
    if interrupted:
        return 130
    return 0 if outcome == "ok" else 1


def deploy(argv: list[str]) -> dict:
    """Run one whole deployment from launcher flags, in this process (nodes are forked from
    it, so torch is imported once for many deployments); returns its summary.  For
    benchmarks and harnesses.  Raises ByzSGDError for a configuration refused at start."""
    args = build_parser().parse_args([*argv, "--quiet"])
    if not args.run_dir:
        raise ConfigError("deploy() needs --run_dir")
    run(args)
    return json.loads((Path(args.run_dir) / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ByzSGDError as exc:
        print(f"byzsgd.launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
