"""One-machine launcher: a whole ByzSGD deployment on loopback — ``python -m byzsgd.launch``.

Parses the flags into a :class:`~byzsgd.deploy.options.LaunchConfig`, validates it (nothing
starts when a node would refuse it), starts every node (:mod:`byzsgd.deploy.local`), shows
progress, and prints and writes the summary (:mod:`byzsgd.deploy.summary`): its outcome says
whether the run finished, failed (which rank, why) or was killed (by whom).  Children are
cleaned up on Ctrl-C, SIGTERM or when a correct node fails.

``run.json`` in the run directory records the launcher's flags, interpreter and package:
``byzsgd-launch --resume RUN_DIR`` continues a killed run from its newest checkpoint (long runs
checkpoint into ``RUN_DIR/checkpoints`` by default, see :func:`with_checkpoints`), and a
fault injector's restart runs the same code.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from byzsgd import rundir
from byzsgd.deploy import preflight
from byzsgd.deploy.tee import Ps0Tee
from byzsgd.deploy import summary as runsum
from byzsgd.device import mapping as device_mapping
from byzsgd.deploy.local import (Deployment, monitor, plan, start, stop_all, stop_restarted,
                                 summarize)
from byzsgd.deploy.options import LaunchConfig
from byzsgd.errors import ByzSGDError, ConfigError


# -- checkpoints and resume ------------------------------------------------------------
#: a run of at least this many steps checkpoints into its run directory by default
LONG_RUN_STEPS = 500
#: ... every this many steps (each PS keeps its 2 newest).  Measured on the main job's model
#: (MNIST convnet, 21,840 parameters, 7 worker-momentum rows; loaded 2-core box): one save
#: (~0.5 MB, written, fsynced, renamed) takes ~30 ms against a ~0.2 s step, i.e. ~0.15% of
#: the run at one save per 100 steps; a kill loses at most 100 steps.
CHECKPOINT_EVERY = 100


def with_checkpoints(lc: LaunchConfig) -> LaunchConfig:
    """``lc`` with its run directory fixed and, for a long run (``--num_iter`` >=
    LONG_RUN_STEPS) or one that asked for ``--checkpoint_every`` without a
    ``--checkpoint_dir``, checkpoints (every CHECKPOINT_EVERY steps unless asked otherwise)
    into ``RUN_DIR/checkpoints``: what ``--resume RUN_DIR`` continues from."""
    run_dir = lc.run_dir or str(Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    cfg = lc.run
    if cfg.checkpoint_dir is None and (cfg.num_iter >= LONG_RUN_STEPS or cfg.checkpoint_every):
        cfg = dataclasses.replace(cfg, checkpoint_dir=str(rundir.checkpoint_dir(Path(run_dir).resolve())),
                                  checkpoint_every=cfg.checkpoint_every or CHECKPOINT_EVERY)
    return dataclasses.replace(lc, run_dir=run_dir, run=cfg)


def resume_config(run_dir: str, extra: list[str] = ()) -> LaunchConfig:
    """The configuration that continues the run of ``run_dir`` (killed or failed): its
    launcher flags (``run.json``), then ``extra`` flags, each PS resuming from the newest
    checkpoint all PSes have.  ConfigError when the run cannot be resumed."""
    path = Path(run_dir).resolve()
    record = rundir.read_run_record(path)
    if not isinstance(record.get("argv"), list):
        raise ConfigError(f"{path} holds no launcher record ({rundir.RUN}): not a run of byzsgd-launch")
    lc = LaunchConfig.from_argv([*record["argv"], *extra])
    ckpt = lc.run.checkpoint_dir or str(rundir.checkpoint_dir(path))
    if not any(Path(ckpt).glob("ckpt-r*-s*.pt")):
        raise ConfigError(f"{path}: no checkpoint in {ckpt} to resume from (runs of fewer than "
                          f"{LONG_RUN_STEPS} steps checkpoint only with --checkpoint_dir/--checkpoint_every)")
    cfg = dataclasses.replace(lc.run, checkpoint_dir=ckpt, resume=True,
                              checkpoint_every=lc.run.checkpoint_every or CHECKPOINT_EVERY)
    return dataclasses.replace(lc, run_dir=str(path), run=cfg)


def _live_ranks(dep: Deployment) -> list[int]:
    return [n.rank for n in dep.nodes if n.proc is not None and n.proc.poll() is None]


def _write_exit_codes(dep: Deployment, summary: dict) -> None:
    """``<role><rank>.rc`` of each node: its exit code as the summary reports it (128 + the
    signal for a rank a stop killed), as ``run_exp.sh``'s ranks leave theirs."""
    for n in dep.nodes:
        code = summary["returncodes"].get(str(n.rank))
        if code is not None:
            rundir.rank_file(dep.run_dir, n.role, n.rank, "rc").write_text(f"{code}\n")


