"""byzsgd's network layer: an asyncio TCP transport for tensor messages between ranks.

One authenticated, long-lived TCP connection per pair of nodes; frames of a small strict msgpack
header plus raw tensor bytes (zero-copy both ways); hard limits checked before any allocation;
per-peer non-blocking outboxes; mailboxes that complete a quorum the moment it is reached.
Knows nothing of training: it imports only :mod:`byzsgd.errors` from the package.

Modules: :mod:`.frame` (wire format, limits, Message), :mod:`.codec` (dtypes, tensor views),
:mod:`.bufpool`, :mod:`.protocol` (receive state machine), :mod:`.handshake` (both sides of the
handshake), :mod:`.admission` (before authentication, TLS accept), :mod:`.dispatch` (handlers),
:mod:`.sending` (outgoing path, send filters), :mod:`.outbox`, :mod:`.peers`, :mod:`.rendezvous`,
:mod:`.quorum` (per-step mailboxes), :mod:`.newest` (newest model per sender), :mod:`.resend`
(quorum waits that re-ask), :mod:`.race`, :mod:`.options` (a node's validated arguments),
:mod:`.node`, :mod:`.loop`, :mod:`.errors`.
"""
from __future__ import annotations

import importlib

from . import errors

#: the package's names and the module each lives in: imported on first use (PEP 562), so a
#: torch-free module (credentials, handshake, peers) can be imported without torch
_EXPORTS = {
    "Node": ".node", "NodeStats": ".stats", "NodeOptions": ".options", "Message": ".frame", "FrameLimits": ".frame",
    "PeerDirectory": ".peers", "Mailbox": ".quorum", "NewestModels": ".newest",
    "until_quorum": ".resend", "race": ".race", "install_event_loop": ".loop", "run": ".loop",
    "resolve_secret": ".handshake",
}

__all__ = [*_EXPORTS, "errors"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'byzsgd.net' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
