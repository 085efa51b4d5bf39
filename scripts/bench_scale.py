#!/usr/bin/env python
"""How byzsgd scales on one machine: whole deployments of n_ps PS x n_w workers.

For each row (n_ps, n_w) and mode (garfield, paper) it runs ``python -m byzsgd.launch`` on
loopback and reports:

* start-up: seconds from the launcher's start to the first step logged by a correct PS
  (``startup_s``; ``startup_nodes_s`` from the moment the launcher starts the nodes);
* step time: the correct PSes' median step time;
* per role (ps, worker), per step: messages (frames) and bytes sent, CPU seconds
  (each node prints its counts at exit: the ``byzsgd-net-stats`` line of its log);
* memory per node: PSS and RSS (``/proc/PID/smaps_rollup``), sampled while the run goes on,
  the largest sample per node kept; and the sum over the deployment;
* the floor of a step: bytes per step / loopback bandwidth, and messages per step x the raw
  per-message cost (both measured here, see ``--floor``).

The protocol rows use ``--model linear`` on ``synthetic:784:10`` (a 7,850-parameter model: the
convnet's gradients would dominate), the MNIST row the ``convnet`` on MNIST.

    python scripts/bench_scale.py --rows 4x7,4x30 --modes garfield,paper --steps 50
    python scripts/bench_scale.py --rows mnist --json
    python scripts/bench_scale.py --rows 4x7,4x30,7x50 --plot docs/scale.png
    python scripts/bench_scale.py --from_json a.out b.out --plot docs/scale.png   # re-plot
    python scripts/bench_scale.py --rows mnist --compare_spawn --repeats 3 --steps 20
        # byzsgd-launch vs run_exp.sh --spawn fork vs --spawn exec: start-up and PSS per node

Prints a table and, with ``--json``, one JSON line (the last) with every row.

:func:`node_memory` / :func:`sample_memory` are the reusable part: PSS/RSS of one pid, and
of every node of a run directory (its ``deployment.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and str(REPO) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(REPO))

#: the rows of the issue; ``mnist`` is 4 PS x 7 workers with the convnet on MNIST
ROWS = {"4x7": (4, 7), "4x30": (4, 30), "7x50": (7, 50), "10x100": (10, 100), "mnist": (4, 7)}
PROTOCOL_MODEL = ("synthetic:784:10", "linear")
MNIST_MODEL = ("mnist", "convnet")


# ----------------------------------------------------------------------------- memory
def node_memory(pid: int) -> dict[str, int] | None:
    """Memory of process ``pid`` in bytes from ``/proc/PID/smaps_rollup``: ``pss``, ``rss``,
    ``pss_anon``, ``pss_file``, ``private`` (clean + dirty); None when it is gone (or the
    kernel has no smaps_rollup)."""
    try:
        text = Path(f"/proc/{int(pid)}/smaps_rollup").read_text()
    except (OSError, ValueError):
        return None
    kb: dict[str, int] = {}
    for line in text.splitlines()[1:]:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kb[key.strip()] = int(parts[0])
    if "Pss" not in kb:
        return None
    return {"pss": kb["Pss"] << 10, "rss": kb.get("Rss", 0) << 10,
            "pss_anon": kb.get("Pss_Anon", 0) << 10, "pss_file": kb.get("Pss_File", 0) << 10,
            "private": (kb.get("Private_Clean", 0) + kb.get("Private_Dirty", 0)) << 10}


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (``/proc/PID/stat``), None when it is gone."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
    except (OSError, ValueError):
        return None
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def deployment_pids(run_dir: str | os.PathLike) -> dict[int, tuple[str, int]]:
    """{rank: (role, pid)} of the nodes of a run directory (empty until it is written)."""
    try:
        doc = json.loads((Path(run_dir) / "deployment.json").read_text())
    except (OSError, ValueError):
        return {}
    return {int(r["rank"]): (r["role"], int(r["pid"])) for r in doc.get("ranks", ())
            if r.get("pid")}


def sample_memory(run_dir: str | os.PathLike) -> dict[int, dict]:
    """One sample of every live node of a run: {rank: {"role", "pid", "pss", "rss", ...}}."""
    out = {}
    for rank, (role, pid) in deployment_pids(run_dir).items():
        mem = node_memory(pid)
        if mem is not None:
            out[rank] = {"role": role, "pid": pid, **mem}
    return out


class MemorySampler(threading.Thread):
    """Samples a run directory's nodes every ``period`` s; keeps each rank's largest PSS
    sample (``peak``) and its last CPU-seconds reading (``cpu``)."""

    def __init__(self, run_dir, period: float = 0.5, parents=None):
        super().__init__(daemon=True)
        self.run_dir, self.period = run_dir, period
        self.parents = parents  # () -> pids the nodes are forked from (sampled into parent_peak)
        self.parent_peak: dict[int, dict] = {}
        self.peak: dict[int, dict] = {}
        self.cpu: dict[int, float] = {}
        self.total_peak = 0  # the largest sum of PSS over one sample
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            sample = sample_memory(self.run_dir)
            for rank, mem in sample.items():
                if mem["pss"] > self.peak.get(rank, {}).get("pss", -1):
                    self.peak[rank] = mem
                cpu = cpu_seconds(mem["pid"])
                if cpu is not None:
                    self.cpu[rank] = cpu
            self.total_peak = max(self.total_peak, sum(m["pss"] for m in sample.values()))
            for pid in self.parents() if self.parents else ():
                mem = node_memory(pid)
                if mem is not None and mem["pss"] > self.parent_peak.get(pid, {}).get("pss", -1):
                    self.parent_peak[pid] = mem
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


# ----------------------------------------------------------------------------- the floor
_FLOOR_CHILD = r"""
import socket, sys, time
port, size, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection(("127.0.0.1", port))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = b"x" * size
for _ in range(n):
    s.sendall(buf)
