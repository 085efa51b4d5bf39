"""A multi-host run's life cycle: start every rank on its host (credentials shipped through the
runner's stdin), poll, kill, collect the files of hosts without a shared run directory, and the
summary.  The command line over it is :mod:`byzsgd.deploy.cluster`.
"""
from __future__ import annotations

import functools
import json
import os
import secrets
import sys
import time
from pathlib import Path

from byzsgd import rundir
from byzsgd.deploy import summary as runsum
from byzsgd.deploy.host_scripts import kill_script, q, start_script, status_script
from byzsgd.deploy.plan import Plan, split_flags
from byzsgd.deploy.remote import parallel, run_script
from byzsgd.errors import ByzSGDError, ConfigError
from byzsgd.net.credentials import RankCredentials

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
            elif line.startswith("byzsgd-server ") and line.split()[1].isdigit():
                plan.servers[host] = int(line.split()[1])  # the host's fork server
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
    """A rank did not start on its host (the run is then stopped)."""


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
    """Copy logs, metrics and exit codes of hosts without a shared run directory (via ``cat``),
    and the log of each such host's fork server (what it forked, how each rank ended)."""
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
    for host, ranks in by_host(doc).items():  # a fork server's own log: beside its first rank's
        if host in doc.get("fork_servers", {}) and not shared.get(host):
            name = f"forkserver-{ranks[0]['role']}{ranks[0]['rank']}.log"
            jobs.append((host, f"{ranks[0]['remote_dir']}/{name}", run_dir / name))

    def one(job):
        host, remote, local = job
        res = run_script(runner, host, f"cat {q(remote)}\n", timeout=120)
        if res.returncode == 0:
            Path(local).write_text(res.stdout)

    parallel(one, jobs)


def summarize(doc: dict, outcome: str, codes: dict[int, int | None]) -> dict:
    series = runsum.ps_series(doc["run_dir"])
    core = runsum.run_summary(doc["run_dir"], outcome, started=doc["started"], returncodes=codes)
    return dict(outcome=core["outcome"], run_dir=doc["run_dir"],
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
    runsum.print_summary(summary, "byzsgd.cluster")
    if outcome.startswith("failed"):
        rank = int(outcome.split(":")[1])
        r = doc["ranks"][rank]
        print(f"byzsgd.cluster: {r['role']} {rank} on {r['host']} failed (exit {codes.get(rank)}); "
              f"its log: {r['log']}", file=sys.stderr)
        runsum.print_log_tail(r["log"])
    if summary["left_behind"]:
        print(f"byzsgd.cluster: processes left behind: {summary['left_behind']}", file=sys.stderr)
    if as_json:
        print(json.dumps(summary))
    return 0 if outcome == "ok" and not summary["left_behind"] else 1


def wait_and_finish(doc: dict, args) -> int:
    try:
        outcome, codes = monitor(doc, timeout=args.timeout, quiet=args.quiet)
    except KeyboardInterrupt:
        finish(doc, "interrupted", {}, as_json=args.json)
        return 130
    return finish(doc, outcome, codes, as_json=args.json)
