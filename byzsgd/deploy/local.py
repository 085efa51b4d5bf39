"""The nodes of a one-machine deployment: lay them out, start them, watch them, stop them.

Every PS and worker is a separate process on loopback; ports are picked free; an operator
secret is generated in memory (never written) and each rank's credentials (its pairwise keys,
byzsgd.net.credentials) are provisioned from it into ``run_dir/credentials/rank<r>.cred``
(0600, directory 0700), rank r getting ``--credentials`` of its own file only (Byzantine ranks
included).  Both happen in a short-lived child of the launcher, which never holds the secret
nor any key: a forked node, which shares the launcher's memory, finds only what it loads itself,
its own rank's keys.  And the run directory (:mod:`byzsgd.rundir`) holds each node's log and metrics plus
``deployment.json``.  A forked node gets its :class:`~byzsgd.config.RunConfig` in memory;
an exec'd one (and a restart by byzsgd.deploy.faults) its argv.  Progress (step, loss,
accuracy) is read from the PSes' metrics files; nodes never poll.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from byzsgd.config import CREDENTIALS_ENV, SECRET_ENV, SECRET_FILE_ENV, RunConfig, ValidatedConfig
from byzsgd import rundir
from byzsgd.deploy import summary as runsum
from byzsgd.device import LOCAL_INDEX_ENV, cuda_initialized
from byzsgd.deploy.options import LaunchConfig
from byzsgd.flags import PER_RANK, scoped
from byzsgd.deploy.spawn import fork_node, preload_optimizer, preload_roles, warm_dataset_cache
from byzsgd.metrics import gather_diameters, read_metrics
from byzsgd.net.credentials import provision_in_child
from byzsgd.net.peers import free_ports
from byzsgd.roles.entry import run_role

#: node fields that differ per rank (declared ``scope=PER_RANK``, and ``byzantine``, which
#: follows --attack): not part of the shared ``config`` of deployment.json
NODE_OWN = scoped(RunConfig, PER_RANK) + ("byzantine",)


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
    cfg: ValidatedConfig  # what the node runs with: in memory for a fork, as argv for an exec
    proc: subprocess.Popen | None = None
    progress: dict = field(default_factory=lambda: {"offset": 0, "last": None, "acc": None, "done": None})
    returncode: int | None = None

    def describe(self, host: str) -> dict:
        return dict(rank=self.rank, role=self.role, host=host, port=self.port,
                    pid=self.proc.pid if self.proc else None, byzantine=self.byzantine,
                    attack=self.attack, attack_args=self.attack_args, log=str(self.log_path),
                    metrics=str(self.metrics_path) if self.metrics_path else None,
                    cmd=self.cmd)

    @property
    def cmd(self) -> list[str]:
        """The node's command line (exec spawning; byzsgd.deploy.faults restarts it with it)."""
        return [sys.executable, "-m", f"byzsgd.roles.{self.role}", *self.cfg.to_argv()]


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
                   credentials=(None if self.cfg.insecure_shared_secret
                                else str(rundir.credentials_dir(self.run_dir))),
                   secret_file=str(self.run_dir / rundir.SECRET) if self.cfg.insecure_shared_secret else None,
                   config={k: v for k, v in self.cfg.to_dict().items() if k not in NODE_OWN},
                   byzantine_ranks=[n.rank for n in self.nodes if n.byzantine],
                   ranks=[n.describe(self.host) for n in self.nodes])
        restarted = read_faults(self.run_dir)[1]
        for r in doc["ranks"]:  # a node restarted by byzsgd.deploy.faults runs under a new pid
            r["pid"] = restarted.get(r["rank"], r["pid"])
        return rundir.write_deployment(self.run_dir, doc)