s.recv(1)
s.close()
"""


def raw_one_way(size: int, count: int) -> float:
    """Seconds per message of ``size`` bytes, one way over a raw loopback TCP socket between
    two processes (a blocking sender, a receiver into one reused buffer)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    child = subprocess.Popen([sys.executable, "-c", _FLOOR_CHILD, str(srv.getsockname()[1]),
                              str(size), str(count)])
    conn, _ = srv.accept()
    buf = bytearray(max(size, 1 << 16))
    view = memoryview(buf)
    total, t0 = size * count, None
    got = 0
    while got < total:
        k = conn.recv_into(view, min(len(buf), total - got))
        if t0 is None:
            t0 = time.perf_counter()
        if not k:
            break
        got += k
    elapsed = time.perf_counter() - (t0 or time.perf_counter())
    conn.sendall(b"!")
    child.wait()
    conn.close()
    srv.close()
    return elapsed / count


def measure_floor(msg_bytes: int) -> dict:
    """The raw per-message cost (at the rows' message size) and the loopback bandwidth (4 MB
    messages), both from :func:`raw_one_way`."""
    msg = raw_one_way(max(64, msg_bytes), 20000 if msg_bytes < 1 << 16 else 2000)
    big = 4 << 20
    bw = big / raw_one_way(big, 100)
    return {"per_message_s": msg, "message_bytes": msg_bytes, "bandwidth_Bps": bw}


# ----------------------------------------------------------------------------- one row
def _stats_lines(run_dir: Path) -> dict[int, dict]:
    from byzsgd import rundir
    out = {}
    for rank, (role, _) in deployment_pids(run_dir).items():
        st = rundir.read_net_stats(rundir.rank_file(run_dir, role, rank, "log"))
        if st:
            out[rank] = st
    return out


