"""Issue 13 (1), (2): a handshake proves the rank, not only membership; wrong or lying
directory entries give failed handshakes, never impostor connections.  Real TCP on loopback."""
import asyncio
import os
import stat

import pytest
import torch

from byzsgd.net import FrameLimits, Node, PeerDirectory, errors, run
from byzsgd.net import handshake as hs
from byzsgd.net.credentials import RankCredentials, credentials_path, derive, pair_key, provision
from byzsgd.net.peers import free_ports, role_of
from byzsgd.net.protocol import HS_PREFIX, hs_pack, hs_unpack
from byzsgd.net.testing import RawPeer

pytestmark = pytest.mark.timeout(120, method="thread")
OPERATOR = b"operator-secret-that-no-node-holds"
LIM = FrameLimits(max_header_bytes=4096, max_frame_bytes=1 << 20)


def creds(world):
    return [derive(OPERATOR, r, world) for r in range(world)]


# ------------------------------------------------------------------ credentials
def test_pair_keys_are_pairwise_and_symmetric():
    cs = creds(4)
    for i in range(4):
        for j in range(4):
            if i != j:
                assert cs[i].key(j) == cs[j].key(i) == pair_key(OPERATOR, 4, i, j)
    assert len({cs[0].key(1), cs[0].key(2), cs[1].key(2)}) == 3
    with pytest.raises(errors.BadRank):
        cs[0].key(0)
    with pytest.raises(errors.BadRank):
        cs[0].key(4)
    assert derive(OPERATOR, 0, 5).key(1) != cs[0].key(1)  # world size is in the derivation
    assert "key" not in repr(cs[0]).lower() or OPERATOR.hex() not in repr(cs[0])
    assert cs[0].key(1).hex() not in repr(cs[0])


def test_credentials_file_round_trip_and_refusals(tmp_path):
    paths = provision(OPERATOR, 3, tmp_path / "creds")
    assert stat.S_IMODE((tmp_path / "creds").stat().st_mode) == 0o700
    for r, p in enumerate(paths):
        assert p == credentials_path(tmp_path / "creds", r)
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        c = RankCredentials.load(p, rank=r, world_size=3)
        assert c.keys == derive(OPERATOR, r, 3).keys
        assert OPERATOR.hex() not in p.read_text() and "operator" not in p.read_text()
    with pytest.raises(errors.ConfigError, match="rank 1.*rank 0"):
        RankCredentials.load(paths[1], rank=0)
    with pytest.raises(errors.ConfigError, match="world of 3"):
        RankCredentials.load(paths[1], world_size=4)
    os.chmod(paths[0], 0o644)
    with pytest.raises(errors.ConfigError, match="readable by others"):
        RankCredentials.load(paths[0])
    with pytest.raises(errors.ConfigError, match="cannot open"):
        RankCredentials.load(tmp_path / "missing")
    bad = tmp_path / "bad"
    for text, match in (("{", "not JSON"), ('{"format": "x"}', "format"),
                        ('{"format": "byzsgd-rank-credentials-v1", "rank": 0, "world_size": 2, '
                         '"deployment": "d", "keys": [null, "zz"]}', "hex chars"),
                        ('{"format": "byzsgd-rank-credentials-v1", "rank": 0, "world_size": 2, '
                         '"deployment": "d", "keys": [null]}', "1 keys")):
        bad.write_text(text)
        os.chmod(bad, 0o600)
        with pytest.raises(errors.ConfigError, match=match):
            RankCredentials.load(bad)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    os.chmod(open_dir, 0o755)
    with pytest.raises(errors.ConfigError, match="accessible by others"):
        provision(OPERATOR, 2, open_dir)
    with pytest.raises(errors.ConfigError):
        derive(b"", 0, 2)
    with pytest.raises(errors.ConfigError):
        derive(OPERATOR, 2, 2)


def test_node_takes_credentials_or_legacy_secret():
    d = PeerDirectory.local(1, 2)
    cs = creds(3)
    n = Node(1, "worker", cs[1], directory=d, limits=LIM)
    assert n.credentials is cs[1] and not n.legacy_secret
    legacy = Node(1, "worker", OPERATOR, directory=d, limits=LIM)
    assert legacy.legacy_secret and legacy.credentials.keys == cs[1].keys
    with pytest.raises(errors.ConfigError, match="rank 2's"):
        Node(1, "worker", cs[2], directory=d, limits=LIM)  # a member cannot run as another rank
    with pytest.raises(errors.ConfigError, match="world of 4"):
        Node(1, "worker", derive(OPERATOR, 1, 4), directory=d, limits=LIM)


