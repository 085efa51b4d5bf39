#!/usr/bin/env bash
# Start a ByzSGD experiment over several hosts: one node per rank, started from its configuration
# (the trainer flags below, checked here, with the rank's own fields filled in), which is shipped
# to its host as JSON (<dir>/<role><rank>.config.json; python -m byzsgd.deploy.shipped).
# --spawn fork (the default): on each Linux host ONE fork server (python -m
# byzsgd.deploy.fork_server, log <dir>/forkserver-<first rank>.log) imports torch once and forks
# that host's ranks; --spawn exec: one interpreter per rank (hosts that are not Linux always).
#
# Garfield's way: in a directory holding `servers`, `workers` and `exp.conf` (trainer flags,
# see scripts/exp.conf.example), run `path/to/scripts/run_exp.sh` with no argument; then
# `path/to/scripts/kill.sh` (no argument) stops that run, the latest one of this checkout.
#
#   scripts/run_exp.sh [--servers FILE] [--workers FILE] [--config FILE] [--run_dir DIR]
#                      [--base_port 29500] [--ports fixed|ephemeral] [--runner CMD] [--spawn fork|exec]
#                      [--tls_cert PEM --tls_key PEM [--tls_ca PEM]] [--timeout S]
#                      [--detach] [--json] [--dry_run] [-- TRAINER FLAGS...]
#
# servers / workers: one rank per line, "HOST [addr=A] [python=P] [repo=R] [dir=D] [listen=L]"
# (see scripts/servers.example); the first server is the master (rank 0); ranks are the
# servers in file order, then the workers.  Defaults: ./servers, ./workers.  Trainer flags come
# from --config (default: exp.conf beside the servers file, when there is one; see
# scripts/exp.conf.example) and after `--`; the deployment sets the per-rank fields itself
# (--rank --master --port --listen_host --advertise_host --credentials --metrics ...: refused
# there).  Rank r listens on base_port + r.
#
# Runner: $BYZSGD_RUNNER (or --runner), default "ssh -o BatchMode=yes", or "local" when every
# host is this machine (127.0.0.1, localhost, its names or addresses); the per-host script
# goes to `RUNNER HOST sh -s` on stdin ("{host}" in RUNNER is replaced instead of appending).
#   BYZSGD_RUNNER="ip netns exec"   hosts are network namespaces (scripts/netns_cluster.sh)
#   BYZSGD_RUNNER=local             everything on this machine
# Credentials: a fresh operator secret is drawn in memory here (never written, never sent);
# each host receives, on that stdin, only the credentials files of the ranks it runs
# (<dir>/credentials/rank<r>.cred, 0600): never on a command line; --dry_run redacts them.
# (--insecure_shared_secret true in the trainer flags: one shared secret instead, from
# --secret_file/$BYZSGD_SECRET_FILE or fresh, into <dir>/secret; it proves membership only.)
#
# Writes RUN_DIR/deployment.json (rank, role, host, addr, port, pid, pgid, log, metrics),
# <role><rank>.{pid,pgid,rc,log}, metrics-ps<rank>.jsonl and, at the end, summary.json.
# Without --detach it waits for the run (Ctrl-C stops every rank); stop a detached run
# with scripts/kill.sh RUN_DIR (or scripts/kill.sh alone: the run is recorded as the
# checkout's latest, runs/latest, or $BYZSGD_LATEST_RUN).
# Python here: $BYZSGD_PYTHON, else the active venv/conda env, else <repo>/.venv/bin/python,
# else python3 (scripts/pick_python.sh).  On the hosts: python= in the host file, else --python,
# else this same interpreter when the hosts are this machine (runner local / ip netns exec),
# else <repo>/.venv/bin/python, else python3; --dry_run prints each host's.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# torch is optional here (the hosts' interpreters are checked on the hosts): not imported
# only to be checked, which would cost every start ~2 s of CPU
PICK_PYTHON_NEEDS=${PICK_PYTHON_NEEDS:-msgpack numpy byzsgd.net}
source "$here/scripts/pick_python.sh"
# --preflight: checks before anything starts (byzsgd.deploy.preflight: trainer flags, optimizer
# arguments, ports and data of the ranks on this machine), one line and exit 2; runner local
# when none is given and every host is this machine (127.0.0.1, localhost, its own names).
# In the launcher's own process: one interpreter, one import of torch, for the whole start.
exec "$py" -m byzsgd.deploy.cluster run --preflight "$@"
