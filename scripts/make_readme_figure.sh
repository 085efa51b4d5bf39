#!/usr/bin/env bash
# Regenerate the README's attack x rule heatmap: run the MNIST grid
# (scripts/configs/mnist_attacks.toml: 20 cells, ~20 min on a busy 2-core machine;
# resumable: rerun after an interruption and the finished cells are skipped), then the
# report into docs/ (docs/heatmap.png is the README's figure; docs/worst_case.md its table).
#
#   scripts/make_readme_figure.sh                     # the whole grid
#   scripts/make_readme_figure.sh --set num_iter=30   # extra flags go to byzsgd.experiment
#
# Environment: RESULTS (default runs/mnist_attacks/results.jsonl), OUT (default docs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
RESULTS=${RESULTS:-runs/mnist_attacks/results.jsonl}
OUT=${OUT:-docs}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
# exit 1 = the grid finished but some cell failed (recorded, shown as 'fail'): still plot
rc=0
"$PY" -m byzsgd.experiment scripts/configs/mnist_attacks.toml --results "$RESULTS" "$@" || rc=$?
if [ "$rc" -ne 0 ] && [ "$rc" -ne 1 ]; then
    echo "make_readme_figure: the grid stopped (exit $rc); rerun to resume" >&2
    exit "$rc"
fi
"$PY" -m byzsgd.report "$RESULTS" --out "$OUT" --title "MNIST, 4 PS (fps=1) + 6 workers (fw=1)"
echo "make_readme_figure: README figure: $OUT/heatmap.png (table: $OUT/worst_case.md)" >&2
