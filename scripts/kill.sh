#!/usr/bin/env bash
# Stop exactly the ranks of one run and leave its outcome:  scripts/kill.sh [RUN_DIR] [--grace SECONDS]
#
# Without RUN_DIR: the latest run scripts/run_exp.sh started from this checkout (the symlink
# runs/latest in the checkout, or $BYZSGD_LATEST_RUN); it refuses, saying so, when none is
# recorded or that run directory is gone.  Any run: run_exp.sh's (each host through the run's
# runner, $BYZSGD_RUNNER overrides it) or byzsgd-launch's (its launcher stops its nodes).
# RUN_DIR/stop.json names kill.sh before any signal; SIGTERM to each rank's process group,
# SIGKILL after --grace seconds (default 5).  A pid is only signalled when it is still one of
# this run's (run id / pid file), never matched by name (no pkill -f).  Then RUN_DIR/summary.json
# says outcome "killed" by kill.sh, and each rank it stopped has exit code 143 (128 + SIGTERM)
# there and in its <role><rank>.rc; the outcome is printed.  A run already over keeps its own.
# Exit status 0 when no process of the run is left (also for a run already over).
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PICK_PYTHON_NEEDS="msgpack byzsgd.deploy.stop" source "$here/scripts/pick_python.sh"
exec "$py" -m byzsgd.deploy.stop "$@"
