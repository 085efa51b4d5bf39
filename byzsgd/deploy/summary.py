"""What a run directory says about its run: per-PS series, quorum shares, rejoins, refusals,
the outcome, and the ``summary.json`` every deployment ends with.

The launcher, the multi-host deployment, ``kill.sh`` (byzsgd.deploy.stop), the experiment
harness, the report and the fault injector all summarise through here, so the median step time
and the outcome have one definition.  The files themselves are :mod:`byzsgd.rundir`'s.

Outcomes (``summary["outcome"]``, details in ``summary["outcome_detail"]``):

* ``ok``      every correct PS finished its last step;
* ``failed``  a correct rank exited on its own with an error: ``rank``, ``exit_code`` and the
              last error line of its log;
* ``killed``  stopped from outside: ``by`` (``kill.sh``, ``--timeout``, ``signal``) and ``signal``;
              the ranks it stopped have exit code 128 + the signal's number (143: SIGTERM),
              whatever they exited with after finishing their step cleanly;
* ``partial`` the run ended without a failure or a stop, yet some correct PS did not finish.
"""
from __future__ import annotations

import os
import re
import signal as _signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from byzsgd import rundir
from byzsgd.errors import ConfigError
from byzsgd.metrics import read_metrics
from byzsgd.rundir import read_deployment, read_faults, rank_file, read_net_stats

OUTCOMES = ("ok", "failed", "killed", "partial")


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


def restarts(run_dir: str | os.PathLike) -> dict[int, dict]:
    """Per rank, its last restart by byzsgd.deploy.faults that happened: the ``restarted``
    event (its new pid, when), unless a later ``restart_failed`` event says the new process
    died before it served (then that event, with its ``reason``)."""
    out: dict[int, dict] = {}
    for ev in read_faults(run_dir)["events"]:
        if isinstance(ev, dict) and ev.get("action") in ("restarted", "restart_failed"):
            try:
                out[int(ev["rank"])] = ev
            except (KeyError, TypeError, ValueError):
                continue
    return out


