"""Core GARs (average, median family, Krum family, MDA, geometric median, centered
clipping) against slow, obviously-correct references written here."""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import byzsgd.gars as gars
from byzsgd.errors import ResilienceError
from byzsgd.gars import _select, mda as mda_mod, median_family as mf

torch.set_num_threads(1)

CORE = ["average", "median", "trimmed_mean", "meamed", "phocas", "krum", "multi_krum",
        "bulyan", "mda", "geometric_median", "centered_clipping"]
HAS_CUDA = torch.cuda.is_available()

# ----------------------------------------------------------------------------- references


def _nan_as_inf(a: np.ndarray) -> np.ndarray:
    return np.where(np.isnan(a), np.inf, a)


def ref_median(x):
    return np.median(_nan_as_inf(x), axis=0)


def ref_trimmed(x, f):
    n = x.shape[0]
    s = np.sort(_nan_as_inf(x), axis=0)
    return s[f:n - f].mean(axis=0)


def _around(col, e, center):
    """Mean of the len(col) - e values closest to the center (ties: exclude upper first)."""
    s = sorted(col)
    n = len(s)
    if center == "median":
        c = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    else:
        c = sum(s[e:n - e]) / (n - 2 * e)
    # rank by (distance, position): keep the n - e smallest keys
    keys = sorted(range(n), key=lambda i: (abs(s[i] - c), i))
    kept = [s[i] for i in keys[: n - e]]
    return sum(kept) / len(kept)


def ref_mean_around(x, e, center):
    x = _nan_as_inf(x.astype(np.float64))
    return np.array([_around(list(x[:, j]), e, center) for j in range(x.shape[1])])


def _sqd(a, b):
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return math.inf
    return float(sum((float(p) - float(q)) ** 2 for p, q in zip(a, b)))


def ref_krum_scores(x, f, idx=None):
    idx = list(range(x.shape[0])) if idx is None else idx
    n = len(idx)
    k = n - f - 2
    scores = []
    for i in idx:
        ds = sorted(_sqd(x[i], x[j]) for j in idx if j != i)
        scores.append(sum(ds[:k]) if k > 0 else 0.0)
    return scores


def ref_krum(x, f):
    s = ref_krum_scores(x, f)
    return x[min(range(len(s)), key=lambda i: (s[i], i))]


def ref_multi_krum(x, f, m):
    s = ref_krum_scores(x, f)
    order = sorted(range(len(s)), key=lambda i: (s[i], i))
    return x[order[:m]].astype(np.float64).mean(axis=0)


def ref_bulyan(x, f):
    """Iterated Krum with at least one neighbour; ties by the further sorted distances."""
    n = x.shape[0]
    active = list(range(n))
    chosen = []
    for _ in range(n - 2 * f):
        m = len(active)
        k = min(max(m - f - 2, 1), m - 1)
        rows = [sorted(_sqd(x[i], x[j]) for j in active if j != i) for i in active]
        keys = [(sum(r[:k]), *r[k:]) for r in rows]
        best = min(range(m), key=lambda i: (keys[i], i))
        chosen.append(active.pop(best))
    return ref_mean_around(x[chosen], 2 * f, "median")


def ref_mda(x, f):
    """The (n - f)-subset whose decreasingly sorted distances are lexicographically least."""
    n = x.shape[0]
    best = min(itertools.combinations(range(n), n - f),
               key=lambda sub: sorted((_sqd(x[i], x[j]) for i, j in itertools.combinations(sub, 2)),
                                      reverse=True))
    return x[list(best)].astype(np.float64).mean(axis=0)


def ref_cc(x, f, tau, iterations, v):
    x = x.astype(np.float64)
    v = v.astype(np.float64)
    n = x.shape[0]
    for _ in range(iterations):
        acc = np.zeros_like(v)
        for i in range(n):
            if not np.all(np.isfinite(x[i])):
                continue
            diff = x[i] - v
            nr = math.sqrt(float(diff @ diff))
            acc += diff * (min(1.0, tau / nr) if nr > 0 else 1.0)
        v = v + acc / n
    return v


def reference(rule, x, f):
    if rule == "average":
        return x.astype(np.float64).mean(axis=0)
    if rule == "median":
        return ref_median(x)
    if rule == "trimmed_mean":
        return ref_trimmed(x, f)
    if rule == "meamed":
        return ref_mean_around(x, f, "median")
    if rule == "phocas":
        return ref_mean_around(x, f, "trimmed_mean")
    if rule == "krum":
        return ref_krum(x, f)
    if rule == "multi_krum":
        return ref_multi_krum(x, f, x.shape[0] - f)
    if rule == "bulyan":
        return ref_bulyan(x, f)
    if rule == "mda":
        return ref_mda(x, f)
    if rule == "centered_clipping":
        return ref_cc(x, f, 10.0, 1, ref_median(x))
    raise KeyError(rule)


