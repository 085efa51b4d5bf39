"""A real deployment inside the test's process: the role classes the processes run
(byzsgd.roles.nodes.ParameterServer / byzsgd.roles.nodes.Worker), each with its own Node on
loopback, all in one event loop -- so a test can patch the process (pickle, a filter) and
look at the role objects afterwards.  Small on purpose: a few PS and workers, a few steps.
"""
from __future__ import annotations

import asyncio
import secrets
import socket
from pathlib import Path

from byzsgd.config import RunConfig
from byzsgd.net.credentials import credentials_path, provision
from byzsgd.roles.nodes import ParameterServer
from byzsgd.roles.nodes import Worker

SECRET = "in-process-test-secret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy(tmp_path: Path, monkeypatch, *, num_ps: int, num_workers: int,
           byzantine: dict[int, tuple[str, dict]] | None = None, timeout: float = 240, **config):
    """Run every rank to the end; returns ({rank: role object}, {rank: exit code}).  The
    PSes write ``tmp_path/metrics-ps<rank>.jsonl``.  ``byzantine``: {rank: (attack, args)}."""
    # per-rank credentials, as the launchers provision them
    cred_dir = provision(secrets.token_bytes(32), num_ps + num_workers, tmp_path / "credentials")[0].parent
    master = f"127.0.0.1:{free_port()}"
    byzantine = byzantine or {}
    common = dict(master=master, num_ps=num_ps, num_workers=num_workers, log=False,
                  listen_host="127.0.0.1", startup_timeout=60, **config)
    roles = {}
    for rank in range(num_ps + num_workers):
        attack, args = byzantine.get(rank, (None, {}))
        extra = dict(metrics=str(tmp_path / f"metrics-ps{rank}.jsonl")) if rank < num_ps else {}
        cfg = RunConfig(rank=rank, attack=attack, attack_args=args,
                        credentials=str(credentials_path(cred_dir, rank)), **common, **extra)
        cfg.validate()
        roles[rank] = ParameterServer(cfg) if rank < num_ps else Worker(cfg)

    async def main():
        codes = await asyncio.wait_for(asyncio.gather(*(r.run() for r in roles.values())), timeout)
        return dict(zip(roles, codes))
    return roles, asyncio.run(main())