def rejoins(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Per rank restarted by byzsgd.deploy.faults (``faults.json``): whether and when it served
    again: a worker when a correct PS aggregated its gradient (the PSes' per-step ``quorum``),
    a PS when a correct peer gathered its model (``model_quorum``) or it logged a step of its
    own, in either case after the restart.

    ``{rank: {"restarted_at", "restart_step", "rejoined_step", "rejoined_after_s",
    "steps_served", "aggregations"}}``: the first step after its (last) restart in which it
    served (None: not yet), seconds from the restart to that step's record, how many distinct
    steps it served in since, and how many times in all (one per PS and step).  A restart
    whose process died before serving (``restart_failed``) is reported with its ``failed``
    reason and nothing served: records of the rank then come from no restarted process."""
    run_dir = Path(run_dir)
    events = restarts(run_dir)
    if not events:
        return {}
    live = {r: ev for r, ev in events.items() if ev.get("action") == "restarted"}
    ranks, _ = _correct_ps(run_dir)
    seen: dict[int, dict[int, float]] = {r: {} for r in live}   # rank -> {step: first time}
    count = dict.fromkeys(live, 0)
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
            if ps_rank in live and "step_time" in rec:
                members.add(ps_rank)  # a restarted PS that completed a step of its own
            for rank in members & set(live):
                if t is None or t < float(live[rank].get("time") or 0):
                    continue
                count[rank] += 1
                step = int(rec["step"])
                seen[rank][step] = min(t, seen[rank].get(step, t))
    out = {}
    for rank, ev in sorted(events.items()):
        at = _num(ev.get("time"))
        if rank not in live:
            out[str(rank)] = dict(restarted_at=at, restart_step=ev.get("step"), rejoined_step=None,
                                  rejoined_after_s=None, steps_served=0, aggregations=0,
                                  failed=ev.get("reason"))
            continue
        first = min(seen[rank]) if seen[rank] else None
        out[str(rank)] = dict(
            restarted_at=at, restart_step=ev.get("step"), rejoined_step=first,
            rejoined_after_s=(round(seen[rank][first] - at, 3) if first is not None and at is not None
                              else None),
            steps_served=len(seen[rank]), aggregations=count[rank])
    return out


def _count_map(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int) and not isinstance(v, bool)}


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
#: what a log's error line looks like (the last one is the failure's cause, as a rule)
_ERROR_LINE = re.compile(r"(Error|Exception|error:|ERROR|Traceback|Errno|refused|failed)")


def last_error_line(log: str | os.PathLike, *, scan: int = 200) -> str | None:
    """The last line of ``log`` that reads like an error (else its last line; None: no log)."""
    try:
        lines = [ln.strip() for ln in Path(log).read_text(errors="replace").splitlines()[-scan:]]
    except OSError:
        return None
    lines = [ln for ln in lines if ln and not ln.startswith(rundir.NET_STATS_PREFIX)]
    for line in reversed(lines):
        if _ERROR_LINE.search(line) and not line.startswith("Traceback"):
            return line[:500]
    return lines[-1][:500] if lines else None


def _rank_log(run_dir: Path, rank: int) -> Path | None:
    try:
        info = next(r for r in read_deployment(run_dir)["ranks"] if int(r["rank"]) == rank)
    except (ConfigError, StopIteration, KeyError, TypeError, ValueError):
        return None
    log = Path(info.get("log") or rank_file(run_dir, info["role"], rank, "log"))
    return log if log.exists() else rank_file(run_dir, info["role"], rank, "log")


def signal_number(name: str | None) -> int:
    """SIGTERM -> 15 (SIGTERM when the name is unknown: what kill.sh and the launchers send)."""
    try:
        return int(getattr(_signal, str(name)))
    except (AttributeError, TypeError, ValueError):
        return int(_signal.SIGTERM)


def run_outcome(run_dir: str | os.PathLike, observed: str, returncodes: dict[int, int | None],
                series: dict[int, dict[str, Any]] | None = None,
                faulty: set[int] = frozenset()) -> dict[str, Any]:
    """The run's outcome (module docstring) from what its launcher ``observed`` (``ok``,
    ``failed:<rank>``, ``timeout``, ``interrupted``, ``stopped``: every PS exited before the
    last step, ``unknown``) and the run directory's records (``stop.json``, the PSes' done
    records): ``{"outcome": ..., **detail}``."""
    run_dir = Path(run_dir)
    series = ps_series(run_dir) if series is None else series
    unfinished = sorted(r for r, s in series.items() if not s["done"] and r not in faulty)
    if observed.startswith("failed"):
        try:
            rank = int(observed.split(":")[1])
        except (IndexError, ValueError):
            rank = None
        log = _rank_log(run_dir, rank) if rank is not None else None
        return dict(outcome="failed", rank=rank, exit_code=returncodes.get(rank) if rank is not None else None,
                    error=last_error_line(log) if log else None, log=str(log) if log else None)
    if not unfinished and (series or observed == "ok"):  # every correct PS finished: whoever
        return dict(outcome="ok")                       # stopped the rest
    stop = rundir.read_stop(run_dir)
    if observed == "timeout":
        return dict(outcome="killed", by="--timeout", signal="SIGTERM", unfinished=unfinished)
    if stop:
        return dict(outcome="killed", by=stop.get("by"), signal=stop.get("signal"), unfinished=unfinished)
    if observed in ("interrupted", "stopped"):
        return dict(outcome="killed", by="signal", signal=None, unfinished=unfinished)
    return dict(outcome="partial", unfinished=unfinished)


def run_summary(run_dir: str | os.PathLike, outcome: str, *, started: float,
                returncodes: dict[int, int | None], exclude: set[int] = frozenset(),
                byzantine_ranks: list[int] = (), stopped_ranks: Any = ()) -> dict[str, Any]:
    """The fields every deployment's ``summary.json`` (and ``--json`` line) has: the outcome
    (:func:`run_outcome`: ``outcome`` and ``outcome_detail``; ``outcome`` is what the launcher
    observed), per correct PS its final accuracy (its done record's, else its last
    evaluation), the least of them (ranks in ``exclude`` — killed on purpose — left out), the
    median step time, which workers the gradient quorums held (:func:`quorum_shares`), per
    rank what its transport refused (``rejections``: reason -> count, see :func:`rejections`)
    and, for nodes restarted by byzsgd.deploy.faults, whether and when they served again
    (``rejoined``).  ``stopped_ranks``: the ranks a stop signalled while they ran; a killed
    run reports them with exit code 128 + the signal's number (they exit 0 once they have
    closed cleanly, which must not read as a finished run)."""
    series = ps_series(run_dir)
    final = {str(r): s["final"] for r, s in series.items()}
    accs = [a for r, a in final.items() if a is not None and int(r) not in exclude]
    summary = dict(outcome=outcome, run_dir=str(run_dir),
                   final_accuracy=final, min_accuracy=min(accs) if accs else None,
                   median_step_time=median_step_time(series), wall_time=time.time() - started,
                   byzantine_ranks=list(byzantine_ranks), **quorum_shares(run_dir, series),
                   rejections=rejections(run_dir),
                   returncodes={str(k): v for k, v in returncodes.items()})
    rejoined = rejoins(run_dir)
    if rejoined:
        summary["rejoined"] = rejoined
    return apply_outcome(summary, run_dir, outcome, stopped_ranks=stopped_ranks, faulty=exclude,
                         series=series)


def apply_outcome(summary: dict, run_dir: str | os.PathLike, observed: str, *, stopped_ranks: Any = (),
                  faulty: Any = (), series: dict[int, dict[str, Any]] | None = None) -> dict:
    """Set ``summary``'s ``outcome`` and ``outcome_detail`` from what the launcher
    ``observed`` (:func:`run_outcome`) and, for a killed run, the exit code 128 + signal of
    each rank in ``stopped_ranks`` that reported 0 or nothing; returns ``summary``."""
    codes = {int(k): v for k, v in (summary.get("returncodes") or {}).items()}
    detail = run_outcome(run_dir, observed, codes, series, set(faulty))
    if detail["outcome"] == "killed":
        sig = 128 + signal_number(detail.get("signal"))
        for r in stopped_ranks:
            if codes.get(int(r)) in (0, None):
                codes[int(r)] = sig
        detail["stopped_ranks"] = sorted(int(r) for r in stopped_ranks)
    summary["outcome"] = detail.pop("outcome")
    summary["outcome_detail"] = detail
    summary["returncodes"] = {str(k): v for k, v in sorted(codes.items())}
    return summary


def outcome_line(summary: dict) -> str:
    """One line: the outcome and its detail (``killed by kill.sh (SIGTERM)``, ``failed: rank 3
    exited 1: ValueError: ...``)."""
    out = summary.get("outcome") or "unknown"
    d = summary.get("outcome_detail") or {}
    if out == "failed":
        return (f"failed: rank {d.get('rank')} exited {d.get('exit_code')}"
                + (f": {d['error']}" if d.get("error") else ""))
    if out == "killed":
        text = f"killed by {d.get('by') or 'a signal'}" + (f" ({d['signal']})" if d.get("signal") else "")
        return text + (f"; PS {', '.join(map(str, d['unfinished']))} did not finish" if d.get("unfinished") else "")
    if out == "partial":
        return f"partial: PS {', '.join(map(str, d.get('unfinished') or []))} did not finish"
    return out


def print_summary(summary: dict, prog: str, stream=None) -> None:
    """The outcome, the final accuracy of each PS and the step time, one line each, on stderr."""
    stream = stream or sys.stderr
    print(f"{prog}: outcome {outcome_line(summary)}", file=stream)
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
