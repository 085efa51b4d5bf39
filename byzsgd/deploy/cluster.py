"""Multi-host deployments: what ``scripts/run_exp.sh`` and ``scripts/kill.sh`` run.

``python -m byzsgd.deploy.cluster run``  starts one ``python -m byzsgd.trainer`` per rank, each on its
host, through a *runner* (a command that runs ``sh -s`` on a host: ``ssh`` by default), waits
for the run, collects the files and writes ``summary.json``.  ``kill [RUN_DIR]`` stops exactly the
ranks of a run (without RUN_DIR: the latest run started from this checkout, recorded by ``run``
in ``runs/latest``; see :func:`latest_pointer`).  ``wait``, ``status`` and ``collect`` act on a
run started with ``--detach``;
``describe`` writes ``deployment.json`` for a run started by SLURM (``scripts/slurm_byzsgd.sbatch``).

Only the standard library is needed on the launching machine (torch is used, when present,
to check the configuration before anything starts).

With no argument, ``run`` reads ``servers``, ``workers`` and, when there is one, ``exp.conf``
(trainer flags) from the working directory: Garfield's ``./run_exp.sh`` workflow.

Hosts files (``servers``, ``workers``): one rank per line, ``HOST [key=value ...]``; ``#``
starts a comment; a host may appear on several lines (several ranks there).  The first server
is the master (rank 0); ranks are the servers in file order, then the workers.  Keys:

``addr=``    address the other nodes use to reach this host (default: HOST without ``user@``);
``python=``  interpreter on that host (default: ``<repo>/.venv/bin/python`` when it exists
             there, else ``python3``);
``repo=``    byzsgd checkout on that host (default: ``--repo``, i.e. this checkout's path);
``dir=``     run directory on that host (default: ``--remote_dir``, else the local run dir);
``listen=``  address to listen on (default ``0.0.0.0``).

Runner (``--runner`` or ``$BYZSGD_RUNNER``; default ``ssh -o BatchMode=yes``): a command line;
``{host}`` in it is replaced by the host, else the host is appended; then ``sh -s`` is
appended and the script for that host is written to its stdin, so nothing secret is ever on a
command line (``ps``).  ``BYZSGD_RUNNER="ip netns exec"`` with namespaces as hosts (and
``addr=`` their addresses) is the one-machine test bed of ``scripts/netns_cluster.sh``;
``BYZSGD_RUNNER=local`` runs everything here, whatever the host names.

Ports: rank r listens on ``--base_port + r`` (``--ports fixed``, the default; the master is
``addr0:base_port``), or, with ``--ports ephemeral``, every rank but the master on a port the
kernel picks, announced through the rendezvous.

Credentials: an operator secret is drawn here, in memory (never written, never sent); each
rank's credentials (its pairwise keys, :mod:`byzsgd.net.credentials`) are derived from it, and
each host receives only the files of the ranks it runs, through the runner's stdin (``printf``,
a shell builtin, umask 077), into ``<dir>/credentials/rank<r>.cred`` (0600; directory 0700);
the trainers get ``--credentials``.  ``--dry_run`` prints the scripts with the keys redacted.
Only with ``--insecure_shared_secret true`` among the trainer flags is a shared secret used
instead (``--secret_file`` / ``$BYZSGD_SECRET_FILE`` or a fresh ``RUN_DIR/secret``, shipped to
``<dir>/secret``): it proves membership, not rank.  TLS certificates (``--tls_cert/--tls_key/
--tls_ca``, local files) travel the same way; the HMAC handshake always runs, TLS under it
when certificates are given.

Each rank runs as ``setsid sh -c '<trainer> & echo $! > <role><rank>.pid; wait; echo $? >
<role><rank>.rc'`` (see ``WRAPPER``): its own session (the process group id, ``.pgid``, is the wrapper's pid),
the trainer's exact pid, its exit code; the environment carries ``BYZSGD_RUN_ID`` so that
``kill`` checks, before signalling, that a pid is still one of this run's.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

from byzsgd.deploy import rundir
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.net.credentials import RankCredentials

# The plan (hosts files, flags, ranks) and the per-host scripts live in their own modules;
# their names are re-exported here, where the scripts and the tests have always found them.
from byzsgd.deploy.host_scripts import (  # noqa: F401  (re-exported)
    PY_PICK, PY_PROBE, RUN_ID_ENV, WRAPPER, _ours, default_python, kill_script, python_rule, q,
    runs_on_this_machine, start_script, status_script)
from byzsgd.deploy.plan import (  # noqa: F401  (re-exported)
    DEFAULT_CONFIG, DEFAULT_RUNNER, HOST_KEYS, OWNED_FLAGS, RUNNER_ENV, TLS_FLAGS, Host, Plan,
    Rank, check_flags, default_config, make_plan, parse_hosts, read_config, read_hosts,
    split_flags)

REPO = Path(__file__).resolve().parents[2]
#: where ``run`` records its run directory, for ``kill.sh`` with no argument (see latest_pointer)
LATEST_ENV = "BYZSGD_LATEST_RUN"


# ----------------------------------------------------------------------------- the latest run
def latest_pointer() -> Path:
    """``$BYZSGD_LATEST_RUN``, else ``<checkout>/runs/latest``: a symlink to the run directory
    of the latest ``run`` started from this checkout.  In the checkout, not the working
    directory, so that ``kill.sh`` finds the run whichever directory either script ran from
    (each experiment directory holding its own servers / workers / exp.conf); a symlink so that
    ``runs/latest/ps0.log`` works, replaced atomically (``os.replace``) so that a reader never
    sees half a record, and holding an absolute path (``--run_dir`` may be anywhere).  An
    installed byzsgd (no checkout around it) records in ``$XDG_STATE_HOME/byzsgd/latest``
    (``~/.local/state``) instead of its site-packages."""
    if os.environ.get(LATEST_ENV):
        return Path(os.environ[LATEST_ENV])
    if (REPO / "scripts" / "run_exp.sh").is_file():
        return REPO / "runs" / "latest"
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "byzsgd" / "latest"


def record_latest(run_dir: Path) -> Path | None:
    """Point :func:`latest_pointer` at ``run_dir``; a pointer that cannot be written (a
    read-only checkout) is a warning, not a failed start."""
    pointer = latest_pointer()
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}")
    try:
        pointer.parent.mkdir(parents=True, exist_ok=True)
        if tmp.is_symlink():
            tmp.unlink()
        os.symlink(Path(run_dir).resolve(), tmp)
        os.replace(tmp, pointer)
    except OSError as exc:
        print(f"byzsgd.cluster: warning: cannot record the latest run in {pointer} ({exc}); "
              f"scripts/kill.sh will need the run directory", file=sys.stderr)
        return None
    return pointer


def latest_run() -> Path:
    """The run directory :func:`record_latest` recorded, or a ConfigError saying why none."""
    pointer = latest_pointer()
    if not pointer.is_symlink():
        raise ConfigError(f"no run recorded in {pointer} (scripts/run_exp.sh records each run it "
                          f"starts there): give the run directory")
    target = Path(os.readlink(pointer))
    if not rundir.deployment_path(target).exists():
        raise ConfigError(f"the latest run, {target} ({pointer}), holds no deployment.json any "
                          f"more: give the run directory")
    return target


def runner_argv(runner: str, host: str) -> list[str]:
    """The local command that runs ``sh -s`` on ``host`` (script on its stdin)."""
    if runner.strip() in ("", "local"):
        return ["sh", "-s"]
    words = shlex.split(runner)
    if any("{host}" in w for w in words):
        words = [w.replace("{host}", host) for w in words]
    else:
        words.append(host)
    return words + ["sh", "-s"]


def run_script(runner: str, host: str, script: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """Run ``script`` with ``sh`` on ``host`` through the runner (never raises on failure)."""
    argv = runner_argv(runner, host)
    try:
        return subprocess.run(argv, input=script, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(argv, 124, exc.stdout or "", f"runner timed out after {timeout}s")
    except OSError as exc:
        return subprocess.CompletedProcess(argv, 127, "", f"cannot run {argv[0]!r}: {exc}")


def parallel(fn, items: Iterable) -> list:
    """``[fn(x) for x in items]``, one thread each (runner calls are I/O bound)."""
    items = list(items)
    results: list[Any] = [None] * len(items)

    def one(i, x):
        results[i] = fn(x)

    threads = [threading.Thread(target=one, args=(i, x), daemon=True) for i, x in enumerate(items)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# ----------------------------------------------------------------------------- start / monitor
def read_shared_secret(plan: Plan) -> str:
    """--insecure_shared_secret: the shared secret's one line (a fresh file when none given)."""
    if plan.secret_file == plan.run_dir / rundir.SECRET and not plan.secret_file.exists():
        rundir.write_secret(plan.secret_file)
    try:
        secret = plan.secret_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the secret file {plan.secret_file}: {exc}") from None
    if not secret or any(c in secret for c in "\n\r\0"):
        raise ConfigError(f"the secret file {plan.secret_file} must hold one non-empty line")
    return secret


