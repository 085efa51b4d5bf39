"""Checkpoints: atomic writes, round trips with optimizer momentum, refusals."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from byzsgd.learning.checkpoint import (Checkpoint, CheckpointPolicy, checkpoint_name, common_checkpoint_step,
                               latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint)
from byzsgd.errors import ConfigError
from byzsgd.learning.flat_state import FlatState

ROOT = Path(__file__).resolve().parent.parent


class FakeReplica:
    """What CheckpointPolicy needs of a Replica: .flat.flat, .optimizer, state vector I/O."""

    def __init__(self, seed: int = 0, momentum: float = 0.9):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
        self.flat = FlatState(self.model)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=momentum)

    def state_vector(self) -> torch.Tensor:
        return self.flat.flat.clone()

    def load_state_vector(self, vec: torch.Tensor) -> None:
        self.flat.load(vec)

    def train_step(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        self.optimizer.zero_grad()
        nn.functional.cross_entropy(self.model(x), y).backward()
        self.optimizer.step()


def _save(path, step=3, size=10, **kw):
    return save_checkpoint(path, step=step, model_state=torch.arange(size, dtype=torch.float32),
                           optimizer_state={"state": {}, "param_groups": []}, extra=kw)


def test_round_trip_with_momentum_and_resume_equivalence(tmp_path):
    a = FakeReplica()
    for s in range(3):
        a.train_step(s)
    policy = CheckpointPolicy(tmp_path, every=3, rank=2)
    assert policy.maybe_save(2, a) is None  # not a multiple of every
    path = policy.maybe_save(3, a)
    assert path is not None and path.name == checkpoint_name(2, 3)
    ck = load_checkpoint(path, expected_state_size=a.flat.state_size)
    assert isinstance(ck, Checkpoint) and ck.step == 3 and ck.extra["rank"] == 2
    assert torch.equal(ck.model_state, a.state_vector())
    bufs = [st["momentum_buffer"] for st in ck.optimizer_state["state"].values()]
    assert bufs and all(b.abs().sum() > 0 for b in bufs)  # momentum really saved

    # a fresh replica restored from the checkpoint continues exactly like the original
    b = FakeReplica(seed=123)
    assert not torch.equal(b.state_vector(), a.state_vector())
    assert CheckpointPolicy(tmp_path, every=3, rank=2).restore(b) == 3
    assert torch.equal(b.state_vector(), a.state_vector())
    a.train_step(99)
    b.train_step(99)
    assert torch.allclose(a.state_vector(), b.state_vector(), atol=0, rtol=0)
    # another rank has no checkpoint
    assert CheckpointPolicy(tmp_path, every=3, rank=1).restore(FakeReplica()) is None


def test_keep_last_k_and_latest(tmp_path):
    r = FakeReplica()
    policy = CheckpointPolicy(tmp_path, every=2, rank=0, keep=2)
    for step in range(1, 11):
        r.train_step(step)
        policy.maybe_save(step, r)
    assert [s for s, _ in list_checkpoints(tmp_path, 0)] == [8, 10]
    assert latest_checkpoint(tmp_path, 0).name == checkpoint_name(0, 10)
    assert latest_checkpoint(tmp_path, 1) is None
    assert latest_checkpoint(tmp_path / "missing", 0) is None


def test_crash_mid_write_leaves_old_checkpoint_valid(tmp_path, monkeypatch):
    good = _save(tmp_path / checkpoint_name(0, 5), step=5)
    real_save = torch.save

    def crashing_save(obj, fh, *a, **kw):
        fh.write(b"PK\x03\x04 partial garbage")  # some bytes hit the disk, then the crash
        raise KeyboardInterrupt("simulated crash mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / checkpoint_name(0, 5), step=6)  # overwriting the same name
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path / checkpoint_name(0, 7), step=7)
    monkeypatch.setattr(torch, "save", real_save)
    # the old file is intact, no new name appeared, no temp file is taken for a checkpoint
    assert load_checkpoint(good, expected_state_size=10).step == 5
    assert [s for s, _ in list_checkpoints(tmp_path, 0)] == [5]
    assert latest_checkpoint(tmp_path, 0) == good


def test_killed_writer_process_never_leaves_a_loadable_partial_file(tmp_path):
    """A real SIGKILL in the middle of torch.save: only complete checkpoints exist."""
    _save(tmp_path / checkpoint_name(0, 1), step=1, size=1000)
    script = f"""
