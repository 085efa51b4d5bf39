"""Triton kernels (CUDA) for the coordinate-wise rules: the pruned network in registers.

The torch path of :mod:`byzsgd.gars._select` runs each comparator as a full pass over
global memory (two reads, one write per element): on a GPU that is ~20-40x the copy
floor at n=50.  Here one generated Triton kernel loads the n values of a block of columns
into registers once, runs the same pruned comparator program (``tl.minimum`` /
``tl.maximum``) and the rule's epilogue on them, and writes the [d] result: one read of
the input, one write of the output.

The kernel source is generated per (n, rule, e, dtype) from the compiled
:class:`~byzsgd.gars._select.Program`, written to a cache file (``triton.jit`` needs a
real source file) and imported.  Semantics are those of the torch path (NaN orders as
+inf) and MeaMed/Phocas/Bulyan use the same window formula
(:class:`~byzsgd.gars._select.AroundPlan`); results agree with the CPU up to float
summation order (the median exactly).

Used only when ``triton`` imports, the tensor is on CUDA (or ``TRITON_INTERPRET=1``, for
tests on CPU) and ``BYZSGD_NO_TRITON`` is unset.  Any failure to build falls back to
the torch path (see :func:`available`).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading

import torch

from byzsgd.gars import _select

_HAVE_TRITON: bool | None = None  # decided on first use: importing triton costs ~0.5 s


def _have_triton() -> bool:
    """Import triton lazily: CPU-only nodes never pay for it."""
    global _HAVE_TRITON
    if _HAVE_TRITON is None:
        try:  # pragma: no cover - depends on the machine
            import triton  # noqa: F401
            import triton.language as tl  # noqa: F401
            _HAVE_TRITON = True
        except Exception:  # noqa: BLE001
            _HAVE_TRITON = False
    return _HAVE_TRITON

_lock = threading.Lock()
_kernels: dict[tuple, object] = {}
_broken: set[tuple] = set()
_DIR = os.path.join(tempfile.gettempdir(), f"byzsgd_triton_{os.getuid()}")

BLOCK = 256
NUM_WARPS = 4


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(x: torch.Tensor) -> bool:
    if os.environ.get("BYZSGD_NO_TRITON"):
        return False
    if x.dtype not in (torch.float32, torch.float64) or x.dim() != 2:
        return False
    if not (x.is_cuda or _interpret()):
        return False
    if not _have_triton():
        return False
    return x.shape[0] <= _select.FUSED_MAX_N and x.shape[1] > 0


def _groups(n: int, kind: str, e: int):
    if kind == "median":
        return [[n // 2]] if n % 2 else [[n // 2 - 1], [n // 2]], None
    if kind == "trimmed":
        return [list(range(e, n - e))], None
    plan = _select.around_plan(n, e, "median" if kind == "around_med" else "trimmed_mean")
    return plan.groups, plan


def _source(n: int, kind: str, e: int) -> str:
    """Generate the kernel source for rule ``kind`` in {median, trimmed, around_med,
    around_tm}; ``e`` = values trimmed (trimmed) or excluded (around_*)."""
    groups, plan = _groups(n, kind, e)
    prog = _select.program(n, tuple(tuple(g) for g in groups))
    L = []
    a = L.append
    a("import triton")
    a("import triton.language as tl")
    a("")
    a("@triton.jit")
    a("def kern(X, OUT, d, stride, BLOCK: tl.constexpr):")
    a("    pid = tl.program_id(0)")
    a("    cols = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)")
    a("    mask = cols < d")
    a("    p = X + cols")
    a("    INF = tl.full([BLOCK], float('inf'), X.dtype.element_ty)")
    a("    ZERO = tl.zeros([BLOCK], X.dtype.element_ty)")
    var = {}
    for r in range(n):
        a(f"    t = tl.load(p + {r} * stride, mask=mask, other=0.0)")
        a(f"    r{r} = tl.where(t != t, INF, t)")
        var[r] = f"r{r}"
    var[n] = "ZERO"
    cnt = 0
    for k, ra, rb, ro in prog.ops:
        nm = f"v{cnt}"
        cnt += 1
        a(f"    {nm} = tl.{'minimum' if k == 0 else 'maximum'}({var[ra]}, {var[rb]})")
        var[ro] = nm
    gv = [[var[r] for r in g] for g in prog.group_rows]

    def total(names):
        return " + ".join(names) if names else "ZERO"

    if kind == "median":
        a(f"    res = {gv[0][0]}" if n % 2 else f"    res = ({gv[0][0]} + {gv[1][0]}) * 0.5")
    elif kind == "trimmed":
        a(f"    res = ({total(gv[0])}) / {n - 2 * e}")
    else:
        ns = len(plan.singles)
        sv = {pos: gv[i][0] for i, pos in enumerate(plan.singles)}
        core = gv[ns] if plan.core else []
        a(f"    core = {total(core)}")
        if kind == "around_med":
            if n % 2:
                a(f"    c = {sv[plan.med[0]]}")
            else:
                a(f"    c = ({sv[plan.med[0]]} + {sv[plan.med[1]]}) * 0.5")
        else:
            a(f"    c = ({total(['core'] + [sv[q] for q in plan.trim_singles])}) / {n - 2 * e}")
        beta = plan.beta
        a("    k = tl.zeros([BLOCK], tl.int32)")
        for i in range(e):
            a(f"    k += ((c - {sv[i]}) > ({sv[i + beta]} - c)).to(tl.int32)")
        a("    s = core")
        for q, need_lo, need_hi in plan.conditions():
            if need_lo and need_hi:
                a(f"    s += tl.where((k <= {q}) & (k > {q - beta}), {sv[q]}, ZERO)")
            elif need_lo:
                a(f"    s += tl.where(k <= {q}, {sv[q]}, ZERO)")
            elif need_hi:
                a(f"    s += tl.where(k > {q - beta}, {sv[q]}, ZERO)")
            else:
                a(f"    s += {sv[q]}")
        a(f"    res = s / {beta}")
    a("    tl.store(OUT + cols, res, mask=mask)")
    return "\n".join(L) + "\n"


def _kernel(n: int, kind: str, e: int):
    key = (n, kind, e)
    with _lock:
        if key in _kernels:
            return _kernels[key]
        src = _source(n, kind, e)
        h = hashlib.sha1(src.encode()).hexdigest()[:16]
        os.makedirs(_DIR, exist_ok=True)
        path = os.path.join(_DIR, f"k_{kind}_{n}_{e}_{h}.py")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as fh:
                fh.write(src)
            os.replace(tmp, path)
        modname = f"byzsgd_triton_k_{kind}_{n}_{e}_{h}"
        spec = importlib.util.spec_from_file_location(modname, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[modname] = mod
        spec.loader.exec_module(mod)
        _kernels[key] = mod.kern
        return mod.kern


def _launch(x: torch.Tensor, kind: str, e: int) -> torch.Tensor | None:
    """Run the kernel; None when it cannot be built or run (caller falls back)."""
    n, d = x.shape
    key = (n, kind, e, x.dtype, x.device.type)
    if key in _broken:
        return None
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(d, dtype=x.dtype, device=x.device)
    try:
        kern = _kernel(n, kind, e)
        grid = ((d + BLOCK - 1) // BLOCK,)
        kern[grid](x, out, d, x.stride(0), BLOCK=BLOCK, num_warps=NUM_WARPS)
    except Exception as exc:  # noqa: BLE001 - fall back to the torch path, once noted
        _broken.add(key)
        import warnings
        warnings.warn(f"byzsgd: Triton kernel {kind} n={n} e={e} failed ({exc!r}); "
                      f"using the torch path")
        return None
    return out


def median(x: torch.Tensor) -> torch.Tensor | None:
    return _launch(x, "median", 0)


def trimmed_mean(x: torch.Tensor, b: int) -> torch.Tensor | None:
    return _launch(x, "trimmed", b)


def mean_around(x: torch.Tensor, e: int, center: str) -> torch.Tensor | None:
    if e == 0:
        return _launch(x, "trimmed", 0)
    return _launch(x, "around_med" if center == "median" else "around_tm", e)
