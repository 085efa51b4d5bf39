"""Where a connection proves who it is: version, role, rank and mutual HMAC-SHA256.

The exchange (each message a length-prefixed msgpack map of at most ``HS_MAX`` bytes)::

    dialer -> listener : {v, role, rank, want, nonce_d}                     (32 random bytes)
    listener -> dialer : {v, role, rank, nonce_l, mac_l}   or {err}
    dialer -> listener : {mac_d}
    listener -> dialer : {ok: True}                         or {err}        (e.g. duplicate rank)

``mac_x = HMAC-SHA256(secret, label_x || transcript)`` where the transcript packs both versions,
roles, ranks and nonces and the labels differ per direction, so a MAC can be neither replayed
(fresh nonces from both sides) nor reflected (direction label).  Comparisons use
``hmac.compare_digest``.  The listener only authenticates itself to a dialer that presented a
valid rank/role for this world; the dialer's proof is checked before its rank is bound to the
connection, and no frame is parsed before both proofs passed.
"""
from __future__ import annotations

import hashlib
import hmac
import os

import msgpack

from . import errors

__all__ = ["PROTOCOL_VERSION", "NONCE_BYTES", "mac", "transcript", "check_hello_fields", "resolve_secret",
           "SECRET_ENV"]

SECRET_ENV = "BYZSGD_SECRET"

PROTOCOL_VERSION = 1
NONCE_BYTES = 32
_LABEL_LISTENER = b"byzsgd-net-v1 listener"
_LABEL_DIALER = b"byzsgd-net-v1 dialer"
ROLES = ("ps", "worker")


def resolve_secret(value: str | bytes | None = None) -> bytes:
    """The cluster secret from a ``--secret`` value, else the ``BYZSGD_SECRET`` environment
    variable (UTF-8 encoded); :class:`byzsgd.errors.ConfigError` when neither is set."""
    if value is None or value == "" or value == b"":
        value = os.environ.get(SECRET_ENV, "")
    if isinstance(value, str):
        value = value.encode("utf-8")
    if not value:
        raise errors.ConfigError(f"no cluster secret: pass --secret or set the environment variable {SECRET_ENV}")
    return bytes(value)


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def transcript(d_role: str, d_rank: int, nonce_d: bytes, l_role: str, l_rank: int, nonce_l: bytes) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, d_role, d_rank, nonce_d, l_role, l_rank, nonce_l],
                         use_bin_type=True)


def mac(secret: bytes, listener: bool, tr: bytes) -> bytes:
    label = _LABEL_LISTENER if listener else _LABEL_DIALER
    return hmac.new(secret, label + tr, hashlib.sha256).digest()


def verify(secret: bytes, listener: bool, tr: bytes, got) -> None:
    if type(got) is not bytes or not hmac.compare_digest(mac(secret, listener, tr), got):
        raise errors.AuthError("bad HMAC: the peer does not hold the cluster secret")


def check_hello_fields(msg: dict, *, dialer: bool) -> tuple[str, int, bytes]:
    """Type-check a hello (dialer's) or reply (listener's); returns (role, rank, nonce)."""
    if "err" in msg:
        err = msg["err"]
        text = err[:200] if type(err) is str else "?"
        if text.startswith("version"):
            raise errors.VersionMismatch(f"peer refused: {text}")
        if text.startswith("duplicate"):
            raise errors.DuplicateRank(f"peer refused: {text}")
        if text.startswith("rank"):
            raise errors.BadRank(f"peer refused: {text}")
        raise errors.HandshakeError(f"peer refused: {text}")
    v = msg.get("v")
    if v != PROTOCOL_VERSION or type(v) is not int:
        raise errors.VersionMismatch(f"protocol version {v!r}, this node speaks {PROTOCOL_VERSION}")
    role, rank, nonce = msg.get("role"), msg.get("rank"), msg.get("nonce")
    if role not in ROLES or type(role) is not str:
        raise errors.BadRank(f"unknown role {role!r}")
    if type(rank) is not int or rank < 0:
        raise errors.BadRank(f"rank must be a non-negative int, got {rank!r}")
    if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
        raise errors.HandshakeError("nonce must be 32 bytes")
    if dialer and type(msg.get("want")) is not int:
        raise errors.HandshakeError("hello must say which rank it wants")
    return role, rank, nonce
