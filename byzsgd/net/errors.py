"""Where the network layer's failures are named.

Every error the transport raises on purpose is a subclass of :class:`NetError`, itself a
:class:`byzsgd.errors.ByzSGDError`, so callers can catch the whole layer at once or one cause
precisely.  Each subclass carries a short, stable ``reason`` string: it is the key under which a
node counts the violation in ``node.stats.rejected`` and the word logged when it closes a
connection, so operators can grep and alert on it.

Error contract (who sees what):

* :class:`ProtocolError` and :class:`HandshakeError` are raised *inside* the transport when a
  peer misbehaves.  They never reach user code: the offending connection is closed, the reason
  logged (logger ``byzsgd.net``) and counted; the node keeps serving everyone else.  The frame
  decoder functions in :mod:`byzsgd.net.frame` raise them directly (that is their whole job and
  what the fuzz tests check: nothing else escapes).
* :class:`QuorumTimeout` and :class:`StaleStep` reach the caller of ``Mailbox.collect``.
* :class:`UnknownPeer` and :class:`ConfigError` (from :mod:`byzsgd.errors`) are programming or
  configuration mistakes, raised synchronously at the call that made them.
"""
from __future__ import annotations

import asyncio

from byzsgd.errors import ByzSGDError, ConfigError

__all__ = [
    "ConfigError", "NetError", "ProtocolError", "FrameTooLarge", "HeaderTooLarge", "BadHeader",
    "BadDtype", "ShapeMismatch", "TooManyTensors", "UnknownKind", "SenderMismatch", "BadStep",
    "BadMeta", "HandshakeError", "HandshakeTimeout", "AuthError", "VersionMismatch",
    "DuplicateRank", "BadRank", "DeploymentMismatch", "AddressMismatch", "PreauthEvicted", "TLSHandshakeError",
    "PeerClosed", "UnknownPeer", "QuorumTimeout", "StaleStep",
    "RendezvousError",
]


class NetError(ByzSGDError):
    """Root of the network layer's errors."""

    reason = "net"


# --------------------------------------------------------------------------- malformed frames
class ProtocolError(NetError):
    """A frame that violates the wire format or a configured limit (peer's fault)."""

    reason = "protocol"


class FrameTooLarge(ProtocolError):
    """The length prefix announces a body above ``FrameLimits.max_frame_bytes``."""

    reason = "frame_too_large"


class HeaderTooLarge(ProtocolError):
    """The length prefix announces a header above ``FrameLimits.max_header_bytes`` (or empty)."""

    reason = "header_too_large"


class BadHeader(ProtocolError):
    """The header is not valid msgpack, or a field has the wrong type or structure."""

    reason = "bad_header"


class BadDtype(ProtocolError):
    """A tensor's dtype is unknown or not in ``FrameLimits.allowed_dtypes``."""

    reason = "bad_dtype"


class ShapeMismatch(ProtocolError):
    """``prod(shape) * itemsize != nbytes``, the byte layout does not add up to the body,
    or the shapes differ from the ones registered for the kind."""

    reason = "shape_mismatch"


class TooManyTensors(ProtocolError):
    """More tensors in one frame than ``FrameLimits.max_tensors``."""

    reason = "too_many_tensors"


class UnknownKind(ProtocolError):
    """A kind no handler was registered for."""

    reason = "unknown_kind"


class SenderMismatch(ProtocolError):
    """The header's sender differs from the connection's authenticated rank."""

    reason = "sender_mismatch"


class BadStep(ProtocolError):
    """The step is not an int in ``[0, frame.MAX_STEP)`` (received), or outside int64 (sent)."""

    reason = "bad_step"


class BadMeta(ProtocolError):
    """The meta map holds a non-str key or a non-scalar value."""

    reason = "bad_meta"


# --------------------------------------------------------------------------- handshake
class HandshakeError(NetError):
    """The connection failed the opening exchange; nothing of it was parsed as a frame."""

    reason = "handshake"


class HandshakeTimeout(HandshakeError):
    reason = "handshake_timeout"


class AuthError(HandshakeError):
    """The peer could not prove it holds the pair key of the rank it claims (bad HMAC)."""

    reason = "auth"


class VersionMismatch(HandshakeError):
    reason = "version"


class DuplicateRank(HandshakeError):
    """A second connection claims a rank that already has a live connection."""

    reason = "duplicate_rank"


class BadRank(HandshakeError):
    """A rank outside the world, a role that does not match the rank, the node's own rank,
    a dial against the higher-dials-lower policy, or not the rank the dialer expected."""

    reason = "bad_rank"


class DeploymentMismatch(HandshakeError):
    """The peer's credentials belong to another deployment (operator secret or world size)."""

    reason = "deployment"


class AddressMismatch(HandshakeError):
    """Plain TCP: the dialer reached this node on an address that is not this socket's own,
    i.e. a relay sits between them (a lying directory entry)."""

    reason = "address"


class PreauthEvicted(HandshakeError):
    """An unauthenticated connection closed to make room: too many before authentication from
    its address or in total (the idlest, oldest one of the busiest address goes first)."""

    reason = "preauth_evicted"


class TLSHandshakeError(HandshakeError):
    """The TLS handshake inside ours failed (no common version, untrusted certificate...)."""

    reason = "tls"


# --------------------------------------------------------------------------- runtime
class PeerClosed(NetError):
    """The connection to a peer closed."""

    reason = "peer_closed"


class UnknownPeer(NetError, KeyError):
    """A send to a rank that is not in the directory."""

    reason = "unknown_peer"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown peer"


class QuorumTimeout(NetError, asyncio.TimeoutError):
    """``Mailbox.collect`` timed out.  ``received`` maps sender -> Message for what arrived;
    those messages stay owned by the mailbox (they are still buffered there)."""

    reason = "quorum_timeout"

    def __init__(self, kind: str, step: int, q: int, received: dict):
        self.kind, self.step, self.q, self.received = kind, step, q, received
        super().__init__(
            f"quorum timeout on {kind!r} step {step}: {len(received)}/{q} senders "
            f"({sorted(received)})"
        )


class StaleStep(NetError):
    """A collect for a step below the mailbox floor (already collected or advanced past)."""

    reason = "stale_step"


class RendezvousError(NetError):
    """The rendezvous through the master failed (bad directory reply, timeout)."""

    reason = "rendezvous"