def bound_f(rule, n):
    """The largest f the rule accepts with n inputs."""
    f = 0
    while gars.min_inputs(rule, f + 1) <= n and f < n:
        f += 1
    return f


def tol(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- agreement

REF_RULES = [r for r in CORE if r != "geometric_median"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d", [(7, 5), (8, 3), (11, 1), (12, 4)])
@pytest.mark.parametrize("rule", REF_RULES)
def test_matches_reference(rule, n, d, dtype):
    if rule == "mda" and n > 11:
        n = 10
    g = torch.Generator().manual_seed(n * 100 + d)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    f = bound_f(rule, n)
    if rule == "centered_clipping":
        f = 0 if n < 10 else 1
        x = x * 20  # make clipping bite (tau = 10)
    out = gars.aggregate(rule, x, f)
    assert out.dtype == dtype and out.shape == (d,)
    ref = reference(rule, x.numpy(), f)
    np.testing.assert_allclose(out.numpy(), ref, **tol(dtype))


@pytest.mark.parametrize("n", list(range(1, 34)) + [50, 97, 120, 513])
def test_median_trimmed_all_n(n):
    """Every n through the pruned networks (and the sort fallback above 512)."""
    x = torch.randn(n, 37, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    x[0, 0] = math.nan
    x[-1, 1] = math.inf
    x[n // 2, 2] = -math.inf
    a = x.numpy()
    np.testing.assert_array_equal(mf.coordinate_median(x).numpy(), ref_median(a))
    for b in {0, 1, (n - 1) // 2}:
        if 2 * b < n:
            np.testing.assert_allclose(mf.coordinate_trimmed_mean(x, b).numpy(),
                                       ref_trimmed(a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 9, 10, 17, 20, 23])
def test_mean_around_all_e(n):
    x = torch.randn(n, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    x[:, 0] = torch.tensor([float(i % 3) for i in range(n)])  # ties in value and distance
    a = x.numpy()
    for e in range(n):
        np.testing.assert_allclose(mf.mean_around(x, e, "median").numpy(),
                                   ref_mean_around(a, e, "median"), rtol=1e-12, atol=1e-12)
        if 2 * e < n:
            np.testing.assert_allclose(mf.mean_around(x, e, "trimmed_mean").numpy(),
                                       ref_mean_around(a, e, "trimmed_mean"),
                                       rtol=1e-12, atol=1e-12)


def test_block_boundaries():
    """d spanning several column blocks, the last one partial."""
    n = 20
    d = 2 * _select.block_cols(n, 10**9, torch.float32, torch.device("cpu")) + 123
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(mf.coordinate_median(x).numpy(), np.median(x.numpy(), 0))
    np.testing.assert_allclose(mf.coordinate_trimmed_mean(x, 4).numpy(),
                               ref_trimmed(x.numpy(), 4), rtol=1e-5, atol=1e-6)
    cols = [0, 1, d // 2, d - 2, d - 1]
    got = mf.mean_around(x, 4, "median")[cols].numpy()
    np.testing.assert_allclose(got, ref_mean_around(x.numpy()[:, cols], 4, "median"),
                               rtol=1e-5, atol=1e-6)


def test_multi_krum_m_and_krum_identity():
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for m in range(1, 10):
        np.testing.assert_allclose(gars.aggregate("multi_krum", x, 2, m=m).numpy(),
                                   ref_multi_krum(x.numpy(), 2, m), rtol=1e-12)
    assert torch.equal(gars.aggregate("multi_krum", x, 2, m=1), gars.aggregate("krum", x, 2))
    with pytest.raises(ValueError):
        gars.aggregate("multi_krum", x, 2, m=0)


def test_bulyan_iterated_selection_matches_reference():
    # Two clusters so that the iterated re-scoring matters.
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(8, 4, generator=g, dtype=torch.float64),
                   5 + torch.randn(3, 4, generator=g, dtype=torch.float64)])
    np.testing.assert_allclose(gars.aggregate("bulyan", x, 2).numpy(),
                               ref_bulyan(x.numpy(), 2), rtol=1e-12)


def test_mda_refines_ties_by_sorted_distances():
    """Distinct distances: the subset whose sorted distances are lexicographically least."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(3, 10))
        f = int(rng.integers(1, (n - 1) // 2 + 1))
        pts = rng.normal(size=(n, 2))
        dmat = torch.tensor([[_sqd(p, q) for q in pts] for p in pts])
        got = mda_mod.mda_select(dmat, f)
        best = min(itertools.combinations(range(n), n - f),
                   key=lambda sub: sorted((dmat[i, j].item() for i, j in itertools.combinations(sub, 2)),
                                          reverse=True))
        assert tuple(got) == best, (trial, pts, f)


def test_mda_exact_ties_still_minimum_diameter():
    """Lattice points (exact distance ties): still a minimum-diameter subset."""
    rng = np.random.default_rng(1)
    for trial in range(40):
        n = int(rng.integers(3, 10))
        f = int(rng.integers(1, (n - 1) // 2 + 1))
        pts = rng.integers(0, 3, size=(n, 2)).astype(np.float64)
        dmat = torch.tensor([[_sqd(p, q) for q in pts] for p in pts])
        dia = lambda sub: max((dmat[i, j].item() for i, j in itertools.combinations(sub, 2)),  # noqa: E731
                              default=0.0)
        got = mda_mod.mda_select(dmat, f)
        assert len(got) == n - f and got == sorted(set(got))
        assert dia(got) == min(dia(s) for s in itertools.combinations(range(n), n - f)), (trial, pts, f)


@pytest.mark.parametrize("n,f", [(20, 4), (50, 10)])
def test_mda_fast(n, f):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 1000, generator=g)
    x[:f] += 3 * torch.randn(f, 1000, generator=g)  # outliers, not trivially far
    t = time.perf_counter()
    out = gars.aggregate("mda", x, f)
    assert time.perf_counter() - t < 3.0
    # and right: the outliers are ~sqrt(10) times farther apart than the honest rows, so the
    # minimum-diameter subset is exactly the n - f honest rows, and MDA returns their mean
    assert torch.allclose(out, x[f:].mean(0), atol=1e-5)


def test_geometric_median_optimality():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(15, 8, dtype=torch.float64, generator=g)
    x[:3] += 100.0
    z = gars.aggregate("geometric_median", x, 3, eps=1e-12, max_iter=10000, nu=1e-12)
    # First-order optimality: the sum of unit vectors from z to the inputs vanishes.
    u = (x - z) / torch.linalg.vector_norm(x - z, dim=1, keepdim=True)
    assert torch.linalg.vector_norm(u.sum(0)) < 1e-6
    # And it beats small perturbations.
    obj = lambda p: torch.linalg.vector_norm(x - p, dim=1).sum()  # noqa: E731
    for _ in range(20):
        assert obj(z) <= obj(z + 1e-3 * torch.randn(8, dtype=torch.float64, generator=g)) + 1e-12
    assert gars.aggregate("geometric_median", x.float(), 3).dtype == torch.float32


def test_centered_clipping_params():
    x = torch.randn(20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 30
    v0 = torch.zeros(5, dtype=torch.float64)
    for tau, it, center in [(1.0, 3, "zeros"), (5.0, 2, v0 + 1), (100.0, 1, "median")]:
        out = gars.aggregate("centered_clipping", x, 2, tau=tau, iterations=it, center=center)
        start = {"zeros": np.zeros(5), "median": ref_median(x.numpy())}.get(
            center if isinstance(center, str) else "", None)
        if start is None:
            start = center.numpy()
        np.testing.assert_allclose(out.numpy(), ref_cc(x.numpy(), 2, tau, it, start), rtol=1e-10)


def test_average_propagates_nan():
    x = torch.randn(5, 3)
    x[1, 2] = math.nan
    out = gars.aggregate("average", x, 0)
    assert math.isnan(out[2]) and torch.isfinite(out[:2]).all()


# ----------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("rule", CORE)
def test_permutation_invariance(rule):
    n, d = 11, 6
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    f = bound_f(rule, n) if rule != "centered_clipping" else 1
    if rule == "centered_clipping":
        x = torch.randn(10, d, dtype=torch.float64, generator=g)
    perm = torch.randperm(x.shape[0], generator=g)
    a = gars.aggregate(rule, x, f)
    b = gars.aggregate(rule, x[perm], f)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("rule", CORE)
def test_refuses_below_bound(rule):
    if rule == "average":
        pytest.skip("average has no resilience bound (n >= 1 for any f)")
    for f in (1, 2, 3):
        bound = gars.min_inputs(rule, f)
        assert bound > 1
        x = torch.randn(bound - 1, 3)
        with pytest.raises(ResilienceError) as ei:
            gars.aggregate(rule, x, f)
        e = ei.value
        assert (e.rule, e.n, e.f, e.bound) == (rule, bound - 1, f, bound)
        assert rule in str(e) and str(bound) in str(e)
        gars.aggregate(rule, torch.randn(bound, 3), f)  # at the bound: accepted


@pytest.mark.parametrize("rule", CORE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_and_d1(rule, dtype):
    for n in (10, 11):
        x = torch.randn(n, 1, dtype=dtype)
        f = 1 if rule == "centered_clipping" else bound_f(rule, n)
        out = gars.aggregate(rule, x, f)
        assert out.dtype == dtype and out.shape == (1,)


def test_deterministic():
    """The same input gives the same bits, whatever ran before (no state kept between calls,
    e.g. a reused buffer), and the input is left untouched."""
    x = torch.randn(20, 3000, generator=torch.Generator().manual_seed(3))
    x_before = x.clone()
    fs = {rule: 2 if rule == "centered_clipping" else 4 for rule in CORE}
    first = {rule: gars.aggregate(rule, x.clone(), fs[rule]) for rule in CORE}
    assert torch.equal(x, x_before)
    other = torch.randn(20, 3000, generator=torch.Generator().manual_seed(4))
    for rule in reversed(CORE):  # other calls in between, in another order
        gars.aggregate(rule, other, fs[rule])
        again = gars.aggregate(rule, x, fs[rule])
        assert torch.equal(again, first[rule]), rule
        assert torch.equal(x, x_before), f"{rule} changed its input"
    assert not torch.equal(first["average"], first["median"])  # the rules do differ


# ----------------------------------------------------------------------------- robustness

BYZ_VALUES = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 3e38, -3e38,
                              0.0, 1.0, -1.0, 1e6])


@st.composite
def attacked(draw, min_n_of_f):
    f = draw(st.integers(1, 3))
    n = min_n_of_f(f) + draw(st.integers(0, 2))
    d = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    center = rng.normal(size=d) * draw(st.sampled_from([1.0, 100.0]))
    spread = draw(st.sampled_from([1e-3, 0.1, 1.0]))
    honest = center + spread * rng.uniform(-1, 1, size=(n - f, d))
    byz = np.array([[draw(BYZ_VALUES) for _ in range(d)] for _ in range(f)])
    whole_row = draw(st.booleans())  # distance rules: also rows that are all-NaN etc.
    if whole_row:
        byz[:] = byz[:, :1]
    x = np.concatenate([byz, honest])
    perm = rng.permutation(n)
    return f, x[perm], honest


HYP = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "meamed", "phocas"])
@HYP
@given(data=st.data())
def test_coordinatewise_within_honest_box(rule, data):
    f, x, honest = data.draw(attacked(lambda f: 2 * f + 1))
    out = gars.aggregate(rule, torch.tensor(x), f).numpy()
    lo, hi = honest.min(0), honest.max(0)
    # median / trimmed mean: inside the honest box.  MeaMed / Phocas keep the n - f values
    # closest to a center inside the box, so they may take a value up to the box's width
    # outside it (a Byzantine value closer than the farthest honest one).
    slack = 0.0 if rule in ("median", "trimmed_mean") else 1.0
    w = (hi - lo) * slack + 1e-9 * (1 + np.abs(lo) + np.abs(hi))
    assert np.all(np.isfinite(out))
    assert np.all(out >= lo - w) and np.all(out <= hi + w), (out, lo, hi)


@pytest.mark.parametrize("rule", ["krum", "multi_krum", "bulyan", "mda", "geometric_median"])
@HYP
@given(data=st.data())
def test_distance_rules_close_to_honest(rule, data):
    f, x, honest = data.draw(attacked(lambda f: gars.min_inputs(rule, f)))
    n = x.shape[0]
    out = gars.aggregate(rule, torch.tensor(x), f).numpy()
    assert np.all(np.isfinite(out))
    diam = max(math.sqrt(_sqd(a, b)) for a in honest for b in honest)
    mean = honest.mean(0)
    # Krum's pick has score <= an honest one's, so it is within sqrt(n) honest diameters;
    # MDA's subset has diameter <= the honest diameter and holds an honest input.
    slack = {"mda": 1.0}.get(rule, math.sqrt(n) + 1)
    if rule == "geometric_median":
        slack = 2.0 * n  # breakdown 1/2: bounded by O(n/(n-2f)) honest radii
    dist = float(np.linalg.norm(out - mean))
    assert dist <= slack * diam + 1e-6 * (1 + np.abs(mean).max()), (dist, diam)


@HYP
@given(data=st.data())
def test_krum_never_picks_nonfinite(data):
    f, x, honest = data.draw(attacked(lambda f: 2 * f + 3))
    out = gars.aggregate("krum", torch.tensor(x), f).numpy()
    # Krum outputs one of its inputs, and never one with a NaN/Inf coordinate
    finite_rows = [row for row in x if np.all(np.isfinite(row))]
    assert any(np.array_equal(out, row) for row in finite_rows), (out, x)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("rule", CORE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_cuda_agree(rule, dtype):
    g = torch.Generator().manual_seed(11)
    for n, d in [(20, 5000), (21, 70001), (50, 3000)]:
        if (rule == "mda" or dtype == torch.float64) and n == 50:
            continue  # keep the number of Triton compilations (and MDA's search) small
        x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
        x[0, :7] = torch.tensor([math.nan, math.inf, -math.inf, 1e30, -1e30, 0, 1])
        f = 2 if rule == "centered_clipping" else (4 if rule != "bulyan" else 4 if n >= 19 else 1)
        a = gars.aggregate(rule, x, f)
        b = gars.aggregate(rule, x.cuda(), f).cpu()
        assert b.dtype == dtype
        if rule == "median":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                                       atol=1e-4 if dtype == torch.float32 else 1e-9,
                                       equal_nan=True)


# ----------------------------------------------------------------------------- fast paths

_TRITON_CHECK = r'''
import os, math, torch
os.environ["TRITON_INTERPRET"] = "1"
from byzsgd.gars import median_family as mf, _triton_select as ts
assert ts._have_triton()
for n in (5, 8, 20):
    x = torch.randn(n, 300, dtype=torch.float64)
    x[0, 0] = math.nan; x[-1, 1] = math.inf; x[n // 2, 2] = -math.inf
    x[:, 3] = torch.tensor([float(i % 3) for i in range(n)])
    cases = [("median", ()), ("trimmed_mean", (n // 3,))] + [
        ("mean_around", (e, c)) for e in (1, (n - 1) // 2, n - 3) for c in ("median", "trimmed_mean") if c == "median" or 2 * e < n]
    for name, args in cases:
        os.environ["BYZSGD_NO_TRITON"] = "1"
        ref = getattr(mf, "coordinate_" + name if name != "mean_around" else name)(x, *args)
        del os.environ["BYZSGD_NO_TRITON"]
        got = getattr(ts, name)(x, *args)
        assert got is not None, (n, name, args)
        torch.testing.assert_close(ref, got, rtol=1e-12, atol=1e-12, equal_nan=True)
print("OK")
'''


def test_triton_kernels_interpreted():
    """The generated Triton kernels, run by Triton's CPU interpreter, match the torch path."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", _TRITON_CHECK], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


def test_compiled_cpu_path(monkeypatch):
    """BYZSGD_GAR_COMPILE=1: the fused torch.compile kernels match the eager path."""
    from byzsgd.gars import _compiled
    x = torch.randn(7, _compiled.MIN_COLS + 3, generator=torch.Generator().manual_seed(9))
    x[0, 0] = math.nan
    x[1, 1] = -math.inf
    calls = [lambda: mf.coordinate_median(x), lambda: mf.mean_around(x, 3, "median"),
             lambda: mf.mean_around(x, 5, "median")]  # overlapping candidates (Bulyan's case)
    refs = [c() for c in calls]
    monkeypatch.setenv("BYZSGD_GAR_COMPILE", "1")
    assert _compiled.enabled(x)
    got = [c() for c in calls]
    if _compiled._broken:
        pytest.skip(f"torch.compile unavailable here: {_compiled._broken}")
    assert torch.equal(refs[0], got[0])
    for r, g in zip(refs[1:], got[1:]):
        torch.testing.assert_close(r, g, rtol=1e-6, atol=1e-6)


def test_python_m_gars_lists_every_rule_with_its_reference_and_keywords():
    """The registry's references and keyword parameters are read: ``python -m byzsgd.gars``
    prints them, and the keywords it prints are the ones ``--gar_args`` accepts."""
    from byzsgd.errors import ConfigError
    from byzsgd.gars import registry

    text = registry.describe()
    for name, rule in gars.rules().items():
        assert f"  {name}: {rule.condition}; parameters: " in text and rule.reference in text
    assert gars.get("multi_krum").keywords() == ["m"]
    assert "parameters: mode" in text  # aksel's one keyword
    registry.check_params("multi_krum", {"m": 3})
    with pytest.raises(ConfigError, match="known: m"):
        registry.check_params("multi_krum", {"k": 3})
