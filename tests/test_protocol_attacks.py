"""Protocol attacks (byzsgd/roles/protocol_attacks.py), the outsider flood and rejoin visibility.

Fast: argument checks, an impersonating member against live nodes holding per-rank
credentials, a lying rendezvous master against live nodes (trap and swap), the outsider flood
script against a live node, and the run summary's ``rejoined`` field from metrics files.
The end-to-end acceptance runs are in tests/test_protocol_attacks_e2e.py (slow).
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from byzsgd.config import RunConfig
from byzsgd import rundir
from byzsgd.deploy import summary as runsum
from byzsgd.errors import ConfigError
from byzsgd.net import FrameLimits, Node
from byzsgd.net.credentials import RankCredentials
from byzsgd.net.peers import PeerDirectory, free_ports
from byzsgd.roles import byzantine, protocol_attacks
from byzsgd.roles.protocol_attacks import ProtocolAttack, parse_report

ROOT = Path(__file__).resolve().parent.parent
LIMITS = FrameLimits.for_model(16)
SECRET = b"operator-secret-of-these-tests!!"


def _cfg(**kw) -> RunConfig:
    base = dict(num_ps=2, num_workers=2, fw=0, fps=0, rank=0)
    base.update(kw)
    return RunConfig(**base)


# -- arguments -------------------------------------------------------------------------
def test_protocol_attacks_are_accepted_and_checked_like_any_attack():
    assert set(protocol_attacks.names("ps")) == set(protocol_attacks.PROTOCOL_ATTACKS)
    assert "far_future" not in protocol_attacks.names("worker")
    byzantine.check_attack(_cfg(rank=1, attack="far_future", attack_args={"ahead": 5}))
    byzantine.check_attack(_cfg(rank=3, attack="withhold_from", attack_args={"ranks": [0]}))
    byzantine.check_attack(_cfg(rank=0, attack="rendezvous_lie"))
    assert byzantine.ps_behaviour(_cfg(rank=1, attack="huge_step")) is None  # honest values
    with pytest.raises(ConfigError, match="for ps nodes"):
        byzantine.check_attack(_cfg(rank=3, attack="far_future"))
    with pytest.raises(ConfigError, match="unknown arguments"):
        byzantine.check_attack(_cfg(rank=1, attack="request_flood", attack_args={"copys": 3}))
    with pytest.raises(ConfigError, match="ranks"):
        byzantine.check_attack(_cfg(rank=3, attack="withhold_from"))
    with pytest.raises(ConfigError, match="other ranks"):
        byzantine.check_attack(_cfg(rank=3, attack="withhold_from", attack_args={"ranks": [3]}))
    with pytest.raises(ConfigError, match="only rank 0"):
        byzantine.check_attack(_cfg(rank=1, attack="rendezvous_lie"))
    with pytest.raises(ConfigError, match="protocol attacks: .*impersonate"):
        byzantine.check_attack(_cfg(rank=1, attack="nonsense"))


def test_parse_report_reads_the_last_counters():
    text = ("x WARNING byzsgd.protocol_attack: protocol attack impersonate: refused=3 tried=3\n"
            "y WARNING byzsgd.protocol_attack: protocol attack impersonate: refused=9 succeeded=0 tried=9\n")
    assert parse_report(text, "impersonate") == {"refused": 9, "succeeded": 0, "tried": 9}
    assert parse_report(text, "huge_step") is None


# -- live nodes --------------------------------------------------------------------------
def _directory(n: int, num_ps: int) -> PeerDirectory:
    ports = free_ports(n)
    return PeerDirectory({r: ("127.0.0.1", ports[r]) for r in range(n)}, num_ps)


def test_impersonation_with_a_members_credentials_always_fails():
    """Rank 3 (a worker holding only its own pair keys) claims every higher rank towards
    every other rank: every attempt is refused by the listener and counted on both sides."""
    async def main():
        d = _directory(5, 2)
        creds = [RankCredentials.derive(SECRET, r, 5) for r in range(5)]
        nodes = [Node(r, d.role(r), creds[r], directory=d, limits=LIMITS) for r in range(5)]
        for n in nodes:
            await n.start()
        try:
            assert await nodes[4].wait_connected(range(4), 10) == {0, 1, 2, 3}
            cfg = _cfg(num_workers=3, rank=3, attack="impersonate")
            attack = ProtocolAttack(cfg, SimpleNamespace(cfg=cfg, node=nodes[3]))
            await attack._impersonate()
            # claims: towards 0: 1, 2, 4; towards 1: 2, 4; towards 2: 4; towards 4: none
            assert attack.counts["tried"] == 6
            assert attack.counts["refused"] == 6 and "succeeded" not in attack.counts
            refused = sum(sum(n.stats.rejected.values()) for n in nodes[:3])
            assert refused >= 6, [dict(n.stats.rejected) for n in nodes]
            assert {k for n in nodes[:3] for k in n.stats.rejected} == {"auth"}  # bad HMAC, every time
            # the genuine connections are untouched
            assert nodes[0].connected == {1, 2, 3, 4}
        finally:
            for n in nodes:
                await n.close()
    asyncio.run(main())


@pytest.mark.parametrize("to", ["self", "swap"])
def test_a_lying_rendezvous_master_yields_failed_handshakes_never_an_impostor(to):
    """Rank 0 hands out a directory that routes ranks 1 and 2 to its trap (answering as them)
    or to each other's address; the dialers' handshakes fail, none attaches a wrong process,
    and once the master hands out the truth everybody connects."""
    async def main():
        world, num_ps = 4, 3
        port = free_ports(1)[0]
        creds = [RankCredentials.derive(SECRET, r, world) for r in range(world)]
        nodes = [Node(r, "ps" if r < num_ps else "worker", creds[r], master=("127.0.0.1", port),
                      world_size=world, num_ps=num_ps, limits=LIMITS, listen_host="127.0.0.1")
                 for r in range(world)]
        cfg = RunConfig(num_ps=num_ps, num_workers=1, fps=0, fw=0, rank=0, attack="rendezvous_lie",
                        master=f"127.0.0.1:{port}", attack_args={"to": to, "for_s": 3.0})
        attack = ProtocolAttack(cfg, SimpleNamespace(cfg=cfg, node=nodes[0]))
        try:
            await asyncio.gather(*(n.start(timeout=20) for n in nodes))
            await asyncio.sleep(2.0)  # still lying: 2 and 3 cannot reach 1 and 2
            assert 1 not in nodes[3].connected and 2 not in nodes[3].connected
            assert 1 not in nodes[2].connected
            refused = sum(sum(n.stats.rejected.values()) for n in nodes[1:])
            assert refused >= 2, [dict(n.stats.rejected) for n in nodes]
            if to == "self":
                assert attack.counts.get("trap_hellos", 0) >= 2
                assert attack.counts.get("trap_proofs_received", 0) == 0
            # the truth: everybody meets everybody, each connection the right process
            assert await nodes[3].wait_connected([0, 1, 2], 15) == {0, 1, 2}
            assert await nodes[2].wait_connected([0, 1], 15) == {0, 1}
            assert attack.counts["truth_sent"] == 1
            for n in nodes:
                for r in n.connected:
                    assert n.connection(r).rank == r
        finally:
            for n in nodes:
                await n.close()
    asyncio.run(main())


def test_outsider_flood_keeps_its_sockets_and_stops_by_itself(tmp_path):
    """60 idle sockets to one live node for 3 s: the node evicts them beyond its limits, the
    script reopens them, stops by itself, and refuses a non-loopback endpoint."""
    async def main():
        d = _directory(2, 1)
        node = Node(0, "ps", RankCredentials.derive(SECRET, 0, 2), directory=d, limits=LIMITS)
        await node.start()
        run = tmp_path / "run"
        run.mkdir()
        doc = dict(num_ps=1, num_workers=1, ranks=[dict(rank=0, role="ps", host="127.0.0.1", port=d[0][1]),
                                                   dict(rank=1, role="worker", host="127.0.0.1", port=d[1][1])])
        (run / "deployment.json").write_text(json.dumps(doc))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "scripts" / "outsider_flood.py"), str(run), "--sockets", "60",
                "--seconds", "3", "--ranks", "0", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            t0 = time.monotonic()
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            assert time.monotonic() - t0 < 20
            res = json.loads(out.decode().strip().splitlines()[-1])
            ep = res["endpoints"][0]
            assert ep["rank"] == 0 and ep["opened"] >= 60 and ep["closed_by_node"] > 0
            assert node.stats.rejected["preauth_evicted"] > 0, dict(node.stats.rejected)
        finally:
            await node.close()
        doc["ranks"][0]["host"] = "10.1.2.3"
        (run / "deployment.json").write_text(json.dumps(doc))
        bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "outsider_flood.py"), str(run),
                              "--seconds", "1"], capture_output=True, text=True, timeout=30)
        assert bad.returncode == 2 and "loopback" in bad.stderr
    asyncio.run(main())


# -- rejoin visibility -------------------------------------------------------------------
def test_summary_and_fault_status_say_when_a_restarted_rank_served_again(tmp_path):
    run = tmp_path
    t0 = 1000.0
    metrics = run / "metrics-ps0.jsonl"
    recs = [dict(event="start", time=t0)]
    for step in range(10):
        quorum = [4, 5, 6] if step < 3 or step >= 6 else [4, 6]
        recs.append(dict(step=step, time=t0 + step, step_time=0.1, quorum=quorum, model_quorum=[1, 2]))
    metrics.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    doc = dict(num_ps=1, num_workers=3, ranks=[dict(rank=0, role="ps", byzantine=False, metrics=str(metrics))])
    (run / "deployment.json").write_text(json.dumps(doc))
    rundir.write_faults(run, dict(faulty=[5], paused=[], restarted={"5": 4242}, events=[
        dict(time=t0 + 3.5, action="kill", rank=5, pid=1, step=3),
        dict(time=t0 + 4.5, action="restart", rank=5, pid=None, step=4),
        dict(time=t0 + 4.6, action="restarted", rank=5, pid=4242, step=4)]))
    r = runsum.rejoins(run)["5"]
    assert r["restart_step"] == 4 and r["rejoined_step"] == 6 and r["steps_served"] == 4
    assert r["aggregations"] == 4 and abs(r["rejoined_after_s"] - 1.4) < 1e-6
    summary = runsum.run_summary(run, "ok", started=t0, returncodes={})
    assert summary["rejoined"]["5"]["rejoined_step"] == 6
    from byzsgd.deploy import faults as fault
    assert fault._rejoin_text(r) == " restarted at step 4, rejoined at step 6 (1.4 s after), served 4 steps"
    assert "not aggregated since" in fault._rejoin_text(dict(r, rejoined_step=None))
