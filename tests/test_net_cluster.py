"""Rendezvous through the master, host files, and TLS."""
import asyncio
import logging
import shutil
import ssl
import subprocess

import pytest
import torch

from byzsgd.net import FrameLimits, Node, PeerDirectory, errors, run
from byzsgd.net.peers import free_ports, role_of

pytestmark = pytest.mark.timeout(180, method="thread")  # uvloop can delay signal-based timeouts

torch.set_num_threads(1)
SECRET = b"rendezvous-secret-0123456789"
LIM = FrameLimits(max_header_bytes=4096, max_frame_bytes=1 << 20)


def test_rendezvous_builds_the_directory_and_everyone_connects():
    async def main():
        world, num_ps = 5, 2
        (mport,) = free_ports(1)
        master = ("127.0.0.1", mport)
        nodes = [Node(r, role_of(r, num_ps), SECRET, master=master, world_size=world, num_ps=num_ps,
                      limits=LIM, listen_host="127.0.0.1") for r in range(world)]
        boxes = [n.mailbox("m") for n in nodes]
        try:
            # start in reverse order: the master comes last, the others keep retrying
            starts = [asyncio.create_task(n.start(timeout=20)) for n in reversed(nodes)]
            await asyncio.wait_for(asyncio.gather(*starts), 30)
            d = nodes[0].directory
            assert d.world_size == world and d.ps_ranks == [0, 1] and d[0] == master
            for n in nodes:
                assert n.directory == d
                assert d[n.rank] == ("127.0.0.1", n.port)
            for n in nodes:
                others = set(range(world)) - {n.rank}
                assert await n.wait_connected(others, 10) == others
            for n in nodes:
                n.broadcast([r for r in range(world) if r != n.rank], "m", 0, [torch.tensor([n.rank])])
            for n, mb in zip(nodes, boxes):
                got = await mb.collect(0, world - 1, timeout=10)
                assert {s: m.tensors[0].item() for s, m in got.items()} == {s: s for s in got}
            # a restarted worker (new ephemeral port) re-registers and everyone re-dials it
            await nodes[4].close()
            n4 = Node(4, "worker", SECRET, master=master, world_size=world, num_ps=num_ps, limits=LIM,
                      listen_host="127.0.0.1")
            mb4 = n4.mailbox("m")
            await n4.start(timeout=10)
            nodes[4] = n4
            assert await n4.wait_connected({0, 1, 2, 3}, 10) == {0, 1, 2, 3}
            assert await nodes[1].send(4, "m", 5, [torch.ones(1)])
            assert set(await mb4.collect(5, 1, timeout=5)) == {1}
        finally:
            for n in nodes:
                await n.close()
    run(main())


def test_rendezvous_timeout():
    async def main():
        (mport,) = free_ports(1)
        n = Node(1, "worker", SECRET, master=("127.0.0.1", mport), world_size=2, num_ps=1, limits=LIM,
                 listen_host="127.0.0.1", connect_timeout=0.2)
        with pytest.raises(errors.RendezvousError):
            await n.start(timeout=0.5)
        await n.close()
    run(main())


def test_host_files(tmp_path):
    (tmp_path / "servers").write_text("10.0.0.1\n# comment\n10.0.0.2\n")
    (tmp_path / "workers").write_text("10.0.0.3\n\n10.0.0.4:9999\n")
    d = PeerDirectory.from_host_files(tmp_path / "servers", tmp_path / "workers", 5000)
    assert d.world_size == 4 and d.ps_ranks == [0, 1] and d.worker_ranks == [2, 3]
    assert d[0] == ("10.0.0.1", 5000) and d[2] == ("10.0.0.3", 5002) and d[3] == ("10.0.0.4", 9999)
    with pytest.raises(errors.ConfigError):
        PeerDirectory.from_host_files(tmp_path / "nope", tmp_path / "workers", 5000)
    with pytest.raises(errors.UnknownPeer):
        d[7]


def _self_signed(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    try:
        from cryptography import x509  # noqa: F401
    except ImportError:
        x509 = None
    if x509 is not None:  # pragma: no cover - not in this venv
        import datetime

        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        k = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
        now = datetime.datetime.now(datetime.timezone.utc)
        c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now)
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                            x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]), False)
             .sign(k, hashes.SHA256()))
        cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return cert, key
    if shutil.which("openssl") is None:
        pytest.skip("neither the cryptography package nor the openssl CLI is available to make a test cert")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    return cert, key


def test_tls_round_trip(tmp_path):
    cert, key = _self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))

    async def main():
        d = PeerDirectory.local(1, 1)
        nodes = [Node(r, d.role(r), SECRET, directory=d, limits=FrameLimits.for_model(500_000),
                      listen_host="127.0.0.1", ssl_server=server, ssl_client=client) for r in range(2)]
        mb = nodes[0].mailbox("m")
        nodes[1].mailbox("m")
        try:
            for n in nodes:
                await n.start()
            assert await nodes[1].wait_connected({0}, 10) == {0}
            conn = nodes[0].connection(1)
            assert conn.transport.get_extra_info("ssl_object") is not None
            x = torch.randn(500_000)
            assert await asyncio.wait_for(nodes[1].send(0, "m", 0, [x]), 10)
            got = await mb.collect(0, 1, timeout=10)
            assert torch.equal(got[1].tensors[0], x)
        finally:
            for n in nodes:
                await n.close()
    run(main())


def test_tls_client_refuses_untrusted_server(tmp_path, caplog):
    """The dialer refuses for the certificate, not for any failure to connect: the listener is
    up and reachable, and the dial fails on certificate verification."""
    cert, key = _self_signed(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # does not trust the self-signed cert

    async def main():
        d = PeerDirectory.local(1, 1)
        nodes = [Node(r, d.role(r), SECRET, directory=d, limits=LIM, listen_host="127.0.0.1",
                      ssl_server=server, ssl_client=client) for r in range(2)]
        for n in nodes:
            n.mailbox("m")
        try:
            for n in nodes:
                await n.start()
            assert await nodes[1].wait_connected({0}, 1.5) == set()
            assert nodes[0].port  # listening: the refusal is not a connection failure
        finally:
            for n in nodes:
                await n.close()
    with caplog.at_level(logging.DEBUG, logger="byzsgd.net"):
        run(main())
    reasons = [r.getMessage() for r in caplog.records if "cannot reach rank 0" in r.getMessage()]
    assert reasons and all("CERTIFICATE_VERIFY_FAILED" in m for m in reasons), reasons


def test_resolve_secret(monkeypatch):
    from byzsgd.net import resolve_secret
    monkeypatch.delenv("BYZSGD_SECRET", raising=False)
    with pytest.raises(errors.ConfigError, match="BYZSGD_SECRET"):
        resolve_secret(None)
    assert resolve_secret("abc") == b"abc"
    monkeypatch.setenv("BYZSGD_SECRET", "from-env")
    assert resolve_secret(None) == b"from-env"
    assert resolve_secret("flag") == b"flag"
