"""What proves a node's rank to its peers: its credentials file, or the insecure shared secret.

Kept apart from the run configuration because it reads files and the environment (the
configuration is values only): :class:`~byzsgd.config.RunConfig` holds the paths and the
``--insecure_shared_secret`` switch, and asks :func:`load_identity` at start.  The file
format and the keys are :mod:`byzsgd.net.credentials`'.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

from byzsgd.errors import ConfigError

SECRET_ENV = "BYZSGD_SECRET"
SECRET_FILE_ENV = "BYZSGD_SECRET_FILE"
CREDENTIALS_ENV = "BYZSGD_CREDENTIALS"
INSECURE_DEFAULT_SECRET = b"byzsgd-public-default-secret"

log = logging.getLogger("byzsgd.config")


def shared_secret(secret_file: str | None) -> bytes:
    """The shared secret of ``--insecure_shared_secret``: --secret_file,
    $BYZSGD_SECRET_FILE or $BYZSGD_SECRET, else the public default (logged loudly)."""
    path = secret_file or os.environ.get(SECRET_FILE_ENV)
    if path:
        try:
            data = Path(path).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the secret file {path}: {exc}") from None
        if not data:
            raise ConfigError(f"the secret file {path} is empty")
        return data
    env = os.environ.get(SECRET_ENV)
    if env:
        return env.encode()
    log.warning("no shared secret given ($%s, $%s or --secret_file): using the PUBLIC default "
                "secret, so anybody who can reach the ports can join, as any rank", SECRET_ENV,
                SECRET_FILE_ENV)
    return INSECURE_DEFAULT_SECRET


def credentials_file(credentials: str | None) -> str | None:
    """--credentials, else $BYZSGD_CREDENTIALS (None: neither)."""
    return credentials or os.environ.get(CREDENTIALS_ENV) or None


def load_identity(*, rank: int, world_size: int, credentials: str | None,
                  insecure_shared_secret: bool, secret_file: str | None):
    """This rank's :class:`~byzsgd.net.RankCredentials`, loaded from ``credentials`` /
    $BYZSGD_CREDENTIALS and checked against the rank and the world size; or, with
    ``insecure_shared_secret`` only, the shared secret (bytes), logged loudly.  ConfigError
    when there is neither: a node never starts without a proof of its rank by accident."""
    from byzsgd.net.credentials import RankCredentials

    path = credentials_file(credentials)
    if insecure_shared_secret:
        if credentials is None and path:
            raise ConfigError(f"${CREDENTIALS_ENV} is set and --insecure_shared_secret true: "
                              f"choose one (unset ${CREDENTIALS_ENV})")
        secret = shared_secret(secret_file)
        log.warning("INSECURE: --insecure_shared_secret true: rank %d authenticates with a shared "
                    "secret; ranks are NOT proven (any holder of the secret can pose as any rank, "
                    "including this one)", rank)
        return secret
    if not path:
        raise ConfigError(
            f"no credentials: pass --credentials FILE (or set ${CREDENTIALS_ENV}) with this "
            f"rank's file; the launchers (python -m byzsgd.launch, scripts/run_exp.sh, "
            f"scripts/slurm_byzsgd.sbatch) provision one per rank.  To run with one shared "
            f"secret that proves membership but not rank, pass --insecure_shared_secret true")
    return RankCredentials.load(path, rank=rank, world_size=world_size)
