"""The run directory: what a deployment leaves on disk, written and read here only.

One directory per run holds ``deployment.json`` (who runs where: each rank's role, address,
pid, Byzantine or not, log and metrics files), per-rank files (``<role><rank>.log/.pid/
.pgid/.rc/.host``, ``metrics-ps<rank>.jsonl``), ``credentials/rank<r>.cred`` (0600 each, in a
0700 directory: the ranks' pairwise keys, byzsgd.net.credentials; the operator secret they are
derived from is never written), ``secret`` (0600, only under ``--insecure_shared_secret``),
``faults.json`` (scripts/fault.py) and ``summary.json``.  The launcher, the multi-host deployment, the
experiment harness, the report and the fault injector all go through this module, so the
schema and the summary (one definition of the median step time) cannot drift.

Light on purpose (standard library + byzsgd.errors + byzsgd.metrics): the roles read their
peer directory through it, and the multi-host launcher runs where torch is absent.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from byzsgd.errors import ConfigError
from byzsgd.metrics import read_metrics

DEPLOYMENT = "deployment.json"
SUMMARY = "summary.json"
FAULTS = "faults.json"
SECRET = "secret"
CREDENTIALS = "credentials"
#: the line each node prints on stderr at exit (its log): transport rejections and failures
NET_STATS_PREFIX = "byzsgd-net-stats "
#: per-rank files: what -> file name pattern (``{stem}`` is ``<role><rank>``)
RANK_FILES = {"log": "{stem}.log", "pid": "{stem}.pid", "pgid": "{stem}.pgid", "rc": "{stem}.rc",
              "host": "{stem}.host", "metrics": "metrics-{stem}.jsonl"}
#: what every rank entry of a deployment.json holds (writers); readers need rank and role
RANK_KEYS = ("rank", "role", "host", "port", "pid", "byzantine", "attack", "attack_args", "log", "metrics")
DOC_KEYS = ("num_ps", "num_workers", "run_dir", "started", "credentials", "byzantine_ranks", "ranks")


# ----------------------------------------------------------------------------- file names
def stem(role: str, rank: int) -> str:
    return f"{role}{rank}"


def rank_file(run_dir: str | os.PathLike, role: str, rank: int, what: str) -> Path:
    """``run_dir``'s file ``what`` (log, pid, pgid, rc, host, metrics) of one rank."""
    return Path(run_dir) / RANK_FILES[what].format(stem=stem(role, rank))


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader never sees half of it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def credentials_dir(run_dir: str | os.PathLike) -> Path:
    """Where the launchers provision the ranks' credentials files (``rank<r>.cred``)."""
    return Path(run_dir) / CREDENTIALS


