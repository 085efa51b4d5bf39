"""In CI a skip for anything but a missing GPU is a failure (the hook in tests/conftest.py)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

CONFTEST = Path(__file__).resolve().parent / "conftest.py"

SAMPLE = '''
import pytest

def test_tool_missing():
    pytest.skip("needs nft, which is not installed")

@pytest.mark.skipif(True, reason="no CUDA device")
def test_gpu():
    pass

def test_passes():
    pass
'''


def _run(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_outside_ci_skips_stay_skips(tmp_path):
    res = _run(tmp_path, None)
    assert res.returncode == 0, res.stdout
    assert "1 passed, 2 skipped" in res.stdout


def test_in_ci_only_the_allowed_reasons_skip(tmp_path):
    res = _run(tmp_path, "true")
    assert res.returncode == 1, res.stdout
    assert "1 failed, 1 passed, 1 skipped" in res.stdout
    assert "skipped in CI for a reason that is not allowed there" in res.stdout
    assert "needs nft, which is not installed" in res.stdout


def test_the_allowed_reasons_are_only_what_a_cpu_ci_cannot_have():
    sys.path.insert(0, str(CONFTEST.parent))
    try:
        import conftest
    finally:
        sys.path.pop(0)
    assert set(conftest.ALLOWED_CI_SKIPS) == {"no CUDA device", "average has no resilience bound",
                                              "fork spawning is Linux-only"}
    assert not conftest.skip_allowed_in_ci("cannot create network namespaces here")
    assert not conftest.skip_allowed_in_ci("torch.compile unavailable here: boom")


def test_in_ci_a_netns_test_without_ip_fails_loudly(tmp_path):
    """The multi-host tests' fixture skips through pytest.skip when `ip` (or root) is missing;
    in CI the hook makes that a failure naming the reason.  `ip` and `nft` are hidden by
    running with a PATH that holds neither."""
    empty = tmp_path / "bin"
    empty.mkdir()
    root = CONFTEST.parent.parent
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(CI="true", PATH=str(empty))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                          "tests/test_multihost.py::test_netns_run_trains_like_the_local_launcher"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert res.returncode == 1, res.stdout[-3000:]
    assert "skipped in CI for a reason that is not allowed there" in res.stdout, res.stdout[-3000:]
    assert "needs iproute2" in res.stdout or "needs root" in res.stdout, res.stdout[-3000:]
    # outside CI the same run is a skip with that reason
    env.pop("CI")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                          "tests/test_multihost.py::test_netns_run_trains_like_the_local_launcher"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert res.returncode == 0 and "1 skipped" in res.stdout, res.stdout[-3000:]