def rank_credentials(world_size: int) -> dict[int, str]:
    """Every rank's credentials file text, derived from a fresh operator secret that exists
    only inside this call (never written, never sent anywhere)."""
    operator = secrets.token_bytes(32)
    return {r: RankCredentials.derive(operator, r, world_size).to_json() for r in range(world_size)}


def start(plan: Plan, quiet: bool = False) -> None:
    secret, creds = None, None
    if plan.insecure:
        secret = read_shared_secret(plan)
    else:
        creds = rank_credentials(plan.num_ps + plan.num_workers)
    plan.started = time.time()
    plan.write_description()
    groups = plan.hosts()
    probe = secrets.token_hex(4)

    def launch(item):
        host, ranks = item
        mine = None if creds is None else {r.rank: creds[r.rank] for r in ranks}  # its ranks' only
        return host, run_script(plan.runner, host, start_script(plan, ranks, secret, probe, creds=mine),
                                timeout=120)

    errors = []
    for host, res in parallel(launch, groups.items()):
        got = {}
        for line in res.stdout.splitlines():
            if line.startswith("byzsgd-rank "):
                _, rank, pid, pgid = line.split()
                got[int(rank)] = (pid, pgid)
            elif line.startswith("byzsgd-error"):
                errors.append(f"{host}: {line}")
        for r in groups[host]:
            pid, pgid = got.get(r.rank, ("-", "-"))
            r.pid = int(pid) if pid.isdigit() else None
            r.pgid = int(pgid) if pgid.isdigit() else None
            if r.pid is None:
                errors.append(f"{host}: rank {r.rank} did not start (runner exit {res.returncode}: "
                              f"{(res.stderr or res.stdout).strip()[-500:]})")
            else:
                local_pid = plan.local(r, "pid")
                if not (local_pid.exists() and local_pid.read_text().strip() == str(r.pid)):
                    local_pid.write_text(f"{r.pid}\n")
                    plan.local(r, "pgid").write_text(f"{r.pgid}\n")
    # A host whose run directory is ours (same path, and the file it just wrote is here) needs
    # no copying back; the others are collected through the runner at the end.
    probe_file = plan.run_dir / f".probe-{probe}"
    seen = probe_file.exists()
    if seen:
        probe_file.unlink()
    plan.shared = {h: seen and all(Path(r.dir) == plan.run_dir for r in ranks)
                   for h, ranks in groups.items()}
    plan.write_description()
    if errors:
        raise StartError("; ".join(errors))


