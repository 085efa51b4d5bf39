"""Shared test set-up: one torch thread per process (2 cores, many processes)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    torch.set_num_threads(1)
    yield


@pytest.fixture
def python() -> str:
    return sys.executable


# --- skips that cannot hide regressions ------------------------------------------------------
#: In CI (``CI=true``) a test may skip only for what no CPU-only Linux CI machine has; any
#: other skip -- a missing system tool, a test bed that failed to come up, a broken kernel
#: builder, a missing package -- is turned into a failure, so a regression cannot pass as a skip.
ALLOWED_CI_SKIPS = (
    "no CUDA device",
    "average has no resilience bound",  # the parametrised bound test has nothing to check there
    "fork spawning is Linux-only",
)


def skip_allowed_in_ci(reason: str) -> bool:
    return any(allowed in reason for allowed in ALLOWED_CI_SKIPS)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and _in_ci()) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if not skip_allowed_in_ci(reason):
        report.outcome = "failed"
        report.longrepr = (f"skipped in CI for a reason that is not allowed there: {reason}\n"
                           f"(allowed: {', '.join(ALLOWED_CI_SKIPS)}; see tests/conftest.py)")
