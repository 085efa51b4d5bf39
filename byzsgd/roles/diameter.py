"""Paper mode: what a PS measures of the diameter of the correct PSes' models.

DMC (the median of q_ps models at each gather) is meant to contract the correct models
together.  A PS can see two sides of it, and the launcher, which knows who is Byzantine,
takes the maximum over the correct pairs (:func:`byzsgd.metrics.gather_diameters`):

* before — the distances among the models the gather took (own included), of the gather's
  step: ``distances_before`` in that step's metrics record;
* after — each PS sends its model right after the gather (``ps_after``); at its next gather
  a PS logs its distance to the peers' (same step): a ``diameter_after`` event, which also
  carries the distances to the peers' models of the previous gather that came after the
  quorum (the pairs the quorum left out of ``distances_before``).

The probe holds at most one ``ps_after`` message per peer (its newest), as the model quorum
does: a Byzantine peer cannot make it buffer more.
"""
from __future__ import annotations

from typing import Callable, Collection, Mapping

import torch

from byzsgd.metrics import MetricsWriter
from byzsgd.net import Message
from byzsgd.roles.messages import KIND_PS_AFTER


def pair(a: int, b: int) -> str:
    """The metrics key of a pair of PS ranks: ``"low-high"``."""
    return f"{min(a, b)}-{max(a, b)}"


def distance(x: torch.Tensor, y: torch.Tensor, num_params: int) -> float:
    """Euclidean distance of two state vectors over the parameters."""
    y = y[:num_params].to(x.device)  # a received (host) model against ours (maybe on a GPU)
    return float(torch.linalg.vector_norm((x[:num_params] - y).double()))


class DiameterProbe:
    """One PS's side of the measurement.  ``send(ranks, kind, step, state)`` sends a model as
    the PS does (a Byzantine PS forges it); ``measure_after`` false keeps only "before"."""

    def __init__(self, rank: int, peers: Collection[int], num_params: int,
                 send: Callable[[list[int], str, int, torch.Tensor], None], metrics: MetricsWriter,
                 *, measure_after: bool):
        self.rank = rank
        self.peers = list(peers)
        self.num_params = num_params
        self.send = send
        self.metrics = metrics
        self.measure_after = measure_after
        self.before: dict[str, float] = {}  # distances among the last gather's models
        self.own_before: tuple[int, torch.Tensor] | None = None  # our model sent to that gather
        self.own_after: tuple[int, torch.Tensor] | None = None  # our model after it
        self.after_inbox: dict[int, Message] = {}  # each peer's newest model after a gather
        self.late_before: dict[str, float] = {}

    # -- before ---------------------------------------------------------------------------
    def start(self, t: int, own: torch.Tensor, newest: Mapping[int, Message]) -> None:
        """A gather of step ``t`` starts with our model ``own``; ``newest`` is what the model
        quorum holds (the peers' models that came after the previous gather's quorum)."""
        if self.measure_after:
            self.late_before = self._late_distances(newest)
        self.own_before = (t, own)
        self.before = {}

    def gathered(self, t: int, steps: Mapping[int, int], rows: torch.Tensor) -> None:
        """The gather took the peers' models of ``steps`` (sender -> step), in ``rows`` after
        ours (row 0; the peers in rank order): the distances among those of step ``t``."""
        senders = sorted(steps)
        ranks = [self.rank] + [s for s in senders if steps[s] == t]
        index = [0] + [1 + i for i, s in enumerate(senders) if steps[s] == t]
        self.before = {pair(ranks[a], ranks[b]): distance(rows[index[a]], rows[index[b]], self.num_params)
                       for a in range(len(index)) for b in range(a + 1, len(index))}

    def _late_distances(self, newest: Mapping[int, Message]) -> dict[str, float]:
        """Distances from our model before the previous gather to the peers' models of that
        step that came after the quorum (still held, unless a newer one replaced them)."""
        if self.own_before is None:
            return {}
        step, own = self.own_before
        return {pair(self.rank, s): distance(own, m.tensors[0], self.num_params)
                for s, m in newest.items() if m.step == step}

    # -- after ----------------------------------------------------------------------------
    def deliver(self, msg: Message) -> None:
        """The node's handler of ``ps_after``: keep each peer's newest."""
        old = self.after_inbox.get(msg.sender)
        if msg.sender not in self.peers or (old is not None and old.step >= msg.step):
            msg.release()
            return
        if old is not None:
            old.release()
        self.after_inbox[msg.sender] = msg

    def publish_after(self, t: int, own: torch.Tensor) -> None:
        """The gather of step ``t`` left us at ``own``: log the distances after the previous
        gather, then send ours after this one."""
        if not self.measure_after:
            return
        if self.own_after is not None:
            self._log_after()
        self.own_after = (t, own)
        self.send(self.peers, KIND_PS_AFTER, t, own)

    def finish(self, newest: Mapping[int, Message]) -> None:
        """The run ended: log the last gather's distances, as far as they came."""
        if self.measure_after and self.own_after is not None:
            self.late_before = self._late_distances(newest)
            self._log_after()

    def _distances_after(self) -> dict[str, float]:
        """Distances from our model after the last gather to the peers' after theirs (same
        step), for the peers whose model came; those messages are consumed."""
        if self.own_after is None:
            return {}
        step, own = self.own_after
        out = {}
        for sender in [s for s, m in self.after_inbox.items() if m.step <= step]:
            msg = self.after_inbox.pop(sender)
            try:
                if msg.step == step:
                    out[pair(self.rank, sender)] = distance(own, msg.tensors[0], self.num_params)
            finally:
                msg.release()
        return out

    def _log_after(self) -> None:
        dists = self._distances_after()
        if dists or self.late_before:
            self.metrics.write(event="diameter_after", step=self.own_after[0], distances=dists,
                               distances_before=self.late_before)
        self.late_before = {}

    def close(self) -> None:
        for msg in self.after_inbox.values():
            msg.release()
        self.after_inbox.clear()
