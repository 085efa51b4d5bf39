"""A real SLURM cluster for the tests: munged + slurmctld + slurmd, as root; one node, or
several nodes on this one machine (:class:`NetnsSlurmCluster`).

:class:`SlurmCluster` writes everything under one private directory (slurm.conf, the munge
key and socket, spool and state directories, the daemons' logs), starts the three daemons
on ports of their own (nothing of the machine's /etc/slurm or /run/munge is used or
changed), waits until ``sinfo`` shows the node idle, and stops them (and every job) at the
end.  The node is named after ``hostname -s`` and declares ``CPUS`` CPUs whatever the machine
has (``SlurmdParameters=config_overrides``), so an 11-task job fits on a 2-core machine.

Needs root and Debian's packages ``slurmctld slurmd slurm-client munge`` (``apt-get install
--no-install-recommends``, ~45 s; :func:`ensure_installed` does it when allowed).
:func:`unavailable` says why a cluster cannot be had here, or None.

:class:`NetnsSlurmCluster` runs K slurmd, each a node of its own: its own network namespace
and address (scripts/netns_cluster.sh's bridge and veths; slurmctld and munged stay in the
machine's namespace and reach them through an address on the bridge), its own host name (UTS
namespace) and its own mount namespace, where ``view`` (one path, the same for every node) is
that node's private directory (``nodes/<name>``): its spool, pid and log, and a node-local
disk for jobs (``view/tmp``).  No ``--enable-multiple-slurmd`` build is needed, and each node
is separate where it counts for a multi-node job: its address, its name, its local files.
"""
from __future__ import annotations