import os, signal, torch
import byzsgd.learning.checkpoint as c
real = torch.save
def slow_save(obj, fh, *a, **kw):
    fh.write(b"x" * 4096); fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = slow_save
c.save_checkpoint({str(tmp_path / checkpoint_name(0, 2))!r}, step=2,
                  model_state=torch.zeros(1000), optimizer_state={{"state": {{}}, "param_groups": []}})
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert proc.returncode == -9
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert any(n.endswith(".tmp") for n in leftovers)  # the crash left its temp file...
    assert [s for s, _ in list_checkpoints(tmp_path, 0)] == [1]  # ...which is never a checkpoint
    r = FakeReplica()
    # and the next save of the policy cleans it up
    policy = CheckpointPolicy(tmp_path, every=1, rank=0, keep=5)
    policy.maybe_save(3, r)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_shape_mismatch_refused(tmp_path):
    p = _save(tmp_path / "c.pt", size=10)
    with pytest.raises(ConfigError, match="10 entries but this model has 11"):
        load_checkpoint(p, expected_state_size=11)
    small = FakeReplica()
    big = nn.Sequential(nn.Linear(5, 7))
    policy = CheckpointPolicy(tmp_path / "d", every=1, rank=0)
    policy.save(1, small)

    class Other(FakeReplica):
        def __init__(self):
            self.model = big
            self.flat = FlatState(big)
            self.optimizer = torch.optim.SGD(big.parameters(), lr=0.1)

    with pytest.raises(ConfigError, match="no valid checkpoint.*entries but this model has"):
        policy.restore(Other())


def test_wrong_types_refused(tmp_path):
    with pytest.raises(ConfigError):
        save_checkpoint(tmp_path / "x.pt", step=-1, model_state=torch.zeros(3), optimizer_state={})
    with pytest.raises(ConfigError):
        save_checkpoint(tmp_path / "x.pt", step=1, model_state=torch.zeros(3, 2), optimizer_state={})
    with pytest.raises(ConfigError):
        save_checkpoint(tmp_path / "x.pt", step=1, model_state=torch.zeros(3, dtype=torch.long),
                        optimizer_state={})
    # a file that is a valid torch file but not a checkpoint
    torch.save({"hello": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a byzsgd checkpoint"):
        load_checkpoint(tmp_path / "other.pt", expected_state_size=3)
    with pytest.raises(ConfigError, match="no such file"):
        load_checkpoint(tmp_path / "nope.pt", expected_state_size=3)


def test_corrupted_files_refused_clearly(tmp_path):
    good = _save(tmp_path / "good.pt", size=64)
    raw = good.read_bytes()
    # truncated
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ConfigError, match="corrupted"):
        load_checkpoint(trunc, expected_state_size=64)
    # garbage
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(300))
    with pytest.raises(ConfigError, match="corrupted"):
        load_checkpoint(junk, expected_state_size=64)
    # a flipped bit inside the tensor data (a zip member the zip reader may not verify)
    with zipfile.ZipFile(good) as zf:
        data_name = next(n for n in zf.namelist() if "/data/" in n)
        info = zf.getinfo(data_name)
    flipped = bytearray(raw)
    header = info.header_offset
    name_len, extra_len = int.from_bytes(raw[header + 26:header + 28], "little"), \
        int.from_bytes(raw[header + 28:header + 30], "little")
    start = header + 30 + name_len + extra_len
    flipped[start + 10] ^= 0x40
    bad = tmp_path / "bitflip.pt"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ConfigError, match="corrupted|checksum"):
        load_checkpoint(bad, expected_state_size=64)


