"""The run directory's layout: what a deployment leaves on disk, written and read here only.

One directory per run holds ``deployment.json`` (who runs where: each rank's role, address,
pid, Byzantine or not, log and metrics files), per-rank files (``<role><rank>.log/.pid/
.pgid/.rc/.host``, ``metrics-ps<rank>.jsonl``), ``credentials/rank<r>.cred`` (0600 each, in a
0700 directory: the ranks' pairwise keys, byzsgd.net.credentials; the operator secret they are
derived from is never written), ``secret`` (0600, only under ``--insecure_shared_secret``),
``run.json`` (who started the run: interpreter, package, launcher flags; what a fault
injector's restart and ``--resume`` reuse), ``faults.json`` (byzsgd.deploy.faults),
``stop.json`` (who stopped the run: ``kill.sh``, a signal, ``--timeout``; written before the
signals go out), ``checkpoints/`` and ``summary.json`` (its outcome, byzsgd.deploy.summary).

Below ``roles`` in the layering on purpose (standard library + byzsgd.errors +
byzsgd.metrics): the roles read their peer directory and write their exit line through it, the
multi-host launcher runs where torch is absent.  What the files *mean* (series, quorum shares,
the outcome) is :mod:`byzsgd.deploy.summary`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from byzsgd.errors import ConfigError

DEPLOYMENT = "deployment.json"
SUMMARY = "summary.json"
RUN = "run.json"
STOP = "stop.json"
CHECKPOINTS = "checkpoints"
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
    """Record a new pid for ``rank`` (a node restarted by byzsgd.deploy.faults)."""
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
    """``faults.json`` (byzsgd.deploy.faults): faulty ranks, paused ranks, restarted {rank: pid},
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


# ----------------------------------------------------------------------------- run.json, stop.json
#: this package's directory: a restart imports the run's code, wherever it was installed
PACKAGE_DIR = str(Path(__file__).resolve().parent)


def write_run_record(run_dir: str | os.PathLike, **fields: Any) -> Path:
    """``run.json``: the interpreter, the package and the working directory of whoever starts
    the run, plus ``fields`` (the launcher's flags): a restarted node must run the same code
    as its peers, and ``--resume`` the same configuration."""
    doc = dict(python=sys.executable, package=PACKAGE_DIR, cwd=os.getcwd(), pid=os.getpid(),
               time=time.time(), **fields)
    path = Path(run_dir) / RUN
    atomic_write(path, json.dumps(doc, indent=1))
    return path


def read_run_record(run_dir: str | os.PathLike) -> dict:
    """``run.json`` ({} when there is none: a run started before it existed, or by SLURM)."""
    try:
        doc = json.loads((Path(run_dir) / RUN).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def record_stop(run_dir: str | os.PathLike, by: str, *, signal: str | None = None) -> dict:
    """Write ``stop.json`` (who stops the run, with which signal) unless one is there: the
    first to stop a run names it (``kill.sh`` before the launcher sees its SIGTERM)."""
    path = Path(run_dir) / STOP
    doc = dict(by=by, signal=signal, time=time.time(), pid=os.getpid())
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return read_stop(run_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(doc))
    return doc


def read_stop(run_dir: str | os.PathLike) -> dict:
    """``stop.json`` ({} when nobody stopped the run)."""
    try:
        doc = json.loads((Path(run_dir) / STOP).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def clear_stop(run_dir: str | os.PathLike) -> None:
    """Forget an earlier stop (``--resume``: the run goes on)."""
    with contextlib.suppress(FileNotFoundError):
        (Path(run_dir) / STOP).unlink()


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    """Where a launcher run's PSes checkpoint by default (``--resume RUN_DIR`` reads them)."""
    return Path(run_dir) / CHECKPOINTS