class StartError(ByzSGDError):
    pass


def load(run_dir: str | os.PathLike) -> dict:
    return rundir.read_deployment(Path(run_dir))


def by_host(doc: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in doc["ranks"]:
        out.setdefault(r["host"], []).append(r)
    return out


def poll(doc: dict, runner: str | None = None) -> dict[int, dict]:
    """{rank: {alive, rc, metric}} for every rank whose host answered."""
    runner = runner if runner is not None else doc["runner"]
    out: dict[int, dict] = {}

    def one(item):
        host, ranks = item
        return run_script(runner, host, status_script(doc["run_id"], ranks), timeout=30)

    for res in parallel(one, by_host(doc).items()):
        for line in res.stdout.splitlines():
            words = line.split(" ", 3)
            if words[0] == "byzsgd-status" and len(words) >= 4:
                out.setdefault(int(words[1]), {}).update(
                    alive=words[2] == "1", rc=int(words[3]) if words[3].lstrip("-").isdigit() else None)
            elif words[0] == "byzsgd-metric" and len(words) >= 3:
                try:
                    out.setdefault(int(words[1]), {})["metric"] = json.loads(line.split(" ", 2)[2])
                except ValueError:
                    pass
    return out


def kill(doc: dict, grace: float = 5.0, runner: str | None = None) -> dict[str, list[int]]:
    """Stop every rank of the run; returns {host: [pids still there]} (empty lists: all gone)."""
    runner = runner if runner is not None else doc["runner"]

    def one(item):
        host, ranks = item
        return host, run_script(runner, host, kill_script(doc["run_id"], ranks, grace), timeout=grace + 30)

    left: dict[str, list[int]] = {}
    for host, res in parallel(one, by_host(doc).items()):
        pids = None
        for line in res.stdout.splitlines():
            if line.startswith("byzsgd-left"):
                pids = [int(p) for p in line.split()[1:]]
        if pids is None:
            print(f"byzsgd.cluster: kill on {host} failed (runner exit {res.returncode}): "
                  f"{res.stderr.strip()[-300:]}", file=sys.stderr)
            pids = [-1]
        left[host] = pids
    return left


def collect(doc: dict, runner: str | None = None) -> None:
    """Copy logs, metrics and exit codes of hosts without a shared run directory (via ``cat``)."""
    runner = runner if runner is not None else doc["runner"]
    shared = doc.get("shared_dirs", {})
    run_dir = Path(doc["run_dir"])
    jobs = []
    for r in doc["ranks"]:
        if shared.get(r["host"]):
            continue
        local = functools.partial(rundir.rank_file, run_dir, r["role"], r["rank"])
        files = [(r["remote_log"], local("log")), (f"{r['remote_dir']}/{local('rc').name}", local("rc"))]
        if r.get("remote_metrics"):
            files.append((r["remote_metrics"], local("metrics")))
        jobs += [(r["host"], remote, local) for remote, local in files]

    def one(job):
        host, remote, local = job
        res = run_script(runner, host, f"cat {q(remote)}\n", timeout=120)
        if res.returncode == 0:
            Path(local).write_text(res.stdout)

    parallel(one, jobs)


def summarize(doc: dict, outcome: str, codes: dict[int, int | None]) -> dict:
    series = rundir.ps_series(doc["run_dir"])
    core = rundir.run_summary(doc["run_dir"], outcome, started=doc["started"], returncodes=codes)
    return dict(outcome=outcome, run_dir=doc["run_dir"],
                steps_done={str(r): s["last_step"] + 1 for r, s in series.items()},
                **{k: v for k, v in core.items() if k not in ("outcome", "run_dir", "returncodes")},
                returncodes=core["returncodes"])


def monitor(doc: dict, *, timeout: float, quiet: bool, interval: float = 2.0,
            worker_grace: float = 15.0) -> tuple[str, dict[int, int | None]]:
    """Wait for every PS to finish (outcome 'ok'), a rank to fail ('failed:<rank>'), every PS
    to exit before the last step ('stopped': killed from outside), or the timeout ('timeout').
    Exit codes: {rank: rc or None while running / unknown}."""
    started = doc["started"]
    roles = {r["rank"]: r["role"] for r in doc["ranks"]}
    codes: dict[int, int | None] = {r: None for r in roles}
    last_print, ok_since = 0.0, None
    total = split_flags(doc.get("flags", [])).get("num_iter") or "100"
    total = int(total) if str(total).isdigit() else 100
    while True:
        st = poll(doc)
        for rank, s in st.items():
            if s.get("rc") is not None:
                codes[rank] = s["rc"]
        failed = [r for r, c in codes.items() if c not in (None, 0)]
        if failed:
            return f"failed:{failed[0]}", codes
        if all(codes[r] == 0 for r in roles if roles[r] == "ps"):
            reached = [s["metric"].get("step", -1) + 1 for r, s in st.items()
                       if roles.get(r) == "ps" and isinstance(s.get("metric"), dict)]
            if not reached or max(reached) < total:
                # every PS exited cleanly but none trained to the end: stopped from outside
                # (scripts/kill.sh, a signal), not a finished run
                return "stopped", codes
            if ok_since is None:
                ok_since = time.monotonic()
            if all(c == 0 for c in codes.values()) or time.monotonic() - ok_since > worker_grace:
                return "ok", codes
        if timeout and time.time() - started > timeout:
            return "timeout", codes
        if not quiet and time.time() - last_print > 10:
            steps = [min(s["metric"].get("step", -1) + 1, total) for r, s in st.items()
                     if roles.get(r) == "ps" and isinstance(s.get("metric"), dict)]
            running = sum(1 for s in st.values() if s.get("alive"))
            print(f"byzsgd.cluster: step {min(steps) if steps else 0}/{total} (slowest PS), "
                  f"{running}/{len(roles)} ranks running, {time.time() - started:.0f}s",
                  file=sys.stderr, flush=True)
            last_print = time.time()
        time.sleep(interval)


def finish(doc: dict, outcome: str, codes: dict, *, as_json: bool, grace: float = 5.0) -> int:
    left = kill(doc, grace)
    collect(doc)
    for r in doc["ranks"]:
        rc_file = rundir.rank_file(doc["run_dir"], r["role"], r["rank"], "rc")
        if codes.get(r["rank"]) is None and rc_file.exists():
            text = rc_file.read_text().strip()
            codes[r["rank"]] = int(text) if text.lstrip("-").isdigit() else None
    summary = summarize(doc, outcome, codes)
    summary["left_behind"] = {h: p for h, p in left.items() if p}
    rundir.write_summary(doc["run_dir"], summary)
    rundir.print_summary(summary, "byzsgd.cluster")
    if outcome.startswith("failed"):
        rank = int(outcome.split(":")[1])
        r = doc["ranks"][rank]
        print(f"byzsgd.cluster: {r['role']} {rank} on {r['host']} failed (exit {codes.get(rank)}); "
              f"its log: {r['log']}", file=sys.stderr)
        rundir.print_log_tail(r["log"])
    if summary["left_behind"]:
        print(f"byzsgd.cluster: processes left behind: {summary['left_behind']}", file=sys.stderr)
    if as_json:
        print(json.dumps(summary))
    return 0 if outcome == "ok" and not summary["left_behind"] else 1


# ----------------------------------------------------------------------------- SLURM
def describe_slurm(run_dir: Path, num_ps: int, num_workers: int, master: str, wait: float) -> dict:
    """deployment.json for ranks started by srun: each task wrote <role><rank>.pid/.host."""
    deadline = time.monotonic() + wait
    world = num_ps + num_workers
    while True:
        ranks = []
        for rank in range(world):
            role = "ps" if rank < num_ps else "worker"
            pid, host = (rundir.rank_file(run_dir, role, rank, w) for w in ("pid", "host"))
            if pid.exists() and host.exists() and pid.read_text().strip() and host.read_text().strip():
                ranks.append(dict(rank=rank, role=role, host=host.read_text().strip(), addr=None,
                                  port=None, pid=int(pid.read_text().strip()), byzantine=False,
                                  attack=None, attack_args={}, log=str(rundir.rank_file(run_dir, role, rank, "log")),
                                  metrics=str(rundir.rank_file(run_dir, role, rank, "metrics")) if role == "ps" else None))
        if len(ranks) == world or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    doc = dict(num_ps=num_ps, num_workers=num_workers, kind="slurm", run_dir=str(run_dir),
               master=master, job_id=os.environ.get("SLURM_JOB_ID"), started=time.time(),
               credentials=str(rundir.credentials_dir(run_dir)), byzantine_ranks=[], ranks=ranks)
    rundir.write_deployment(run_dir, doc)
    return doc


# ----------------------------------------------------------------------------- CLI
LATEST_HELP = (f"the run directory (default: the latest run started from this checkout, "
               f"${LATEST_ENV} or <checkout>/runs/latest)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m byzsgd.deploy.cluster",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="start a multi-host deployment (scripts/run_exp.sh)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--servers", default="servers", help="hosts of the PSes, one rank a line")
    r.add_argument("--workers", default="workers", help="hosts of the workers, one rank a line")
    r.add_argument("--config", default=None, help=f"file of trainer flags (shell words, # comments; "
                   f"default: {DEFAULT_CONFIG} beside the servers file, if there is one)")
    r.add_argument("--run_dir", default=None, help="local run directory (default runs/multihost-<time>)")
    r.add_argument("--remote_dir", default=None, help="run directory on the hosts (default: --run_dir)")
    r.add_argument("--repo", default=str(REPO), help="byzsgd checkout on the hosts (default: this one)")
    r.add_argument("--python", default=None, help="python on the hosts (default: this interpreter where the hosts are this machine (runner local or ip netns exec), else <repo>/.venv/bin/python, else python3)")
    r.add_argument("--runner", default=None, help=f"remote command runner (default ${RUNNER_ENV} or '{DEFAULT_RUNNER}')")
    r.add_argument("--base_port", type=int, default=29500, help="rank r listens on base_port + r")
    r.add_argument("--ports", default="fixed", choices=("fixed", "ephemeral"),
                   help="fixed: base_port + rank; ephemeral: only the master's port is fixed")
    r.add_argument("--secret_file", default=None, help="with --insecure_shared_secret true among the "
                   "trainer flags only: the shared secret (default: a fresh random one)")
    for k in TLS_FLAGS:
        r.add_argument(f"--{k}", default=None, help="local PEM file, shipped to every host (TLS on)")
    r.add_argument("--timeout", type=float, default=0, help="stop the run after N s (0: never)")
    r.add_argument("--detach", action="store_true", help="start and return (see wait / kill)")
    r.add_argument("--force", action="store_true", help="reuse a run directory")
    r.add_argument("--dry_run", action="store_true", help="print the per-host scripts (credentials and secret redacted)")
    r.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    r.add_argument("--quiet", action="store_true", help="no progress lines")
    r.add_argument("trainer_flags", nargs=argparse.REMAINDER,
                   help="after --: more trainer flags (override the config file)")
    w = sub.add_parser("wait", help="wait for a detached run, then stop, collect, summarize")
    w.add_argument("run_dir", nargs="?", help=LATEST_HELP)
    w.add_argument("--timeout", type=float, default=0)
    w.add_argument("--json", action="store_true")
    w.add_argument("--quiet", action="store_true")
    k = sub.add_parser("kill", help="stop every rank of a run (scripts/kill.sh)")
    k.add_argument("run_dir", nargs="?", help=LATEST_HELP)
    k.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    s = sub.add_parser("status", help="per-rank state of a run, as JSON")
    s.add_argument("run_dir", nargs="?", help=LATEST_HELP)
    c = sub.add_parser("collect", help="copy logs/metrics of non-shared hosts into the run dir")
    c.add_argument("run_dir", nargs="?", help=LATEST_HELP)
    sm = sub.add_parser("summary", help="summary of a finished run (metrics of the PSes), as JSON")
    sm.add_argument("run_dir", nargs="?", help=LATEST_HELP)
    d = sub.add_parser("describe", help="write deployment.json for a SLURM run")
    d.add_argument("run_dir")
    d.add_argument("--num_ps", type=int, required=True)
    d.add_argument("--num_workers", type=int, required=True)
    d.add_argument("--master", default="")
    d.add_argument("--wait", type=float, default=120.0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd in ("wait", "kill", "status", "collect", "summary") and not args.run_dir:
            args.run_dir = str(latest_run())
            print(f"byzsgd.cluster: the latest run: {args.run_dir}", file=sys.stderr)
        if args.cmd == "run":
            if args.trainer_flags and args.trainer_flags[0] == "--":
                args.trainer_flags = args.trainer_flags[1:]
            plan = make_plan(args)
            if args.dry_run:
                for host, ranks in plan.hosts().items():
                    print(f"# {host}: python {python_rule(ranks[0].host, plan.runner)}")
                    print(f"# {' '.join(runner_argv(plan.runner, host))} <<'EOF'")
                    print(start_script(plan, ranks, "" if plan.insecure else None, "probe", redact=True) + "EOF")
                return 0
            print(f"byzsgd.cluster: {plan.num_ps} PS + {plan.num_workers} workers on "
                  f"{len(plan.hosts())} hosts, master {plan.master}, runner {plan.runner!r}; "
                  f"run dir {plan.run_dir}", file=sys.stderr)
            config = args.config or default_config(args.servers)
            print(f"byzsgd.cluster: trainer flags from {config}" if config else
                  f"byzsgd.cluster: no --config and no {DEFAULT_CONFIG} beside the servers file: "
                  f"the trainer's defaults", file=sys.stderr)
            record_latest(plan.run_dir)  # before anything starts: kill.sh can stop a half start
            try:
                start(plan, args.quiet)
            except (StartError, KeyboardInterrupt) as exc:
                doc = load(plan.run_dir)
                kill(doc, 2.0)
                if isinstance(exc, KeyboardInterrupt):
                    return 130
                raise
            doc = load(plan.run_dir)
            if args.detach:
                print(str(plan.run_dir))
                return 0
            return wait_and_finish(doc, args)
        if args.cmd == "wait":
            return wait_and_finish(load(args.run_dir), args)
        if args.cmd == "kill":
            doc = load(args.run_dir)
            left = kill(doc, args.grace, os.environ.get(RUNNER_ENV) or None)
            for host, pids in left.items():
                if pids:
                    print(f"byzsgd.cluster: {host}: still running: {pids}", file=sys.stderr)
            if not any(left.values()):
                print(f"byzsgd.cluster: no process of the run {doc['run_dir']} is left", file=sys.stderr)
            return 1 if any(left.values()) else 0
        if args.cmd == "status":
            print(json.dumps({str(k): v for k, v in poll(load(args.run_dir)).items()}, indent=1))
            return 0
        if args.cmd == "summary":
            doc = load(args.run_dir)
            codes = {}
            for r in doc["ranks"]:
                rc = rundir.rank_file(doc["run_dir"], r["role"], r["rank"], "rc")
                text = rc.read_text().strip() if rc.exists() else ""
                codes[r["rank"]] = int(text) if text.lstrip("-").isdigit() else None
            done = all(codes.get(r["rank"]) == 0 for r in doc["ranks"] if r["role"] == "ps")
            summary = summarize(doc, "ok" if done else "unknown", codes)
            rundir.write_summary(doc["run_dir"], summary)
            print(json.dumps(summary))
            return 0 if done else 1
        if args.cmd == "collect":
            collect(load(args.run_dir))
            return 0
        if args.cmd == "describe":
            doc = describe_slurm(Path(args.run_dir), args.num_ps, args.num_workers, args.master, args.wait)
            missing = args.num_ps + args.num_workers - len(doc["ranks"])
            if missing:
                print(f"byzsgd.cluster: {missing} rank(s) did not report a pid", file=sys.stderr)
                return 1
            return 0
    except ByzSGDError as exc:
        print(f"byzsgd.cluster: error: {exc}", file=sys.stderr)
        return 2
    return 2


def wait_and_finish(doc: dict, args) -> int:
    try:
        outcome, codes = monitor(doc, timeout=args.timeout, quiet=args.quiet)
    except KeyboardInterrupt:
        finish(doc, "interrupted", {}, as_json=args.json)
        return 130
    return finish(doc, outcome, codes, as_json=args.json)


if __name__ == "__main__":
    sys.exit(main())
