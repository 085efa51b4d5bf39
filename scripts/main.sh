#!/usr/bin/env bash
# Set up (if needed) and run the main job: a whole local ByzSGD deployment training MNIST
# (4 PS with fps=1, 7 workers with fw=1, median), with progress and the final accuracy.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m byzsgd.launch "$@"
