"""What runs on each host of a multi-host deployment, as ``sh`` text.

:func:`start_script` (the host's directories, the credentials of *its* ranks only, the TLS
files, each rank's configuration as JSON, then the ranks, started from those files: under
``--spawn fork``, on a Linux host, one fork server that forks them all
(:mod:`byzsgd.deploy.fork_server`); else one wrapped interpreter per rank, :data:`WRAPPER`),
:func:`status_script` and :func:`kill_script`: each is
written to the stdin of the runner (``ssh HOST sh -s`` by default, see
:mod:`byzsgd.deploy.cluster`), so nothing secret is ever on a command line.  Also the rule by
which a host picks its interpreter (:data:`PY_PICK`; the default one is
:func:`byzsgd.deploy.plan.default_python`).  The scripts render a :class:`~byzsgd.deploy.plan.Plan`:
this module imports the plan, never the reverse.
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from byzsgd.deploy.plan import FORK_SERVER_COMMAND, NODE_COMMAND, Host, Plan, Rank, default_python
from byzsgd.device import LOCAL_INDEX_ENV
from byzsgd.net.credentials import credentials_path

RUN_ID_ENV = "BYZSGD_RUN_ID"


def q(value: Any) -> str:
    return shlex.quote(str(value))


# ----------------------------------------------------------------------------- scripts
PY_PICK = """\
if [ -n "$PYSEL" ]; then PY=$PYSEL
elif [ -x "$REPO/.venv/bin/python" ]; then PY=$REPO/.venv/bin/python
else PY=python3; fi
command -v "$PY" >/dev/null 2>&1 || { echo "byzsgd-error: no python '$PY' on $(hostname)"; exit 3; }
cd "$REPO" || { echo "byzsgd-error: no byzsgd checkout at '$REPO' on $(hostname)"; exit 3; }
"""

#: fail fast, naming the interpreter and the module, when a host's python cannot run a node
#: (otherwise every rank dies at import and the run fails in its summary)
PY_PROBE = """\
miss=$(PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c '
import importlib
for m in ("msgpack", "numpy", "torch", "byzsgd.net"):
    try:
        importlib.import_module(m)
    except Exception as e:
        print(m + " (" + type(e).__name__ + ": " + str(e) + ")")
        break
' 2>&1) || miss="? (the interpreter failed: $miss)"
[ -z "$miss" ] || { echo "byzsgd-error: $(hostname): $PY cannot import $miss"; exit 3; }
"""

def python_rule(host: Host, runner: str) -> str:
    """What ``--dry_run`` prints: the interpreter a host will use, or the rule it follows."""
    return host.python or default_python(runner) or "<repo>/.venv/bin/python if present, else python3"


#: the per-rank wrapper: own session, exact trainer pid, exit code kept
#: (a signal to the wrapper is passed on to the trainer, and the wrapper stays to record its exit).
#: A forked rank keeps the same files (byzsgd.deploy.fork_server): <stem>.pgid and .pid once it
#: runs, .rc (its $?) once it ended, output appended to <stem>.log.  Each file is written
#: whole then renamed, so a reader (kill.sh, the fault injector, a test) never sees it empty.
WRAPPER = ('echo $$ > "$1.pgid.tmp" && mv -f "$1.pgid.tmp" "$1.pgid"; s=$1; shift; "$@" & c=$!; '
           'echo $c > "$s.pid.tmp" && mv -f "$s.pid.tmp" "$s.pid"; '
           'trap \'kill -TERM $c 2>/dev/null\' TERM INT HUP; wait $c; rc=$?; '
           'while kill -0 $c 2>/dev/null; do wait $c; rc=$?; done; '
           'echo $rc > "$s.rc.tmp" && mv -f "$s.rc.tmp" "$s.rc"')


def start_script(plan: Plan, ranks: list[Rank], secret: str | None, probe: str, redact: bool = False,
                 creds: dict[int, str] | None = None) -> str:
    """The script a host runs (on its stdin): its directories, the credentials files of *its*
    ranks only (``creds``: rank -> file text; or the shared ``secret`` under
    --insecure_shared_secret), the TLS files, each rank's configuration (its JSON, a file
    beside its log), then the ranks, started from those files: one fork server for them all
    (``plan.spawn == "fork"`` on a Linux host), else one wrapped interpreter each."""
    host = ranks[0].host
    dirs = sorted({r.dir for r in ranks})
    lines = ["set -u", "umask 077"]
    for d in dirs:
        lines.append(f"mkdir -p {q(d)} || {{ echo 'byzsgd-error: cannot create {d}'; exit 3; }}")
        if secret is not None:
            # printf is a shell builtin: the secret is never on a command line
            lines.append(f"printf '%s\\n' {q('<secret>' if redact else secret)} > {q(d + '/secret')}")
        for k, path in plan.tls.items():
            text = "<pem>" if redact else Path(path).read_text()
            lines.append(f"printf '%s' {q(text)} > {q(d + '/' + k.replace('_', '-') + '.pem')}")
        lines.append(f": > {q(d + '/.probe-' + probe)}")
    shipped = ranks if (creds is not None or (redact and not plan.insecure)) else []
    for r in shipped:
        cdir = plan.cred_dir(r)
        path = str(credentials_path(cdir, r.rank))
        text = "<credentials of rank %d>" % r.rank if redact else creds[r.rank]
        # a fresh 0600 file (rm first: '>' would keep an older file's mode), 0700 directory
        lines.append(f"mkdir -p {q(cdir)} && chmod 700 {q(cdir)} && rm -f {q(path)} && "
                     f"printf '%s' {q(text)} > {q(path)} || "
                     f"{{ echo 'byzsgd-error: cannot write the credentials of rank {r.rank} in {cdir}'; exit 3; }}")
    lines += [f"REPO={q(host.repo)}", f"PYSEL={q(host.python or '')}", PY_PICK.rstrip()]
    env = (f"{RUN_ID_ENV}={q(plan.run_id)} OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1 "
           f"PYTHONPATH=\"$REPO${{PYTHONPATH:+:$PYTHONPATH}}\"")
    for r in ranks:
        stem = q(r.dir + "/" + r.stem)
        lines.append(f"rm -f {stem}.pid {stem}.pgid {stem}.rc")
        lines.append(f"printf '%s\\n' {q(r.config.to_json())} > {q(r.remote_config)} || "
                     f"{{ echo 'byzsgd-error: cannot write the configuration of rank {r.rank}'; exit 3; }}")
    # a rank's local index on this host (--device auto): its position; the fork server sets it
    # for each rank it forks the same way
    envs = [f"{env} {LOCAL_INDEX_ENV}={local}" for local in range(len(ranks))]
    if plan.spawn == "fork":
        log = server_log(ranks)
        lines += ['srv=', 'if [ "$(uname -s)" = Linux ]; then',
                  f"{env} setsid \"$PY\" {' '.join(FORK_SERVER_COMMAND)} "
                  + f" {NEXT} ".join(f"{q(r.dir + '/' + r.stem)} {q(r.remote_config)}" for r in ranks)
                  + f" < /dev/null >> {q(log)} 2>&1 &",
                  'srv=$!; echo "byzsgd-server $srv"', "else", *_exec_lines(ranks, envs), "fi", RUNNING]
        patience = 2000  # the server imports torch before it forks: up to 100 s
    else:
        lines += _exec_lines(ranks, envs) + ["srv="]
        patience = 200
    # report the exact pids once every wrapper (or the fork server) wrote them
    lines.append("n=0")
    wait_for = " ".join(f"{q(r.remote('.pid'))} {q(r.remote('.pgid'))}" for r in ranks)
    lines.append(f"for f in {wait_for}; do while [ ! -s \"$f\" ] && [ $n -lt {patience} ] && "
                 f"{{ [ -z \"$srv\" ] || running $srv; }}; do sleep 0.05; n=$((n+1)); done; done")
    if plan.spawn == "fork":  # a server gone before its ranks ran: say why, as the probe would
        lines.append(f"if [ -n \"$srv\" ] && ! running $srv && [ ! -s {q(ranks[-1].remote('.pid'))} ]; "
                     f"then\n{PY_PROBE.rstrip()}\necho \"byzsgd-error: $(hostname): the fork server "
                     f"exited before it started every rank: $(tail -n 5 {q(log)} | tr '\\n' ' ')\"; "
                     f"exit 3; fi")
    for r in ranks:
        lines.append(f"echo \"byzsgd-rank {r.rank} $(cat {q(r.remote('.pid'))} 2>/dev/null || echo -) "
                     f"$(cat {q(r.remote('.pgid'))} 2>/dev/null || echo -)\"")
    return "\n".join(lines) + "\n"


#: the word between two ranks on the fork server's command line: byzsgd.deploy.fork_server.NEXT
#: (not imported: the fork server reaches this module through the node's checks)
NEXT = "--next"
#: ``running PID``: a live process, not a zombie (the fork server is a child of the script)
RUNNING = ('running() { s=$(sed -n \'s/^.*) \\([A-Za-z]\\) .*$/\\1/p\' /proc/$1/stat 2>/dev/null); '
           '[ -n "$s" ] && [ "$s" != Z ] && [ "$s" != X ]; }')


def server_log(ranks: list[Rank]) -> str:
    """The fork server's own log on its host: beside its first rank's (forkserver-<stem>.log)."""
    return f"{ranks[0].dir}/forkserver-{ranks[0].stem}.log"


def _exec_lines(ranks: list[Rank], envs: list[str]) -> list[str]:
    """One wrapped interpreter per rank (``--spawn exec``, or a host that is not Linux), each
    with its environment (``envs``, in rank order)."""
    lines = [PY_PROBE.rstrip()]
    for r, env in zip(ranks, envs):
        stem = q(r.dir + "/" + r.stem)
        lines.append(f"{env} setsid sh -c {q(WRAPPER)} byzsgd-rank {stem} \"$PY\" "
                     + " ".join(q(a) for a in (*NODE_COMMAND, r.remote_config))
                     + f" < /dev/null >> {q(r.remote('.log'))} 2>&1 &")
    return lines


def _ours(run_id: str) -> str:
    """Shell functions: ``ours PID`` -- is PID (still) a process of this run?  ``members`` --
    every pid of this run on the host (one grep over /proc/*/environ, no per-process fork)."""
    marker = q(RUN_ID_ENV + "=" + run_id)
    return (f"ours() {{ grep -qzx {marker} /proc/$1/environ 2>/dev/null; }}\n"
            f"members() {{ grep -lzx {marker} /proc/[0-9]*/environ 2>/dev/null | "
            "sed -n 's|^/proc/\\([0-9]*\\)/environ$|\\1|p'; }")


