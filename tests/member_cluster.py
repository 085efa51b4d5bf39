"""One real role on loopback among members the test plays: what a member can send it.

The role under test (a PS or a worker: the classes the processes run) gets its own
credentials, a static peer directory (``deployment.json``) and a metrics file; every other
rank is a bare :class:`byzsgd.net.Node` with that rank's own credentials, so whatever the
test sends is an authenticated frame from a member, with any value the wire format carries.
A tiny model (``linear`` on ``synthetic:1x8x8:4``: 260 parameters) keeps a step to
milliseconds.  Everything runs on the caller's event loop.
"""
from __future__ import annotations

import asyncio
import json
import secrets
from pathlib import Path

from byzsgd.config import RunConfig
from byzsgd.net import FrameLimits, Node, PeerDirectory
from byzsgd.net.credentials import RankCredentials, credentials_path, provision
from byzsgd.net.peers import role_of

TINY = dict(dataset="synthetic:1x8x8:4", model="linear", eval_samples=64, batch=16)
#: the main job's rule (byzsgd.deploy.options.LAUNCH_DEFAULTS, pinned here): median after
#: nnm of per-worker momentums
MAIN_RULE = dict(gar="median", pre_agg="nnm", worker_momentum=0.9, log=False,
                 opt_args={"lr": "0.05", "momentum": "0.9"})


class Cluster:
    """``role_rank`` runs the real role; the others are :attr:`members` (rank -> Node).

    ``received[rank]``: what each member got, as ``(kind, sender, step, meta, tensors)`` with
    the tensors cloned; :meth:`wait_for` waits (with a deadline) for a predicate, woken by
    each frame a member or the role receives."""

    def __init__(self, tmp: Path, role_rank: int, *, num_ps: int, num_workers: int, **config):
        self.tmp = Path(tmp)
        self.num_ps, self.world = num_ps, num_ps + num_workers
        self.role_rank = role_rank
        creds = provision(secrets.token_bytes(32), self.world, self.tmp / "credentials")[0].parent
        directory = PeerDirectory.local(num_ps, num_workers)
        doc = dict(num_ps=num_ps, num_workers=num_workers,
                   ranks=[dict(rank=r, role=role_of(r, num_ps), host=h, port=p,
                               log=str(self.tmp / f"rank{r}.log"))
                          for r, (h, p) in sorted(directory.to_dict().items())])
        (self.tmp / "deployment.json").write_text(json.dumps(doc))
        values = dict(MAIN_RULE, **TINY)
        values.update(rank=role_rank, num_ps=num_ps, num_workers=num_workers,
                      peers=str(self.tmp / "deployment.json"), listen_host="127.0.0.1",
                      credentials=str(credentials_path(creds, role_rank)), startup_timeout=30,
                      metrics=str(self.tmp / f"metrics-ps{role_rank}.jsonl"), **config)
        self.cfg = RunConfig(**values).validate()
        from byzsgd.roles.nodes import ParameterServer
        from byzsgd.roles.nodes import Worker

        self.role = ParameterServer(self.cfg) if self.cfg.is_ps else Worker(self.cfg)
        limits = FrameLimits.for_model(self.role.replica.state_size)
        peer_role = role_of(role_rank, num_ps)
        self.members: dict[int, Node] = {}
        self.received: dict[int, list] = {}
        self._arrived = asyncio.Event()
        for r in range(self.world):
            if r == role_rank:
                continue
            node = Node(r, role_of(r, num_ps), RankCredentials.load(credentials_path(creds, r), rank=r,
                                                                   world_size=self.world),
                        directory=directory, limits=limits, listen_host="127.0.0.1",
                        peer_roles=("ps", "worker") if r < num_ps else (peer_role,))
            self.received[r] = []
            for kind in ("model", "grad", "done", "ps_model", "ps_ask", "pull", "ps_after"):
                node.on(kind, self._recorder(r))
            self.members[r] = node
        self.task: asyncio.Task | None = None
        # wake wait_for on every frame the role receives too (its counters are predicates)
        inner = self.role.node._dispatch

        def dispatch(conn, msg) -> None:
            try:
                inner(conn, msg)
            finally:
                self._arrived.set()
        self.role.node._dispatch = dispatch

    def _recorder(self, rank: int):
        def record(msg) -> None:
            self.received[rank].append((msg.kind, msg.sender, msg.step, dict(msg.meta),
                                        [t.clone() for t in msg.tensors]))
            msg.release()
            self._arrived.set()
        return record

    async def start(self) -> None:
        """Start every member and the role; return once the role is connected to all."""
        for node in self.members.values():
            await node.start()
        self.task = asyncio.ensure_future(self.role.run())
        got = await self.role.node.wait_connected(set(self.members), 30)
        assert got == set(self.members), f"connected only to {sorted(got)}"

    async def wait_for(self, predicate, timeout: float, what: str):
        """Wait for ``predicate()`` to return something other than None or False (returned),
        woken by each frame a member or the role receives (and by the role's end);
        AssertionError after ``timeout`` s or when the role ended first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if value is not None and value is not False:
                return value
            assert self.task is None or not self.task.done(), f"the role ended: {self.task.result()}"
            left = deadline - loop.time()
            assert left > 0, f"timed out waiting for {what}"
            self._arrived.clear()
            waiter = asyncio.ensure_future(self._arrived.wait())
            await asyncio.wait([waiter, self.task] if self.task else [waiter], timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    async def stop(self) -> int | None:
        """Stop the role (as a signal would) and the members; the role's exit code."""
        code = None
        if self.task is not None:
            if self.role.stop is not None:
                self.role.stop.set()
            code = await asyncio.wait_for(self.task, 30)
        for node in self.members.values():
            await node.close()
        return code