def plan(lc: LaunchConfig) -> Deployment:
    """Validate the configuration and lay out the ranks, ports and files (nothing started);
    each rank's configuration is validated here, once (a forked node does not check it again)."""
    cfg = lc.run
    run_dir = Path(lc.run_dir or Path("runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    nodes = lc.node_configs(run_dir)  # refused before the run directory exists
    run_dir.mkdir(parents=True, exist_ok=True)
    dep = Deployment(cfg, run_dir, lc.host)
    ports = free_ports(cfg.world_size, lc.host)
    for rank, node in enumerate(nodes):
        dep.nodes.append(NodeProcess(rank, node.role, ports[rank], node.byzantine, node.attack,
                                     node.attack_args, rundir.rank_file(run_dir, node.role, rank, "log"),
                                     Path(node.metrics) if node.metrics else None, node))
    return dep


def provision_credentials(dep: Deployment) -> list[Path]:
    """One credentials file per rank in ``run_dir/credentials`` (0600 each, directory 0700),
    derived from an operator secret that lives only in a short-lived child's memory: the nodes
    forked from this process later must not find any other rank's key in what they inherit."""
    cred_dir = rundir.credentials_dir(dep.run_dir)
    for stale in cred_dir.glob("rank*.cred") if cred_dir.is_dir() else ():
        stale.unlink()  # a reused run directory: no file of an earlier world stays behind
    return provision_in_child(dep.cfg.world_size, cred_dir)


def node_env(run_dir: Path, insecure: bool) -> dict[str, str]:
    """The nodes' environment: ours, without any inherited secret or credentials (each node
    gets its own file through --credentials), one thread each."""
    env = dict(os.environ)
    for var in (SECRET_ENV, SECRET_FILE_ENV, CREDENTIALS_ENV):
        env.pop(var, None)
    if insecure:
        env[SECRET_FILE_ENV] = str(run_dir / rundir.SECRET)
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    return env


def start(dep: Deployment, spawn: str = "exec") -> None:
    """Start every node: ``exec`` (a fresh interpreter each) or ``fork`` (see byzsgd.deploy.spawn)."""
    insecure = dep.cfg.insecure_shared_secret
    if insecure:  # the legacy mode: one shared secret, handed over as a 0600 file
        rundir.write_secret(dep.run_dir / rundir.SECRET)
    else:
        provision_credentials(dep)
    env = node_env(dep.run_dir, insecure)
    dep.started = time.time()
    dep.write_description()  # ports are needed by every node before it starts
    if spawn == "fork" and cuda_initialized():
        # a child forked after CUDA was initialised here could not use CUDA: exec them
        print("byzsgd: CUDA is initialised in the launcher: nodes are exec'd, not forked",
              file=sys.stderr)
        spawn = "exec"
    if spawn == "fork":
        preload_roles()  # first: the child that warms the cache inherits the imports
        from byzsgd.learning.optim import steps_flat  # torch: imported by preload_roles anyway

        if not steps_flat(dep.cfg.optimizer):
            preload_optimizer()
    warm_dataset_cache(dep.cfg.dataset, dep.cfg.data_root)
    for node in dep.nodes:
        # every rank runs on this host: its local index (--device auto/cuda) is its rank
        node_env_r = dict(env, **{LOCAL_INDEX_ENV: str(node.rank)})
        if spawn == "fork":
            node.proc = fork_node(functools.partial(run_role, node.cfg, node.role), str(node.log_path),
                                  node_env_r, name=f"byzsgd.roles.{node.role}")
        else:
            with open(node.log_path, "ab") as log:
                node.proc = subprocess.Popen(node.cmd, stdout=log, stderr=subprocess.STDOUT, env=node_env_r,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        rundir.rank_file(dep.run_dir, node.role, node.rank, "pid").write_text(str(node.proc.pid))
    if spawn == "fork":  # the children keep the frozen heap; this process collects as before
        import gc

        gc.unfreeze()
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
    """``run_dir/faults.json``, written by byzsgd.deploy.faults before it kills, pauses or
    restarts a node: the ranks that fail on purpose, and the pids of restarted ranks."""
    doc = rundir.read_faults(run_dir)
    try:
        return ({int(r) for r in doc["faulty"]},
                {int(r): int(pid) for r, pid in doc["restarted"].items()})
    except (ValueError, TypeError, AttributeError):
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
    """Stop the nodes byzsgd.deploy.faults restarted (not our children): SIGTERM, then SIGKILL."""
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


#: how long a restarted PS (byzsgd.deploy.faults) is waited for once every other correct PS is done
RESTARTED_GRACE_S = 30.0


def monitor(dep: Deployment, *, quiet: bool, timeout: float) -> str:
    """Wait until every correct PS is done; returns 'ok', 'failed:<rank>' or 'timeout'.
    Ranks listed in ``faults.json`` (byzsgd.deploy.faults) failed on purpose: their exit is not
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
    faulty, restarted = read_faults(dep.run_dir)
    # a PS killed on purpose (and not restarted) does not count in the minimum
    summary = runsum.run_summary(dep.run_dir, outcome, started=dep.started,
                                 returncodes={n.rank: n.returncode for n in dep.nodes},
                                 exclude=faulty - set(restarted),
                                 byzantine_ranks=[n.rank for n in dep.nodes if n.byzantine])
    summary = dict(outcome=outcome, run_dir=summary["run_dir"], steps=dep.cfg.num_iter,
                   **{k: v for k, v in summary.items() if k not in ("outcome", "run_dir", "returncodes")},
                   faulty_ranks=sorted(faulty), restarted_ranks=sorted(restarted),
                   returncodes=summary["returncodes"])
    if dep.cfg.mode == "paper" and dep.cfg.num_ps > 1:
        summary["diameter"] = _diameter_summary(dep, faulty)
    return summary


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
