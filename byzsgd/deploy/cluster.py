"""Multi-host deployments: what ``scripts/run_exp.sh`` and ``scripts/kill.sh`` run.

``python -m byzsgd.deploy.cluster run``  starts every rank on its host (forked by one fork server
per host, or one interpreter per rank: ``--spawn``), through a *runner* (a command that runs
``sh -s`` on a host: ``ssh`` by default), waits for the run, collects the files and writes
``summary.json``.  ``kill [RUN_DIR]`` stops exactly the
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

Spawning (``--spawn``, named as byzsgd-launch's): ``fork`` (the default) starts one fork server
per host (``python -m byzsgd.deploy.fork_server``, on Linux hosts; others exec): it imports torch
and byzsgd once and forks the host's ranks, each in its own session (its process group id,
``.pgid``, is its pid).  ``exec`` runs each rank as ``setsid sh -c '<trainer> & echo $! >
<role><rank>.pid; wait; echo $? > <role><rank>.rc'`` (see ``WRAPPER``): its own session (the
process group id, ``.pgid``, is the wrapper's pid).  Either way each rank has its exact pid, its
log and its exit code (``.rc``, 128 + N after signal N), and its environment carries
``BYZSGD_RUN_ID`` so that ``kill`` checks, before signalling, that a pid is still one of this run's.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from byzsgd import rundir
from byzsgd.deploy.host_scripts import python_rule, start_script
from byzsgd.deploy.cluster_args import build_parser
from byzsgd.deploy.latest import latest_run, record_latest
from byzsgd.deploy.multihost import (StartError, collect, kill, load, poll, start, summarize,
                                     wait_and_finish)
from byzsgd.deploy.plan import DEFAULT_CONFIG, RUNNER_ENV, default_config, make_plan
from byzsgd.deploy.remote import runner_argv
from byzsgd.deploy.slurm import describe_slurm
from byzsgd.errors import ByzSGDError, ConfigError

def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd in ("wait", "kill", "status", "collect", "summary") and not args.run_dir:
            args.run_dir = str(latest_run())
            print(f"byzsgd.cluster: the latest run: {args.run_dir}", file=sys.stderr)
        if args.cmd == "run":
            if args.trainer_flags and args.trainer_flags[0] == "--":
                args.trainer_flags = args.trainer_flags[1:]
            if args.preflight:  # scripts/run_exp.sh: checked before anything starts, here
                from byzsgd.deploy.preflight import check_run
                try:
                    if check_run(args) == "local" and args.runner is None:
                        os.environ[RUNNER_ENV] = "local"
                except ConfigError as exc:  # PreflightError included
                    print(f"byzsgd.cluster: error: {exc}", file=sys.stderr)
                    return 2
            plan = make_plan(args)
            if args.dry_run:
                for host, ranks in plan.hosts().items():
                    print(f"# {host}: python {python_rule(ranks[0].host, plan.runner)}")
                    print(f"# {host}: spawn {plan.spawn}" + (" (one fork server for its ranks where "
                          "the host is Linux, else exec)" if plan.spawn == "fork" else ""))
                    print(f"# {' '.join(runner_argv(plan.runner, host))} <<'EOF'")
                    print(start_script(plan, ranks, "" if plan.insecure else None, "probe", redact=True) + "EOF")
                return 0
            print(f"byzsgd.cluster: {plan.num_ps} PS + {plan.num_workers} workers on "
                  f"{len(plan.hosts())} hosts, master {plan.master}, runner {plan.runner!r}, "
                  f"spawn {plan.spawn}; run dir {plan.run_dir}", file=sys.stderr)
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