def run_row(n_ps: int, n_w: int, mode: str, *, dataset: str, model: str, steps: int, batch: int,
            workdir: Path, spawn: str | None = None, timeout: float = 600,
            extra: list[str] = ()) -> dict:
    """Run one deployment and measure it (see the module docstring)."""
    from byzsgd import rundir
    from byzsgd.deploy import summary as runsum

    run_dir = workdir / f"{mode}-{n_ps}x{n_w}-{model}"
    cmd = [sys.executable, "-m", "byzsgd.launch", "--run_dir", str(run_dir), "--quiet",
           "--num_ps", str(n_ps), "--num_workers", str(n_w), "--mode", mode,
           "--dataset", dataset, "--model", model, "--batch", str(batch),
           "--num_iter", str(steps), "--acc_freq", str(steps), "--timeout", str(timeout)]
    if model != "convnet":
        cmd += ["--loss", "cross-entropy"]
    if spawn:
        cmd += ["--spawn", spawn]
    cmd += list(extra)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    sampler = MemorySampler(run_dir)
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    wall = time.time() - t0
    summary = rundir.read_summary(run_dir)
    series = runsum.ps_series(run_dir)
    firsts = [s["first_time"] for s in series.values() if s.get("first_time")]
    stats = _stats_lines(run_dir)
    pids = deployment_pids(run_dir)
    row = {"n_ps": n_ps, "n_w": n_w, "nodes": n_ps + n_w, "mode": mode, "dataset": dataset,
           "model": model, "batch": batch, "steps": steps, "spawn": spawn or "default",
           "outcome": summary.get("outcome", f"launcher exit {proc.returncode}"),
           "min_accuracy": summary.get("min_accuracy"),
           "step_time": summary.get("median_step_time"),
           "startup_s": (min(firsts) - t0) if firsts else None, "wall_s": wall}
    try:  # from the launcher's start of the nodes (its own imports excluded)
        started = float(json.loads((run_dir / "deployment.json").read_text())["started"])
        row["startup_nodes_s"] = (min(firsts) - started) if firsts else None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    done_steps = max([s["last_step"] + 1 for s in series.values()] or [steps]) or steps
    for role in ("ps", "worker"):
        ranks = [r for r, (ro, _) in pids.items() if ro == role]
        st = [stats[r] for r in ranks if r in stats]
        mem = [sampler.peak[r] for r in ranks if r in sampler.peak]
        key = "ps" if role == "ps" else "w"
        if st:
            row[f"{key}_msgs_per_step"] = sum(s.get("frames_sent", 0) for s in st) / done_steps
            row[f"{key}_bytes_per_step"] = sum(s.get("bytes_sent", 0) for s in st) / done_steps
            row[f"{key}_cpu_per_step"] = sum(s.get("cpu_s", 0.0) for s in st) / done_steps
        if mem:
            pss = sorted(m["pss"] for m in mem)
            row[f"{key}_pss_median"] = pss[len(pss) // 2]
            row[f"{key}_pss_max"] = pss[-1]
            row[f"{key}_rss_median"] = sorted(m["rss"] for m in mem)[len(mem) // 2]
    row["total_pss_peak"] = sampler.total_peak
    if row["outcome"] != "ok":
        row["stderr_tail"] = err[-2000:]
    return row


# ----------------------------------------------------------------------------- spawning
#: how the ranks of one deployment start: byzsgd-launch (forks from the launcher), run_exp.sh
#: with one fork server per host, run_exp.sh with one interpreter per rank
SPAWN_WAYS = ("launch", "run_exp-fork", "run_exp-exec")


def _parent_pids(run_dir: Path, way: str) -> list[int]:
    """The processes the nodes are forked from (a launcher's zygote, the fork servers)."""
    try:
        doc = json.loads((run_dir / "deployment.json").read_text())
    except (OSError, ValueError):
        return []
    if way == "launch":
        return [int(doc["launcher_pid"])] if doc.get("launcher_pid") else []
    return [int(p) for p in (doc.get("fork_servers") or {}).values()]


def run_spawn_way(way: str, n_ps: int, n_w: int, *, dataset: str, model: str, steps: int,
                  batch: int, run_dir: Path, timeout: float) -> dict:
    """One deployment started ``way`` (see SPAWN_WAYS), every host this machine (run_exp.sh:
    runner local, one host, so one fork server); the same node configuration each way (the
    launcher's, shipped to run_exp.sh as trainer flags).  Start-up: from the command's start to
    the first step of *every* PS; memory: each node's largest PSS sample, and the parents'."""
    from byzsgd import rundir
    from byzsgd.deploy import summary as runsum

    flags = ["--num_ps", str(n_ps), "--num_workers", str(n_w), "--dataset", dataset, "--model", model,
             "--batch", str(batch), "--num_iter", str(steps), "--acc_freq", str(steps)]
    if model != "convnet":
        flags += ["--loss", "cross-entropy"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               BYZSGD_PYTHON=sys.executable, BYZSGD_RUNNER="local")
    if way == "launch":
        cmd = [sys.executable, "-m", "byzsgd.launch", "--run_dir", str(run_dir), "--quiet", "--spawn",
               "fork", "--timeout", str(timeout), *flags]
    else:
        from byzsgd.deploy.options import LaunchConfig
        from byzsgd.deploy.plan import OWNED_FLAGS

        argv = LaunchConfig.from_argv(flags).run.to_argv()
        trainer = [w for i in range(0, len(argv), 2) if argv[i][2:] not in OWNED_FLAGS
                   for w in argv[i:i + 2]]
        hosts = run_dir.parent / f"{run_dir.name}-hosts"
        hosts.mkdir(parents=True, exist_ok=True)
        (hosts / "servers").write_text("127.0.0.1\n" * n_ps)
        (hosts / "workers").write_text("127.0.0.1\n" * n_w)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = ["bash", str(REPO / "scripts" / "run_exp.sh"), "--servers", str(hosts / "servers"),
               "--workers", str(hosts / "workers"), "--run_dir", str(run_dir), "--base_port", str(port),
               "--ports", "ephemeral", "--spawn", way.rpartition("-")[2], "--quiet", "--timeout",
               str(timeout), "--", *trainer]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    sampler = MemorySampler(run_dir, parents=lambda: _parent_pids(run_dir, way))
    sampler.start()
    out, err = proc.communicate()
    sampler.stop()
    summary = rundir.read_summary(run_dir)
    firsts = [s["first_time"] for s in runsum.ps_series(run_dir).values() if s.get("first_time")]
    pss = sorted(m["pss"] for m in sampler.peak.values())
    row = {"way": way, "outcome": summary.get("outcome", f"exit {proc.returncode}"),
           "startup_all_s": max(firsts) - t0 if len(firsts) == n_ps else None,
           "startup_first_s": min(firsts) - t0 if firsts else None,
           "node_pss_median": pss[len(pss) // 2] if pss else None, "node_pss_max": pss[-1] if pss else None,
           "nodes_sampled": len(pss), "total_pss_peak": sampler.total_peak,
           "parent_pss": sum(m["pss"] for m in sampler.parent_peak.values()) or None,
           "wall_s": time.time() - t0}
    if row["outcome"] != "ok":
        row["stderr_tail"] = err[-2000:]
    return row


def compare_spawn(n_ps: int, n_w: int, *, repeats: int, workdir: Path, **kw) -> dict:
    """Every way of SPAWN_WAYS, ``repeats`` times, interleaved (the order turns each round);
    the median of each figure per way, and the ratios the issue asks for."""
    runs: dict[str, list[dict]] = {w: [] for w in SPAWN_WAYS}
    for rep in range(repeats):
        for i in range(len(SPAWN_WAYS)):
            way = SPAWN_WAYS[(i + rep) % len(SPAWN_WAYS)]
            row = run_spawn_way(way, n_ps, n_w, run_dir=workdir / f"{way}-{n_ps}x{n_w}-{rep}", **kw)
            runs[way].append(row)
            print(f"bench_scale: {way} #{rep}: {row['outcome']}, every PS stepping after "
                  f"{_f(row['startup_all_s'], '{:.1f}')} s, node PSS median {_mb(row['node_pss_median'])} "
                  f"MB, parent {_mb(row['parent_pss'])} MB", file=sys.stderr, flush=True)

    def median(way: str, key: str):
        vals = sorted(r[key] for r in runs[way] if r.get(key) is not None)
        return vals[len(vals) // 2] if vals else None

    keys = ("startup_all_s", "startup_first_s", "node_pss_median", "node_pss_max", "total_pss_peak",
            "parent_pss")
    med = {w: {k: median(w, k) for k in keys} for w in SPAWN_WAYS}

    def ratio(a: str, b: str, key: str):
        x, y = med[a][key], med[b][key]
        return x / y if x is not None and y else None

    return {"n_ps": n_ps, "n_w": n_w, "repeats": repeats, "runs": runs, "median": med,
            "ratios": {"startup_fork_over_launch": ratio("run_exp-fork", "launch", "startup_all_s"),
                       "startup_exec_over_launch": ratio("run_exp-exec", "launch", "startup_all_s"),
                       "node_pss_fork_over_exec": ratio("run_exp-fork", "run_exp-exec", "node_pss_median"),
                       "node_pss_fork_over_launch": ratio("run_exp-fork", "launch", "node_pss_median")}}


def spawn_table(res: dict) -> str:
    lines = [f"{res['n_ps']} PS x {res['n_w']} workers, medians of {res['repeats']} interleaved runs "
             f"({os.cpu_count()} cores)",
             "way | ok | every PS stepping s | first PS s | node PSS MB median|max | nodes total MB | parent MB"]
    for w in SPAWN_WAYS:
        m = res["median"][w]
        ok = sum(r["outcome"] == "ok" for r in res["runs"][w])
        lines.append(f"{w} | {ok}/{len(res['runs'][w])} | {_f(m['startup_all_s'], '{:.1f}')} | "
                     f"{_f(m['startup_first_s'], '{:.1f}')} | {_mb(m['node_pss_median'])}|"
                     f"{_mb(m['node_pss_max'])} | {_mb(m['total_pss_peak'])} | {_mb(m['parent_pss'])}")
    r = res["ratios"]
    lines.append(f"start-up (every PS stepping): run_exp fork / byzsgd-launch = "
                 f"{_f(r['startup_fork_over_launch'], '{:.2f}')} (target <= 2), run_exp exec / "
                 f"byzsgd-launch = {_f(r['startup_exec_over_launch'], '{:.2f}')}")
    lines.append(f"node PSS: run_exp fork / exec = {_f(r['node_pss_fork_over_exec'], '{:.2f}')}, "
                 f"fork / byzsgd-launch = {_f(r['node_pss_fork_over_launch'], '{:.2f}')}; fork median "
                 f"{_mb(res['median']['run_exp-fork']['node_pss_median'])} MB a node (target <= 100)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- output
def _mb(v) -> str:
    return "-" if v is None else f"{v / 2**20:.0f}"


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(rows: list[dict]) -> str:
    head = ("row", "mode", "out", "start s", "step s", "floor s", "x", "msg/step ps|w",
            "KB/step ps|w", "cpu/step ps|w", "PSS MB ps|w", "total MB")
    lines = [" | ".join(head)]
    for r in rows:
        floor = r.get("floor_s")
        lines.append(" | ".join([
            f"{r['n_ps']}x{r['n_w']} {r['model']}", r["mode"], r["outcome"],
            _f(r.get("startup_s"), "{:.1f}"), _f(r.get("step_time")), _f(floor, "{:.4f}"),
            _f(r["step_time"] / floor if floor and r.get("step_time") else None, "{:.0f}"),
            f"{_f(r.get('ps_msgs_per_step'), '{:.0f}')}|{_f(r.get('w_msgs_per_step'), '{:.0f}')}",
            f"{_f((r.get('ps_bytes_per_step') or 0) / 1024, '{:.0f}')}|"
            f"{_f((r.get('w_bytes_per_step') or 0) / 1024, '{:.0f}')}",
            f"{_f(r.get('ps_cpu_per_step'), '{:.2f}')}|{_f(r.get('w_cpu_per_step'), '{:.2f}')}",
            f"{_mb(r.get('ps_pss_median'))}|{_mb(r.get('w_pss_median'))}",
            _mb(r.get("total_pss_peak"))]))
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_scale: matplotlib not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for mode, marker in (("garfield", "o"), ("paper", "s")):
        sel = sorted((r for r in rows if r["mode"] == mode and r["model"] == PROTOCOL_MODEL[1]
                      and r["outcome"] == "ok"), key=lambda r: r["nodes"])
        if not sel:
            continue
        n = [r["nodes"] for r in sel]
        axes[0].plot(n, [r["step_time"] for r in sel], marker=marker, label=f"{mode}: step")
        axes[0].plot(n, [r.get("floor_s") for r in sel], marker=marker, ls=":",
                     label=f"{mode}: floor")
        axes[1].plot(n, [r["startup_s"] for r in sel], marker=marker, label=mode)
        axes[2].plot(n, [r["total_pss_peak"] / 2**30 for r in sel], marker=marker, label=mode)
    axes[0].set(xlabel="nodes (PS + workers)", ylabel="s per step", yscale="log",
                title="step time vs floor")
    axes[1].set(xlabel="nodes", ylabel="s", title="start-up to the first step")
    axes[2].set(xlabel="nodes", ylabel="GiB", title="memory (sum of PSS)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"byzsgd on one machine ({os.cpu_count()} cores): {PROTOCOL_MODEL[1]} on "
                 f"{PROTOCOL_MODEL[0]}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="4x7,4x30,mnist",
                    help=f"comma-separated rows among {', '.join(ROWS)} or any NPSxNW "
                         "(default 4x7,4x30,mnist)")
    ap.add_argument("--modes", default="garfield,paper")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--spawn", choices=("fork", "exec"), default=None)
    ap.add_argument("--workdir", default=None, help="run directories (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--json", action="store_true", help="last line: one JSON object")
    ap.add_argument("--plot", default=None, help="write the curve there (e.g. docs/scale.png)")
    ap.add_argument("--no_floor", action="store_true", help="skip the raw-socket floor")
    ap.add_argument("--compare_spawn", action="store_true",
                    help="the first row started three ways (byzsgd-launch; run_exp.sh --spawn "
                         "fork; run_exp.sh --spawn exec), --repeats times interleaved: medians and "
                         "ratios of start-up (every PS stepping) and PSS per node")
    ap.add_argument("--repeats", type=int, default=3, help="with --compare_spawn")
    ap.add_argument("--from_json", nargs="+", default=None, metavar="FILE",
                    help="run nothing: table (and --plot) of the rows of earlier --json outputs "
                         "(their last line each)")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = []
        for f in args.from_json:
            rows += json.loads(Path(f).read_text().strip().splitlines()[-1])["rows"]
        rows.sort(key=lambda r: (r["model"] != PROTOCOL_MODEL[1], r["nodes"], r["mode"]))
        print(table(rows))
        if args.plot and plot(rows, args.plot):
            print(f"bench_scale: plot written to {args.plot}", file=sys.stderr)
        if args.json:
            print(json.dumps({"rows": rows, "cores": os.cpu_count()}))
        return 0
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.compare_spawn:
        name = args.rows.split(",")[0].strip()
        n_ps, n_w = ROWS[name] if name in ROWS else (int(v) for v in name.lower().split("x"))
        dataset, model = MNIST_MODEL if name == "mnist" else PROTOCOL_MODEL
        res = compare_spawn(n_ps, n_w, repeats=args.repeats, workdir=workdir, dataset=dataset,
                            model=model, steps=args.steps, batch=args.batch, timeout=args.timeout)
        print(spawn_table(res))
        if args.json:
            print(json.dumps(res))
        return 0 if all(r["outcome"] == "ok" for rs in res["runs"].values() for r in rs) else 1
    floors: dict[int, dict] = {}
    rows = []
    for name in [r.strip() for r in args.rows.split(",") if r.strip()]:
        if name in ROWS:
            n_ps, n_w = ROWS[name]
        else:
            try:
                n_ps, n_w = (int(v) for v in name.lower().split("x"))
            except ValueError:
                ap.error(f"row {name!r}: expected NPSxNW or one of {', '.join(ROWS)}")
        dataset, model = MNIST_MODEL if name == "mnist" else PROTOCOL_MODEL
        for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
            row = run_row(n_ps, n_w, mode, dataset=dataset, model=model, steps=args.steps,
                          batch=args.batch, workdir=workdir, spawn=args.spawn,
                          timeout=args.timeout)
            msgs = (row.get("ps_msgs_per_step") or 0) + (row.get("w_msgs_per_step") or 0)
            nbytes = (row.get("ps_bytes_per_step") or 0) + (row.get("w_bytes_per_step") or 0)
            if msgs and not args.no_floor:
                size = int(nbytes / msgs)
                key = max(64, 1 << max(0, size - 1).bit_length())  # one measurement per size class
                if key not in floors:
                    floors[key] = measure_floor(size)
                fl = floors[key]
                row["floor_bw_s"] = nbytes / fl["bandwidth_Bps"]
                row["floor_msg_s"] = msgs * fl["per_message_s"]
                row["floor_s"] = row["floor_bw_s"] + row["floor_msg_s"]
                row["floor"] = fl
            rows.append(row)
            print(f"bench_scale: {n_ps}x{n_w} {mode} {model}: {row['outcome']}, start-up "
                  f"{_f(row.get('startup_s'), '{:.1f}')} s, step {_f(row.get('step_time'))} s, "
                  f"worker PSS {_mb(row.get('w_pss_median'))} MB, total "
                  f"{_mb(row.get('total_pss_peak'))} MB", file=sys.stderr, flush=True)
    print(table(rows))
    if args.plot:
        if plot(rows, args.plot):
            print(f"bench_scale: plot written to {args.plot}", file=sys.stderr)
    if args.json:
        print(json.dumps({"rows": rows, "cores": os.cpu_count()}))
    return 0 if all(r["outcome"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