def run(lc: LaunchConfig) -> int:
    # -- pre-start validation (byzsgd.deploy.preflight): one line, exit 2, no run directory
    preflight.check_launch(lc)
    record = dict(launcher="byzsgd.launch", argv=lc.to_argv())  # before the defaults below
    lc = with_checkpoints(lc)
    dep = plan(lc)
    rundir.clear_stop(dep.run_dir)  # a resumed run goes on
    rundir.write_run_record(dep.run_dir, **record)
    byz = [f"{n.role}{n.rank}({n.attack})" for n in dep.nodes if n.byzantine]
    defence = "".join([f" after pre_agg={dep.cfg.pre_agg}" if dep.cfg.pre_agg not in ("", "none") else "",
                       f", worker_momentum={dep.cfg.worker_momentum}" if dep.cfg.worker_momentum else ""])
    mode = f"{dep.cfg.mode} mode"
    if dep.cfg.mode == "paper":  # the gather period, resolved (``auto``: from lr and l)
        mode += f" (T={dep.cfg.gather_every}{', auto' if dep.cfg.gather_period == 'auto' else ''})"
    print(f"byzsgd: {dep.cfg.num_ps} PS (fps={dep.cfg.fps}) + {dep.cfg.num_workers} workers "
          f"(fw={dep.cfg.fw}), gar={dep.cfg.gar}{defence}, {mode}, {dep.cfg.dataset}/{dep.cfg.model}, "
          f"{dep.cfg.num_iter} steps; run dir {dep.run_dir}", file=sys.stderr)
    print(f"byzsgd: Byzantine nodes: {', '.join(byz) if byz else 'none'}", file=sys.stderr)
    if lc.schedule == "adversarial":
        print(f"byzsgd: TEST HARNESS --schedule adversarial: every PS plays the network adversary "
              f"(workers {', '.join(map(str, lc.byzantine_worker_ranks()))} first in every gradient "
              f"quorum, the correct gradients leaked to them)", file=sys.stderr)
    print(f"byzsgd: --device {dep.cfg.device}: {device_mapping(dep.cfg.device, range(dep.cfg.world_size))}",
          file=sys.stderr)
    interrupted = False

    def _terminate(signum, frame):  # SIGTERM (kill, timeout): clean up like Ctrl-C
        rundir.record_stop(dep.run_dir, "signal", signal="SIGTERM")  # unless kill.sh named itself
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    tee = Ps0Tee.start_for(dep, lc)  # -- terminal tee: PS 0's --bench / --log lines, "[ps0] ..."
    try:
        start(dep, lc.spawn)
        outcome = monitor(dep, quiet=lc.quiet, timeout=lc.timeout)
        if outcome == "ok":
            # Correct workers leave once every PS said done; give them a moment.
            deadline = time.monotonic() + 10
            for n in dep.correct:
                try:
                    n.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
    except KeyboardInterrupt:
        interrupted, outcome = True, "interrupted"
        rundir.record_stop(dep.run_dir, "signal", signal="SIGINT")  # no-op after SIGTERM's record
    finally:
        stopped = _live_ranks(dep)  # what the stop below kills (not a finished run's leftovers)
        stop_all(dep)
        if tee is not None:
            tee.stop()
        stop_restarted(dep)
        dep.write_description()
    if not lc.quiet and sys.stderr.isatty():
        print(file=sys.stderr)
    summary = summarize(dep, outcome)
    runsum.apply_outcome(summary, dep.run_dir, outcome, stopped_ranks=() if outcome == "ok" else stopped,
                         faulty=set(summary.get("faulty_ranks") or ()) - set(summary.get("restarted_ranks") or ()))
    _write_exit_codes(dep, summary)
    rundir.write_summary(dep.run_dir, summary)
    runsum.print_summary(summary, "byzsgd")
    diam = summary.get("diameter")
    if diam and diam["measured"]:
        print(f"byzsgd: correct PSes' diameter: mean {diam['mean_before']:.4g} before a gather, "
              f"{diam['mean_after']:.4g} after; shrank at {diam['shrank']} of the {diam['measured']} "
              f"gathers measured ({dep.run_dir / 'diameters.json'})", file=sys.stderr)
    if outcome.startswith("failed"):
        rank = int(outcome.split(":")[1])
        node = dep.nodes[rank]
        print(f"byzsgd: {node.role} {rank} failed (exit {node.returncode}); its log: {node.log_path}",
              file=sys.stderr)
        runsum.print_log_tail(node.log_path)
    if lc.json:
        print(json.dumps(summary))
    if interrupted:
        return 130
    return 0 if outcome == "ok" else 1


def deploy(argv: list[str] | LaunchConfig) -> dict:
    """Run one whole deployment, in this process (nodes are forked from it, so torch is
    imported once for many deployments); returns its summary.  For benchmarks and harnesses:
    launcher flags or a :class:`LaunchConfig`.  Raises ByzSGDError for a configuration
    refused at start."""
    lc = argv if isinstance(argv, LaunchConfig) else LaunchConfig.from_argv(list(argv))
    lc = dataclasses.replace(lc, quiet=True)
    if not lc.run_dir:
        raise ConfigError("deploy() needs --run_dir")
    run(lc)
    return rundir.read_summary(lc.run_dir)


def build_parser():
    """The launcher's flags (generated from :class:`LaunchConfig` and RunConfig)."""
    return LaunchConfig.parser()


def _resume_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--resume RUN_DIR`` (a directory, not the nodes' ``--resume true|false``): the run
    directory and the other flags."""
    for i, word in enumerate(argv):
        value = word.partition("=")[2] if word.startswith("--resume=") else (
            argv[i + 1] if word == "--resume" and i + 1 < len(argv) else None)
        if value is not None and value.lower() not in ("true", "false", "1", "0", "yes", "no") \
                and Path(value).is_dir():
            return value, argv[:i] + argv[i + (1 if "=" in word else 2):]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    resume_dir, rest = _resume_argv(argv)
    if resume_dir is not None:
        try:
            return run(resume_config(resume_dir, rest))
        except ByzSGDError as exc:
            print(f"byzsgd.launch: error: {exc}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return run(LaunchConfig.from_args(args))
    except ByzSGDError as exc:
        print(f"byzsgd.launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
