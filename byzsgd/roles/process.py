"""What a node process needs, whatever its role: logging, its network endpoint (the peer
directory, TLS, the :class:`~byzsgd.net.Node`), the stop signals and the exit.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys

from byzsgd.config import RunConfig, parse_host_port
from byzsgd import rundir
from byzsgd.errors import ConfigError
from byzsgd.net import FrameLimits, Node, PeerDirectory
from byzsgd.roles.messages import PEER_ROLES

def setup_logging(cfg: RunConfig) -> None:
    """Every line a node prints, on stderr, prefixed with time and node (``ps0``, ``worker4``):
    start-up, evaluations, stalls, the end — and, per step, what ``--bench`` / ``--log`` ask
    for (:meth:`byzsgd.roles.ps_base.PSBase._record`).  A node process owns its logging:
    handlers it inherited (a node forked from a launcher or a test runner that configured
    its own) are replaced, so every line reaches the node's log."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, force=True,
        format=f"%(asctime)s {cfg.role}{cfg.rank} %(levelname)s %(name)s: %(message)s")


def load_directory(path: str) -> PeerDirectory:
    """Read the launcher's deployment description (``deployment.json``) as a directory."""
    try:
        doc = rundir.read_deployment(path)
        return PeerDirectory(rundir.peer_addresses(doc), int(doc["num_ps"]))
    except (ConfigError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"cannot read the peer directory {path}: {exc}") from None


def tls_contexts(cfg: RunConfig) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """Server and client TLS contexts when a certificate is given (HMAC auth runs on top)."""
    if not cfg.tls_cert:
        return None, None
    try:
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cfg.tls_cert, cfg.tls_key)
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cfg.tls_ca or cfg.tls_cert)
        # Peers are addressed by IP in most clusters; the rank is proven by the HMAC handshake
        # under the pair key of the two ranks (--credentials), the CA proves the certificate
        # is the cluster's and the handshake binds the TLS channel.
        client.check_hostname = False
        if cfg.tls_ca:
            server.verify_mode = ssl.CERT_OPTIONAL
            server.load_verify_locations(cfg.tls_ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot set up TLS with {cfg.tls_cert}/{cfg.tls_key}: {exc}") from None
    return server, client


def make_node(cfg: RunConfig, limits: FrameLimits, *, device=None) -> Node:
    """The node's endpoint: from --peers when given, else a rendezvous through --master.
    ``device``: where the role computes (a CUDA node stages its sends through pinned
    buffers, :mod:`byzsgd.net.staging`)."""
    identity = cfg.identity()  # refuses to start without a proof of this rank (ConfigError)
    ssl_server, ssl_client = tls_contexts(cfg)
    common = dict(limits=limits, listen_host=cfg.listen_host, advertise_host=cfg.advertise_host,
                  ssl_server=ssl_server, ssl_client=ssl_client, bind_address=cfg.bind_address,
                  device=device, peer_roles=PEER_ROLES[cfg.role])
    if cfg.peers:
        directory = load_directory(cfg.peers)
        if directory.world_size != cfg.world_size or directory.num_ps != cfg.num_ps:
            raise ConfigError(
                f"the peer directory {cfg.peers} describes {directory.num_ps} PS and "
                f"{directory.world_size - directory.num_ps} workers, but the flags say "
                f"{cfg.num_ps} PS and {cfg.num_workers} workers")
        return Node(cfg.rank, cfg.role, identity, directory=directory, **common)
    host, port = parse_host_port(cfg.master)
    listen_port = cfg.port if cfg.port is not None else (port if cfg.rank == 0 else 0)
    return Node(cfg.rank, cfg.role, identity, master=(host, port), world_size=cfg.world_size,
                num_ps=cfg.num_ps, listen_port=listen_port, **common)


def exit_now(code: int) -> None:
    """Leave the process at once with ``code``, output flushed.

    A node is done when its role says so: nothing is left to save, and waiting for
    library threads (zarr's I/O loop, torch's pools) to wind down only delays the exit by
    seconds after SIGTERM."""
    logging.shutdown()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code if isinstance(code, int) else 1)


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGINT/SIGTERM set ``stop``: the node finishes its current step and closes cleanly."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-main thread
            pass
