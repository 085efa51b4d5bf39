"""--device: parsing, checks, the rank -> device mapping, the staging of device tensors for
the wire, device-resident batches, and that the CPU path is what it was (docs/gpu.md).

CUDA-only tests at the end skip with a reason where there is no GPU."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from byzsgd import device as dv
from byzsgd.config import RunConfig
from byzsgd.errors import ConfigError
from byzsgd.learning import data, device_data
from byzsgd.learning.shards import WorkerShard, _rng, augment_batch
from byzsgd.net.frame import encode
from byzsgd.net.outbox import Outbox
from byzsgd.net.staging import CpuStaging, PinnedPool, Staged, needs_staging
from tests import inprocess

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device (this machine has no visible GPU)")
SYNTH = "synthetic:1x28x28:10:64:64"
IMG = "synthetic:3x8x8:10:64:32"


# -- the flag -----------------------------------------------------------------------------
@pytest.mark.parametrize("text,canon", [("auto", "auto"), ("CPU", "cpu"), (" cuda ", "cuda"),
                                        ("cuda:0", "cuda:0"), ("cuda:07", "cuda:7")])
def test_device_flag_spellings(text, canon):
    assert dv.parse_device(text) == canon
    assert RunConfig(device=text).device == canon


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:-1", "cuda:x", "mps", ""])
def test_bad_device_flag_refused_at_construction(bad):
    with pytest.raises(ConfigError, match="--device"):
        RunConfig(device=bad)


def test_device_round_trips_through_argv():
    cfg = RunConfig(device="cuda:1")
    assert RunConfig.from_argv(cfg.to_argv()).device == "cuda:1"


def test_cuda_without_cuda_is_refused_at_validate(monkeypatch):
    monkeypatch.setattr(dv, "cuda_count", lambda: 0)
    RunConfig(device="auto").validate()
    RunConfig(device="cpu").validate()
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            RunConfig(device=spec).validate()


def test_cuda_index_out_of_range_is_refused(monkeypatch):
    monkeypatch.setattr(dv, "cuda_count", lambda: 2)
    RunConfig(device="cuda:1").validate()
    with pytest.raises(ConfigError, match="only 2 CUDA devices"):
        RunConfig(device="cuda:2").validate()


def test_cuda_count_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert dv.cuda_count() == 3
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: False)
    assert dv.cuda_count() == 0


# -- auto: the local index round-robin ---------------------------------------------------
def test_local_index_precedence():
    env = {"LOCAL_RANK": "5", "SLURM_LOCALID": "3", "BYZSGD_LOCAL_INDEX": "2"}
    assert dv.local_index(7, env) == 7
    assert dv.local_index(None, env) == 2
    del env["BYZSGD_LOCAL_INDEX"]
    assert dv.local_index(None, env) == 3
    del env["SLURM_LOCALID"]
    assert dv.local_index(None, env) == 5
    assert dv.local_index(None, {}) == 0
    with pytest.raises(ConfigError, match="SLURM_LOCALID"):
        dv.local_index(None, {"SLURM_LOCALID": "x"})


def test_auto_maps_round_robin(monkeypatch):
    for var in dv.INDEX_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(torch.backends.cuda, "is_built", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert dv.resolve("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert dv.resolve("auto") == torch.device("cuda", 0)
    monkeypatch.setenv("SLURM_LOCALID", "3")
    assert dv.resolve("auto") == torch.device("cuda", 1)
    assert dv.resolve("cuda") == torch.device("cuda", 1)
    monkeypatch.delenv("SLURM_LOCALID")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert dv.resolve("auto") == torch.device("cuda", 0)
    monkeypatch.setenv(dv.LOCAL_INDEX_ENV, "5")  # the launcher's index wins
    assert dv.resolve("auto") == torch.device("cuda", 1)
    assert dv.resolve("auto", 4) == torch.device("cuda", 0)  # explicit wins over everything
    assert dv.resolve("cuda:1", 0) == torch.device("cuda", 1)
    assert dv.resolve("cpu", 3) == torch.device("cpu")
    assert dv.mapping("auto", range(5), count=2) == "cuda:0 <- ranks 0,2,4; cuda:1 <- ranks 1,3"
    assert dv.mapping("auto", range(3), count=0) == "cpu <- ranks 0,1,2"


def test_launcher_gives_each_rank_its_local_index():
    from byzsgd.deploy import host_scripts, local
    import inspect

    assert "LOCAL_INDEX_ENV: str(node.rank)" in inspect.getsource(local.start)
    assert "LOCAL_INDEX_ENV" in inspect.getsource(host_scripts.start_script)


# -- staging: the CPU path copies nothing -------------------------------------------------
def test_cpu_staging_is_a_pass_through():
    t = torch.randn(10_000)  # above SMALL_FRAME: small frames are sent as one joined copy
    staged = CpuStaging().stage([t])
    assert staged.tensors[0] is t and staged.ready is None
    assert not needs_staging([t])
    # and the wire reads the tensor's own memory (no copy on the CPU path)
    buffers, _, _ = encode("grad", 3, 1, [t])
    assert np.frombuffer(buffers[1], dtype=np.uint8).ctypes.data == t.data_ptr()


def test_cpu_node_has_no_staging():
    from byzsgd.net import FrameLimits, Node

    node = Node(0, "ps", b"0123456789abcdef0123", master=("127.0.0.1", 1), world_size=2, num_ps=1,
                limits=FrameLimits.for_model(10))
    assert node.staging is None and node.device == torch.device("cpu")
    assert node.pool.acquire(100).__class__ is bytearray


def test_pinned_pool_reuses_buffers():
    pool = PinnedPool(1 << 24, pin=False)  # pin=False: testable without CUDA
    a = pool.acquire(10_000)
    pool.release(a)
    b = pool.acquire(9_000)
    assert b.data_ptr() == a.data_ptr() and pool.allocations == 1
    pool.acquire(9_000)
    assert pool.allocations == 2


def test_staged_release_after_every_send():
    released = []
    s = Staged([torch.zeros(1)], None, lambda: released.append(1))
    s.hold(3)
    s.drop(), s.drop()
    assert not released
    s.drop()
    s.release()
    assert released == [1]


class _Transport:
    def __init__(self):
        self.written = []

    def writelines(self, bufs):
        self.written.append(b"".join(bytes(b) for b in bufs))

    def write(self, data):
        self.written.append(bytes(data))

    def get_write_buffer_size(self):
        return 0


class _Conn:
    tls = False
    write_paused = False
    closed = False

    def __init__(self):
        self.transport = _Transport()


class _Stats:
    dropped = frames_sent = bytes_sent = 0


def test_outbox_keeps_order_behind_a_copy_in_flight():
    loop = asyncio.new_event_loop()
    try:
        ob = Outbox(1, 8, _Stats())
        conn = _Conn()
        ob.attach(conn)
        fa, fb = loop.create_future(), loop.create_future()
        item = ob.put([b"A"], 1, fa, None, ready=False)  # its device -> host copy runs
        ob.put([b"B"], 1, fb, None)
        assert conn.transport.written == []  # B waits behind A: per-peer order
        ob.mark_ready(item)
        # A then B (written together: queued small frames share one write)
        assert b"".join(conn.transport.written) == b"AB" and fa.result() and fb.result()
    finally:
        loop.close()


# -- device-resident batches: the same batches ----------------------------------------------
def test_device_augmentation_matches_the_host_one():
    x = torch.randn(16, 3, 8, 8)
    a = augment_batch(x, _rng(1, 4, 0, 5), pad_value=(0.1, 0.2, 0.3))
    b = device_data.augment_on_device(x, _rng(1, 4, 0, 5), pad_value=(0.1, 0.2, 0.3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("augment", [False, True])
def test_device_shard_gives_the_same_batches(augment):
    train = data.load_dataset(IMG, train=True)
    host = WorkerShard(train, 1, 3, 8, seed=4, augment=augment)
    resident = device_data.DeviceShard(WorkerShard(train, 1, 3, 8, seed=4, augment=augment), "cpu",
                                       resident=True)
    for step in (0, 1, 7, 30):
        (x1, y1), (x2, y2) = host.batch(step), resident.batch(step)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert resident.steps_per_epoch == host.steps_per_epoch
    assert device_data.on_device(host, "cpu") is host  # the CPU path is the shard itself
    assert device_data.dataset_on(train, "cpu") is train


def test_resident_copy_keeps_the_split():
    """The copy a CUDA node makes of a split (built here on the CPU): the same rows, labels and
    normalisation, whatever the split's class keeps in memory (uint8 pixels, lazy inputs)."""
    train = data.load_dataset(IMG, train=True)
    moved = device_data._moved(train, torch.device("cpu"))
    assert type(moved) is type(train) and moved is not train
    assert torch.equal(moved.inputs, train.inputs) and torch.equal(moved.labels, train.labels)
    assert (moved.name, moved.num_classes, moved.mean, moved.std) == \
        (train.name, train.num_classes, train.mean, train.std)
    idx = torch.tensor([0, 5, 3])
    assert torch.equal(moved.take(idx), train.take(idx))


