"""Where a connection proves which **rank** it is: version, role, rank and a mutual HMAC-SHA256.

The exchange (each message a length-prefixed msgpack map of at most ``HS_MAX`` bytes)::

    dialer -> listener : {v, dep, role, rank, want, nonce_d, to}          (nonces: 32 random bytes)
    listener -> dialer : {v, dep, role, rank, nonce_l, mac_l}   or {err: CODE}
    dialer -> listener : {mac_d}
    listener -> dialer : {ok: True}                              or {err: CODE}  (duplicate rank)

A refusal (``{err}``) goes to a peer that has proven nothing yet, so it carries a stable reason
code only (:data:`REFUSALS`: ``version``, ``bad_rank``, ``deployment``, ``address``,
``duplicate_rank``): never the listener's deployment id, world size, ranks or addresses, which an
outsider could otherwise collect by dialing with any hello.  The dialer raises the matching
error class from the code; the details stay in the listener's own log.  The listener's reply
hello repeats only what the dialer presented (its deployment id, and the rank it asked for).

``mac_x = HMAC-SHA256(K(dialer, listener), label_x || transcript)`` with the *pair key* only
those two ranks hold (:mod:`.credentials`); the transcript packs the protocol version, the
deployment id, both roles, ranks and nonces, the address the dialer actually connected to
(``to``) and the TLS channel binding.  So:

* a member cannot complete a handshake under another rank (it lacks that rank's pair keys), and
  a dialer that reached the wrong process (a wrong or lying directory entry) gets a MAC it cannot
  verify: a failed handshake, never an impostor connection;
* a MAC can be neither replayed (fresh nonces from both sides) nor reflected (direction label);
* a relay that splices two connections (a Byzantine rendezvous master routing rank ``d``'s
  connection for ``l`` through itself) fails: under TLS the two TLS sessions have different
  channel bindings; over plain TCP the listener checks that ``to`` is the address it was reached
  on (``Node(bind_address=False)`` turns this off behind NAT, where TLS must then provide it).

Channel binding: ``ssl_object.get_channel_binding("tls-unique")`` (the first Finished message),
the only type Python's ``ssl`` exposes.  RFC 9266 leaves tls-unique undefined for TLS 1.3 and
names the exporter instead, which Python does not expose; OpenSSL (1.1.1 and 3.x) returns the
client's Finished for TLS 1.3 too, and that message is a MAC over the whole handshake transcript
under the session's ECDHE-derived keys, so it differs between two spliced TLS sessions, which
is what the binding must give here.  Comparisons use ``hmac.compare_digest``.  The listener only
authenticates itself to a dialer that presented a valid rank/role for this world; the dialer's
proof is checked before its rank is bound to the connection, and no frame is parsed before both
proofs passed.

:func:`dial` and :func:`serve` run the two sides of this exchange for a node on one
:class:`~.protocol.Connection` (duck-typed here, so this module stays importable without torch).
``serve`` owns the listener's error contract: whatever goes wrong closes that connection with a
counted, logged reason (:meth:`Connection.abort`) and nothing propagates.  What they use of the
node: its identity (``rank``, ``role``, ``num_ps``, ``world_size``, ``credentials``,
``peer_roles``, ``bind_address``, ``handshake_timeout``), its admission (``_admission``: the
passed hello moves to the proving budget) and ``_attach`` / ``connection`` (the live one for a
rank, for the duplicate check).
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
from dataclasses import dataclass

import msgpack

from . import errors
from .peers import role_of

__all__ = ["PROTOCOL_VERSION", "NONCE_BYTES", "mac", "verify", "transcript", "check_hello_fields", "Hello",
           "resolve_secret", "SECRET_ENV", "norm_addr", "channel_binding", "REFUSALS", "refusal", "dial", "serve"]

log = logging.getLogger("byzsgd.net")

SECRET_ENV = "BYZSGD_SECRET"

PROTOCOL_VERSION = 2
NONCE_BYTES = 32
_LABEL_LISTENER = b"byzsgd-net-v2 listener"
_LABEL_DIALER = b"byzsgd-net-v2 dialer"
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


def norm_addr(addr) -> list:
    """``[ip, port]`` from a socket address, IPv4-mapped IPv6 and scope ids folded, so the two
    ends of one TCP connection name the listener's address identically."""
    if not addr or len(addr) < 2:
        return ["", 0]
    host, port = str(addr[0]).split("%", 1)[0], int(addr[1])
    try:
        ip = ipaddress.ip_address(host)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        host = ip.compressed
    except ValueError:
        pass
    return [host, port]


