"""The command line of ``python -m byzsgd.deploy.cluster`` (``run``, ``wait``, ``kill``, ...).

Its own module so that :mod:`byzsgd.deploy.preflight` can read ``run``'s arguments the way the
cluster launcher does without importing the launcher (which runs the preflight in-process:
``run --preflight``, one interpreter and one import of torch for ``scripts/run_exp.sh``).
"""
from __future__ import annotations

import argparse

from byzsgd.deploy.latest import LATEST_ENV, REPO
from byzsgd.deploy.plan import DEFAULT_CONFIG, DEFAULT_RUNNER, DEFAULT_SPAWN, RUNNER_ENV, SPAWN_CHOICES, TLS_FLAGS

LATEST_HELP = (f"the run directory (default: the latest run started from this checkout, "
               f"${LATEST_ENV} or <checkout>/runs/latest)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m byzsgd.deploy.cluster",
                                description="Multi-host deployments: what scripts/run_exp.sh and scripts/kill.sh run.",
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
    r.add_argument("--spawn", default=DEFAULT_SPAWN, choices=SPAWN_CHOICES,
                   help="fork: each host's ranks are forked from one fork server per host after "
                   "one import of torch (fast start; Linux hosts, the others exec); exec: each "
                   "rank a fresh interpreter")
    r.add_argument("--preflight", action="store_true", help="check the run here first "
                   "(byzsgd.deploy.preflight: trainer flags, optimizer, ports, data; one line and exit 2 "
                   "before anything starts; runner local when every host is this machine): what "
                   "scripts/run_exp.sh passes")
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
