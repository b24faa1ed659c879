#!/usr/bin/env python
"""The expert kernel alone (no router, no dispatch), for the options tried on the large-layer gap (issue 15):

* ``kernel``: forward+backward of :class:`~moeparadigms.core.grouped_ffn.GroupedFFN` on expert-sorted rows
  (balanced routing, top-k rows per token), the fused per-expert kernel against the earlier per-GEMM grouped
  path, interleaved, medians;
* ``recompute``: what saving the activation instead of recomputing it could gain at most: the time of the
  activation over all (A, H) rows, one expert at a time as the backward recomputes it, next to the kernel's step;
* ``packed``: one expert's GEMM (rows x D @ D x H) through ``torch.mm`` against MKL's packed-weight GEMM
  (``torch.ops.mkl._mkl_linear`` on a ``_mkl_reorder_linear_weight`` packing), one thread, and the packing
  itself (the weights change every step, so each step would pack each weight once per orientation);
* ``faults``: minor page faults per forward+backward of the whole layer against the dense FFN (fresh
  memory the kernel has to zero-fill; large allocations are fresh ``mmap`` s every step).

    python scripts/bench_core_kernel.py --reps 5 --out benchmarks/results/core_kernel_cpu.json
    python scripts/bench_core_kernel.py --quick                      # seconds-long smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_core  # noqa: E402

from moeparadigms.core import MLPExperts, grouped_ffn  # noqa: E402


def _median_ms(fns: dict, warmup: int, reps: int) -> dict[str, float]:
    """Median wall ms per call of each function (interleaved, order rotated), and with ``cpu_`` the median
    process CPU ms (robust to other processes on the cores; meaningful with one thread, where no worker spins)."""
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(warmup + reps):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[k]()
            if r >= warmup:
                wall[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
    return {k: 1000 * statistics.median(v) for k, v in wall.items()} | {
        f"cpu_{k}": 1000 * statistics.median(v) for k, v in cpu.items()}


def kernel(E: int, k: int, tokens: int, d: int, h: int, warmup: int, reps: int) -> dict:
    torch.manual_seed(0)
    bank = MLPExperts(d_model=d, hidden=h, num_experts=E)
    A = tokens * k
    counts = torch.full((E,), A // E)
    x = torch.randn(A, d, requires_grad=True)
    g = torch.randn(A, d)

    def step(fused: bool):
        def run():
            prev, grouped_ffn.FUSED = grouped_ffn.FUSED, fused
            try:
                for p in bank.parameters():
                    p.grad = None
                x.grad = None
                bank(x, counts).backward(g)
            finally:
                grouped_ffn.FUSED = prev
        return run

    def act_recompute():  # the backward's recompute of the activation, one expert's rows at a time
        for hs in hbuf.split(A // E):
            F.gelu(hs)

    hbuf = torch.randn(A, h)
    ms = _median_ms({"fused": step(True), "grouped": step(False), "act_recompute": act_recompute}, warmup, reps)
    return {"E": E, "k": k, "rows": A, "threads": torch.get_num_threads(), **{f"{n}_ms": v for n, v in ms.items()},
            "fused_vs_grouped": ms["fused"] / ms["grouped"], "cpu_fused_vs_grouped": ms["cpu_fused"] / ms["cpu_grouped"],
            "recompute_share_of_fused": ms["act_recompute"] / ms["fused"]}


def packed(rows: int, d: int, h: int, reps: int) -> dict | None:
    if not torch.backends.mkl.is_available():
        print("packed: this torch has no MKL; skipped", file=sys.stderr)
        return None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    x, w = torch.randn(rows, d), torch.randn(d, h)
    wt = w.t().contiguous()  # (out, in), the layout linear takes
    out = torch.empty(rows, h)
    wp = torch.ops.mkl._mkl_reorder_linear_weight(wt, rows)
    torch.testing.assert_close(torch.ops.mkl._mkl_linear(x, wp, wt, None, rows), x @ w, rtol=1e-4, atol=1e-3)
    ms = _median_ms({
        "mm": lambda: torch.mm(x, w, out=out),
        "mkl_packed_gemm": lambda: torch.ops.mkl._mkl_linear(x, wp, wt, None, rows),
        "mkl_pack_weight": lambda: torch.ops.mkl._mkl_reorder_linear_weight(wt, rows),
    }, 5, reps)
    torch.set_num_threads(threads)
    return {"rows": rows, "d": d, "h": h, **{f"{n}_ms": v for n, v in ms.items()}}


def faults(E: int, k: int, tokens: int, d: int, h: int) -> dict:
    s = bench_core.Shape(tokens, d, h, E, k)
    x, g = bench_core._inputs(s, 1)
    out = {}
    for impl in ("dense", "moeparadigms", "moeparadigms-grouped"):
        _, step = bench_core.build(impl, s)
        step(x, g)
        x.grad = None
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(x, g)
        x.grad = None
        out[impl] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return {"E": E, "k": k, **{f"{i}_fault_mb": v for i, v in out.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one rep: a smoke run")
    args = ap.parse_args(argv)
    for name in ("tokens", "reps", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be positive, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    d, h = (64, 128) if args.quick else (512, 1024)
    if args.quick:
        args.tokens, args.warmup, args.reps = 256, 0, 1
    res: dict = {"kernel": [], "faults": [], "load_before": os.getloadavg()[0]}
    for threads in sorted({args.threads, 1}, reverse=True):  # and one thread, where CPU time is clean
        torch.set_num_threads(threads)
        for E in (8, 64):
            res["kernel"].append(kernel(E, 2, args.tokens, d, h, args.warmup, args.reps))
            print(res["kernel"][-1], flush=True)
    torch.set_num_threads(args.threads)
    res["packed"] = packed(2 * args.tokens // 64, d, h, 3 * args.reps)  # one expert's rows at E = 64, top-2
    print(res["packed"], flush=True)
    for E in (8, 64):
        res["faults"].append(faults(E, 2, args.tokens, d, h))
        print(res["faults"][-1], flush=True)
    res["load_after"] = os.getloadavg()[0]
    res["meta"] = {"torch": torch.__version__, "threads": args.threads, "tokens": args.tokens, "d_model": d, "hidden": h}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