def channel_binding(transport) -> bytes:
    """The TLS channel binding of ``transport`` (``b""`` over plain TCP)."""
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if sslobj is None:
        return b""
    cb = sslobj.get_channel_binding("tls-unique")
    if not cb:
        raise errors.HandshakeError("TLS is on but no channel binding is available")
    return bytes(cb)


def transcript(dep: str, d_role: str, d_rank: int, nonce_d: bytes, l_role: str, l_rank: int, nonce_l: bytes,
               to: list, binding: bytes) -> bytes:
    return msgpack.packb([PROTOCOL_VERSION, dep, d_role, d_rank, nonce_d, l_role, l_rank, nonce_l,
                          list(to), binding], use_bin_type=True)


def mac(key: bytes, listener: bool, tr: bytes) -> bytes:
    label = _LABEL_LISTENER if listener else _LABEL_DIALER
    return hmac.new(key, label + tr, hashlib.sha256).digest()


def verify(key: bytes, listener: bool, tr: bytes, got) -> None:
    if type(got) is not bytes or not hmac.compare_digest(mac(key, listener, tr), got):
        raise errors.AuthError("bad HMAC: the peer does not hold this pair's key (wrong rank, wrong "
                               "deployment, or a relay between us)")


@dataclass(frozen=True)
class Hello:
    role: str
    rank: int
    nonce: bytes
    dep: str
    want: int | None = None
    to: list | None = None


# the refusals a listener sends, by code, and what each tells the dialer
REFUSALS: dict[str, tuple[type[errors.HandshakeError], str]] = {
    errors.VersionMismatch.reason: (errors.VersionMismatch, "another protocol version"),
    errors.BadRank.reason: (errors.BadRank, "the rank/role this node claims or wants does not fit the listener"),
    errors.DeploymentMismatch.reason: (errors.DeploymentMismatch,
                                       "another deployment (operator secret or world size)"),
    errors.AddressMismatch.reason: (errors.AddressMismatch, "the listener was reached through another address"),
    errors.DuplicateRank.reason: (errors.DuplicateRank, "this rank already has a live connection there"),
}


def refusal(err: errors.HandshakeError) -> dict:
    """The message refusing a handshake for ``err``: its reason code, nothing else."""
    code = err.reason if err.reason in REFUSALS else errors.HandshakeError.reason
    return {"err": code}


def check_hello_fields(msg: dict, *, dialer: bool) -> Hello:
    """Type-check a hello (dialer's) or reply (listener's); raises the peer's refusal."""
    if "err" in msg:
        code = msg["err"]
        cls, what = REFUSALS.get(code, (None, None)) if type(code) is str else (None, None)
        if cls is None:
            raise errors.HandshakeError("peer refused the handshake")
        raise cls(f"peer refused the handshake: {code} ({what})")
    v = msg.get("v")
    if v != PROTOCOL_VERSION or type(v) is not int:
        raise errors.VersionMismatch(f"protocol version {v!r}, this node speaks {PROTOCOL_VERSION}")
    role, rank, nonce, dep = msg.get("role"), msg.get("rank"), msg.get("nonce"), msg.get("dep")
    if role not in ROLES or type(role) is not str:
        raise errors.BadRank(f"unknown role {role!r}")
    if type(rank) is not int or rank < 0:
        raise errors.BadRank(f"rank must be a non-negative int, got {rank!r}")
    if type(nonce) is not bytes or len(nonce) != NONCE_BYTES:
        raise errors.HandshakeError("nonce must be 32 bytes")
    if type(dep) is not str or not 1 <= len(dep) <= 64:
        raise errors.HandshakeError("deployment id must be a short str")
    if not dialer:
        return Hello(role, rank, nonce, dep)
    want, to = msg.get("want"), msg.get("to")
    if type(want) is not int:
        raise errors.HandshakeError("hello must say which rank it wants")
    if (type(to) is not list or len(to) != 2 or type(to[0]) is not str or len(to[0]) > 64
            or type(to[1]) is not int or not 0 <= to[1] <= 65535):
        raise errors.HandshakeError("hello must say which [ip, port] it dialed")
    return Hello(role, rank, nonce, dep, want, to)


