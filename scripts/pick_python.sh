# Sourced by the scripts that run byzsgd on this machine: sets $py to the interpreter to use.
# Order: $BYZSGD_PYTHON; the active virtual environment or conda env (the one a user installed
# byzsgd into); this checkout's .venv (what scripts/setup.sh makes); python3.  Fails fast,
# naming the interpreter and the missing module, when the choice cannot import byzsgd's needs.
# Expects $here (the checkout); $PICK_PYTHON_NEEDS overrides the modules checked.
py=${BYZSGD_PYTHON:-}
if [[ -z $py && -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then py=$VIRTUAL_ENV/bin/python; fi
if [[ -z $py && -n ${CONDA_PREFIX:-} && -x $CONDA_PREFIX/bin/python ]]; then py=$CONDA_PREFIX/bin/python; fi
if [[ -z $py && -x $here/.venv/bin/python ]]; then py=$here/.venv/bin/python; fi
py=${py:-python3}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
if ! _miss=$("$py" -c 'import importlib, sys
for m in sys.argv[1:]:
    try:
        importlib.import_module(m)
    except Exception as e:
        sys.exit(m + " (" + type(e).__name__ + ": " + str(e) + ")")' ${PICK_PYTHON_NEEDS:-msgpack numpy torch byzsgd.net} 2>&1); then
    echo "$(basename "$0"): $py cannot import ${_miss:-byzsgd} — set BYZSGD_PYTHON, activate the environment byzsgd is installed in, or run scripts/setup.sh" >&2
    exit 3
fi
