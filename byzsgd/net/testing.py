"""Where fault injection starts: a raw, hand-driven dialer for tests and fault scripts.

It speaks the handshake by hand (optionally wrongly) and then lets the caller write arbitrary
bytes, so tests can check that every malformed input only costs the offender its connection.
Not used by :class:`~byzsgd.net.Node` itself.
"""
from __future__ import annotations

import asyncio

from . import handshake as hs
from .credentials import RankCredentials
from .peers import role_of
from .protocol import HS_PREFIX, hs_pack, hs_unpack

__all__ = ["RawPeer"]


class RawPeer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, host: str, port: int, *, ssl=None) -> "RawPeer":
        r, w = await asyncio.open_connection(host, port, ssl=ssl, server_hostname=host if ssl else None)
        return cls(r, w)

    async def recv_hs(self, timeout: float = 5.0) -> dict:
        (n,) = HS_PREFIX.unpack(await asyncio.wait_for(self.reader.readexactly(HS_PREFIX.size), timeout))
        return hs_unpack(await asyncio.wait_for(self.reader.readexactly(n), timeout))

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def handshake(self, creds, rank: int, want: int, num_ps: int, *, role: str | None = None,
                        version: int = hs.PROTOCOL_VERSION, bad_mac: bool = False, world_size: int | None = None,
                        to=None, dep: str | None = None) -> dict:
        """Run the dialer side claiming ``rank``; returns the listener's final message
        ({'ok': True}, {'err': ...} or {'closed': True}).

        ``creds``: :class:`RankCredentials` (the MAC uses the key *they* hold for ``want``, so
        claiming another rank than ``creds.rank`` is an impersonation attempt), or ``bytes``: an
        operator secret from which ``rank``'s credentials are derived (needs ``world_size``).
        ``to`` overrides the dialed address put in the transcript."""
        if not isinstance(creds, RankCredentials):
            if world_size is None:
                raise ValueError("an operator secret needs world_size to derive credentials")
            creds = RankCredentials.derive(creds, rank, world_size)
        key = creds.keys[want] if 0 <= want < creds.world_size and creds.keys[want] is not None else bytes(32)
        dep = creds.deployment if dep is None else dep
        role = role or role_of(rank, num_ps)
        nonce = hs.new_nonce()
        to = hs.norm_addr(self.writer.get_extra_info("peername")) if to is None else list(to)
        self.write(hs_pack({"v": version, "dep": dep, "role": role, "rank": rank, "want": want, "nonce": nonce,
                            "to": to}))
        reply = await self.recv_hs()
        if "err" in reply:
            return reply
        tr = hs.transcript(dep, role, rank, nonce, reply["role"], reply["rank"], reply["nonce"], to,
                           hs.channel_binding(self.writer.transport))
        m = hs.mac(key, False, tr)
        if bad_mac:
            m = bytes(32)
        self.write(hs_pack({"mac": m}))
        try:
            return await self.recv_hs()
        except (asyncio.IncompleteReadError, ConnectionError):
            return {"closed": True}

    async def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True once the other side closed the connection (EOF or reset) within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
        except TimeoutError:  # before OSError: TimeoutError is one
            return False
        except (ConnectionError, OSError):
            return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except Exception:
            pass
