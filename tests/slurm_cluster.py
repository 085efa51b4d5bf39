"""A real, one-node SLURM cluster for the tests: munged + slurmctld + slurmd, as root.

:class:`SlurmCluster` writes everything under one private directory (slurm.conf, the munge
key and socket, spool and state directories, the daemons' logs), starts the three daemons
on ports of their own (nothing of the machine's /etc/slurm or /run/munge is used or
changed), waits until ``sinfo`` shows the node idle, and stops them (and every job) at the
end.  The node is named after ``hostname -s`` and declares ``CPUS`` CPUs whatever the machine
has (``SlurmdParameters=config_overrides``), so an 11-task job fits on a 2-core machine.

Needs root and Debian's packages ``slurmctld slurmd slurm-client munge`` (``apt-get install
--no-install-recommends``, ~45 s; :func:`ensure_installed` does it when allowed).
:func:`unavailable` says why a cluster cannot be had here, or None.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scancel")
INSTALL_ENV = "BYZSGD_SLURM_INSTALL"
CPUS = 16


def _missing() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def ensure_installed() -> str | None:
    """Install the packages with apt-get when they are missing and ``$BYZSGD_SLURM_INSTALL=1``
    (or ``CI`` is set); returns why SLURM is not available, or None."""
    if not _missing():
        return None
    allowed = os.environ.get(INSTALL_ENV, "").strip() == "1" or \
        os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    if not allowed:
        return (f"SLURM not installed ({', '.join(_missing())} missing); set {INSTALL_ENV}=1 to "
                f"let the tests apt-get install {' '.join(PACKAGES)}")
    if os.geteuid() != 0:
        return "SLURM not installed and installing it needs root"
    if shutil.which("apt-get") is None:
        return "SLURM not installed and apt-get is not available to install it"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:  # a stale package index: update once, then again
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return "apt-get install of SLURM timed out"
    if r.returncode != 0 or _missing():
        return f"apt-get install {' '.join(PACKAGES)} failed: {(r.stderr or r.stdout)[-500:]}"
    return None


def unavailable() -> str | None:
    """Why a SLURM cluster cannot be started here (None when it can)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "a one-node SLURM cluster needs root (slurmd runs jobs as their users)"
    return ensure_installed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """``with SlurmCluster() as c: c.run(["sbatch", ...])``: a private one-node cluster."""

    def __init__(self, cpus: int = CPUS, base: str | None = None):
        self.cpus = cpus
        self.dir = Path(tempfile.mkdtemp(prefix="byzsgd-slurm-", dir=base))
        os.chmod(self.dir, 0o755)
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket.2"
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in list(self.env):  # not inside any outer allocation
            if var.startswith("SLURM_") and var != "SLURM_CONF":
                del self.env[var]

    # -- set-up ------------------------------------------------------------------------
    def _write(self) -> None:
        d = self.dir
        for sub in ("munge", "state", "spool", "log"):
            (d / sub).mkdir(mode=0o700, exist_ok=True)
        key = d / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(f"""\
ClusterName=byzsgdtest
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=byzsgd Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")

    def _spawn(self, cmd: list[str], name: str) -> subprocess.Popen:
        log = open(self.dir / "log" / f"{name}.out", "ab")
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.procs.append(p)
        return p

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        self._write()
        d = self.dir
        self._spawn([_sbin("munged"), "--foreground", "--force",
                     f"--key-file={d}/munge/munge.key", f"--socket={self.munge_socket}",
                     f"--pid-file={d}/munge/munged.pid", f"--log-file={d}/log/munged.log",
                     f"--seed-file={d}/munge/munged.seed"], "munged")
        self._wait(lambda: self.munge_socket.exists(), 15, "munged did not create its socket")
        self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], "slurmctld")
        self._spawn([_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.host], "slurmd")
        self._wait(self._idle, timeout, "the node did not become idle")
        return self

    def _idle(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
        return r.returncode == 0 and any(line.split()[1:] == ["idle"]
                                         for line in r.stdout.splitlines() if line.strip())

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(tail))
        return "\n".join(out)

    # -- use ---------------------------------------------------------------------------
    def run(self, cmd: list[str], *, check: bool = True, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True,
                           text=True, timeout=timeout, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}\n{self.logs()}")
        return r

    def job_state(self, job: str) -> str | None:
        """The job's state (PENDING, RUNNING, COMPLETED, CANCELLED, ...), None when unknown."""
        r = self.run(["scontrol", "show", "job", job], check=False, timeout=15)
        for word in r.stdout.split():
            if word.startswith("JobState="):
                return word.split("=", 1)[1]
        return None

    def wait_job(self, job: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", None):
                return state
            time.sleep(1.0)
        return state

    # -- tear-down ---------------------------------------------------------------------
    def stop(self) -> None:
        self.run(["scancel", "--full", "--user", "root"], check=False, timeout=15)
        for p in reversed(self.procs):  # slurmd, slurmctld, munged
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()
        self.procs.clear()

    def __enter__(self) -> "SlurmCluster":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
