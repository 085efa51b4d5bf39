"""Optional CPU fast path: the whole rule (network + epilogue) fused by ``torch.compile``.

The eager path of :mod:`byzsgd.gars._select` issues one torch op per comparator per
column block, so each comparator streams the block through L2: ~7x the copy floor for the
median at n=20 and ~20x at n=50.  Compiled by inductor, the same straight-line program of
``minimum``/``maximum`` becomes one vectorised C++ loop over the columns with the n values
in registers: ~1.3x the floor for the median at n=20 (measured on the 2-core dev box).

Opt-in, because the first call per (rule, n, e, dtype) compiles C++ (~20 s cold, ~3 s
from inductor's on-disk cache) and needs a C++ compiler: set ``BYZSGD_GAR_COMPILE=1``.
Used for CPU tensors with at least ``MIN_COLS`` columns; any failure to compile falls back
to the eager path for that key (with a warning), so results never depend on it being
present.  The column dimension is marked dynamic: one compilation serves every d.

Semantics are the torch path's (NaN orders as +inf), with the same window formula for
MeaMed/Phocas/Bulyan (:class:`~byzsgd.gars._select.AroundPlan`); results agree up to
summation order (the median exactly).
"""
from __future__ import annotations

import math
import os
import threading
import types
import warnings

import torch

from byzsgd.gars import _select

MIN_COLS = 1 << 16

_lock = threading.Lock()
_fns: dict[tuple, object] = {}
_broken: set[tuple] = set()


def enabled(x: torch.Tensor) -> bool:
    return (os.environ.get("BYZSGD_GAR_COMPILE") == "1" and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and x.dim() == 2
            and x.shape[1] >= MIN_COLS and x.shape[0] <= _select.FUSED_MAX_N)


def _build(n: int, kind: str, e: int):
    plan = None
    if kind == "median":
        groups = [[n // 2]] if n % 2 else [[n // 2 - 1], [n // 2]]
    elif kind == "trimmed":
        groups = [list(range(e, n - e))]
    else:
        plan = _select.around_plan(n, e, "median" if kind == "around_med" else "trimmed_mean")
        groups = plan.groups
    prog = _select.program(n, tuple(tuple(g) for g in groups))
    fns = (torch.minimum, torch.maximum)
    ops = [(fns[k], a, b, o) for k, a, b, o in prog.ops]
    group_rows = prog.group_rows

    def total(ts):
        acc = ts[0]
        for t in ts[1:]:
            acc = acc + t
        return acc

    def fn(x):
        inf = torch.full((), math.inf, dtype=x.dtype)
        r = [torch.where(t != t, inf, t) for t in x.unbind(0)] + [None]
        for op, a, b, o in ops:
            r[o] = op(r[a], r[b])
        g = [[r[i] for i in grp] for grp in group_rows]
        if kind == "median":
            return g[0][0] if n % 2 else (g[0][0] + g[1][0]) * 0.5
        if kind == "trimmed":
            return total(g[0]) / (n - 2 * e)
        ns = len(plan.singles)
        sv = {pos: g[i][0] for i, pos in enumerate(plan.singles)}
        zero = torch.zeros_like(g[0][0])
        core = total(g[ns]) if plan.core else zero
        if kind == "around_med":
            c = sv[plan.med[0]] if n % 2 else (sv[plan.med[0]] + sv[plan.med[1]]) * 0.5
        else:
            c = total([core] + [sv[q] for q in plan.trim_singles]) / (n - 2 * e)
        beta = plan.beta
        k = total([((c - sv[i]) > (sv[i + beta] - c)).to(torch.int32) for i in range(e)])
        s = core
        for q, need_lo, need_hi in plan.conditions():
            if need_lo and need_hi:
                s = s + torch.where((k <= q) & (k > q - beta), sv[q], zero)
            elif need_lo:
                s = s + torch.where(k <= q, sv[q], zero)
            elif need_hi:
                s = s + torch.where(k > q - beta, sv[q], zero)
            else:
                s = s + sv[q]
        return s / beta

    # Dynamo caches compiled graphs per *code object*, with a small recompile limit (8):
    # every (n, kind, e) would share fn's code object and, past 8 variants, silently fall
    # back to eager.  Give each its own code object.
    code = fn.__code__.replace(co_name=f"byzsgd_{kind}_n{n}_e{e}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__,
                              fn.__closure__)


def run(x: torch.Tensor, kind: str, e: int) -> torch.Tensor | None:
    """The rule's [d] output, or None (caller uses the eager path)."""
    n = x.shape[0]
    key = (n, kind, e, x.dtype)
    if key in _broken:
        return None
    try:
        with _lock:
            f = _fns.get(key)
            if f is None:
                f = torch.compile(_build(n, kind, e), dynamic=False,
                                  options={"max_fusion_size": 4096})
                _fns[key] = f
        xc = x.contiguous()
        torch._dynamo.mark_dynamic(xc, 1)
        return f(xc)
    except Exception as exc:  # noqa: BLE001
        _broken.add(key)
        warnings.warn(f"byzsgd: compiled CPU kernel {kind} n={n} e={e} failed ({exc!r}); "
                      f"using the eager path")
        return None


def median(x):
    return run(x, "median", 0)


def trimmed_mean(x, b):
    return run(x, "trimmed", b)


def mean_around(x, e, center):
    if e == 0:
        return run(x, "trimmed", 0)
    return run(x, "around_med" if center == "median" else "around_tm", e)
