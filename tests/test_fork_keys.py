"""A forked node holds only its own rank's keys (docs/design.md §5: a member proves its rank and
no other).  Forked nodes share the launcher's memory at the fork: if the launcher had ever
held the operator secret or another rank's pair keys (even in freed memory), a Byzantine
member could read them in its own address space, without opening any file.

The test starts a real forked deployment from this process (as ``byzsgd.launch.deploy`` does)
and reads each node's writable memory through ``/proc/PID/mem``: its own keys are there (the
scan works), no other pair's key is, nor the operator secret, raw or as hex."""
from __future__ import annotations

import os
import re
import secrets
import signal
import stat
import time
from pathlib import Path

import numpy as np
import pytest

from byzsgd.deploy.spawn import FORK_AVAILABLE
from byzsgd.errors import ConfigError
from byzsgd.net.credentials import RankCredentials, credentials_path, pair_key, provision_in_child

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(not FORK_AVAILABLE, reason="fork spawning is Linux-only")]

NUM_PS, NUM_WORKERS = 4, 7  # the main job's shape: its last rank's file text outlived provision()
WORLD = NUM_PS + NUM_WORKERS
_MAPS_LINE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ \d+\s*(.*)$")
_CHUNK = 64 << 20


def _written_regions(pid: int):
    """(start, end) of every resident page run the process may have written: in the heap, the
    stacks, anonymous memory and writable private file mappings.  Read-only file mappings
    (libraries' code, the dataset cache) hold only their files' bytes, which are no keys; pages
    never touched (absent from ``/proc/PID/pagemap``) read as zeros."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open(f"/proc/{pid}/pagemap", "rb", buffering=0) as pagemap:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            m = _MAPS_LINE.match(line)
            if not m or m.group(3)[0] != "r":
                continue
            path = m.group(4)
            if path in ("[vvar]", "[vsyscall]", "[vdso]") or (path and not path.startswith("[") and "w" not in m.group(3)):
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            pagemap.seek(start // page * 8)
            entries = np.frombuffer(pagemap.read((end - start) // page * 8), dtype=np.uint64)
            there = np.concatenate(([False], (entries >> np.uint64(62)) != 0, [False])).astype(np.int8)
            edges = np.flatnonzero(np.diff(there))  # run starts and ends, alternating
            for a, b in zip(edges[::2], edges[1::2]):
                yield start + int(a) * page, start + int(b) * page


def _found(pid: int, needles: dict[str, bytes]) -> set[str]:
    """The names of ``needles`` that occur in the process's written memory."""
    overlap = max(len(n) for n in needles.values()) - 1
    hits: set[str] = set()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in _written_regions(pid):
            pos, tail = start, b""
            while pos < end:
                try:
                    mem.seek(pos)
                    chunk = mem.read(min(_CHUNK, end - pos))
                except OSError:  # a region unmapped meanwhile
                    break
                if not chunk:
                    break
                data = tail + chunk
                hits.update(name for name, n in needles.items() if name not in hits and n in data)
                tail, pos = data[-overlap:], pos + len(chunk)
    return hits


def _forms(name: str, key: bytes) -> dict[str, bytes]:
    """The key as bytes and as the hex text of a credentials file."""
    return {f"{name} raw": key, f"{name} hex": key.hex().encode()}


def test_launcher_never_derives_a_key_itself(tmp_path, monkeypatch):
    """The launcher's provisioning derives every key in a child: none in this process, not
    even transiently (freed ``bytes`` keep their contents), and the files are as before."""
    from byzsgd.config import RunConfig
    from byzsgd.deploy.local import Deployment, provision_credentials
    from byzsgd.net import credentials

    derived_here = []  # a child appends to its own copy
    monkeypatch.setattr(credentials, "pair_key", lambda *a: derived_here.append(a[2:]) or pair_key(*a))
    dep = Deployment(RunConfig(num_ps=2, num_workers=2), tmp_path / "run", "127.0.0.1")
    paths = provision_credentials(dep)
    assert derived_here == []
    creds = [RankCredentials.load(p, rank=r, world_size=4) for r, p in enumerate(paths)]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in paths)
    assert stat.S_IMODE(paths[0].parent.stat().st_mode) == 0o700
    assert all(creds[i].key(j) == creds[j].key(i) for i in range(4) for j in range(4) if i != j)
    assert len({c.deployment for c in creds}) == 1 and creds[0].key(1) != creds[0].key(2)
    assert provision_credentials(dep) == paths  # a fresh operator secret each time
    assert RankCredentials.load(paths[0]).deployment != creds[0].deployment


