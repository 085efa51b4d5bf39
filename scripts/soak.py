#!/usr/bin/env python3
"""The soak: the main job for a wall time under an outsider flood, member reconnect churn and a
worker killed and restarted every 2 minutes; then the same number of steps without any of it.

    python scripts/soak.py [--minutes 20] [--run_dir D] [--json] [--no_control] [-- LAUNCHER FLAGS]
    python scripts/soak.py churn RUN_DIR --rank R [--rate 4] [--seconds S]   (the churner alone)

What runs at once (issue 24: "no member input crashes, pins or hides from a correct node"):

* ``python -m byzsgd.launch`` with its defaults (4 PS + 7 workers, MNIST) and a ``--num_iter``
  it will not reach; at the deadline it gets SIGTERM (its own ``--timeout`` is the backstop), so
  every PS stops where it is and the launcher writes ``summary.json``;
* ``scripts/outsider_flood.py`` on the PSes' ports (connections without credentials, loopback,
  from the members' own address unless ``--flood_source``): ``--flood_sockets`` 64 per PS, twice
  a node's pre-authentication budget per address, so it evicts and the flood reconnects at its
  ``--flood_rate`` (500/s) all the time;
* the churner (``soak.py churn``, its own process): it holds one worker rank's credentials file
  (``RUN_DIR/credentials/rank<R>.cred``, what the launcher provisioned) and, through the
  library's hand-driven dialer (``byzsgd.net.testing.RawPeer``), connects to each PS in turn,
  proves rank R, stays ``--churn_hold`` s and leaves, ``--churn_rate`` times a second.  With
  ``--churn_mode takeover`` (default) rank R's own node is killed first (``fault.py kill``,
  recorded as faulty): the churner *is* rank R, a Byzantine member (fw = 1 allows one) whose
  reconnects the PSes accept.  ``shared``: node R keeps running and every reconnect of the
  churner is proven, then refused as a duplicate;
* every ``--fault_every`` s of wall time since the launch (none in the last ``--fault_margin``
  s) one more correct worker (round robin, never R) is killed and restarted at once
  (``fault.py``'s kill / restart, the library the CLI wraps).  With the takeover, the
  other six workers are exactly q_w: the job waits for each restarted worker, so a restart that
  never rejoins shows as a stall.

Every ~``--sample_every`` s the resident memory (VmRSS of ``/proc/<pid>/status``) of every node
(pids from the run directory's pid records, checked to be this run's node) and of the helpers is
sampled.  The report (``--json``: one JSON object on the last line): per node min/max RSS, every
log file's size, the final accuracy of each correct PS, the steps done, the flood's and churn's
counts, the nodes' refusals, each restart and whether the worker rejoined (a correct PS
aggregated its gradient after the restart).  Then, unless ``--no_control``, the main job again
for the same number of steps with no attack and no fault (its RSS sampled the same way), and
the accuracy difference at the last step both evaluated (the soak's PSes are stopped between
two evaluations).

Everything the soak starts runs in its own process group and is stopped at the deadline, on
Ctrl-C or SIGTERM (SIGTERM, then SIGKILL); nodes restarted by ``fault.py`` are stopped by the
launcher, and any node of the run still alive afterwards is killed (identity-checked, as
fault.py does).  Loopback only.  Exit 0 when the soak ran to its deadline, every node stopped
and every restarted worker rejoined; 1 otherwise; 2 for bad arguments; 130 when interrupted.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SCRIPTS))
from byzsgd.deploy import faults as fault  # noqa: E402  (the fault-injection library)
from outsider_flood import loopback  # noqa: E402
from byzsgd import rundir  # noqa: E402  (light: no torch import)
from byzsgd.errors import ConfigError  # noqa: E402
from byzsgd.metrics import read_metrics  # noqa: E402

#: a --num_iter the soak never reaches: it is stopped at its deadline
SOAK_NUM_ITER = 10_000_000
#: seconds a helper or the launcher gets between SIGTERM and SIGKILL
GRACE_S = {"churn": 20.0, "flood": 30.0, "launcher": 90.0}
#: the helpers whose RSS is sampled too (nodes are named like their files: ps0, worker4, ...)
HELPERS = ("launcher", "flood", "churn")
#: scripts/outsider_flood.py refuses a longer --seconds
FLOOD_MAX_S = 3600.0


class SoakError(Exception):
    pass


class Interrupted(Exception):
    """Ctrl-C or SIGTERM on the soak itself, raised where the soak checks for it."""


#: the signal asked to stop the soak (None: none yet).  The handler only records it and the
#: supervising loops raise Interrupted at their next check (<= 0.5 s): a signal never lands
#: between starting a helper and recording it, so nothing started can be left behind.
_stop_signal: list[str] = []


def _on_signal(signum, frame) -> None:
    _stop_signal.append(signal.Signals(signum).name)


def check_stop() -> None:
    if _stop_signal:
        raise Interrupted(_stop_signal[0])


# ----------------------------------------------------------------------------- processes
class Child:
    """A helper process in its own session (its own process group), output to a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env: dict | None = None):
        self.name, self.cmd, self.log = name, cmd, log
        with open(log, "ab") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the whole group, only while its leader is not reaped (its pgid is ours then)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout=max(0.0, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self, grace: float) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` s; the exit code."""
        self.signal(signal.SIGTERM)
        if not self.wait(grace):
            self.signal(signal.SIGKILL)
            self.wait(10.0)
        return self.proc.returncode

    def last_json(self) -> dict | None:
        """The last line of the log that is a JSON object (the helpers print their counts so)."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return None
        for line in reversed(lines):
            line = line.strip()
            if line.startswith("{"):
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    return doc
        return None


def child_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def vm_rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (None: gone, or a zombie without memory)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def node_pids(run_dir: Path) -> dict[str, int]:
    """``{"ps0": pid, ...}`` of the nodes of this run alive now (fault.py's identity check)."""
    try:
        doc = fault.load_deployment(run_dir)
    except fault.FaultError:
        return {}
    out = {}
    for info in doc["ranks"]:
        pid = fault.node_pid(run_dir, info)
        if pid is not None:
            out[rundir.stem(info["role"], int(info["rank"]))] = pid
    return out


class RssTable:
    """Samples per process name (a node's ``ps0``, a helper's ``flood``): the pid it had."""

    def __init__(self):
        self.samples: dict[str, list[tuple[float, int, int]]] = {}

    def add(self, name: str, pid: int, t: float) -> None:
        kib = vm_rss_kib(pid)
        if kib:  # 0: a process between fork and exec, or exiting
            self.samples.setdefault(name, []).append((t, pid, kib))

    def summary(self) -> dict[str, dict]:
        return rss_summary(self.samples)


def rss_summary(samples: dict[str, list]) -> dict[str, dict]:
    """Per name: min, max, first and last RSS in MiB over the samples (t, pid, KiB), how many
    samples and how many pids (a restarted node has several)."""
    def stats(rows):
        kib = [r[2] for r in rows]
        return dict(min_mib=round(min(kib) / 1024, 1), max_mib=round(max(kib) / 1024, 1),
                    first_mib=round(kib[0] / 1024, 1), last_mib=round(kib[-1] / 1024, 1), samples=len(rows))
    out = {}
    for name, rows in samples.items():
        if not rows:
            continue
        pids = list(dict.fromkeys(r[1] for r in rows))  # in the order they ran
        out[name] = dict(stats(rows), pids=len(pids))
        if len(pids) > 1:  # a restarted node: each process's own figures too
            out[name]["per_pid"] = [dict(stats([r for r in rows if r[1] == pid]), pid=pid) for pid in pids]
    return out


# ----------------------------------------------------------------------------- the churner
async def churn(run_dir: Path, rank: int, *, rate: float, seconds: float, hold: float) -> dict:
    """Connect to each PS in turn as ``rank`` (its own credentials file), prove the rank, stay
    ``hold`` s reading what the PS sends, close; ``rate`` attempts a second until ``seconds``
    passed or SIGTERM/SIGINT.  Returns the counts."""
    doc = rundir.read_deployment(run_dir)  # before the imports (torch): a wrong RUN_DIR fails fast
    from byzsgd.net.credentials import RankCredentials, credentials_path
    from byzsgd.net.testing import RawPeer

    info = fault.rank_info(doc, rank)
    world = len(doc["ranks"])
    num_ps = sum(1 for r in doc["ranks"] if r["role"] == "ps")
    path = fault.rank_credentials(info) or credentials_path(rundir.credentials_dir(run_dir), rank)
    creds = RankCredentials.load(path, rank=rank, world_size=world)
    targets = [(int(r["rank"]), str(r["host"]), int(r["port"])) for r in doc["ranks"] if r["role"] == "ps"]
    for _, host, _ in targets:
        if not loopback(host):
            raise ConfigError(f"a PS is at {host}: the churner only dials loopback addresses")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    counts = dict(rank=rank, attempts=0, connected=0, refused={}, closed=0, errors={}, bytes_received=0,
                  per_ps={str(t[0]): 0 for t in targets})
    start = loop.time()
    deadline = start + seconds
    interval = 1.0 / rate
    i = 0
    while not stop.is_set() and loop.time() < deadline:
        ps, host, port = targets[i % len(targets)]
        i += 1
        t_next = loop.time() + interval
        counts["attempts"] += 1
        peer = None
        try:
            peer = await asyncio.wait_for(RawPeer.connect(host, port), 5.0)
            res = await asyncio.wait_for(peer.handshake(creds, rank, ps, num_ps), 10.0)
            if res.get("ok") is True:
                counts["connected"] += 1
                counts["per_ps"][str(ps)] += 1
                end = loop.time() + hold
                while loop.time() < end:  # what the PS sends a reconnected member: read, dropped
                    try:
                        data = await asyncio.wait_for(peer.reader.read(1 << 16), end - loop.time())
                    except asyncio.TimeoutError:
                        break
                    if not data:
                        break
                    counts["bytes_received"] += len(data)
            elif "err" in res:
                code = str(res["err"])[:40]
                counts["refused"][code] = counts["refused"].get(code, 0) + 1
            else:
                counts["closed"] += 1
        except Exception as exc:  # a refused, evicted or timed-out attempt: counted by type
            name = type(exc).__name__
            counts["errors"][name] = counts["errors"].get(name, 0) + 1
        finally:
            if peer is not None:
                await peer.close()
        left = t_next - loop.time()
        if left > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), left)
    counts["seconds"] = round(loop.time() - start, 2)
    return counts


def churn_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="scripts/soak.py churn",
                                description="one member rank reconnecting to every PS, repeatedly")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--rank", type=int, required=True, help="the member rank whose credentials file is used")
    p.add_argument("--rate", type=float, default=4.0, help="connection attempts per second (default 4)")
    p.add_argument("--seconds", type=float, default=60.0, help="stop after S s (or SIGTERM)")
    p.add_argument("--hold", type=float, default=0.1, help="seconds each connection stays (default 0.1)")
    args = p.parse_args(argv)
    if not 0 < args.rate <= 100 or not args.seconds > 0 or not 0 <= args.hold <= 10:
        print("soak.py churn: error: --rate in (0, 100], --seconds > 0, --hold in [0, 10]", file=sys.stderr)
        return 2
    try:
        print(f"soak.py churn: rank {args.rank} reconnecting at {args.rate:g}/s for at most "
              f"{args.seconds:g} s", file=sys.stderr, flush=True)
        counts = asyncio.run(churn(args.run_dir.resolve(), args.rank, rate=args.rate, seconds=args.seconds,
                                   hold=args.hold))
    except (ConfigError, fault.FaultError, OSError) as exc:
        print(f"soak.py churn: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(counts), flush=True)
    return 0


# ----------------------------------------------------------------------------- metrics of a run
def ps_records(run_dir: Path) -> dict[int, list[dict]]:
    """The step records (with ``time``) of each correct PS of a run."""
    out: dict[int, list[dict]] = {}
    try:
        doc = rundir.read_deployment(run_dir)
    except ConfigError:
        return out
    for r in doc["ranks"]:
        if r["role"] != "ps" or r.get("byzantine") or not r.get("metrics"):
            continue
        path = Path(r["metrics"])
        out[int(r["rank"])] = [rec for rec in read_metrics(path) if "step" in rec and "event" not in rec]
    return out


def evaluations(records: dict[int, list[dict]]) -> dict[int, dict[int, float]]:
    """{PS rank: {step of the record: accuracy}} of every evaluation logged."""
    out = {}
    for rank, recs in records.items():
        out[rank] = {int(r["step"]): float(r["accuracy"]) for r in recs
                     if isinstance(r.get("accuracy"), (int, float))}
    return out


def steps_done(records: dict[int, list[dict]]) -> dict[int, int]:
    """Per PS the steps it completed (its last step record with a step time, + 1)."""
    return {rank: max((int(r["step"]) + 1 for r in recs if "step_time" in r), default=0)
            for rank, recs in records.items()}


def rejoins(records: dict[int, list[dict]], restarts: list[dict]) -> list[dict]:
    """Each restart with whether the worker rejoined: the first step record, at or after the
    restart and before that rank's next kill, whose gradient ``quorum`` holds it (any correct
    PS), its step and how long after the restart."""
    rows = []
    for i, ev in enumerate(restarts):
        row = dict(ev)
        t0 = ev.get("restarted_at")
        later = [e["killed_at"] for e in restarts[i + 1:] if e["rank"] == ev["rank"] and e.get("killed_at")]
        t1 = min(later) if later else float("inf")
        first = None
        served = set()
        if t0 is not None:
            for recs in records.values():
                for rec in recs:
                    t = rec.get("time")
                    if not isinstance(t, (int, float)) or not t0 <= t < t1:
                        continue
                    if ev["rank"] in (rec.get("quorum") or ()):
                        served.add(int(rec["step"]))
                        if first is None or t < first[0]:
                            first = (t, int(rec["step"]))
        row.update(rejoined=first is not None, rejoined_step=first[1] if first else None,
                   rejoined_after_s=round(first[0] - t0, 1) if first else None, steps_served=len(served))
        rows.append(row)
    return rows


def compare_accuracy(soak: dict[int, dict[int, float]], control: dict[int, dict[int, float]]) -> dict:
    """The accuracy difference at the last step both runs evaluated on every correct PS: the
    least accuracy over the correct PSes of each (the soak's PSes were stopped at their
    deadline: their last evaluation is some steps before the end)."""
    def common(evals):
        sets = [set(v) for v in evals.values() if v]
        return set.intersection(*sets) if sets and len(sets) == len(evals) else set()
    both = common(soak) & common(control)
    if not both:
        return dict(step=None, soak=None, control=None, difference=None)
    step = max(both)
    s = min(v[step] for v in soak.values())
    c = min(v[step] for v in control.values())
    return dict(step=step + 1, soak=s, control=c, difference=round(s - c, 2))


def log_sizes(run_dir: Path) -> dict:
    """Every ``*.log`` of the run directory with its size in bytes, and the totals (the nodes'
    logs, and all of them: the soak's own helpers' logs are ``soak-*.log``)."""
    files = {p.name: p.stat().st_size for p in sorted(run_dir.glob("*.log")) if p.is_file()}
    nodes = sum(v for k, v in files.items() if not k.startswith("soak-"))
    metrics = {p.name: p.stat().st_size for p in sorted(run_dir.glob("metrics-*.jsonl")) if p.is_file()}
    return dict(files=files, nodes_total=nodes, total=sum(files.values()), metrics=metrics,
                metrics_total=sum(metrics.values()))


def refusal_totals(rejections: dict) -> dict[str, dict[str, int]]:
    """The summary's ``rejections`` ({rank: {reason[:kind:sender]: n}}) summed per rank and
    reason (the kind and sender dropped)."""
    out: dict[str, dict[str, int]] = {}
    for rank, counts in (rejections or {}).items():
        agg: dict[str, int] = {}
        for key, n in (counts or {}).items():
            reason = str(key).split(":")[0]
            agg[reason] = agg.get(reason, 0) + int(n)
        out[str(rank)] = agg
    return out


def flood_counts(doc: dict | None) -> dict | None:
    if not doc:
        return None
    eps = doc.get("endpoints") or []
    tot = lambda k: sum(int(e.get(k, 0)) for e in eps)  # noqa: E731
    return dict(seconds=doc.get("seconds"), mode=doc.get("mode"), sockets_per_endpoint=doc.get("sockets_per_endpoint"),
                source=doc.get("source"), tried=tot("opened") + tot("connect_failures"), opened=tot("opened"),
                closed_by_node=tot("closed_by_node"), connect_failures=tot("connect_failures"),
                max_open=max((int(e.get("max_open", 0)) for e in eps), default=0),
                per_endpoint={str(e.get("rank")): {k: e.get(k) for k in ("opened", "closed_by_node",
                                                                          "connect_failures", "max_open")}
                              for e in eps})


# ----------------------------------------------------------------------------- the soak
class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.run_dir: Path = args.run_dir
        self.children: dict[str, Child] = {}
        self.rss = RssTable()
        self.restarts: list[dict] = []
        self.notes: list[str] = []
        self.churn_rank: int | None = None
        self.t0 = 0.0
        self.deadline = 0.0
        self.train_started: float | None = None
        self.fault_ranks: list[int] = []
        self.ended_early: set[str] = set()
        self.leftover: list[str] = []

    def say(self, msg: str) -> None:
        print(f"soak: [{time.time() - self.t0:4.0f} s] {msg}" if self.t0 else f"soak: {msg}",
              file=sys.stderr, flush=True)

    # -- phases ------------------------------------------------------------------------
    def start_launcher(self) -> None:
        a = self.args
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "byzsgd.launch", "--run_dir", str(self.run_dir), "--num_iter",
               str(SOAK_NUM_ITER), "--timeout", str(int(a.minutes * 60 + 120)), *a.launcher_args]
        self.t0 = time.time()
        self.children["launcher"] = Child("launcher", cmd, self.run_dir / "soak-launcher.log", child_env())
        self.say(f"launcher pid {self.children['launcher'].pid}: {' '.join(cmd[1:])}")

    def training(self) -> bool:
        """Every correct PS logged a step."""
        steps = steps_done(ps_records(self.run_dir))
        return bool(steps) and min(steps.values()) >= 1

    def start_attacks(self) -> None:
        a = self.args
        doc = fault.load_deployment(self.run_dir)
        workers = [int(r["rank"]) for r in doc["ranks"] if r["role"] == "worker" and not r.get("byzantine")]
        self.churn_rank = a.churn_rank if a.churn_rank >= 0 else max(workers)
        if self.churn_rank not in workers:
            raise SoakError(f"--churn_rank {self.churn_rank} is not a correct worker of this run ({workers})")
        self.fault_ranks = [w for w in workers if w != self.churn_rank]
        left = self.deadline - time.time()
        env = child_env()
        ps = ",".join(str(r["rank"]) for r in doc["ranks"] if r["role"] == "ps")
        flood = [sys.executable, str(SCRIPTS / "outsider_flood.py"), str(self.run_dir), "--ranks", ps,
                 "--sockets", str(a.flood_sockets), "--rate", str(a.flood_rate), "--mode", a.flood_mode,
                 "--seconds", str(round(min(left + 30, FLOOD_MAX_S), 1))]
        if left + 30 > FLOOD_MAX_S:
            self.notes.append(f"the flood stops after {FLOOD_MAX_S:.0f} s (scripts/outsider_flood.py's bound)")
        if a.flood_source:
            flood += ["--source", a.flood_source]
        self.children["flood"] = Child("flood", flood, self.run_dir / "soak-flood.log", env)
        self.say(f"flood pid {self.children['flood'].pid}: {a.flood_sockets} {a.flood_mode} sockets per PS, "
                 f"<= {a.flood_rate:g} connections/s")
        if a.churn_mode == "takeover":
            pid = fault.kill(self.run_dir, self.churn_rank)
            self.say(f"worker {self.churn_rank} (pid {pid}) killed: the churner holds its credentials now")
        churn = [sys.executable, str(Path(__file__).resolve()), "churn", str(self.run_dir), "--rank",
                 str(self.churn_rank), "--rate", str(a.churn_rate), "--hold", str(a.churn_hold),
                 "--seconds", str(round(left + 30, 1))]
        self.children["churn"] = Child("churn", churn, self.run_dir / "soak-churn.log", env)
        self.say(f"churn pid {self.children['churn'].pid}: rank {self.churn_rank} ({a.churn_mode}) reconnecting "
                 f"at {a.churn_rate:g}/s")

    def do_fault(self, n: int) -> None:
        rank = self.fault_ranks[n % len(self.fault_ranks)]
        row = dict(rank=rank, killed_at=None, restarted_at=None, pid=None, error=None)
        self.restarts.append(row)
        try:
            fault.kill(self.run_dir, rank)
            row["killed_at"] = time.time()
            row["kill_step"] = fault.current_step(self.run_dir)
            if self.args.fault_down > 0:
                self.sleep_until(time.time() + self.args.fault_down)
            row["pid"] = fault.restart(self.run_dir, rank)
            row["restarted_at"] = time.time()
            self.say(f"worker {rank} killed and restarted (pid {row['pid']})")
        except fault.FaultError as exc:
            row["error"] = str(exc)
            self.say(f"fault on worker {rank} failed: {exc}")

    def sample(self) -> None:
        t = time.time()
        for name, pid in node_pids(self.run_dir).items():
            self.rss.add(name, pid, t)
        for name in HELPERS:
            c = self.children.get(name)
            if c is not None and c.running():
                self.rss.add(name, c.pid, t)

    def sleep_until(self, t: float) -> None:
        """Wait (the soak is a supervisor: it watches files and processes) until ``t``, or
        until the launcher exits."""
        while time.time() < t:
            check_stop()
            launcher = self.children.get("launcher")
            if launcher is not None and not launcher.running():
                return
            time.sleep(min(0.5, max(0.0, t - time.time())))

    def run_soak(self) -> None:
        a = self.args
        self.start_launcher()
        self.deadline = self.t0 + a.minutes * 60
        launcher = self.children["launcher"]
        next_sample = time.time() + a.sample_every  # (a process just spawned has no RSS yet)
        faults_done = 0
        next_fault = self.t0 + a.fault_every
        while time.time() < self.deadline:
            check_stop()
            if not launcher.running():
                self.notes.append(f"the launcher exited before the deadline (exit {launcher.proc.returncode})")
                self.say(self.notes[-1])
                break
            if self.train_started is None and self.training():
                self.train_started = time.time()
                self.say("training started; flood, churn and faults begin")
                self.sample()  # every node once before anything is killed
                self.start_attacks()
            now = time.time()
            if now >= next_sample:
                self.sample()
                next_sample = now + a.sample_every
            if (self.train_started is not None and now >= next_fault and a.fault_every > 0
                    and self.deadline - now >= a.fault_margin):
                self.do_fault(faults_done)
                faults_done += 1
                next_fault = max(next_fault + a.fault_every, time.time() + 1)
            for name in ("flood", "churn"):
                c = self.children.get(name)
                if c is not None and not c.running() and name not in self.ended_early:
                    self.ended_early.add(name)
                    self.notes.append(f"the {name} helper exited early (exit {c.proc.returncode})")
                    self.say(self.notes[-1])
            self.sleep_until(min(self.deadline, next_sample, now + 1.0))
        if self.train_started is None:
            self.notes.append("training never started before the deadline")
        self.sample()
        self.say("deadline: stopping the churn, the flood and the job")

    def stop_all(self) -> dict[str, int | None]:
        """Stop every helper and the launcher (which stops the nodes, restarted ones included),
        then kill any node of this run still alive.  Idempotent."""
        codes = {}
        for name in ("churn", "flood", "launcher"):
            c = self.children.get(name)
            if c is not None:
                c.signal(signal.SIGTERM)
        for name in ("churn", "flood", "launcher"):
            c = self.children.get(name)
            if c is not None:
                codes[name] = c.stop(GRACE_S[name])
        self.leftover = []
        for name, pid in node_pids(self.run_dir).items():
            self.leftover.append(f"{name} (pid {pid})")
            with contextlib.suppress(fault.FaultError, ProcessLookupError):
                fault._signal_group(pid, signal.SIGKILL)
        for name in HELPERS:
            c = self.children.get(name)
            if c is not None and c.running():
                self.leftover.append(f"{name} (pid {c.pid})")
                c.signal(signal.SIGKILL)
                c.wait(5)
        return codes

    # -- the report ----------------------------------------------------------------------
    def report(self, codes: dict) -> dict:
        summary = rundir.read_summary(self.run_dir)
        records = ps_records(self.run_dir)
        steps = steps_done(records)
        evals = evaluations(records)
        finals = {}
        for rank, ev in evals.items():
            if ev:
                step = max(ev)
                finals[str(rank)] = dict(accuracy=ev[step], step=step + 1)
            else:
                finals[str(rank)] = dict(accuracy=None, step=None)
        rss = self.rss.summary()
        logs = log_sizes(self.run_dir)
        wall = time.time() - self.t0 if self.t0 else None
        logs["nodes_bytes_per_min"] = round(logs["nodes_total"] * 60 / wall) if wall else None
        churn = self.children["churn"].last_json() if "churn" in self.children else None
        if churn is not None:
            churn["mode"] = self.args.churn_mode
        return dict(
            run_dir=str(self.run_dir), minutes=self.args.minutes,
            wall_s=round(wall, 1) if wall else None,
            outcome=summary.get("outcome"), exit_codes=codes, notes=self.notes,
            steps=min(steps.values()) if steps else 0, steps_per_ps={str(k): v for k, v in steps.items()},
            rss={k: v for k, v in rss.items() if k not in HELPERS},
            helpers_rss={k: v for k, v in rss.items() if k in HELPERS},
            logs=logs, accuracy=finals,
            flood=flood_counts(self.children["flood"].last_json() if "flood" in self.children else None),
            churn=churn, refusals=refusal_totals(summary.get("rejections") or {}),
            restarts=rejoins(records, [dict(r, at_s=round(r["killed_at"] - self.t0, 1) if r.get("killed_at")
                                            else None) for r in self.restarts]),
            leftover=self.leftover,
            control=None, _evals=evals)


def run_control(args: argparse.Namespace, steps: int, soak_evals: dict, say) -> dict:
    """The main job with no attack and no fault for ``steps`` steps; the accuracy difference."""
    ctl_dir = Path(str(args.run_dir) + "-control")
    ctl_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "byzsgd.launch", "--run_dir", str(ctl_dir), "--num_iter", str(steps),
           "--timeout", str(int(args.control_timeout)), "--quiet", *args.launcher_args]
    say(f"control: {steps} steps, no attack, no fault ({ctl_dir})")
    child = Child("control", cmd, ctl_dir / "soak-launcher.log", child_env())
    rss = RssTable()  # the same sampling: what the nodes hold without attack, to compare
    end = time.time() + args.control_timeout + 120  # the launcher's own --timeout ends it first
    next_sample = time.time() + args.sample_every
    try:
        while child.running() and time.time() < end:
            check_stop()
            child.wait(min(0.5, max(0.0, end - time.time())))
            if time.time() >= next_sample:
                next_sample = time.time() + args.sample_every
                for name, pid in node_pids(ctl_dir).items():
                    rss.add(name, pid, next_sample)
    finally:
        if child.running():
            child.stop(GRACE_S["launcher"])
        for name, pid in node_pids(ctl_dir).items():
            with contextlib.suppress(fault.FaultError, ProcessLookupError):
                fault._signal_group(pid, signal.SIGKILL)
    summary = rundir.read_summary(ctl_dir)
    evals = evaluations(ps_records(ctl_dir))
    cmp = compare_accuracy(soak_evals, evals)
    return dict(run_dir=str(ctl_dir), steps=steps, outcome=summary.get("outcome"), exit_code=child.proc.returncode,
                final_accuracy=summary.get("final_accuracy"), rss=rss.summary(), logs=log_sizes(ctl_dir),
                **{f"at_step_{k}": v for k, v in cmp.items()})


# ----------------------------------------------------------------------------- formatting
def _mib(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def _acc(v) -> str:
    return "n/a" if v is None else f"{v:.2f}%"


def format_report(rep: dict) -> str:
    """The human-readable report (what ``--json`` prints as one object)."""
    L = []
    L.append(f"soak report: {rep['run_dir']}")
    L.append(f"  {rep['minutes']:g} min asked, {rep.get('wall_s') or 0:.0f} s ran; launcher outcome "
             f"{rep.get('outcome')}; steps done {rep['steps']} (per PS: "
             + ", ".join(f"{k}: {v}" for k, v in sorted(rep.get('steps_per_ps', {}).items(), key=_rank_key)) + ")")
    for note in rep.get("notes") or []:
        L.append(f"  note: {note}")
    L.append("RSS per node (MiB): min / max (first -> last, samples, pids)")
    for name, r in sorted(rep.get("rss", {}).items(), key=lambda kv: _node_key(kv[0])):
        L.append(f"  {name:<9} {_mib(r['min_mib']):>7} / {_mib(r['max_mib']):>7}   "
                 f"({_mib(r['first_mib'])} -> {_mib(r['last_mib'])}, {r['samples']}, {r['pids']})")
        for k, p in enumerate(r.get("per_pid") or []):
            L.append(f"    {'started' if k == 0 else f'restart {k}':<9} {_mib(p['min_mib']):>5} / "
                     f"{_mib(p['max_mib']):>7}   ({_mib(p['first_mib'])} -> {_mib(p['last_mib'])}, "
                     f"{p['samples']}, pid {p['pid']})")
    for name, r in sorted(rep.get("helpers_rss", {}).items()):
        L.append(f"  {name:<9} {_mib(r['min_mib']):>7} / {_mib(r['max_mib']):>7}   (helper)")
    logs = rep.get("logs") or {}
    rate = logs.get("nodes_bytes_per_min")
    L.append(f"logs: {logs.get('total', 0):,} bytes in all, {logs.get('nodes_total', 0):,} the nodes'"
             + (f" ({rate:,} bytes/min)" if rate is not None else "")
             + f"; metrics {logs.get('metrics_total', 0):,} bytes")
    for name, size in sorted((logs.get("files") or {}).items(), key=lambda kv: _node_key(kv[0])):
        L.append(f"  {name:<22} {size:>12,}")
    L.append("final accuracy of each correct PS (its last evaluation)")
    for rank, a in sorted((rep.get("accuracy") or {}).items(), key=_rank_key):
        L.append(f"  PS {rank}: {_acc(a.get('accuracy'))} at step {a.get('step')}")
    fl = rep.get("flood")
    if fl:
        L.append(f"flood: {fl['tried']:,} connections tried, {fl['opened']:,} opened, {fl['closed_by_node']:,} "
                 f"closed by the nodes, {fl['connect_failures']:,} refused at connect, at most {fl['max_open']} "
                 f"open per PS ({fl.get('sockets_per_endpoint')} {fl.get('mode')} sockets per PS, "
                 f"{fl.get('seconds')} s)")
    else:
        L.append("flood: no counts (not started, or it printed none)")
    ch = rep.get("churn")
    if ch:
        refused = ", ".join(f"{k} {v:,}" for k, v in sorted(ch.get("refused", {}).items())) or "none"
        errs = ", ".join(f"{k} {v:,}" for k, v in sorted(ch.get("errors", {}).items())) or "none"
        L.append(f"churn: rank {ch['rank']} ({ch.get('mode')}): {ch['attempts']:,} attempts, "
                 f"{ch['connected']:,} reconnects accepted; refused: {refused}; closed in the handshake "
                 f"{ch.get('closed', 0):,}; errors: {errs}; {ch.get('bytes_received', 0):,} bytes received")
    else:
        L.append("churn: no counts (not started, or it printed none)")
    refs = rep.get("refusals") or {}
    if refs:
        L.append("refusals counted by the nodes (summary.json rejections, per reason)")
        for rank, counts in sorted(refs.items(), key=_rank_key):
            if counts:
                L.append(f"  rank {rank}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    rs = rep.get("restarts") or []
    ok = sum(1 for r in rs if r.get("rejoined"))
    L.append(f"restarts: {len(rs)} done, {ok} rejoined")
    for r in rs:
        if r.get("error"):
            L.append(f"  worker {r['rank']}: FAILED: {r['error']}")
        elif r.get("rejoined"):
            L.append(f"  worker {r['rank']}: restarted, rejoined at step {r['rejoined_step']} "
                     f"({r['rejoined_after_s']:.1f} s after), served {r['steps_served']} steps")
        else:
            L.append(f"  worker {r['rank']}: restarted, NOT rejoined (no correct PS aggregated it since)")
    left = rep.get("leftover") or []
    L.append("processes left after the stop: " + (", ".join(left) + " (killed)" if left else "none"))
    ctl = rep.get("control")
    if ctl:
        L.append(f"control ({ctl['run_dir']}): {ctl['steps']} steps, no attack, no fault: outcome "
                 f"{ctl.get('outcome')}, final accuracy "
                 + ", ".join(f"PS {k} {_acc(v)}" for k, v in sorted((ctl.get('final_accuracy') or {}).items(),
                                                                  key=_rank_key)))
        if ctl.get("rss"):
            L.append("  its RSS (MiB), min / max: " + ", ".join(
                f"{name} {_mib(r['min_mib'])} / {_mib(r['max_mib'])}"
                for name, r in sorted(ctl["rss"].items(), key=lambda kv: _node_key(kv[0]))))
        if ctl.get("logs"):
            L.append(f"  its logs: {ctl['logs'].get('nodes_total', 0):,} bytes (the nodes')")
        if ctl.get("at_step_step") is not None:
            L.append(f"accuracy at step {ctl['at_step_step']} (least over the correct PSes): soak "
                     f"{_acc(ctl['at_step_soak'])}, control {_acc(ctl['at_step_control'])}, difference "
                     f"{ctl['at_step_difference']:+.2f} points")
        else:
            L.append("accuracy difference: no step evaluated by both runs")
    return "\n".join(L)


def _rank_key(kv):
    try:
        return (int(kv[0]), "")
    except (TypeError, ValueError):
        return (1 << 30, str(kv[0]))


def _node_key(name: str):
    digits = "".join(ch for ch in name if ch.isdigit())
    return (0 if name.startswith("ps") else 1 if name.startswith("worker") else 2,
            int(digits) if digits else 0, name)


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/soak.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Flags after -- go to python -m byzsgd.launch (soak and control).  "
                                       "'scripts/soak.py churn RUN_DIR --rank R' runs the churner alone "
                                       "(see 'scripts/soak.py churn --help').")
    p.add_argument("--minutes", type=float, default=20.0, help="wall time of the soak (default 20)")
    p.add_argument("--run_dir", type=Path, default=None,
                   help="run directory (default runs/soak-<date>-<time>; the control's is <run_dir>-control)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (last line)")
    p.add_argument("--no_control", action="store_true", help="skip the run without attack and fault")
    p.add_argument("--control_timeout", type=float, default=None,
                   help="seconds the control may take (default: max(900, 2 x the soak))")
    p.add_argument("--sample_every", type=float, default=10.0, help="RSS sampling period, s (default 10)")
    p.add_argument("--fault_every", type=float, default=120.0,
                   help="kill and restart a worker every S s of the soak (default 120; 0: never)")
    p.add_argument("--fault_down", type=float, default=0.0, help="seconds a killed worker stays down (default 0)")
    p.add_argument("--fault_margin", type=float, default=30.0,
                   help="no fault in the last S s (the worker could not rejoin; default 30)")
    p.add_argument("--flood_sockets", type=int, default=64, help="outsider sockets per PS (default 64)")
    p.add_argument("--flood_rate", type=float, default=500.0, help="outsider connections per second (default 500)")
    p.add_argument("--flood_mode", choices=("idle", "slow"), default="idle")
    p.add_argument("--flood_source", default="",
                   help="bind the flood to this loopback address (default: the members' own, 127.0.0.1)")
    p.add_argument("--churn_rank", type=int, default=-1, help="the reconnecting member's rank (default: the last worker)")
    p.add_argument("--churn_mode", choices=("takeover", "shared"), default="takeover",
                   help="takeover: its node is killed and the churner is that rank; shared: both run")
    p.add_argument("--churn_rate", type=float, default=4.0, help="reconnects per second (default 4)")
    p.add_argument("--churn_hold", type=float, default=0.1, help="seconds each reconnect stays (default 0.1)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the flags; ConfigError for values out of range."""
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher = []
    if "--" in argv:
        i = argv.index("--")
        argv, launcher = argv[:i], argv[i + 1:]
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown arguments {unknown} (launcher flags go after --)")
    args.launcher_args = launcher
    for flag in ("--run_dir", "--num_iter", "--timeout"):
        if any(a == flag or a.startswith(flag + "=") for a in launcher):
            raise ConfigError(f"{flag} is the soak's to set, not a launcher flag to pass")
    if not 0 < args.minutes <= 24 * 60:
        raise ConfigError("--minutes must be in (0, 1440]")
    if not args.sample_every > 0:
        raise ConfigError("--sample_every must be > 0")
    if args.fault_every < 0 or args.fault_down < 0 or args.fault_margin < 0:
        raise ConfigError("--fault_every, --fault_down and --fault_margin must be >= 0")
    if not 0 < args.churn_rate <= 100 or not 0 <= args.churn_hold <= 10:
        raise ConfigError("--churn_rate must be in (0, 100] and --churn_hold in [0, 10]")
    if not 1 <= args.flood_sockets <= 5000 or not args.flood_rate > 0:
        raise ConfigError("--flood_sockets must be in [1, 5000] and --flood_rate > 0")
    if args.flood_source and not loopback(args.flood_source):
        raise ConfigError(f"--flood_source {args.flood_source} is not a loopback address")
    if args.control_timeout is None:
        args.control_timeout = max(900.0, 2 * args.minutes * 60)
    if args.run_dir is None:
        args.run_dir = ROOT / "runs" / time.strftime("soak-%Y%m%d-%H%M%S")
    args.run_dir = Path(args.run_dir).resolve()
    return args


def public(rep: dict) -> dict:
    return {k: v for k, v in rep.items() if not k.startswith("_")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["churn"]:
        return churn_main(argv[1:])
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        print(f"soak.py: error: {exc}", file=sys.stderr)
        return 2
    if (args.run_dir / rundir.DEPLOYMENT).exists():
        print(f"soak.py: error: {args.run_dir} holds a run already; give a new --run_dir", file=sys.stderr)
        return 2

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    soak = Soak(args)
    interrupted = False
    try:
        try:
            soak.run_soak()
        except Interrupted as exc:
            interrupted = True
            soak.notes.append(f"interrupted ({exc}): stopped early")
        except (fault.FaultError, SoakError, ConfigError) as exc:
            soak.notes.append(f"error: {exc}")
            print(f"soak.py: error: {exc}", file=sys.stderr)
        finally:
            codes = soak.stop_all()
        rep = soak.report(codes)
        if not args.no_control and not interrupted and rep["steps"] > 0:
            try:
                rep["control"] = run_control(args, rep["steps"], rep["_evals"], soak.say)
            except Interrupted as exc:
                interrupted = True
                rep["notes"].append(f"interrupted ({exc}) during the control")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if args.json:
        print(format_report(rep), file=sys.stderr)
        print(json.dumps(public(rep)), flush=True)
    else:
        print(format_report(rep), flush=True)
    if interrupted:
        return 130
    ok = (soak.train_started is not None and not rep["leftover"]
          and all(r.get("rejoined") for r in rep["restarts"])
          and not any(n.startswith(("error", "the launcher exited")) for n in rep["notes"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
