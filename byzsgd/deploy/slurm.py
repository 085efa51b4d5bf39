"""A run started by SLURM (``scripts/slurm_byzsgd.sbatch``): ``srun`` starts the ranks, each
writes its pid and host; this module turns them into the run's ``deployment.json``, so that
``kill``, ``status`` and the summary work on it as on any run.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from byzsgd import rundir

def describe_slurm(run_dir: Path, num_ps: int, num_workers: int, master: str, wait: float) -> dict:
    """deployment.json for ranks started by srun: each task wrote <role><rank>.pid/.host."""
    deadline = time.monotonic() + wait
    world = num_ps + num_workers
    while True:
        ranks = []
        for rank in range(world):
            role = "ps" if rank < num_ps else "worker"
            pid, host = (rundir.rank_file(run_dir, role, rank, w) for w in ("pid", "host"))
            if pid.exists() and host.exists() and pid.read_text().strip() and host.read_text().strip():
                ranks.append(dict(rank=rank, role=role, host=host.read_text().strip(), addr=None,
                                  port=None, pid=int(pid.read_text().strip()), byzantine=False,
                                  attack=None, attack_args={}, log=str(rundir.rank_file(run_dir, role, rank, "log")),
                                  metrics=str(rundir.rank_file(run_dir, role, rank, "metrics")) if role == "ps" else None))
        if len(ranks) == world or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    doc = dict(num_ps=num_ps, num_workers=num_workers, kind="slurm", run_dir=str(run_dir),
               master=master, job_id=os.environ.get("SLURM_JOB_ID"), started=time.time(),
               credentials=str(rundir.credentials_dir(run_dir)), byzantine_ranks=[], ranks=ranks)
    rundir.write_deployment(run_dir, doc)
    return doc