def status_script(run_id: str, ranks: list[dict]) -> str:
    lines = ["set -u", _ours(run_id)]
    for r in ranks:
        stem = q(f"{r['remote_dir']}/{r['role']}{r['rank']}")
        lines.append(f"pg=$(cat {stem}.pgid 2>/dev/null || echo {r.get('pgid') or 0}); alive=0; "
                     f"[ \"$pg\" -gt 0 ] 2>/dev/null && ours \"$pg\" && alive=1; "
                     f"rc=$(cat {stem}.rc 2>/dev/null || echo -); "
                     f"echo \"byzsgd-status {r['rank']} $alive ${{rc:--}}\"")
        if r.get("remote_metrics"):
            lines.append(f"tail -n 1 {q(r['remote_metrics'])} 2>/dev/null | sed 's/^/byzsgd-metric {r['rank']} /'")
    return "\n".join(lines) + "\n"


def kill_script(run_id: str, ranks: list[dict], grace: float) -> str:
    """SIGTERM each rank's process group, SIGKILL what is left after ``grace``; report."""
    lines = ["set -u", _ours(run_id), "groups="]
    for r in ranks:
        stem = q(f"{r['remote_dir']}/{r['role']}{r['rank']}")
        lines.append(f"for p in $(cat {stem}.pgid 2>/dev/null) {r.get('pgid') or ''} "
                     f"$(cat {stem}.pid 2>/dev/null) {r.get('pid') or ''}; do "
                     f"ours $p && {{ groups=\"$groups {r['rank']}:$p\"; break; }}; done")
    lines.append("""\
# SIGTERM to each rank's process group: the trainer stops cleanly (closes its connections)
for g in $groups; do p=${g#*:}; kill -TERM -$p 2>/dev/null || kill -TERM $p 2>/dev/null; done
# (a process that exited but is not reaped yet has no environ: members skips zombies)
n=0
while [ -n "$(members)" ] && [ $n -lt %d ]; do sleep 0.1; n=$((n+1)); done
# SIGKILL whatever of this run is left on the host (the groups, and any stray process that
# carries the run's id: a rank restarted by hand, a child that left its group)
for g in $groups; do kill -KILL -${g#*:} 2>/dev/null; done
for p in $(members); do kill -KILL $p 2>/dev/null; done
n=0
while [ -n "$(members)" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n+1)); done
echo "byzsgd-killed $groups"
echo "byzsgd-left" $(members)
""" % max(1, int(grace * 10)))
    return "\n".join(lines) + "\n"
