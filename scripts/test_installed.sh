#!/usr/bin/env bash
# CI's second job step: byzsgd installed as a user installs it -- non-editable, into a fresh
# virtual environment outside the checkout -- then the entry points and the fast part of the
# suite run with that environment's interpreter, from outside the checkout, so `import byzsgd`
# is the installed copy (pytest --import-mode=importlib puts nothing of the checkout on sys.path).
#
#   scripts/test_installed.sh [PYTEST ARGS...]     (default: -m "not slow")
# $BYZSGD_INSTALL_VENV: where to make the environment (default: a fresh temporary directory).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
venv=${BYZSGD_INSTALL_VENV:-$work/venv}
"${PYTHON:-python3}" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch/torchvision pinned as in setup.sh (this machine serves them from local disk)
"$venv/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
"$venv/bin/python" -m pip install -q "$here[dev]" 2>&1 | grep -v "^WARNING: Location" || true
cd "$work"
where=$("$venv/bin/python" -c 'import byzsgd, os; print(os.path.dirname(byzsgd.__file__))')
case "$where" in
    "$venv"/*) echo "test_installed: byzsgd imported from $where" ;;
    *) echo "test_installed: error: byzsgd imported from $where, not from $venv" >&2; exit 1 ;;
esac
# the entry points of a non-editable install, and a short main job from outside the checkout
"$venv/bin/byzsgd-ps" --help >/dev/null
"$venv/bin/python" -m byzsgd.roles.worker --help >/dev/null
OMP_NUM_THREADS=1 "$venv/bin/byzsgd-launch" --num_iter 20 --acc_freq 20 --quiet --json --run_dir "$work/run" \
    | tail -n 1 | "$venv/bin/python" -c 'import json, sys; s = json.loads(sys.stdin.read())
assert s["outcome"] == "ok", s
print("test_installed: byzsgd-launch ok, min accuracy %.2f%% after 20 steps" % s["min_accuracy"])'
if [ $# -eq 0 ]; then set -- -m "not slow"; fi
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    --import-mode=importlib --rootdir "$here" "$here/tests" "$@"
