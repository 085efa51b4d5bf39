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
from byzsgd.metrics import read_metrics

#: flags forwarded verbatim from the launcher to every node
FORWARDED = ("dataset", "batch", "num_ps", "num_workers", "fw", "fps", "model", "loss", "optimizer",
             "opt_args", "num_iter", "gar", "gar_args", "model_gar", "acc_freq", "bench", "log",
             "mode", "gather_period", "data_root", "split", "seed", "eval_samples", "step_timeout",
             "resend_after", "startup_timeout", "threads", "checkpoint_dir", "checkpoint_every", "resume")


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
        path = self.run_dir / "deployment.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
        return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m byzsgd.launch",
        description="Start a whole ByzSGD deployment on this machine (loopback): every PS and "
                    "worker a process. Default: MNIST convnet, 4 PS (fps=1), 7 workers (fw=1), median.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p, role="launch")
    p.set_defaults(num_ps=4, num_workers=7, fw=1, fps=1, gar="median", num_iter=1000, acc_freq=100,
                   opt_args={"lr": "0.1", "momentum": "0.9"}, rank=0, eval_samples=2000, log=False)
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


def start(dep: Deployment) -> None:
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
    for node in dep.nodes:
        with open(node.log_path, "ab") as log:
            node.proc = subprocess.Popen(node.cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        (dep.run_dir / f"{node.role}{node.rank}.pid").write_text(str(node.proc.pid))
    dep.write_description()


def stop_all(dep: Deployment, grace: float = 3.0) -> None:
    """SIGTERM every live child, then SIGKILL what is left after ``grace`` seconds."""
    live = [n for n in dep.nodes if n.proc and n.proc.poll() is None]
    for n in live:
        try:
            os.killpg(n.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    for n in live:
        try:
            n.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(n.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            n.proc.wait()
    for n in dep.nodes:
        if n.proc:
            n.returncode = n.proc.returncode


def progress(dep: Deployment) -> dict[int, dict]:
    """The newest step record and the newest accuracy of each correct PS."""
    out = {}
    for n in dep.correct_ps:
        last, acc, done = None, None, None
        for rec in read_metrics(n.metrics_path):
            if "step" in rec and "event" not in rec:
                last = rec
                if rec.get("accuracy") is not None:
                    acc = rec
            if rec.get("event") == "done":
                done = rec
        out[n.rank] = dict(last=last, acc=acc, done=done)
    return out


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


def monitor(dep: Deployment, *, quiet: bool, timeout: float) -> str:
    """Wait until every correct PS is done; returns 'ok', 'failed:<rank>' or 'timeout'."""
    tty = sys.stderr.isatty()
    last_print = 0.0
    while True:
        time.sleep(0.5)  # the launcher only watches files; the nodes never poll
        for n in dep.correct:
            code = n.proc.poll()
            if code is not None and code != 0:
                return f"failed:{n.rank}"
        if all(n.proc.poll() == 0 for n in dep.correct_ps):
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
    accs = [a for a in final.values() if a is not None]
    return dict(outcome=outcome, run_dir=str(dep.run_dir), steps=dep.cfg.num_iter,
                final_accuracy={str(k): v for k, v in final.items()},
                min_accuracy=min(accs) if accs else None,
                median_step_time=sorted(times)[len(times) // 2] if times else None,
                wall_time=time.time() - dep.started,
                byzantine_ranks=[n.rank for n in dep.nodes if n.byzantine],
                returncodes={str(n.rank): n.returncode for n in dep.nodes})


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
        start(dep)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except ByzSGDError as exc:
        print(f"byzsgd.launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
