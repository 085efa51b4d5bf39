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
import json
import os
import sys
from pathlib import Path

from byzsgd import rundir
from byzsgd.deploy.host_scripts import python_rule, start_script
from byzsgd.deploy.latest import LATEST_ENV, REPO, latest_run, record_latest
from byzsgd.deploy.multihost import (StartError, collect, kill, load, poll, start, summarize,
                                     wait_and_finish)
from byzsgd.deploy.plan import (DEFAULT_CONFIG, DEFAULT_RUNNER, RUNNER_ENV, TLS_FLAGS, default_config,
                                make_plan)
from byzsgd.deploy.remote import runner_argv
from byzsgd.deploy.slurm import describe_slurm
from byzsgd.errors import ByzSGDError

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


if __name__ == "__main__":
    sys.exit(main())
