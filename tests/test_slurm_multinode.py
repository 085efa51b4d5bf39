"""scripts/slurm_byzsgd.sbatch across three SLURM nodes on this one machine
(tests/slurm_cluster.py's NetnsSlurmCluster: each slurmd in network, UTS and mount namespaces
of its own, with its own address, host name and local disk).  ``sbatch --nodes=3`` spreads
4 PS + 7 workers over the nodes; they train the correct PSes to the one-node test's bar,
every rank exits 0, and with BYZSGD_STAGE_CREDENTIALS=1 each node's local disk holds the
credentials of its own ranks and of no other (none left once the job is over).

Needs root and iproute2/util-linux; SLURM is installed as for tests/test_slurm.py."""
from __future__ import annotations

import json
import re
import stat
import time

import pytest

from tests.slurm_cluster import NetnsSlurmCluster, netns_unavailable
from tests.test_slurm import NUM_PS, NUM_WORKERS, _ours, _submit

NODES = 3
WORLD = NUM_PS + NUM_WORKERS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm3():
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    # 4 CPUs a node: 11 one-CPU tasks need all three nodes
    with NetnsSlurmCluster(nodes=NODES, cpus=4) as cluster:
        yield cluster


def _role(rank: int) -> str:
    return "ps" if rank < NUM_PS else "worker"


def _staged(cluster: NetnsSlurmCluster, node: str, job: str) -> dict[int, list[str]]:
    """{rank: files in its staging directory} of the job's credentials on ``node``'s local
    disk, as that node sees it (the sbatch stages rank r into byzsgd-JOB-r.XXXXXX/)."""
    local = cluster.seen_by(node, cluster.view / "tmp")
    out = {}
    for d in local.iterdir():
        m = re.fullmatch(rf"byzsgd-{job}-(\d+)\.\w+", d.name)
        assert m, f"unexpected {d.name} on {node}'s local disk"
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, (node, d)
        files = sorted(f.name for f in d.iterdir())
        assert all(stat.S_IMODE((d / f).stat().st_mode) == 0o600 for f in files), (node, d)
        out[int(m.group(1))] = files
    return out


def test_sbatch_across_three_nodes_stages_each_rank_on_its_node(slurm3, tmp_path):
    # cyclic: the PSes too are spread over the nodes (PS-to-PS traffic crosses the bridge)
    job, run_dir = _submit(slurm3, tmp_path, "multi", steps=100, nodes=NODES,
                           sbatch_args=("--distribution=cyclic",), BYZSGD_STAGE_CREDENTIALS="1",
                           BYZSGD_STAGE_DIR=str(slurm3.view / "tmp"))
    stems = [run_dir / f"{_role(r)}{r}" for r in range(WORLD)]

    def logs() -> str:
        out = "\n".join(p.read_text(errors="replace")[-3000:] for p in tmp_path.glob("multi-*.out"))
        ranks = "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-800:]
                          for p in sorted(run_dir.glob("*.log"))[:3])
        return f"{out}\n{ranks}\n{slurm3.logs()}"

    # every task has staged its file once it has started its trainer (its .pid): look then,
    # while they all run (a trainer keeps its staged file until it exits)
    deadline = time.monotonic() + 600
    while not all((s.with_suffix(".pid")).is_file() and s.with_suffix(".pid").read_text().strip()
                  for s in stems):
        state = slurm3.job_state(job)
        assert time.monotonic() < deadline and state in ("PENDING", "CONFIGURING", "RUNNING"), \
            f"job {job} ({state}): not every rank started\n{logs()}"
        time.sleep(0.5)
    staged = {n: _staged(slurm3, n, job) for n in slurm3.nodes}
    exited = [s.name for s in stems if s.with_suffix(".rc").exists()]
    shared_left = sorted(p.name for p in (run_dir / "credentials").iterdir())
    hosts = {r: s.with_suffix(".host").read_text().strip() for r, s in enumerate(stems)}

    assert not exited, f"ranks {exited} exited before every rank had started\n{logs()}"
    assert set(hosts.values()) == set(slurm3.nodes), f"not spread over the {NODES} nodes: {hosts}"
    for node in slurm3.nodes:
        mine = {r for r, h in hosts.items() if h == node}
        assert staged[node] == {r: [f"rank{r}.cred"] for r in mine}, \
            f"{node} (ranks {sorted(mine)}) holds {staged[node]}"
        anywhere = sorted(f.name for f in slurm3.seen_by(node, slurm3.view).rglob("*.cred"))
        assert anywhere == sorted(f"rank{r}.cred" for r in mine), (node, anywhere)
    assert shared_left == [], f"credentials left on shared storage: {shared_left}"

    state = slurm3.wait_job(job, timeout=900)
    assert state == "COMPLETED", f"job {job}: {state}\n{logs()}"
    summary = json.loads((run_dir / "summary.json").read_text())
    finals = summary["final_accuracy"]
    assert len(finals) == NUM_PS, summary
    assert all(a is not None and a >= 80.0 for a in finals.values()), summary
    assert summary["min_accuracy"] >= 80.0
    rcs = {s.name: s.with_suffix(".rc").read_text().strip() for s in stems}
    assert rcs == {s.name: "0" for s in stems}, rcs
    assert all(_staged(slurm3, n, job) == {} for n in slurm3.nodes), "staged copies left behind"
    assert not _ours(run_dir)
    print("\nranks per node: " + ", ".join(
        f"{n}: {sorted(staged[n])}" for n in slurm3.nodes))