# -- roles: --device cpu is today's behaviour; seeded runs repeat ---------------------------
def _worker_cfg(**kw):
    return RunConfig(insecure_shared_secret=True, rank=2, num_ps=2, num_workers=3,
                     dataset=SYNTH, seed=3, **kw)


def test_replica_cpu_equals_default():
    from byzsgd.roles.replica import Replica

    a = Replica(_worker_cfg(), with_train_shard=True)
    b = Replica(_worker_cfg(device="cpu"), with_train_shard=True)
    assert a.device == b.device == torch.device("cpu")
    state = a.state_vector()
    ga, _, la = a.gradient_at(state, 4)
    gb, _, lb = b.gradient_at(state, 4)
    assert torch.equal(ga, gb) and la == lb


def test_worker_and_ps_on_cpu_hold_host_tensors():
    from byzsgd.roles.nodes import ParameterServer
    from byzsgd.roles.nodes import Worker

    ps = ParameterServer(RunConfig(insecure_shared_secret=True, rank=0, num_ps=2, num_workers=3,
                                   dataset=SYNTH, device="cpu"))
    w = Worker(_worker_cfg(device="cpu"))
    for t in (ps.grad_rows, ps.model_rows, ps.replica.flat.flat, w.replica.flat.flat):
        assert t.device.type == "cpu"
    assert ps.node.staging is None and w.node.staging is None