# ------------------------------------------------------------------ finding 1: impersonation
def test_member_cannot_handshake_as_another_rank_and_real_rank_still_joins():
    async def main():
        d = PeerDirectory.local(1, 3)   # PS 0, workers 1, 2, 3
        cs = creds(4)
        n0 = Node(0, "ps", cs[0], directory=d, limits=LIM, listen_host="127.0.0.1", handshake_timeout=2.0)
        mb = n0.mailbox("m")
        await n0.start()
        try:
            # rank 3 (a member, with its own credentials) claims ranks 2 and 1 towards PS 0
            for claim in (2, 1):
                p = await RawPeer.connect("127.0.0.1", n0.port)
                reply = await p.handshake(cs[3], claim, 0, 1)
                assert reply.get("ok") is not True, reply
                assert await p.closed_by_peer(5)
                await p.close()
            assert n0.stats.rejected["auth"] == 2
            assert n0.connected == set()
            # the real ranks 2 and 1 are then accepted (no "duplicate" left behind)
            n2 = Node(2, "worker", cs[2], directory=d, limits=LIM, listen_host="127.0.0.1")
            n1 = Node(1, "worker", cs[1], directory=d, limits=LIM, listen_host="127.0.0.1")
            for n in (n1, n2):
                n.mailbox("m")
                await n.start()
            try:
                assert await n0.wait_connected({1, 2}, 10) == {1, 2}
                assert await n2.send(0, "m", 0, [torch.ones(2)])
                assert await n1.send(0, "m", 0, [torch.ones(2)])
                got = await mb.collect(0, 2, timeout=5)
                assert sorted(got) == [1, 2]
                # and rank 3 still cannot take rank 2's place, nor spoof it on its own connection
                p = await RawPeer.connect("127.0.0.1", n0.port)
                assert (await p.handshake(cs[3], 2, 0, 1)).get("ok") is not True
                await p.close()
                assert n0.stats.rejected["auth"] == 3 and n0.stats.rejected["duplicate_rank"] == 0
            finally:
                await n1.close()
                await n2.close()
        finally:
            await n0.close()
    run(main())


# ------------------------------------------------------------------ wrong / lying directory entries
async def fake_listener(creds: RankCredentials, claim: int, num_ps: int):
    """A member's listener that answers every hello as rank ``claim``, MACing with the key it
    really holds for the dialer (it lacks K(dialer, claim))."""
    async def serve(reader, writer):
        try:
            (n,) = HS_PREFIX.unpack(await reader.readexactly(HS_PREFIX.size))
            hello = hs_unpack(await reader.readexactly(n))
            nonce = hs.new_nonce()
            role = role_of(claim, num_ps)
            tr = hs.transcript(creds.deployment, hello["role"], hello["rank"], hello["nonce"], role, claim,
                               nonce, hello["to"], b"")
            writer.write(hs_pack({"v": hs.PROTOCOL_VERSION, "dep": creds.deployment, "role": role, "rank": claim,
                                  "nonce": nonce, "mac": hs.mac(creds.key(hello["rank"]), True, tr)}))
            await reader.read(1024)
        except Exception:
            pass
        finally:
            writer.close()
    return await asyncio.start_server(serve, "127.0.0.1", 0)


def test_wrong_directory_entry_fails_the_handshake():
    """Rank 2's entry for rank 1 points at rank 3's listener: a refusal (rank 3 is not who rank
    2 wants) -- and at a listener of rank 3 that claims to be rank 1: a bad MAC."""
    async def main():
        cs = creds(4)
        d = PeerDirectory.local(1, 3)
        imp = await fake_listener(cs[3], claim=1, num_ps=1)
        imp_port = imp.sockets[0].getsockname()[1]
        nodes = {r: Node(r, d.role(r), cs[r], directory=d, limits=LIM, listen_host="127.0.0.1")
                 for r in (0, 1, 3)}
        for wrong, reason in ((d[3], "bad_rank"), (("127.0.0.1", imp_port), "auth")):
            n2 = Node(2, "worker", cs[2], directory=d.with_address(1, wrong), limits=LIM, listen_host="127.0.0.1")
            n2.mailbox("m")
            for n in nodes.values():
                if not n._started:
                    n.mailbox("m")
                    await n.start()
            await n2.start()
            try:
                assert await n2.wait_connected({0}, 10) == {0}
                assert await n2.wait_connected({1}, 1.0) == set()
                assert n2.stats.rejected[reason] >= 1, n2.stats.rejected
                assert 1 not in n2.connected and 2 not in nodes[1].connected  # (rank 3 dialing 2 is legitimate)
            finally:
                await n2.close()
        for n in nodes.values():
            await n.close()
        imp.close()
    run(main())


