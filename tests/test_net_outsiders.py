"""Issue 13 (7): outsiders cannot keep a rank from joining; TLS handshakes count as pre-auth."""
import asyncio
import socket
import ssl

import pytest
import torch

from byzsgd.net import FrameLimits, Node, PeerDirectory, run
from byzsgd.net.credentials import derive

from .test_net_cluster import _self_signed

pytestmark = pytest.mark.timeout(120, method="thread")
OPERATOR = b"operator-secret-outsiders-test"
LIM = FrameLimits(max_header_bytes=4096, max_frame_bytes=1 << 20)


def test_flood_of_idle_sockets_does_not_keep_a_rank_out():
    """1,000 idle sockets from the rank's own address (loopback): only the flood is evicted."""
    async def main():
        d = PeerDirectory.local(1, 1)
        n0 = Node(0, "ps", derive(OPERATOR, 0, 2), directory=d, limits=LIM, listen_host="127.0.0.1",
                  handshake_timeout=5.0)
        mb = n0.mailbox("m")
        await n0.start()
        socks = []
        loop = asyncio.get_running_loop()
        try:
            async def flood(k):
                for _ in range(k):
                    s = socket.socket()
                    s.setblocking(False)
                    await loop.sock_connect(s, ("127.0.0.1", n0.port))
                    socks.append(s)
            await flood(500)
            t0 = loop.time()
            n1 = Node(1, "worker", derive(OPERATOR, 1, 2), directory=d, limits=LIM, listen_host="127.0.0.1")
            n1.mailbox("m")
            await n1.start()
            await flood(500)  # keeps flooding while rank 1 joins
            try:
                assert await n1.wait_connected({0}, 5) == {0}
                assert loop.time() - t0 < 5
                assert n0._pending_handshakes() <= n0.max_preauth_per_address
                assert n0.stats.rejected["preauth_evicted"] >= 900
                assert await n1.send(0, "m", 0, [torch.ones(3)])
                assert set(await mb.collect(0, 1, timeout=5)) == {1}
                # and it rejoins under the flood after a restart
                await n1.close()
                n1 = Node(1, "worker", derive(OPERATOR, 1, 2), directory=d, limits=LIM, listen_host="127.0.0.1")
                n1.mailbox("m")
                await n1.start()
                await flood(200)
                assert await n1.wait_connected({0}, 5) == {0}
            finally:
                await n1.close()
        finally:
            for s in socks:
                s.close()
            await n0.close()
    run(main())


def test_tls_handshakes_count_before_authentication(tmp_path):
    cert, key = _self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))

    async def main():
        d = PeerDirectory.local(1, 1)
        n0 = Node(0, "ps", derive(OPERATOR, 0, 2), directory=d, limits=LIM, listen_host="127.0.0.1",
                  ssl_server=server, ssl_client=client, handshake_timeout=3.0)
        mb = n0.mailbox("m")
        await n0.start()
        socks = []
        try:
            for _ in range(20):  # TCP connects that never start (or finish) their TLS handshake
                s = socket.create_connection(("127.0.0.1", n0.port))
                s.setblocking(False)
                socks.append(s)
            await asyncio.sleep(0.3)
            assert n0._pending_handshakes() == n0.max_preauth_per_address
            assert n0.stats.rejected["preauth_evicted"] >= 12
            n1 = Node(1, "worker", derive(OPERATOR, 1, 2), directory=d, limits=LIM, listen_host="127.0.0.1",
                      ssl_server=server, ssl_client=client)
            n1.mailbox("m")
            await n1.start()
            try:
                assert await n1.wait_connected({0}, 5) == {0}
                assert n0._conns[1].tls
                assert await n1.send(0, "m", 0, [torch.ones(3)])
                assert set(await mb.collect(0, 1, timeout=5)) == {1}
                for s in socks:
                    s.close()
                await asyncio.sleep(0.3)
                assert n0._pending_handshakes() == 0
            finally:
                await n1.close()
        finally:
            for s in socks:
                s.close()
            await n0.close()
    run(main())