def test_provisioning_child_reports_its_failure(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(ConfigError, match="accessible by others"):
        provision_in_child(2, shared)
    blocked = tmp_path / "blocked"
    blocked.mkdir(mode=0o700)
    credentials_path(blocked, 1).mkdir()  # rank 1's file cannot replace a directory
    with pytest.raises(ConfigError, match="cannot provision the credentials in .*IsADirectoryError"):
        provision_in_child(2, blocked)
    with pytest.raises(ConfigError, match="world_size"):
        provision_in_child(0, tmp_path / "none")


@pytest.mark.slow
def test_forked_node_holds_only_its_own_keys(tmp_path, monkeypatch):
    from byzsgd import rundir
    from byzsgd.deploy import summary as runsum
    from byzsgd.deploy.local import plan, start, stop_all
    from byzsgd.deploy.options import LaunchConfig

    """11 nodes forked from this process: each holds its own keys, no other pair's, and not
    the operator secret."""
    # The operator secret is drawn by secrets.token_bytes; this one is kept masked (two random
    # halves XORed only when drawn), so no copy of it sits in this process's memory before the
    # fork unless the launcher itself draws it.  (The nodes draw no 32-byte token themselves.)
    mask, masked = os.urandom(32), os.urandom(32)
    real_token_bytes = secrets.token_bytes

    def token_bytes(n=None):
        return bytes(a ^ b for a, b in zip(mask, masked)) if n == 32 else real_token_bytes(n)

    monkeypatch.setattr(secrets, "token_bytes", token_bytes)
    lc = LaunchConfig.from_argv([
        "--run_dir", str(tmp_path / "run"), "--quiet", "--spawn", "fork",
        "--num_ps", str(NUM_PS), "--num_workers", str(NUM_WORKERS), "--fps", "0", "--fw", "0",
        "--gar", "average", "--pre_agg", "none", "--worker_momentum", "0",
        "--dataset", "synthetic:1x8x8:3:60:20", "--model", "linear", "--batch", "4",
        "--num_iter", "100000", "--acc_freq", "100000", "--eval_samples", "20"])
    dep = plan(lc)
    try:
        start(dep, "fork")
        deadline = time.monotonic() + 90  # every PS past a step: every node has handshaken
        while min(runsum.ps_steps(dep.run_dir).values() or [-1]) < 2:
            dead = [n.rank for n in dep.nodes if n.proc.poll() is not None]
            assert not dead, f"nodes {dead} exited; see {dep.run_dir}"
            assert time.monotonic() < deadline, "the deployment made no step in 90 s"
            time.sleep(0.2)

        operator = bytes(a ^ b for a, b in zip(mask, masked))  # only now, after every fork
        keys = {(i, j): pair_key(operator, WORLD, i, j) for i in range(WORLD) for j in range(i + 1, WORLD)}
        cred = RankCredentials.load(credentials_path(rundir.credentials_dir(dep.run_dir), 0))
        assert cred.key(1) == keys[0, 1], "the launcher no longer draws its secret with secrets.token_bytes"

        for node in dep.nodes:  # frozen while scanned: the scan gets the CPU, the memory holds still
            os.killpg(node.proc.pid, signal.SIGSTOP)
        for node in dep.nodes:
            r = node.rank
            own = next(k for (i, j), k in keys.items() if r in (i, j))
            needles = {"its own key": own, **_forms("the operator secret", operator)}
            for (i, j), k in keys.items():
                if r not in (i, j):
                    needles.update(_forms(f"K({i},{j})", k))
            hits = _found(node.proc.pid, needles)
            assert node.proc.poll() is None, f"node {r} exited during the scan"
            assert "its own key" in hits, f"rank {r}: its own key not found: the scan is broken"
            leaked = sorted(hits - {"its own key"})
            assert not leaked, f"{node.role} rank {r} holds {leaked}"
    finally:
        for node in dep.nodes:
            if node.proc is not None and node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGCONT)
        stop_all(dep)
