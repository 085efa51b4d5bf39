"""One-machine launcher: a whole ByzSGD deployment on loopback — ``python -m byzsgd.launch``.

Parses the flags into a :class:`~byzsgd.deploy.options.LaunchConfig`, validates it (nothing
starts when a node would refuse it), starts every node (:mod:`byzsgd.deploy.local`), shows
progress, and prints and writes the summary (:mod:`byzsgd.deploy.rundir`).  Children are
cleaned up on Ctrl-C, SIGTERM or when a correct node fails.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time

from byzsgd.deploy import rundir
from byzsgd.device import mapping as device_mapping
from byzsgd.deploy.local import (Deployment, NodeProcess, free_ports, monitor, pid_alive, plan,  # noqa: F401
                                 progress, read_faults, start, stop_all, stop_restarted, summarize)
from byzsgd.deploy.options import LaunchConfig
from byzsgd.errors import ByzSGDError, ConfigError


def run(lc: LaunchConfig) -> int:
    dep = plan(lc)
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
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
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
    finally:
        stop_all(dep)
        stop_restarted(dep)
        dep.write_description()
    if not lc.quiet and sys.stderr.isatty():
        print(file=sys.stderr)
    summary = summarize(dep, outcome)
    rundir.write_summary(dep.run_dir, summary)
    rundir.print_summary(summary, "byzsgd")
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
        rundir.print_log_tail(node.log_path)
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(LaunchConfig.from_args(args))
    except ByzSGDError as exc:
        print(f"byzsgd.launch: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