# ---------------------------------------------------------------------- the state machine
async def dial(node, conn) -> None:
    """The dialer's side on ``conn`` (towards ``conn.expect_rank``); attaches the connection to
    ``node`` once both proofs passed.  Raises the :class:`errors.HandshakeError` that ended it
    (the caller, the dial loop, closes and counts)."""
    want = conn.expect_rank
    cred = node.credentials
    key = cred.key(want)
    nonce_d = new_nonce()
    to = norm_addr(conn.transport.get_extra_info("peername"))
    binding = channel_binding(conn.transport)
    conn.send_hs({"v": PROTOCOL_VERSION, "dep": cred.deployment, "role": node.role, "rank": node.rank,
                  "want": want, "nonce": nonce_d, "to": to})
    reply = await conn.recv_hs()
    h = check_hello_fields(reply, dialer=False)
    if h.dep != cred.deployment:
        raise errors.DeploymentMismatch(f"rank {want} is in deployment {h.dep[:16]!r}, this is {cred.deployment!r}")
    if h.rank != want or h.role != role_of(want, node.num_ps):
        raise errors.BadRank(f"dialed rank {want} but reached rank {h.rank} ({h.role})")
    tr = transcript(cred.deployment, node.role, node.rank, nonce_d, h.role, h.rank, h.nonce, to, binding)
    verify(key, True, tr, reply.get("mac"))
    conn.send_hs({"mac": mac(key, False, tr)})
    ok = await conn.recv_hs()
    if ok.get("ok") is not True:
        check_hello_fields(ok, dialer=False)  # raises the peer's refusal
        raise errors.HandshakeError("no ok from the listener")
    node._attach(conn, h.rank, h.role)


def check_inbound(node, rank: int, role: str, want) -> None:
    """Whether a dialer claiming ``rank``/``role`` and asking for ``want`` may dial ``node``."""
    if want != node.rank:
        raise errors.BadRank(f"the dialer wants rank {want!r}, this is rank {node.rank}")
    if rank >= node.world_size:
        raise errors.BadRank(f"rank {rank} outside the world of {node.world_size}")
    if role != role_of(rank, node.num_ps):
        raise errors.BadRank(f"rank {rank} claims role {role}, but is a {role_of(rank, node.num_ps)}")
    if rank <= node.rank:
        raise errors.BadRank(f"rank {rank} dialed rank {node.rank}: only higher ranks dial lower ones")
    if node.peer_roles is not None and role not in node.peer_roles:
        raise errors.BadRank(f"rank {rank} ({role}) dialed rank {node.rank} ({node.role}), which exchanges "
                             f"messages only with {'/'.join(sorted(node.peer_roles))} nodes")


async def serve(node, conn) -> None:
    """The listener's side on an accepted ``conn``, within ``node.handshake_timeout``; never
    raises but ``CancelledError`` (see the module docstring)."""
    cred = node.credentials
    try:
        async with asyncio.timeout(node.handshake_timeout):
            hello = await conn.recv_hs()
            conn.progressed = True
            try:
                h = check_hello_fields(hello, dialer=True)
                if h.dep != cred.deployment:
                    raise errors.DeploymentMismatch(
                        f"the dialer is in deployment {h.dep[:16]!r}, this is {cred.deployment!r}")
                check_inbound(node, h.rank, h.role, h.want)
                if not conn.tls and node.bind_address:
                    here = norm_addr(conn.transport.get_extra_info("sockname"))
                    if h.to != here:
                        raise errors.AddressMismatch(
                            f"the dialer reached {h.to[0][:64]}:{h.to[1]}, this socket is {here[0]}:{here[1]}")
            except (errors.VersionMismatch, errors.BadRank, errors.DeploymentMismatch,
                    errors.AddressMismatch) as e:
                conn.send_hs(refusal(e))  # a code: the details (ids, ranks) stay in our log
                raise e
            node._admission.promote(conn, h.rank)
            key = cred.key(h.rank)
            nonce_l = new_nonce()
            tr = transcript(cred.deployment, h.role, h.rank, h.nonce, node.role, node.rank, nonce_l, h.to,
                            channel_binding(conn.transport))
            conn.send_hs({"v": PROTOCOL_VERSION, "dep": cred.deployment, "role": node.role, "rank": node.rank,
                          "nonce": nonce_l, "mac": mac(key, True, tr)})
            reply = await conn.recv_hs()
            verify(key, False, tr, reply.get("mac"))
            if node.connection(h.rank) is not None:
                err = errors.DuplicateRank(f"rank {h.rank} already has a live connection")
                conn.send_hs(refusal(err))
                raise err
            conn.send_hs({"ok": True})
            node._attach(conn, h.rank, h.role)
    except (TimeoutError, asyncio.TimeoutError):
        conn.abort(errors.HandshakeTimeout(f"no complete handshake within {node.handshake_timeout}s"))
    except errors.HandshakeError as e:
        conn.abort(e)
    except errors.PeerClosed:
        pass
    except asyncio.CancelledError:
        conn.close()
        raise
    except Exception as e:
        node._rlog.log(logging.ERROR, conn.source, f"handshake error: {type(e).__name__}",
                       "rank %d: unexpected handshake error: %r", node.rank, e, exc_info=e)
        conn.abort(errors.HandshakeError(repr(e)))
    finally:
        if conn.rank is None:
            node._admission.done(conn)
