"""scripts/slurm_byzsgd.sbatch under a real SLURM (a one-node cluster of Debian's slurm-wlm
daemons started for the test, tests/slurm_cluster.py): a 4 PS + 7 workers run trains the
correct PSes to a good accuracy, and ``scancel`` of a running job leaves no byzsgd process.

Needs root; SLURM is installed with apt-get when missing and ``BYZSGD_SLURM_INSTALL=1``
(.ci/run sets it) or ``CI`` is set; otherwise the tests are skipped with the reason."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, _free_port, unavailable

ROOT = Path(__file__).resolve().parent.parent
SBATCH = ROOT / "scripts" / "slurm_byzsgd.sbatch"
NUM_PS, NUM_WORKERS = 4, 7

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm():
    why = unavailable()
    if why:
        pytest.skip(why)
    with SlurmCluster() as cluster:
        yield cluster


def _submit(slurm: SlurmCluster, tmp: Path, name: str, steps: int, nodes: int = 1,
            sbatch_args: tuple[str, ...] = (), **extra_env: str) -> tuple[str, Path]:
    conf = tmp / f"{name}.conf"
    conf.write_text(f"""\
--dataset mnist
--model convnet
--loss nll
--optimizer sgd
--opt_args '{{"lr": 0.1}}'
--batch 32
--num_iter {steps}
--gar median
--fw 1
--fps 1
--acc_freq 50
--eval_samples 2000
""")
    run_dir = tmp / name
    env = {"BYZSGD_CONF": str(conf), "BYZSGD_RUN_DIR": str(run_dir),
           "BYZSGD_PYTHON": sys.executable, "BYZSGD_REPO": str(ROOT),
           "BYZSGD_MASTER_PORT": str(_free_port()), "OMP_NUM_THREADS": "1", **extra_env}
    r = slurm.run(["sbatch", "--parsable", f"--nodes={nodes}", f"--ntasks={NUM_PS + NUM_WORKERS}",
                   f"--output={tmp}/{name}-%j.out", "--time=00:20:00", *sbatch_args, str(SBATCH)],
                  env=env, cwd=str(ROOT))
    return r.stdout.strip().split(";")[0], run_dir


def _ours(run_dir: Path) -> list[tuple[int, str]]:
    """Live processes that belong to the run: its path on their command line (every trainer
    has its credentials file there) or a pid recorded in it."""
    pids = set()
    for f in run_dir.glob("*.pid"):
        try:
            pids.add(int(f.read_text().strip()))
        except ValueError:
            pass
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue
        if str(run_dir) in cmd or int(entry.name) in pids:
            out.append((int(entry.name), cmd[:200]))
    return out


def test_sbatch_trains_and_scancel_leaves_nothing(slurm, tmp_path):
    job, run_dir = _submit(slurm, tmp_path, "train", steps=100)
    state = slurm.wait_job(job, timeout=900)
    out = "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("train-*.out"))
    logs = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-800:]
                     for p in sorted(run_dir.glob("ps*.log"))[:2])
    assert state == "COMPLETED", f"job {job}: {state}\n{out}\n{logs}\n{slurm.logs()}"
    summary = json.loads((run_dir / "summary.json").read_text())
    finals = summary["final_accuracy"]
    assert len(finals) == NUM_PS, summary
    assert all(a is not None and a >= 80.0 for a in finals.values()), summary
    assert summary["min_accuracy"] >= 80.0
    assert sorted(int(p.read_text()) for p in run_dir.glob("*.rc")) == [0] * (NUM_PS + NUM_WORKERS)
    assert not _ours(run_dir)

    # a second job, cancelled while it trains: nothing of it may stay behind
    job, run_dir = _submit(slurm, tmp_path, "cancel", steps=100000)
    deadline = time.monotonic() + 600
    from byzsgd.deploy import summary as runsum

    trained = False
    while time.monotonic() < deadline:
        state = slurm.job_state(job)
        trained = state == "RUNNING" and bool(runsum.ps_series(run_dir)) and \
            max(runsum.ps_steps(run_dir).values()) >= 5
        if trained or state not in ("PENDING", "CONFIGURING", "RUNNING", None):  # or it ended
            break
        time.sleep(1.0)
    if not trained:
        out = "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("cancel-*.out"))
        pytest.fail(f"job {job} never trained: {state}\n{out}\n{slurm.logs()}")
    assert len(_ours(run_dir)) >= NUM_PS + NUM_WORKERS  # the trainers are there
    slurm.run(["scancel", job])
    state = slurm.wait_job(job, timeout=120)
    assert state == "CANCELLED", state
    deadline = time.monotonic() + 60  # KillWait=5 s, then SIGKILL
    while _ours(run_dir) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ours(run_dir), _ours(run_dir)
