#!/usr/bin/env python
"""Time every registered GAR next to the memory-copy floor.

Configurations (f as given; a rule whose bound refuses that f is timed at the largest f
it accepts, and the table says so):

* CPU and CUDA:  (n=20, f=4, d=1e6)   and (n=50, f=10, d=1e5)
* CUDA only:     (n=50, f=10, d=1.1e7)

The floor of a configuration is the time to move the input once: n*d*4 bytes (the input's
element size, float32) at the copy bandwidth measured in the same run (``dst.copy_(src)``
into a preallocated buffer of that size; bandwidth = bytes copied / time).

Output: a table; with ``--json``, one JSON object as the last line::

    {"<device>": {"<key>": {"n": n, "f": f, "d": d, "ms": t, "floor_ms": m}, ...}, ...}

Key scheme: the rule's name for the first configuration (n=20, d=1e6), ``<rule>@n50`` for
(n=50, d=1e5) and ``<rule>@n50_d11M`` for (n=50, d=1.1e7).  A rule that raised is absent
from the JSON and listed as skipped in the table (with the error); ``"skipped"`` holds
``{"<key>": "<error>"}`` per device when any was.  ``ms`` is the best of ``--repeats``
timed calls after one warm-up call.

Usage::

    python scripts/bench_gars.py [--device cpu|cuda|all] [--quick] [--repeats R] [--json]
                                 [--rules median,krum,...] [--threads T] [--compile]
                                 [--config N,F,D ...]

``x_floor`` in the JSON is ``ms / floor_ms`` (what scripts/gpu_check.sh reports).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import byzsgd.gars as gars  # noqa: E402

CONFIGS = {
    "cpu": [("", 20, 4, 10**6), ("@n50", 50, 10, 10**5)],
    "cuda": [("", 20, 4, 10**6), ("@n50", 50, 10, 10**5), ("@n50_d11M", 50, 10, 11 * 10**6)],
}


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def best_time(fn, dev, repeats: int) -> float:
    fn()  # warm-up (compiles networks, allocator, caches)
    sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(x: torch.Tensor, repeats: int) -> float:
    """Bytes per second of ``dst.copy_(x)`` into a reused buffer."""
    dst = torch.empty_like(x)
    t = best_time(lambda: dst.copy_(x), x.device, max(3, repeats))
    return x.numel() * x.element_size() / t


def run_rule(name: str, x: torch.Tensor, f: int):
    rule = gars.get(name)
    call = gars.pre_aggregate if rule.pre else gars.aggregate
    return lambda: call(name, x, f)


def usable_f(name: str, n: int, f: int) -> int:
    while f > 0 and gars.min_inputs(name, f) > n:
        f -= 1
    return f


def parse_config(text: str) -> tuple[str, int, int, int]:
    """``n,f,d`` (d may be written 1.1e7) -> (key suffix, n, f, d)."""
    try:
        n, f, d = text.split(",")
        n, f, d = int(n), int(f), int(float(d))
    except ValueError:
        raise SystemExit(f"--config expects n,f,d (e.g. 50,10,1.1e7), got {text!r}") from None
    tag = f"@n{n}" + (f"_d{d / 1e6:g}M" if d >= 10**6 else f"_d{d}")
    return tag.replace(".", "p"), n, f, d


def bench_device(dev: torch.device, rules: list[str], repeats: int, quick: bool, configs=None):
    results, skipped, rows = {}, {}, []
    for tag, n, f, d in configs or CONFIGS[dev.type]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g).to(dev)
        bw = copy_bandwidth(x, repeats)
        floor = x.numel() * x.element_size() / bw
        rows.append(f"-- {dev.type}: n={n} f={f} d={d:.3g}  copy {bw / 1e9:.2f} GB/s, "
                    f"floor {floor * 1e3:.2f} ms")
        for name in rules:
            key = name + tag
            fu = usable_f(name, n, f)
            try:
                t = best_time(run_rule(name, x, fu), dev, repeats)
            except Exception as e:  # noqa: BLE001 - a broken rule must not stop the bench
                msg = f"{type(e).__name__}: {e}"[:200]
                skipped[key] = msg
                rows.append(f"   {key:<28} SKIPPED ({msg})")
                continue
            results[key] = {"n": n, "f": fu, "d": d, "ms": round(t * 1e3, 3),
                            "floor_ms": round(floor * 1e3, 3), "x_floor": round(t / floor, 2)}
            note = "" if fu == f else f"  (f={fu}: its bound refuses f={f})"
            rows.append(f"   {key:<28} {t * 1e3:10.2f} ms  {t / floor:7.1f}x floor{note}")
            print(rows[-1], file=sys.stderr, flush=True)
        del x
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    if skipped:
        results["skipped"] = skipped
    return results, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    ap.add_argument("--quick", action="store_true", help="1 timed repeat (after a warm-up)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--rules", default="", help="comma-separated subset of rules")
    ap.add_argument("--compile", action="store_true",
                    help="set BYZSGD_GAR_COMPILE=1: fused torch.compile CPU kernels for the "
                         "median family (first call per rule compiles, untimed warm-up)")
    ap.add_argument("--config", action="append", default=[], metavar="N,F,D",
                    help="time only this configuration (repeatable), e.g. 50,10,1.1e7 "
                         "(key suffix @n50_d11M)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the machine is shared, docs/design.md §9)")
    a = ap.parse_args(argv)
    if a.compile:
        os.environ["BYZSGD_GAR_COMPILE"] = "1"
    torch.set_num_threads(a.threads)
    repeats = a.repeats if a.repeats is not None else (1 if a.quick else 3)
    rules = [r for r in a.rules.split(",") if r] or gars.names()
    devs = ["cpu", "cuda"] if a.device == "all" else [a.device]
    out, table = {}, []
    for dv in devs:
        if dv == "cuda" and not torch.cuda.is_available():
            table.append("-- cuda: not available, skipped")
            continue
        dev = torch.device(dv)
        res, rows = bench_device(dev, rules, repeats, a.quick,
                                 [parse_config(c) for c in a.config] or None)
        name = torch.cuda.get_device_name(dev) if dv == "cuda" else "cpu"
        table.append(f"== {dv} ({name}), threads={torch.get_num_threads()}, repeats={repeats}")
        table += rows
        out[dv] = res
    print("\n".join(table))
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