def test_restore_falls_back_to_previous_when_newest_corrupted(tmp_path):
    r = FakeReplica()
    policy = CheckpointPolicy(tmp_path, every=1, rank=0, keep=2)
    r.train_step(1)
    policy.maybe_save(1, r)
    saved = r.state_vector()
    r.train_step(2)
    newest = policy.maybe_save(2, r)
    newest.write_bytes(newest.read_bytes()[:100])
    fresh = FakeReplica(seed=5)
    assert CheckpointPolicy(tmp_path, every=1, rank=0).restore(fresh) == 1
    assert torch.equal(fresh.state_vector(), saved)
    # every checkpoint corrupted: a clear error, never a silent restart from scratch
    for _, p in list_checkpoints(tmp_path, 0):
        p.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="no valid checkpoint for rank 0"):
        CheckpointPolicy(tmp_path, every=1, rank=0).restore(FakeReplica())


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    # 1. a torch zip checkpoint whose pickle carries a code payload
    evil = tmp_path / checkpoint_name(0, 9)
    torch.save({"format": "byzsgd-checkpoint", "version": 1, "step": 9,
                "model_state": torch.zeros(4), "payload": _Evil(str(marker))}, evil)
    with pytest.raises(ConfigError, match="not a safe checkpoint|corrupted"):
        load_checkpoint(evil, expected_state_size=4)
    assert not marker.exists()
    # 2. a bare (legacy, non-zip) pickle
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(ConfigError):
        load_checkpoint(legacy, expected_state_size=4)
    assert not marker.exists()
    # 3. through the policy's restore
    with pytest.raises(ConfigError):
        CheckpointPolicy(tmp_path, every=1, rank=0).restore(FakeReplica())
    assert not marker.exists()
    # sanity: the payload is live (an unsafe load would have executed it)
    pickle.loads(legacy.read_bytes())
    assert marker.exists()


def test_policy_argument_checks(tmp_path):
    with pytest.raises(ConfigError):
        CheckpointPolicy(tmp_path, every=-1, rank=0)
    with pytest.raises(ConfigError):
        CheckpointPolicy(tmp_path, every=1, rank=0, keep=0)
    policy = CheckpointPolicy(tmp_path, every=0, rank=0)  # disabled
    assert policy.maybe_save(10, FakeReplica()) is None
    assert list(tmp_path.iterdir()) == []


def test_common_step_and_restore_of_a_given_step(tmp_path):
    reps = {rank: FakeReplica(seed=rank) for rank in range(3)}
    policies = {rank: CheckpointPolicy(tmp_path, every=2, rank=rank, keep=3) for rank in range(3)}
    states = {}
    for step in (2, 4, 6):
        for rank in range(3):
            if rank == 2 and step == 6:
                continue  # rank 2 crashed before its step-6 checkpoint
            reps[rank].train_step(step)
            policies[rank].maybe_save(step, reps[rank])
            states[(rank, step)] = reps[rank].state_vector()
    assert common_checkpoint_step(tmp_path, range(3)) == 4
    assert common_checkpoint_step(tmp_path, [0, 1]) == 6
    assert common_checkpoint_step(tmp_path, [7]) is None
    fresh = FakeReplica(seed=9)
    assert CheckpointPolicy(tmp_path, every=2, rank=0).restore(fresh, step=4) == 4
    assert torch.equal(fresh.state_vector(), states[(0, 4)])
    with pytest.raises(ConfigError, match="no checkpoint of step 6 for rank 2"):
        CheckpointPolicy(tmp_path, every=2, rank=2).restore(fresh, step=6)


def test_non_finite_state_round_trips(tmp_path):
    p = save_checkpoint(tmp_path / "nan.pt", step=1, model_state=torch.tensor([1.0, float("nan")]),
                        optimizer_state={"state": {}, "param_groups": []})
    ck = load_checkpoint(p, expected_state_size=2)
    assert ck.model_state[0] == 1.0 and torch.isnan(ck.model_state[1])


def test_policy_on_the_real_ps_replica(tmp_path):
    """What ps.py will do: save a PS Replica mid-training, restore it into a fresh one, and
    the next (momentum) step is bit-identical."""
    from byzsgd.config import RunConfig
    from byzsgd.roles.replica import Replica

    cfg = RunConfig(dataset="synthetic:1x28x28:10", model="convnet",
                    opt_args={"lr": "0.1", "momentum": "0.9"})
    a = Replica(cfg, with_test_set=True)
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(a.grad_size, generator=gen) * 0.01 for _ in range(4)]
    for g in grads[:3]:
        a.apply_gradient(g)
    policy = CheckpointPolicy(tmp_path, every=3, rank=0)
    assert policy.maybe_save(3, a) is not None
    b = Replica(RunConfig(dataset="synthetic:1x28x28:10", model="convnet", seed=7,
                          opt_args={"lr": "0.1", "momentum": "0.9"}), with_test_set=True)
    assert CheckpointPolicy(tmp_path, every=3, rank=0).restore(b) == 3
    assert torch.equal(a.state_vector(), b.state_vector())
    a.apply_gradient(grads[3])
    b.apply_gradient(grads[3])
    assert torch.equal(a.state_vector(), b.state_vector())