import atexit
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


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class SlurmCluster:
    """``with SlurmCluster() as c: c.run(["sbatch", ...])``: a private one-node cluster."""

    def __init__(self, cpus: int = CPUS, base: str | None = None):
        self.cpus = cpus
        self.dir = Path(tempfile.mkdtemp(prefix="byzsgd-slurm-", dir=base))
        os.chmod(self.dir, 0o755)
        self.host = socket.gethostname().split(".")[0]
        self.nodes = [self.host]
        self.ctl_addr = "127.0.0.1"
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
SlurmctldHost={self.host}({self.ctl_addr})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={d}/state
SlurmctldPidFile={d}/slurmctld.pid
SlurmctldLogFile={d}/log/slurmctld.log
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
{self._node_conf()}
PartitionName=byzsgd Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")

    def _node_conf(self) -> str:
        d = self.dir
        return f"""\
SlurmdSpoolDir={d}/spool
SlurmdPidFile={d}/slurmd.pid
SlurmdLogFile={d}/log/slurmd.log
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN"""

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
        self._start_nodes()
        self._wait(self._idle, timeout, "the nodes did not become idle")
        return self

    def _start_nodes(self) -> None:
        self._spawn([_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.host], "slurmd")

    def _idle(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
        r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
        idle = {line.split()[0] for line in r.stdout.splitlines() if line.split()[1:] == ["idle"]}
        return r.returncode == 0 and idle == set(self.nodes)

    def _wait(self, cond, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{what} within {timeout:.0f} s:\n{self.logs()}")

    def logs(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.dir / "log").glob("*")) + sorted(self.dir.glob("nodes/*/slurmd.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.relative_to(self.dir)}\n" + "\n".join(tail))
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
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


NETNS_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "netns_cluster.sh"

# In a node's namespaces: its private directory on ``view``, a hosts file that names every
# node, its host name, then slurmd.  (nsenter, not ``ip netns exec``: that one mounts a fresh
# /sys, without the cgroup file systems slurmd's cgroup plugin needs.)
_NODE_SH = """set -e
mount --bind "$1" "$2"
mount --bind "$3" /etc/hosts
hostname "$4"
exec "$5" -D -f "$6" -N "$4"
"""


def netns_unavailable() -> str | None:
    """Why a multi-node cluster (network namespaces) cannot be started here, or None."""
    why = unavailable()
    if why:
        return why
    missing = [t for t in ("ip", "nsenter", "unshare", "mount", "hostname")
               if shutil.which(t) is None]
    if missing:
        return f"a multi-node SLURM cluster needs {', '.join(missing)} (iproute2, util-linux)"
    return None


class NetnsSlurmCluster(SlurmCluster):
    """K nodes on this machine, each slurmd in network, UTS and mount namespaces of its own
    (see the module's docstring); ``node_dir(name)`` is what that node has at ``view``."""

    def __init__(self, nodes: int = 3, cpus: int = 4, base: str | None = None):
        super().__init__(cpus=cpus, base=base)
        tag = os.getpid() % 10000  # concurrent sessions do not share namespaces or subnets
        self.prefix = f"bs{tag}"
        self.subnet = f"10.78.{tag % 250}"
        self.nodes = [f"{self.prefix}{i}" for i in range(nodes)]
        self.addrs = [f"{self.subnet}.{i + 1}" for i in range(nodes)]
        self.ctl_addr = f"{self.subnet}.254"  # the bridge's address: slurmctld, for the nodes
        self.view = self.dir / "node"
        self.slurmd: dict[str, subprocess.Popen] = {}
        self._net_up = False

    def node_dir(self, name: str) -> Path:
        """Node ``name``'s private directory, from outside (what it has at ``view``)."""
        return self.dir / "nodes" / name

    def seen_by(self, name: str, path: Path) -> Path:
        """``path`` as node ``name`` sees it: through its slurmd's root, in its mount namespace
        (slurmd execs in place of nsenter, unshare and sh: the pid stays)."""
        return Path(f"/proc/{self.slurmd[name].pid}/root") / Path(path).relative_to("/")

    def _netns(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, BYZSGD_NETNS_PREFIX=self.prefix, BYZSGD_NETNS_SUBNET=self.subnet)
        r = subprocess.run(["bash", str(NETNS_SCRIPT), *args], env=env, capture_output=True,
                           text=True, timeout=120)
        if check and r.returncode != 0:
            raise RuntimeError(f"netns_cluster.sh {' '.join(args)}: {r.stderr.strip()[-500:]}")
        return r

    def _node_conf(self) -> str:
        v = self.view
        lines = [f"NodeName={n} NodeAddr={a} CPUs={self.cpus} State=UNKNOWN"
                 for n, a in zip(self.nodes, self.addrs)]
        return "\n".join([f"SlurmdSpoolDir={v}/spool", f"SlurmdPidFile={v}/slurmd.pid",
                          f"SlurmdLogFile={v}/slurmd.log", f"TmpFS={v}/tmp", *lines])

    def _start_nodes(self) -> None:
        self._net_up = True
        atexit.register(self._teardown_net)  # even if the session is interrupted
        self._netns("up", str(len(self.nodes)))
        br = f"{self.prefix}br"
        r = subprocess.run(["ip", "addr", "replace", f"{self.ctl_addr}/24", "dev", br],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"cannot give {br} the address {self.ctl_addr}: {r.stderr}")
        self.view.mkdir(mode=0o755)  # a mount point, empty: each node binds its own here
        for name in self.nodes:
            (self.node_dir(name) / "spool").mkdir(mode=0o755, parents=True)
            (self.node_dir(name) / "tmp").mkdir()
            (self.node_dir(name) / "tmp").chmod(0o1777)
        hosts = self.dir / "hosts"
        hosts.write_text("127.0.0.1 localhost\n" + f"{self.ctl_addr} {self.host}\n" +
                         "".join(f"{a} {n}\n" for n, a in zip(self.nodes, self.addrs)))
        hosts.chmod(0o644)
        for name in self.nodes:
            self.slurmd[name] = self._spawn(
                ["nsenter", f"--net=/run/netns/{name}", "--",
                 "unshare", "--mount", "--uts", "--propagation", "private", "--",
                 "sh", "-c", _NODE_SH, "node", str(self.node_dir(name)), str(self.view),
                 str(hosts), name, _sbin("slurmd"), str(self.conf)], f"slurmd-{name}")

    def node_pids(self, name: str) -> list[int]:
        """Every process in node ``name``'s network namespace (its slurmd, steps, tasks)."""
        r = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                           timeout=30)
        return [int(w) for w in r.stdout.split() if w.isdigit()]

    def _teardown_net(self) -> None:
        """Kill what is left in our namespaces (by pid: they are all ours), then remove them."""
        if not self._net_up:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            left = [p for n in self.nodes for p in self.node_pids(n)]
            if not left:
                break
            for pid in left:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        self._netns("down", check=False)
        self._net_up = False

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self._teardown_net()
