"""byzsgd's network layer: an asyncio TCP transport for tensor messages between ranks.

One authenticated, long-lived TCP connection per pair of nodes; frames of a small strict msgpack
header plus raw tensor bytes (zero-copy both ways); hard limits checked before any allocation;
per-peer non-blocking outboxes; mailboxes that complete a quorum the moment it is reached.
Knows nothing of training: it imports only :mod:`byzsgd.errors` from the package.

Modules: :mod:`.frame` (wire format, limits, Message), :mod:`.codec` (dtypes, tensor views),
:mod:`.bufpool`, :mod:`.protocol` (receive state machine), :mod:`.handshake`, :mod:`.outbox`,
:mod:`.peers`, :mod:`.rendezvous`, :mod:`.quorum` (per-step mailboxes), :mod:`.newest` (newest
model per sender), :mod:`.resend` (quorum waits that re-ask), :mod:`.race`, :mod:`.node`,
:mod:`.loop`, :mod:`.errors`.
"""
from . import errors
from .frame import FrameLimits, Message
from .handshake import resolve_secret
from .loop import install_event_loop, run
from .node import Node, NodeStats
from .peers import PeerDirectory
from .newest import NewestModels
from .quorum import Mailbox
from .race import race
from .resend import until_quorum

__all__ = ["Node", "NodeStats", "Message", "FrameLimits", "PeerDirectory", "Mailbox", "NewestModels",
           "until_quorum", "race", "install_event_loop", "run", "errors", "resolve_secret"]
