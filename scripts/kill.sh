#!/usr/bin/env bash
# Stop exactly the ranks of one run:  scripts/kill.sh [RUN_DIR] [--grace SECONDS]
#
# Without RUN_DIR: the latest run scripts/run_exp.sh started from this checkout (the symlink
# runs/latest in the checkout, or $BYZSGD_LATEST_RUN); it refuses, saying so, when none is
# recorded or that run directory is gone.  Reads RUN_DIR/deployment.json; on each host, through
# the run's runner ($BYZSGD_RUNNER overrides it), it sends SIGTERM to each rank's process group
# (pid files <role><rank>.pgid / .pid), waits --grace seconds (default 5), then SIGKILLs
# whatever is left.  A pid is only signalled when its environment carries this run's
# BYZSGD_RUN_ID, so a recycled pid is never hit; nothing is matched by name (no pkill -f).
# Exit status 0 when no process of the run is left on any host (also for a run already over).
set -euo pipefail
if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PICK_PYTHON_NEEDS="msgpack byzsgd.deploy.cluster" source "$here/scripts/pick_python.sh"
exec "$py" -m byzsgd.deploy.cluster kill "$@"
