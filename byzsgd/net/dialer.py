"""Where a node keeps its connection to a lower rank: dial, authenticate, reconnect.

The higher rank of a pair dials (so a pair never holds two connections).  :func:`dial_loop`
runs for as long as the node does: it connects within ``connect_timeout``, runs the dialer's
side of the handshake (:func:`.handshake.dial`) within ``handshake_timeout``, waits while the
connection lives, and after a failure or a loss tries again after an exponential backoff with
jitter (``BACKOFF_MIN`` to ``BACKOFF_MAX`` seconds).  Error contract: nothing escapes it but
its cancellation; a refused handshake is counted in ``stats.rejected`` and logged rate-limited,
an unreachable peer only at debug level (it may simply not be up yet).
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl as _ssl

from . import errors, handshake
from .protocol import Connection

__all__ = ["dial_loop", "BACKOFF_MIN", "BACKOFF_MAX"]

log = logging.getLogger("byzsgd.net")

BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0


async def dial_loop(node, rank: int) -> None:
    """Keep ``node`` connected to ``rank`` until the node closes (see the module docstring)."""
    backoff = BACKOFF_MIN
    loop = node.loop
    while not node.closing:
        conn = None
        try:
            host, port = node._address(rank)
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: Connection(node, expect_rank=rank), host, port, ssl=node.ssl_client,
                server_hostname=host if node.ssl_client is not None else None,
                ssl_handshake_timeout=node.handshake_timeout if node.ssl_client else None),
                node.connect_timeout)
            await asyncio.wait_for(handshake.dial(node, conn), node.handshake_timeout)
        except asyncio.CancelledError:
            if conn is not None:
                conn.close()
            raise
        except errors.HandshakeError as e:
            if conn is not None and not conn.closed:
                conn.abort(e)
            else:  # the listener closed first: still count the refusal here
                node.stats.rejected[e.reason] += 1
            node._rlog.info(f"rank {rank}", f"handshake failed: {e.reason}",
                            "rank %d: handshake with rank %d failed: %s", node.rank, rank, e)
        except (OSError, asyncio.TimeoutError, errors.NetError, _ssl.SSLError) as e:
            if conn is not None:
                conn.close()
            log.debug("rank %d: cannot reach rank %d yet: %r", node.rank, rank, e)
        except Exception as e:  # never let a dialer die
            if conn is not None:
                conn.close()
            node._rlog.log(logging.ERROR, f"rank {rank}", f"dial error: {type(e).__name__}",
                           "rank %d: unexpected error dialing rank %d: %r", node.rank, rank, e, exc_info=e)
        else:
            backoff = BACKOFF_MIN
            await conn.wait_closed()
            if not node.closing:
                node._rlog.info(f"rank {rank}", "reconnecting",
                                "rank %d: connection to rank %d lost; reconnecting", node.rank, rank)
            continue
        if node.closing:
            break
        await asyncio.sleep(backoff * (0.5 + random.random()))
        backoff = min(backoff * 2, BACKOFF_MAX)
