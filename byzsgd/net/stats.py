"""What a node counts: traffic, refusals, and the failures it contained.

The keys of every counter are bounded (reasons are a fixed vocabulary, kinds are registered,
ranks authenticated), so a peer cannot grow them; the roles print them at the end of a run
(``Role._report_net_stats``) and the run summary reads them back.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

__all__ = ["NodeStats"]


@dataclass
class NodeStats:
    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    dropped: int = 0          # sends dropped by an outbox overflow
    handler_errors: int = 0
    connects: int = 0         # authenticated connections made (both directions)
    rejected: collections.Counter = field(default_factory=collections.Counter)
    # contained local failures by stable reason: "handler:<kind>:<Exc>", "dispatch:<Exc>"
    failures: collections.Counter = field(default_factory=collections.Counter)
    # what a member sent that was refused, the connection kept: by "<reason>:<kind>" in
    # ``refused`` and by "<reason>:<kind>:<sender>" in ``refused_from`` (``refuse``)
    refused: collections.Counter = field(default_factory=collections.Counter)
    refused_from: collections.Counter = field(default_factory=collections.Counter)

    def refuse(self, reason: str, kind: str, sender: int) -> None:
        """Count one refusal: reason ``"sender"`` (a kind the sender may not send, see
        Node.on(senders=...)) or a role's (``"meta.<field>"``: a field it refused).  The keys
        are bounded: registered kinds, authenticated ranks.  The run summary's ``rejections``
        show ``refused_from`` (roles/base.py, deploy/summary.py)."""
        self.refused[f"{reason}:{kind}"] += 1
        self.refused_from[f"{reason}:{kind}:{sender}"] += 1