def write_secret(path: Path) -> Path:
    """A fresh random shared secret in ``path`` (0600): ``--insecure_shared_secret`` only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path


# ----------------------------------------------------------------------------- deployment.json
def _check_doc(doc: Any, source: str, *, full: bool) -> dict:
    if not isinstance(doc, dict) or not isinstance(doc.get("ranks"), list):
        raise ConfigError(f"{source}: not a deployment description (no 'ranks' list)")
    missing = [k for k in DOC_KEYS if k not in doc] if full else []
    for i, r in enumerate(doc["ranks"]):
        need = RANK_KEYS if full else ("rank", "role")
        if not isinstance(r, dict):
            raise ConfigError(f"{source}: ranks[{i}] is not an object")
        missing += [f"ranks[{i}].{k}" for k in need if k not in r]
        if "role" in r and r["role"] not in ("ps", "worker"):
            raise ConfigError(f"{source}: ranks[{i}].role must be ps or worker, got {r['role']!r}")
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}")
    return doc


def write_deployment(run_dir: str | os.PathLike, doc: dict) -> Path:
    """Check ``doc`` against the schema and write it atomically as ``deployment.json``."""
    path = Path(run_dir) / DEPLOYMENT
    _check_doc(doc, "deployment description", full=True)
    atomic_write(path, json.dumps(doc, indent=1))
    return path


def deployment_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / DEPLOYMENT


def read_deployment(where: str | os.PathLike) -> dict:
    """``deployment.json`` of a run directory (or the file itself); ConfigError when it is
    missing, not JSON or not a deployment description."""
    path = Path(where)
    if path.name != DEPLOYMENT and (path.is_dir() or not path.suffix):
        path = path / DEPLOYMENT
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return _check_doc(doc, str(path), full=False)


def peer_addresses(doc: dict) -> dict[int, tuple[str, int]]:
    """{rank: (host, port)} of a deployment description (the nodes' ``--peers``)."""
    try:
        return {int(r["rank"]): (str(r["host"]), int(r["port"])) for r in doc["ranks"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the deployment description has no address for every rank: {exc}") from None


def set_rank_pid(run_dir: str | os.PathLike, rank: int, pid: int) -> None:
    """Record a new pid for ``rank`` (a node restarted by scripts/fault.py)."""
    doc = read_deployment(run_dir)
    for r in doc["ranks"]:
        if int(r["rank"]) == rank:
            r["pid"] = pid
    atomic_write(Path(run_dir) / DEPLOYMENT, json.dumps(doc, indent=1))


# ----------------------------------------------------------------------------- faults.json
@contextlib.contextmanager
def faults_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    with open(Path(run_dir) / ".faults.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def read_faults(run_dir: str | os.PathLike) -> dict:
    """``faults.json`` (scripts/fault.py): faulty ranks, paused ranks, restarted {rank: pid},
    events; every key present, empty when there is no file."""
    try:
        doc = json.loads((Path(run_dir) / FAULTS).read_text())
        if not isinstance(doc, dict):
            doc = {}
    except (OSError, ValueError):
        doc = {}
    doc.setdefault("faulty", [])
    doc.setdefault("paused", [])
    doc.setdefault("restarted", {})
    doc.setdefault("events", [])
    return doc


def write_faults(run_dir: str | os.PathLike, doc: dict) -> None:
    atomic_write(Path(run_dir) / FAULTS, json.dumps(doc, indent=1))


# ----------------------------------------------------------------------------- metrics
def _num(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if x == x and x not in (float("inf"), float("-inf")) else None


def _correct_ps(run_dir: Path) -> tuple[list[tuple[int, Path]], float | None]:
    """(rank, metrics file) of each correct PS, and the deployment's start time; from the
    metrics files' names when there is no readable deployment.json."""
    try:
        doc = read_deployment(run_dir)
        ranks = [(int(r["rank"]), Path(r["metrics"])) for r in doc["ranks"]
                 if r.get("role") == "ps" and not r.get("byzantine") and r.get("metrics")]
        return ranks, float(doc.get("started") or 0) or None
    except (ConfigError, TypeError, ValueError):
        ranks = [(int(m.group(1)), p) for p in sorted(run_dir.glob("metrics-ps*.jsonl"))
                 if (m := re.match(r"metrics-ps(\d+)\.jsonl$", p.name))]
        return ranks, None


def ps_series(run_dir: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """Per correct PS of a run directory: evaluations [(step, acc, seconds since start)],
    final accuracy, steps logged, last completed step, first/last step times, bytes moved,
    its own median step time (from its done record; None until done)."""
    run_dir = Path(run_dir)
    ranks, t0 = _correct_ps(run_dir)
    out: dict[int, dict[str, Any]] = {}
    for rank, path in ranks:
        if not path.is_absolute():
            path = run_dir / path
        if not path.exists():
            path = run_dir / path.name  # run directory moved since
        evals, steps, final, start, done = [], [], None, None, None
        sent = received = None
        quorums: list[tuple[list, list]] = []  # per gradient phase: (aggregated, nonfinite)
        gathers: list[list] = []  # per gather: the peers whose models it used
        last_step = -1
        for rec in read_metrics(path):
            if rec.get("event") == "start":
                start = rec.get("time")
            elif rec.get("event") == "done":
                done = rec
                final = _num(rec.get("final_accuracy"))
                sent = rec.get("bytes_sent", sent)
                received = rec.get("bytes_received", received)
            elif "step" in rec and "event" not in rec:
                steps.append(rec)
                if "step_time" in rec:
                    last_step = max(last_step, int(rec["step"]))
                sent = rec.get("bytes_sent", sent)
                received = rec.get("bytes_received", received)
                if isinstance(rec.get("quorum"), list):
                    quorums.append((rec["quorum"], rec.get("nonfinite") or []))
                if isinstance(rec.get("model_quorum"), list):
                    gathers.append(rec["model_quorum"])
                if "accuracy" in rec:
                    evals.append((int(rec["step"]), _num(rec.get("accuracy")), rec.get("time")))
        origin = t0 or start or (steps[0]["time"] if steps else None)
        evals = [(s, a, (t - origin) if (t is not None and origin is not None) else None)
                 for s, a, t in evals]
        if final is None and evals:
            final = evals[-1][1]
        out[rank] = dict(evals=evals, final=final, steps=len(steps), last_step=last_step,
                         first_time=steps[0].get("time") if steps else None,
                         last_time=steps[-1].get("time") if steps else None,
                         bytes_sent=sent, bytes_received=received, metrics=str(path),
                         done=done is not None, quorums=quorums, gathers=gathers,
                         median_step_time=_num(done.get("median_step_time")) if done else None)
    return out


def ps_steps(run_dir: str | os.PathLike) -> dict[int, int]:
    """The last completed step logged by each correct PS (-1 when none yet)."""
    return {rank: s["last_step"] for rank, s in ps_series(run_dir).items()}


def _worker_ranks(run_dir: Path) -> list[int]:
    try:
        return sorted(int(r["rank"]) for r in read_deployment(run_dir)["ranks"] if r.get("role") == "worker")
    except (ConfigError, KeyError, TypeError, ValueError):
        return []


def _ps_ranks(run_dir: Path) -> list[int]:
    try:
        return sorted(int(r["rank"]) for r in read_deployment(run_dir)["ranks"] if r.get("role") == "ps")
    except (ConfigError, KeyError, TypeError, ValueError):
        return []


def quorum_shares(run_dir: str | os.PathLike,
                  series: dict[int, dict[str, Any]] | None = None) -> dict[str, dict[str, float] | int]:
    """Which workers the correct PSes' gradient quorums held, from their metrics (each step
    record's ``quorum`` and ``nonfinite``): ``quorum_share`` {worker rank: share of the
    correct PSes' gradient phases (all of them pooled) that aggregated its gradient},
    ``nonfinite_share`` {worker rank: share of them that left its row out for NaN/Inf; ranks
    never left out are not listed}, ``quorum_steps`` (how many gradient phases: the
    denominator).  Every worker rank of deployment.json is in ``quorum_share`` (0.0 when
    never aggregated: a silent or slow worker); a Byzantine worker's share says whether its
    attack reached the rule at all.  Likewise for the models: ``model_quorum_share`` {PS rank:
    share of the correct PSes' gathers that used its model} over ``model_quorum_steps``
    gathers (the other PSes' ranks only; empty without gathers)."""
    run_dir = Path(run_dir)
    series = ps_series(run_dir) if series is None else series
    phases = [q for s in series.values() for q in s["quorums"]]
    ranks = set(_worker_ranks(run_dir))
    counts: dict[int, int] = {}
    nonfinite: dict[int, int] = {}
    for members, dropped in phases:
        for w in set(members):
            counts[w] = counts.get(w, 0) + 1
            ranks.add(w)
        for w in set(dropped):
            nonfinite[w] = nonfinite.get(w, 0) + 1
    n = len(phases)
    share = lambda c: round(c / n, 4) if n else 0.0  # noqa: E731
    gathers = [g for s in series.values() for g in s["gathers"]]
    used: dict[int, int] = {}
    for peers in gathers:
        for p in set(peers):
            used[p] = used.get(p, 0) + 1
    ps_ranks = set(used) | {p for r, s in series.items() if s["gathers"] for p in _ps_ranks(run_dir) if p != r}
    return dict(quorum_share={str(w): share(counts.get(w, 0)) for w in sorted(ranks)},
                nonfinite_share={str(w): share(c) for w, c in sorted(nonfinite.items())},
                quorum_steps=n,
                model_quorum_share={str(p): round(used.get(p, 0) / len(gathers), 4) for p in sorted(ps_ranks)},
                model_quorum_steps=len(gathers))


def median_step_time(series: dict[int, dict[str, Any]]) -> float | None:
    """The run's median step time: the median over the PSes that finished of each one's
    median step time (each PS's skips its warm-up steps)."""
    times = [s["median_step_time"] for s in series.values() if s["median_step_time"] is not None]
    return statistics.median(times) if times else None


def summarize_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The metrics of a finished run, as the experiment harness records them per cell."""
    series = ps_series(run_dir)
    if not series:
        return dict(final_accuracy=None, best_accuracy=None, final_accuracy_per_ps={}, steps=0,
                    steps_per_s=None, bytes_sent=None, bytes_received=None, quorum_share={})
    finals = {str(r): s["final"] for r, s in series.items()}
    final = min(finals.values()) if all(v is not None for v in finals.values()) else None
    by_step: dict[int, list[float | None]] = {}
    for s in series.values():
        for step, acc, _ in s["evals"]:
            by_step.setdefault(step, []).append(acc)
    mins = [min(v) for v in by_step.values() if len(v) == len(series) and None not in v]
    rates = []
    for s in series.values():
        if s["steps"] >= 2 and s["first_time"] is not None and s["last_time"] is not None \
                and s["last_time"] > s["first_time"]:
            rates.append((s["steps"] - 1) / (s["last_time"] - s["first_time"]))

    def total(name):
        vals = [s[name] for s in series.values()]
        return sum(vals) if vals and all(isinstance(v, (int, float)) for v in vals) else None
    return dict(final_accuracy=final, best_accuracy=max(mins) if mins else None,
                final_accuracy_per_ps=finals, steps=min(s["steps"] for s in series.values()),
                steps_per_s=min(rates) if len(rates) == len(series) else None,
                bytes_sent=total("bytes_sent"), bytes_received=total("bytes_received"),
                quorum_share=quorum_shares(run_dir, series)["quorum_share"])


def rejoins(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Per rank restarted by scripts/fault.py (``faults.json``): whether and when it served
    again, read from the correct PSes' per-step ``quorum`` (a worker whose gradient was
    aggregated) and ``model_quorum`` (a PS whose model was gathered) fields.

    ``{rank: {"restarted_at", "restart_step", "rejoined_step", "rejoined_after_s",
    "steps_served", "aggregations"}}``: the first step after its (last) restart in which a
    correct PS aggregated it (None: not yet), seconds from the restart to that step's record,
    how many distinct steps some correct PS aggregated it in since, and how many times in all
    (one per PS and step)."""
    run_dir = Path(run_dir)
    faults = read_faults(run_dir)
    restarts: dict[int, dict] = {}
    for ev in faults["events"]:
        if isinstance(ev, dict) and ev.get("action") == "restarted":
            try:
                restarts[int(ev["rank"])] = ev
            except (KeyError, TypeError, ValueError):
                continue
    if not restarts:
        return {}
    ranks, _ = _correct_ps(run_dir)
    seen: dict[int, dict[int, float]] = {r: {} for r in restarts}   # rank -> {step: first time}
    count = dict.fromkeys(restarts, 0)
    for ps_rank, path in ranks:
        if not path.is_absolute():
            path = run_dir / path
        if not path.exists():
            path = run_dir / path.name
        for rec in read_metrics(path):
            if "event" in rec or "step" not in rec:
                continue
            t = _num(rec.get("time"))
            members = set()
            for key in ("quorum", "model_quorum"):
                v = rec.get(key)
                if isinstance(v, list):
                    members.update(x for x in v if type(x) is int)
            for rank in members & set(restarts):
                if ps_rank == rank or t is None or t < float(restarts[rank].get("time") or 0):
                    continue
                count[rank] += 1
                step = int(rec["step"])
                seen[rank][step] = min(t, seen[rank].get(step, t))
    out = {}
    for rank, ev in sorted(restarts.items()):
        at = _num(ev.get("time"))
        first = min(seen[rank]) if seen[rank] else None
        out[str(rank)] = dict(
            restarted_at=at, restart_step=ev.get("step"), rejoined_step=first,
            rejoined_after_s=(round(seen[rank][first] - at, 3) if first is not None and at is not None
                              else None),
            steps_served=len(seen[rank]), aggregations=count[rank])
    return out


# ----------------------------------------------------------------------------- net stats
def net_stats_line(rank: int, role: str, rejected: dict, failures: dict, *, refused: dict | None = None,
                   **counts) -> str:
    """The line a node prints at exit: ``byzsgd-net-stats {json}``: connections refused
    (``rejected``: reason -> count), what members sent that was refused, the connection kept
    (``refused``: "<reason>:<kind>:<sender>" -> count), contained failures; ``counts``
    (numbers) are added as they are: what the node sent and received (``frames_sent``,
    ``bytes_sent``, ...), its CPU seconds (``cpu_s``), its peak resident memory (``maxrss``),
    ... (scripts/bench_scale.py reads them)."""
    doc = {"rank": int(rank), "role": role,
           "rejected": {str(k): int(v) for k, v in dict(rejected).items()},
           "refused": {str(k): int(v) for k, v in dict(refused or {}).items()},
           "failures": {str(k): int(v) for k, v in dict(failures).items()}}
    doc.update({str(k): v for k, v in counts.items() if isinstance(v, (int, float))})
    return NET_STATS_PREFIX + json.dumps(doc, sort_keys=True)


def _count_map(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool)}


def read_net_stats(log: str | os.PathLike) -> dict | None:
    """The last ``byzsgd-net-stats`` record of a node's log (None when there is none)."""
    found = None
    try:
        with open(log, "rb") as fh:
            for raw in fh:
                if raw.startswith(NET_STATS_PREFIX.encode()):
                    found = raw
    except OSError:
        return None
    if found is None:
        return None
    try:
        doc = json.loads(found[len(NET_STATS_PREFIX):].decode("utf-8", "replace"))
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _refusals(doc: dict) -> dict[str, int] | None:
    """A net-stats line's or done record's refusals in one map: connections by reason, and
    what members sent by "<reason>:<kind>:<sender>" (disjoint keys); None if it has none."""
    counts = _count_map(doc.get("rejected"))
    if counts is None:
        return None
    return {**counts, **(_count_map(doc.get("refused")) or {})}


def rejections(run_dir: str | os.PathLike) -> dict[str, dict[str, int]]:
    """Per rank that reported, what it refused: ``{rank: {reason: count}}`` (an empty map:
    nothing refused): connections the transport closed (``"auth"``, ``"bad_rank"``, ...) and
    what a member sent that was refused, the connection kept, as
    ``"<reason>:<kind>:<sender>"`` (``"sender:grad:0"``: PS 0 sent a gradient;
    ``"meta.loss:grad:9"``: worker 9's loss was not a finite number).  From the line each node
    prints at exit into its log, else (a PS) from its metrics' done record; a rank that
    reported neither is absent."""
    run_dir = Path(run_dir)
    try:
        ranks = read_deployment(run_dir)["ranks"]
    except ConfigError:
        return {}
    out: dict[str, dict[str, int]] = {}
    for r in ranks:
        try:
            rank, role = int(r["rank"]), r["role"]
        except (KeyError, TypeError, ValueError):
            continue
        log = Path(r.get("log") or rank_file(run_dir, role, rank, "log"))
        if not log.exists():
            log = rank_file(run_dir, role, rank, "log")  # run directory moved since
        stats = read_net_stats(log)
        counts = _refusals(stats) if stats else None
        if counts is None and role == "ps":
            metrics = Path(r.get("metrics") or rank_file(run_dir, role, rank, "metrics"))
            if not metrics.exists():
                metrics = rank_file(run_dir, role, rank, "metrics")
            for rec in read_metrics(metrics):
                if rec.get("event") == "done" and "rejected" in rec:
                    counts = _refusals(rec)
        if counts is not None:
            out[str(rank)] = counts
    return out


# ----------------------------------------------------------------------------- run summary
def run_summary(run_dir: str | os.PathLike, outcome: str, *, started: float,
                returncodes: dict[int, int | None], exclude: set[int] = frozenset(),
                byzantine_ranks: list[int] = ()) -> dict[str, Any]:
    """The fields every deployment's ``summary.json`` (and ``--json`` line) has: per correct
    PS its final accuracy (its done record's, else its last evaluation), the least of them
    (ranks in ``exclude`` — killed on purpose — left out), the median step time, which
    workers the gradient quorums held (:func:`quorum_shares`), per rank what its transport
    refused (``rejections``: reason -> count, see :func:`rejections`) and, for nodes restarted
    by scripts/fault.py, whether and when they served again (``rejoined``)."""
    series = ps_series(run_dir)
    final = {str(r): s["final"] for r, s in series.items()}
    accs = [a for r, a in final.items() if a is not None and int(r) not in exclude]
    summary = dict(outcome=outcome, run_dir=str(run_dir), final_accuracy=final,
                   min_accuracy=min(accs) if accs else None,
                   median_step_time=median_step_time(series), wall_time=time.time() - started,
                   byzantine_ranks=list(byzantine_ranks), **quorum_shares(run_dir, series),
                   rejections=rejections(run_dir),
                   returncodes={str(k): v for k, v in returncodes.items()})
    rejoined = rejoins(run_dir)
    if rejoined:
        summary["rejoined"] = rejoined
    return summary


def write_summary(run_dir: str | os.PathLike, summary: dict) -> Path:
    path = Path(run_dir) / SUMMARY
    atomic_write(path, json.dumps(summary, indent=1))
    return path


def read_summary(run_dir: str | os.PathLike) -> dict:
    try:
        doc = json.loads((Path(run_dir) / SUMMARY).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def print_summary(summary: dict, prog: str, stream=None) -> None:
    """The final accuracy of each PS and the step time, one line each, on stderr."""
    stream = stream or sys.stderr
    for rank, acc in summary["final_accuracy"].items():
        acc_s = f"{acc:.2f}%" if isinstance(acc, (int, float)) else "n/a"
        print(f"{prog}: PS {rank} final accuracy {acc_s}", file=stream)
    if summary.get("median_step_time") is not None:
        print(f"{prog}: median step time {summary['median_step_time']:.4f} s, wall time "
              f"{summary['wall_time']:.1f} s", file=stream)
    shares = summary.get("quorum_share") or {}
    for rank in summary.get("byzantine_ranks") or ():
        if str(rank) in shares:
            print(f"{prog}: Byzantine worker {rank} in {100 * shares[str(rank)]:.1f}% of the correct "
                  f"PSes' gradient quorums ({summary.get('quorum_steps')} steps)", file=stream)


def print_log_tail(path: str | os.PathLike, lines: int = 15, stream=None) -> None:
    try:
        tail = Path(path).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return
    print("\n".join("  | " + line for line in tail), file=stream or sys.stderr)