def _final_models(tmp_path, monkeypatch, tag):
    roles, codes = inprocess.deploy(tmp_path / tag, monkeypatch, num_ps=2, num_workers=3, fw=0, fps=0,
                                    dataset=SYNTH, gar="average", num_iter=4, acc_freq=4,
                                    eval_samples=64, seed=11, device="cpu")
    assert all(c == 0 for c in codes.values()), codes
    return [roles[r].replica.state_vector() for r in (0, 1)]


def test_seeded_cpu_runs_are_identical(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _final_models(tmp_path, monkeypatch, "a")
    second = _final_models(tmp_path, monkeypatch, "b")
    for x, y in zip(first, second):
        assert torch.equal(x, y)


# -- the CUDA path (skipped without a GPU) --------------------------------------------------
@needs_cuda
def test_staging_round_trip_on_cuda():
    from byzsgd.net.staging import DeviceStaging

    st = DeviceStaging("cuda:0")
    t = torch.randn(1 << 20, device="cuda:0")
    buf = torch.arange(10, dtype=torch.int64)  # a host tensor passes untouched
    staged = st.stage([t, buf])
    if staged.ready is not None:
        staged.ready.result(timeout=30)
    host, same = staged.tensors
    assert same is buf and host.device.type == "cpu" and host.is_pinned()
    assert torch.equal(host, t.cpu())
    staged.release()
    again = st.stage([t])  # the pool is warm: no new pinned buffer
    if again.ready is not None:
        again.ready.result(timeout=30)
    assert st.pool.allocations == 1
    again.release()
    st.close()


@needs_cuda
def test_worker_step_on_cuda_matches_cpu():
    from byzsgd.roles.replica import Replica

    cpu = Replica(_worker_cfg(device="cpu"), with_train_shard=True)
    gpu = Replica(_worker_cfg(device="cuda:0"), with_train_shard=True)
    assert gpu.flat.flat.is_cuda
    state = cpu.state_vector()
    g1, _, l1 = cpu.gradient_at(state, 2)
    g2, _, l2 = gpu.gradient_at(state, 2)  # a host model loaded onto the device
    assert g2.is_cuda
    assert torch.allclose(g1, g2.cpu(), rtol=1e-3, atol=1e-5) and abs(l1 - l2) < 1e-4


@needs_cuda
@pytest.mark.parametrize("rule", ["average", "median", "krum", "mda", "trimmed_mean"])
def test_aggregation_on_cuda_equals_cpu(rule):
    from byzsgd.roles.aggregation import aggregate_finite

    x = torch.randn(11, 4096, generator=torch.Generator().manual_seed(0))
    a, _ = aggregate_finite(rule, x, 2)
    b, _ = aggregate_finite(rule, x.cuda(), 2)
    assert b.is_cuda and torch.allclose(a, b.cpu(), rtol=1e-4, atol=1e-5)


@needs_cuda
def test_inprocess_deployment_on_cuda(tmp_path, monkeypatch):
    roles, codes = inprocess.deploy(tmp_path, monkeypatch, num_ps=2, num_workers=3, fw=0, fps=0,
                                    dataset=SYNTH, gar="median", num_iter=4, acc_freq=4,
                                    eval_samples=64, device="cuda")
    assert all(c == 0 for c in codes.values()), codes
    assert all(r.replica.device.type == "cuda" for r in roles.values())
