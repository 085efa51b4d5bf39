"""Where a rank gets the credentials that prove *its* rank, and nobody else's.

One shared secret proves membership only: any member could handshake as any rank.  Instead the
operator (the launcher) holds an *operator secret* that no node holds and derives one key per
pair of ranks::

    K(i, j) = HMAC-SHA256(operator_secret, LABEL || u32 world_size || u32 min(i, j) || u32 max(i, j))

Rank ``i`` receives only ``{K(i, j) : j != i}`` plus its rank, the world size and a deployment
id (a fingerprint of the operator secret, so two deployments' nodes refuse each other with a
clear message).  The handshake MACs its transcript with ``K(dialer, listener)``: a member ``m``
lacks ``K(a, b)`` for every pair without ``m``, so it cannot complete a handshake as ``a`` towards
``b``.  The world size is part of the derivation, so credentials of a differently sized
deployment never authenticate.

Files: JSON ``{"format", "rank", "world_size", "deployment", "keys"}`` with hex keys (``null`` at
the rank's own index), written 0600 and refused when readable by group or others.
:func:`provision` writes one such file per rank into a directory (the launcher's side);
:func:`provision_in_child` does it in a short-lived child process, for a launcher that forks its
nodes: a forked node shares the memory of the process it is forked from, freed memory included,
so that process must never have held the operator secret nor any rank's keys.

Legacy/dev mode: a node given plain ``bytes`` treats them as the operator secret and derives its
own credentials (:meth:`RankCredentials.derive`).  Every node then holds the operator secret and
can derive any pair key, i.e. the security of a single shared secret; use per-rank files in any
deployment where a member may be Byzantine.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from . import errors

__all__ = ["RankCredentials", "derive", "pair_key", "deployment_id", "provision", "provision_in_child",
           "credentials_path", "FORMAT", "MAX_WORLD"]

FORMAT = "byzsgd-rank-credentials-v1"
MAX_WORLD = 1 << 16          # bounds the file and the derivation loop
KEY_BYTES = 32
_PAIR_LABEL = b"byzsgd pair key v1\0"
_DEPLOYMENT_LABEL = b"byzsgd deployment id v1\0"
_MAX_FILE_BYTES = 96 * MAX_WORLD  # hex key + JSON punctuation per rank, with margin


def _check_operator_secret(secret) -> bytes:
    if isinstance(secret, str):
        raise errors.ConfigError("the operator secret must be bytes (encode the string first)")
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise errors.ConfigError("a non-empty operator secret (bytes) is required")
    return bytes(secret)


def _check_world(rank, world_size) -> None:
    if type(world_size) is not int or not 1 <= world_size <= MAX_WORLD:
        raise errors.ConfigError(f"world_size must be an int in [1, {MAX_WORLD}], got {world_size!r}")
    if type(rank) is not int or not 0 <= rank < world_size:
        raise errors.ConfigError(f"rank must be an int in [0, {world_size}), got {rank!r}")


def pair_key(operator_secret: bytes, world_size: int, i: int, j: int) -> bytes:
    """``K(i, j) = K(j, i)``: the key only ranks ``i`` and ``j`` receive."""
    a, b = (i, j) if i <= j else (j, i)
    msg = _PAIR_LABEL + struct.pack(">III", world_size, a, b)
    return hmac.new(operator_secret, msg, hashlib.sha256).digest()


def deployment_id(operator_secret: bytes, world_size: int) -> str:
    """A public fingerprint (16 hex chars) of the deployment: same secret and world size."""
    msg = _DEPLOYMENT_LABEL + struct.pack(">I", world_size)
    return hmac.new(operator_secret, msg, hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True, repr=False)
class RankCredentials:
    """What one rank holds: its pair keys ``keys[j] = K(rank, j)`` (``None`` at ``rank``)."""

    rank: int
    world_size: int
    deployment: str
    keys: tuple

    def __post_init__(self):
        _check_world(self.rank, self.world_size)
        if type(self.deployment) is not str or not 1 <= len(self.deployment) <= 64:
            raise errors.ConfigError("deployment id must be a str of 1..64 chars")
        keys = tuple(self.keys)
        if len(keys) != self.world_size:
            raise errors.ConfigError(f"credentials hold {len(keys)} keys for a world of {self.world_size}")
        for j, k in enumerate(keys):
            if j == self.rank:
                if k is not None:
                    raise errors.ConfigError(f"credentials of rank {self.rank} hold a key for itself")
            elif type(k) is not bytes or len(k) != KEY_BYTES:
                raise errors.ConfigError(f"key for rank {j} must be {KEY_BYTES} bytes")
        object.__setattr__(self, "keys", keys)

    def __repr__(self) -> str:  # never print keys
        return f"RankCredentials(rank={self.rank}, world_size={self.world_size}, deployment={self.deployment!r})"

    @classmethod
    def derive(cls, operator_secret: bytes, rank: int, world_size: int) -> "RankCredentials":
        """Rank ``rank``'s credentials (the launcher's side, or the legacy/dev mode)."""
        secret = _check_operator_secret(operator_secret)
        _check_world(rank, world_size)
        keys = tuple(None if j == rank else pair_key(secret, world_size, rank, j) for j in range(world_size))
        return cls(rank, world_size, deployment_id(secret, world_size), keys)

    def key(self, peer: int) -> bytes:
        """``K(rank, peer)``; :class:`errors.BadRank` for a rank outside the world or itself."""
        if type(peer) is not int or not 0 <= peer < self.world_size or peer == self.rank:
            raise errors.BadRank(f"rank {self.rank} holds no key for rank {peer!r}")
        return self.keys[peer]

    # ------------------------------------------------------------------ files
    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "rank": self.rank, "world_size": self.world_size,
                           "deployment": self.deployment,
                           "keys": [None if k is None else k.hex() for k in self.keys]})

    @classmethod
    def from_json(cls, text: str, *, source: str = "credentials") -> "RankCredentials":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise errors.ConfigError(f"{source}: not JSON ({e})") from None
        if type(obj) is not dict or obj.get("format") != FORMAT:
            raise errors.ConfigError(f"{source}: not a byzsgd credentials file (format must be {FORMAT!r})")
        rank, world, dep, keys = obj.get("rank"), obj.get("world_size"), obj.get("deployment"), obj.get("keys")
        if type(keys) is not list:
            raise errors.ConfigError(f"{source}: 'keys' must be a list")
        out = []
        for j, k in enumerate(keys):
            if k is None:
                out.append(None)
                continue
            if type(k) is not str or len(k) != 2 * KEY_BYTES:
                raise errors.ConfigError(f"{source}: key {j} must be {2 * KEY_BYTES} hex chars")
            try:
                out.append(bytes.fromhex(k))
            except ValueError:
                raise errors.ConfigError(f"{source}: key {j} is not hex") from None
        try:
            return cls(rank, world, dep, tuple(out))
        except errors.ConfigError as e:
            raise errors.ConfigError(f"{source}: {e}") from None

    def save(self, path) -> Path:
        """Write atomically, mode 0600 (created so, never widened by the umask's absence)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(self.to_json())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    @classmethod
    def load(cls, path, *, rank: int | None = None, world_size: int | None = None) -> "RankCredentials":
        """Read and validate a credentials file; refuse one readable by group or others, and
        (when given) one for another rank or world size.  :class:`errors.ConfigError` on any
        problem, with the path in the message."""
        path = Path(path)
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as e:
            raise errors.ConfigError(f"cannot open the credentials file {path}: {e.strerror or e}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise errors.ConfigError(f"the credentials file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise errors.ConfigError(f"the credentials file {path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
                        f"chmod 600 it")
            if st.st_size > _MAX_FILE_BYTES:
                raise errors.ConfigError(f"the credentials file {path} is too large ({st.st_size} bytes)")
            with os.fdopen(fd, "rb") as fh:
                fd = None
                data = fh.read(_MAX_FILE_BYTES + 1)
        finally:
            if fd is not None:
                os.close(fd)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise errors.ConfigError(f"the credentials file {path} is not UTF-8") from None
        cred = cls.from_json(text, source=str(path))
        if rank is not None and cred.rank != rank:
            raise errors.ConfigError(f"the credentials file {path} is for rank {cred.rank}, this node is rank {rank}")
        if world_size is not None and cred.world_size != world_size:
            raise errors.ConfigError(f"the credentials file {path} is for a world of {cred.world_size}, this one has {world_size}")
        return cred


def derive(operator_secret: bytes, rank: int, world_size: int) -> RankCredentials:
    """Shorthand for :meth:`RankCredentials.derive`."""
    return RankCredentials.derive(operator_secret, rank, world_size)


def credentials_path(directory, rank: int) -> Path:
    """Where :func:`provision` puts rank ``rank``'s file."""
    return Path(directory) / f"rank{rank}.cred"


def provision(operator_secret: bytes, world_size: int, directory) -> list[Path]:
    """The launcher's side: one 0600 credentials file per rank in ``directory`` (created 0700
    if missing; refused if it is group/other-accessible).  Returns the paths, by rank.  The
    operator secret itself is never written."""
    secret = _check_operator_secret(operator_secret)
    _check_world(0, world_size)
    d = Path(directory)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(d.stat().st_mode)
    except OSError as e:
        raise errors.ConfigError(f"cannot create the credentials directory {d}: {e.strerror or e}") from None
    if mode & 0o077:
        raise errors.ConfigError(f"the credentials directory {d} is accessible by others (mode {mode:04o}); "
                                 f"use a fresh directory or chmod 700 it")
    return [derive(secret, r, world_size).save(credentials_path(d, r)) for r in range(world_size)]


_MAX_CHILD_REPORT = 4096


def provision_in_child(world_size: int, directory) -> list[Path]:
    """:func:`provision` from a fresh operator secret, both drawn and used in a short-lived
    forked child: the calling process never holds the secret nor any key, not even in memory it
    has freed (Python cannot scrub ``bytes``), so the nodes it forks afterwards inherit none of
    them.  The caller must not read the files either.  Returns the paths, by rank; a failure
    comes back as :class:`errors.ConfigError` with the child's message.  Without ``os.fork``
    (where nodes are never forked) it provisions in this process."""
    _check_world(0, world_size)
    paths = [credentials_path(directory, r) for r in range(world_size)]
    if not hasattr(os, "fork"):
        provision(secrets.token_bytes(32), world_size, directory)
        return paths
    rfd, wfd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without returning into the caller's code
        code = 1
        try:
            os.close(rfd)
            try:
                provision(secrets.token_bytes(32), world_size, directory)
                code = 0
            except errors.ConfigError as exc:
                os.write(wfd, str(exc).encode("utf-8", "replace")[:_MAX_CHILD_REPORT])
            except BaseException as exc:  # noqa: BLE001 - an OSError writing a file, a signal
                os.write(wfd, f"cannot provision the credentials in {directory}: {type(exc).__name__}: "
                              f"{exc}".encode("utf-8", "replace")[:_MAX_CHILD_REPORT])
        finally:
            os._exit(code)
    os.close(wfd)
    try:
        report = b""
        while chunk := os.read(rfd, _MAX_CHILD_REPORT):  # EOF: the child has exited
            report += chunk
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise errors.ConfigError(report.decode("utf-8", "replace") or
                                 f"the process provisioning the credentials in {directory} died (exit {code})")
    return paths
