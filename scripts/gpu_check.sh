#!/usr/bin/env bash
# The GPU check of issue 17, in one go, on a machine with one CUDA GPU (docs/gpu.md):
#
#   1. the CUDA tests: tests/test_device.py and the GAR tests' CUDA cases;
#   2. scripts/bench_gars.py on CUDA at n=50, f=10, d=1.1e7: every rule as a multiple of the
#      device's memory-copy floor (goals: the median family <= 3x, Krum <= 3x);
#   3. scripts/bench_gpu.py: 4 PS (fps=1) + 7 workers (fw=1), ResNet-18 on synthetic 3x32x32,
#      batch 128, 100 steps, --mode garfield and --mode paper, against vanilla (1 PS, average,
#      the same workers), all on that GPU (--device auto), GPU utilisation sampled;
#   4. one JSON line on stdout (the last): each stage's result, s/step, the ratios, the goals.
#
# The whole stays under $BYZSGD_GPU_CHECK_BUDGET seconds (default 340: under 6 minutes with
# the install); each stage runs under `timeout` with its share.
#
#   scripts/gpu_check.sh            the check (needs torch with CUDA; `pip install -e .` when
#                                   byzsgd's dependencies are missing)
#   scripts/gpu_check.sh --smoke    the same pipeline at a tiny size on the CPU (what the CPU
#                                   test suite runs: tests/test_gpu_check.py); also --dry-run
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$here"
smoke=0
case "${1:-}" in
    --smoke|--dry-run) smoke=1 ;;
    "") ;;
    *) echo "usage: $0 [--smoke|--dry-run]" >&2; exit 2 ;;
esac
budget=${BYZSGD_GPU_CHECK_BUDGET:-340}
t0=$(date +%s)
left() { echo $(( budget - ($(date +%s) - t0) )); }
out=${BYZSGD_GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/byzsgd-gpu-check-XXXXXX")}
mkdir -p "$out"

# -- 0. an interpreter that imports byzsgd (install the checkout when it cannot)
cand=${BYZSGD_PYTHON:-${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}}
[[ -z $cand && -x $here/.venv/bin/python ]] && cand=$here/.venv/bin/python
cand=${cand:-python3}
if ! PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" "$cand" -c 'import msgpack, torch, byzsgd.net' 2>/dev/null; then
    echo "gpu_check: installing byzsgd (pip install -e .) into $cand" >&2
    "$cand" -m pip install -q -e "$here" >&2 || { echo "gpu_check: pip install -e . failed" >&2; exit 3; }
fi
export BYZSGD_PYTHON=$cand
source "$here/scripts/pick_python.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if (( smoke )); then
    echo "gpu_check: smoke mode (CPU, tiny sizes): $out" >&2
else
    "$py" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || { echo "gpu_check: no CUDA device visible to $py (torch $("$py" -c 'import torch; print(torch.__version__)'))" >&2; exit 4; }
    nvidia-smi -L >&2 2>/dev/null || true
fi

# -- 1. CUDA tests
if (( smoke )); then tests_t=60; else tests_t=70; fi
timeout "$tests_t" "$py" -m pytest -q -p no:cacheprovider tests/test_device.py -k "cuda" >"$out/pytest_device.txt" 2>&1
echo $? >"$out/pytest_device.rc"
if (( ! smoke )); then
    timeout 60 "$py" -m pytest -q -p no:cacheprovider -m "not slow" -k "cuda" \
        tests/test_gars_core.py tests/test_gars_pipeline.py tests/test_gars_extra.py >"$out/pytest_gars.txt" 2>&1
    echo $? >"$out/pytest_gars.rc"
fi
echo "gpu_check: tests done ($(tail -n 1 "$out/pytest_device.txt")), $(left) s left" >&2

# -- 2. the rules against the copy floor
if (( smoke )); then
    gars_args=(--device cpu --config 5,1,1000 --rules average,median,trimmed_mean,krum --quick)
    gars_t=60
else
    gars_args=(--device cuda --config 50,10,1.1e7 --quick)
    gars_t=80
fi
timeout "$gars_t" "$py" scripts/bench_gars.py "${gars_args[@]}" --json >"$out/bench_gars.txt" 2>"$out/bench_gars.err"
echo $? >"$out/bench_gars.rc"
echo "gpu_check: bench_gars done, $(left) s left" >&2

# -- 3. the deployments (what is left of the budget, minus 15 s to report)
dep_budget=$(( $(left) - 15 ))
(( dep_budget < 60 )) && dep_budget=60
if (( smoke )); then dep_args=(--smoke); else dep_args=(); fi
timeout $(( dep_budget + 30 )) "$py" scripts/bench_gpu.py "${dep_args[@]}" --budget "$dep_budget" \
    --run_root "$out/runs" >"$out/bench_gpu.txt" 2>"$out/bench_gpu.err"
echo $? >"$out/bench_gpu.rc"

# -- 4. one JSON line
"$py" - "$out" "$(( $(date +%s) - t0 ))" "$smoke" <<'PY'
import json, sys
from pathlib import Path
out, elapsed, smoke = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"

def last_json(name):
    try:
        lines = [l for l in (out / name).read_text().splitlines() if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None

def rc(name):
    try:
        return int((out / f"{name}.rc").read_text())
    except (OSError, ValueError):
        return None

def tail(name):
    try:
        return (out / name).read_text().strip().splitlines()[-1][:200]
    except (OSError, IndexError):
        return None

gars = last_json("bench_gars.txt") or {}
dev = next(iter(gars), None)
rules = {k.split("@")[0]: v.get("x_floor") for k, v in (gars.get(dev) or {}).items()
         if isinstance(v, dict) and "x_floor" in v}
median_family = {r: rules[r] for r in ("median", "trimmed_mean", "meamed", "phocas") if r in rules}
dep = last_json("bench_gpu.txt") or {}
goals = dict(dep.get("goals") or {})
goals["median family <= 3x copy floor"] = (max(median_family.values()) <= 3.0) if median_family else None
goals["krum <= 3x copy floor"] = (rules["krum"] <= 3.0) if "krum" in rules else None
report = {
    "check": "smoke (CPU, tiny)" if smoke else "gpu", "elapsed_s": elapsed,
    "tests": {"device": {"rc": rc("pytest_device"), "summary": tail("pytest_device.txt")},
              "gars_cuda": {"rc": rc("pytest_gars"), "summary": tail("pytest_gars.txt")}},
    "bench_gars": {"device": dev, "rc": rc("bench_gars"), "x_floor": rules},
    "deployments": {"rc": rc("bench_gpu"), "s_per_step": dep.get("s_per_step"), "ratio": dep.get("ratio"),
                    "outcome": dep.get("outcome"), "gpu_util": dep.get("gpu_util"),
                    "device": dep.get("device")},
    "goals": goals, "out": str(out)}
print(json.dumps(report))
PY