async def relay(target):
    """A byte relay to ``target[0]`` (set later): what a lying master routes a rank through."""
    async def pipe(r, w):
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except Exception:
            pass
        finally:
            w.close()

    async def serve(reader, writer):
        try:
            r2, w2 = await asyncio.open_connection(*target[0])
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, w2), pipe(r2, writer))
    return await asyncio.start_server(serve, "127.0.0.1", 0)


def test_lying_rendezvous_master_gets_no_impostor_path():
    """A Byzantine master routes rank 2's connection to rank 1 through a relay it controls (it
    could then read and rewrite rank 2's frames).  Rank 1 sees it was dialed on another address
    and refuses: the two never connect through the relay."""
    async def main():
        world, num_ps = 3, 1
        cs = creds(world)
        port = free_ports(1)[0]
        target = [None]
        rel = await relay(target)
        rel_addr = ("127.0.0.1", rel.sockets[0].getsockname()[1])
        nodes = [Node(r, role_of(r, num_ps), cs[r], master=("127.0.0.1", port), world_size=world, num_ps=num_ps,
                      limits=LIM, listen_host="127.0.0.1", handshake_timeout=2.0) for r in range(world)]
        master = nodes[0]._rdv
        honest_complete = type(master)._maybe_complete

        def lying_complete(self=master):
            if len(self.addrs) == world and self.addrs[1] != rel_addr:
                target[0] = self.addrs[1]
                self.addrs[1] = rel_addr  # everyone is told rank 1 listens at the relay
            honest_complete(self)
        master._maybe_complete = lying_complete
        for n in nodes:
            n.mailbox("m")
        try:
            await asyncio.wait_for(asyncio.gather(*(n.start(timeout=20) for n in nodes)), 30)
            assert nodes[2].directory[1] == rel_addr
            assert await nodes[2].wait_connected({0}, 10) == {0}
            assert await nodes[2].wait_connected({1}, 1.5) == set()
            assert nodes[1].stats.rejected["address"] >= 1, nodes[1].stats.rejected
            assert nodes[2].stats.rejected["address"] >= 1, nodes[2].stats.rejected
            assert 2 not in nodes[1].connected
        finally:
            for n in nodes:
                await n.close()
            rel.close()
    run(main())


def test_registration_under_another_rank_is_impossible():
    """Registrations are frames of an authenticated connection, so they carry the proven rank:
    a member that tries to reach the master as another rank never gets to register."""
    async def main():
        world, num_ps = 3, 1
        cs = creds(world)
        port = free_ports(1)[0]
        master = Node(0, "ps", cs[0], master=("127.0.0.1", port), world_size=world, num_ps=num_ps,
                      limits=LIM, listen_host="127.0.0.1")
        t = asyncio.create_task(master.start(timeout=20))
        await asyncio.sleep(0.2)
        p = await RawPeer.connect("127.0.0.1", port)
        assert (await p.handshake(cs[2], 1, 0, num_ps)).get("ok") is not True  # rank 2 as rank 1
        await p.close()
        assert master.stats.rejected["auth"] == 1 and 1 not in master._rdv.addrs
        others = [Node(r, "worker", cs[r], master=("127.0.0.1", port), world_size=world, num_ps=num_ps,
                       limits=LIM, listen_host="127.0.0.1") for r in (1, 2)]
        try:
            await asyncio.wait_for(asyncio.gather(t, *(n.start(timeout=20) for n in others)), 30)
            assert sorted(master._rdv.addrs) == [0, 1, 2]
            assert master._rdv.addrs[1][1] == others[0].port
        finally:
            for n in [master, *others]:
                await n.close()
    run(main())
