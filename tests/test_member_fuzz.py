"""Issue 24: no member input crashes, pins or hides from a correct node.

Hypothesis drives two colluding members (fw = 2 Byzantine workers against a real PS;
two Byzantine PSes against a real worker, garfield and paper mode) sending authenticated
frames: every metadata field (loss, rejected, anything else) with every value the wire
carries (None, bools, 64-bit ints, NaN, +-inf, 1e308, subnormals, strings, bytes), tensors
of every allowed dtype holding NaN/inf/huge values, steps around and far from the role's,
and kinds their role may not send.  Correct members drive the role meanwhile.  After each
example the role is alive, made progress, reports a loss inside the correct workers' range
(the median), counts every refusal by sender, kept every queue within its bound, and
contained nothing (no exception at all on member data).
"""
from __future__ import annotations

import asyncio
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from byzsgd.net.frame import MAX_STEP
from byzsgd.roles.ps_base import KEPT_MODELS
from tests.member_cluster import Cluster

pytestmark = pytest.mark.timeout(600, method="thread")
EXAMPLES = int(os.environ.get("FUZZ_N", 25))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
          torch.uint8, torch.bool]
EXTREME_FLOATS = [1e308, -1e308, float("nan"), float("inf"), float("-inf"), 5e-324, -0.0, 3.4e38]
META_VALUE = st.one_of(
    st.none(), st.booleans(), st.sampled_from(EXTREME_FLOATS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1, -(1 << 63), 10**6]),
    st.integers(-(1 << 63), (1 << 64) - 1), st.text(max_size=24), st.binary(max_size=24))
#: the fields a PS reads (each present or not), among up to 4 others
META = st.tuples(st.fixed_dictionaries({}, optional={"loss": META_VALUE, "rejected": META_VALUE}),
                 st.dictionaries(st.text(max_size=8), META_VALUE, max_size=4)).map(
    lambda pair: {**pair[1], **pair[0]})


@st.composite
def tensor(draw, size: int) -> torch.Tensor:
    fill = draw(st.sampled_from(["normal", "nan", "inf", "-inf", "huge", "zero", "mixed", "tiny"]))
    base = torch.randn(size, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))),
                       dtype=torch.float64)
    value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 1e308,
             "zero": 0.0, "tiny": 5e-324}.get(fill)
    if value is not None:
        base = torch.full((size,), value, dtype=torch.float64)
    elif fill == "mixed":
        base[:: 3] = draw(st.sampled_from(EXTREME_FLOATS))
    return base.to(draw(st.sampled_from(DTYPES)))


def step_of(t: int, offset: str, window: int) -> int:
    return {"now": t, "next": t + 1, "past": max(0, t - 1), "edge": t + window - 1, "beyond": t + window,
            "far": MAX_STEP - 1, "zero": 0}[offset]


OFFSETS = st.sampled_from(["now", "now", "now", "next", "past", "edge", "beyond", "far", "zero"])


@st.composite
def frames(draw, kinds: list[str], sizes: dict[str, int]):
    """1-3 frames of one Byzantine member: (kind, step offset, tensors, meta)."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(kinds))
        tensors = [draw(tensor(sizes[kind]))] if sizes.get(kind) else []
        out.append((kind, draw(OFFSETS), tensors, draw(META)))
    return out


def run(loop, coro):
    return loop.run_until_complete(asyncio.wait_for(coro, 120))


def outboxes_bounded(node) -> bool:
    return all(len(ob) <= ob.depth for ob in node._peers.values())


# ------------------------------------------------------------------------------------ the PS
@pytest.fixture(scope="module", params=["alone", "gather"])
def ps_cluster(request, tmp_path_factory):
    """A PS alone (n_ps = 1), or with 3 peers (fps = 1) whose last is Byzantine and the
    others answer its gathers: 7 workers, fw = 2, the last two Byzantine."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    num_ps = 1 if request.param == "alone" else 4
    c = Cluster(tmp_path_factory.mktemp(request.param), 0, num_ps=num_ps, num_workers=7, fw=2,
                fps=num_ps // 4, num_iter=10**6, acc_freq=10**6)
    workers = list(range(num_ps, num_ps + 7))
    c.honest_workers, c.byz_workers = workers[:5], workers[5:]
    c.honest_ps, c.byz_ps = list(range(1, num_ps - 1)), list(range(max(1, num_ps - 1), num_ps))
    c.sent_refused = {}
    run(loop, c.start())
    yield loop, c
    run(loop, c.stop())
    loop.close()
    asyncio.set_event_loop(None)


def requested(c: Cluster) -> int:
    """The newest step the PS asked its first correct worker for (-1: none yet)."""
    return max((step for kind, _, step, _, _ in c.received[c.honest_workers[0]] if kind == "model"),
               default=-1)


def gathered_model(c: Cluster, step: int):
    """The PS's ps_model of ``step``, as its first correct peer got it (None: not yet)."""
    got = c.received[c.honest_ps[0]]
    return next((ts[0] for kind, _, s, _, ts in got if kind == "ps_model" and s == step), None)


def losses_by_step(c: Cluster) -> dict[int, object]:
    out = {}
    with open(c.cfg.metrics) as fh:
        for line in fh:
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                out[rec["step"]] = rec["loss"]
    return out


def may_send(c: Cluster, rank: int, kind: str) -> bool:
    return (kind == "grad") == (rank >= c.num_ps)


async def ps_example(c: Cluster, plan: dict[int, list]) -> None:
    ps = c.role
    await c.wait_for(lambda: requested(c) >= 0, 30, "the first request")
    t = requested(c)
    window = c.cfg.step_window
    expect = dict(c.sent_refused)
    for rank, sent in plan.items():
        for kind, offset, tensors, meta in sent:
            c.members[rank].send(0, kind, step_of(t, offset, window), tensors, meta)
            if not may_send(c, rank, kind):
                key = f"sender:{kind}:{rank}"
                expect[key] = expect.get(key, 0) + 1
    # every refusal counted, by kind and sender, before the correct members answer
    await c.wait_for(lambda: all(ps.node.stats.refused_from[k] == n for k, n in expect.items()), 20,
                     f"the refusals {expect}")
    c.sent_refused = expect
    for i, rank in enumerate(c.honest_workers):
        grad = torch.randn(ps.replica.grad_size, generator=torch.Generator().manual_seed(t * 10 + i)) * 0.01
        c.members[rank].send(0, "grad", t, [grad], {"loss": 1.0 + 0.1 * i})
    if c.honest_ps:  # the correct peers answer the gather with the PS's own model
        model = await c.wait_for(lambda: gathered_model(c, t), 20, f"the ps_model of step {t}")
        for rank in c.honest_ps:
            c.members[rank].send(0, "ps_model", t, [model])
    await c.wait_for(lambda: requested(c) > t, 20, f"step {t + 1}")
    # the loss of step t: the median of the quorum's finite losses, inside the correct range
    loss = losses_by_step(c)[t]
    assert isinstance(loss, float) and 1.0 <= loss <= 1.4, loss
    state = ps.replica.state_vector()
    assert bool(torch.isfinite(state).all()) and float(state.abs().max()) < 1e3
    assert not ps.node.stats.failures, ps.node.stats.failures
    assert len(ps.grad_box) <= c.cfg.step_window * c.cfg.num_workers
    assert len(ps.models.newest) <= len(ps.peers) and len(ps.asks) <= len(ps.peers)
    assert len(ps.sent_models) <= KEPT_MODELS + 1 and outboxes_bounded(ps.node)
    assert ps.node.connected >= set(c.members)  # nobody lost a connection over a value
    for received in c.received.values():  # keep the test's memory flat
        del received[:-8]


PS_KINDS = ["grad", "grad", "grad", "ps_model", "ps_ask", "done"]
SIZES = {"grad": 260, "ps_model": 260}


@FUZZ
@given(workers=st.tuples(frames(PS_KINDS, SIZES), frames(PS_KINDS, SIZES)),
       peer=frames(["ps_model", "ps_model", "ps_ask", "done", "grad"], SIZES))
def test_two_colluding_workers_and_a_peer_never_crash_pin_or_hide_from_the_ps(ps_cluster, workers, peer):
    loop, c = ps_cluster
    plan = dict(zip(c.byz_workers, workers)) | {r: peer for r in c.byz_ps}
    run(loop, ps_example(c, plan))


def test_the_ps_takes_the_median_of_two_1e308_losses(ps_cluster):
    """Finding 1 through the real PS: both Byzantine workers in the quorum with loss 1e308
    (the mean's fsum overflowed and ended every correct PS)."""
    loop, c = ps_cluster

    async def case():
        ps = c.role
        await c.wait_for(lambda: requested(c) >= 0, 30, "the first request")
        t = requested(c)
        for rank in c.byz_workers:
            c.members[rank].send(0, "grad", t, [torch.zeros(260)], {"loss": 1e308})
        # both in the quorum: they are filed before any correct gradient is sent
        await c.wait_for(lambda: set(c.byz_workers) <= set(ps.grad_box.pending(t)), 20, "both filed")
        await ps_example(c, {})
        rec = [json.loads(line) for line in open(c.cfg.metrics)]
        quorum = next(r["quorum"] for r in rec if r.get("step") == t and "quorum" in r)
        assert set(c.byz_workers) <= set(quorum)
    run(loop, case())


# ------------------------------------------------------------------------------- the worker
BYZ_PS = (0, 1)


@pytest.fixture(scope="module", params=["garfield", "paper"])
def worker_cluster(request, tmp_path_factory):
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    c = Cluster(tmp_path_factory.mktemp(request.param), 7, num_ps=7, num_workers=1, fw=0, fps=2,
                mode=request.param, pre_agg="", worker_momentum=0.0, num_iter=10**6)
    run(loop, c.start())
    c.next_step = 0
    yield loop, c
    run(loop, c.stop())
    loop.close()
    asyncio.set_event_loop(None)


def answered(c: Cluster, rank: int, step: int):
    return next((m for k, _, s, m, ts in c.received[rank] if k == "grad" and s == step), None)


async def worker_example(c: Cluster, plan: dict[int, list]) -> None:
    w = c.role
    s = c.next_step
    window = c.cfg.step_window
    for rank, sent in plan.items():
        for kind, offset, tensors, meta in sent:
            c.members[rank].send(7, kind, step_of(s, offset, window), tensors, meta)
    honest = (2,) if c.cfg.mode == "garfield" else (2, 3, 4, 5, 6)
    model = torch.full((w.replica.state_size,), 0.01)
    for rank in honest:
        c.members[rank].send(7, "model", s, [model], {})
    meta = await c.wait_for(lambda: answered(c, 2, s), 20, f"the gradient of step {s}")
    grad = next(ts[0] for k, _, st_, _, ts in c.received[2] if k == "grad" and st_ == s)
    assert bool(torch.isfinite(grad).all()) and type(meta["loss"]) is float
    c.next_step = s + 1
    assert not w.node.stats.failures, w.node.stats.failures
    assert outboxes_bounded(w.node) and w.node.connected >= set(c.members)
    if c.cfg.mode == "garfield":
        assert len(w.pending) <= c.cfg.num_ps and len(w.answered) <= c.cfg.num_ps
    else:
        assert len(w.models.newest) <= c.cfg.num_ps and len(w.replayed) <= c.cfg.num_ps
    for received in c.received.values():  # what the members got: keep the test's memory flat
        del received[:-4]


@FUZZ
@given(plan=st.fixed_dictionaries({r: frames(["model", "model", "model", "done"], {"model": 260})
                                   for r in BYZ_PS}))
def test_two_colluding_pses_never_crash_or_pin_a_worker(worker_cluster, plan):
    loop, c = worker_cluster
    run(loop, worker_example(c, plan))
