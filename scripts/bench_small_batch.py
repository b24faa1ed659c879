"""Small-batch MoE cost: the sorted (grouped-GEMM) path against the dense all-experts path, side by side.

RL rollouts and few-shot episodes feed the MoE a few to a few hundred tokens, where the sorted path's
fixed cost (sort, gathers, a host sync) dominates. This times both ``MoE(dense_dispatch=False/True)`` on the
same layer and inputs (forward under no_grad, and forward+backward), interleaved, median of repeats, one
thread, and a dense ``Linear`` layer of the active width for scale; it picks the ``DENSE_MACS`` crossover.

    python scripts/bench_small_batch.py --out benchmarks/results/small_batch.json
    python scripts/bench_small_batch.py --quick --out /tmp/sb.json
"""
from __future__ import annotations

import argparse
import json
import statistics as st
import time
from pathlib import Path

import torch


def _time(fn, n: int, repeats: int) -> list[float]:
    for _ in range(max(3, n // 10)):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out.append((time.perf_counter() - t0) / n * 1e6)
    return out


def _step(module, x, phase: str) -> None:
    """One forward (no_grad) or one forward+backward of an MoE (its aux loss included) or a plain module."""
    if phase == "forward":
        with torch.no_grad():
            module(x)
        return
    out = module(x)
    loss = out.y.sum() + out.aux_loss if hasattr(out, "aux_loss") else out.sum()
    loss.backward()


def main() -> None:
    from moeparadigms.core import MLPExperts, MoE, TopKRouter
    from moeparadigms.core.layer import DENSE_MACS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    n, repeats = (5, 2) if args.quick else (100, 5)
    shapes = [(64, 64, 4, 2)] if args.quick else [(64, 64, 4, 2), (64, 32, 4, 1), (256, 512, 8, 2)]
    tokens = [8, 64] if args.quick else [8, 32, 64, 128, 256, 512, 1024]
    records = []
    for d, h, e, k in shapes:
        moe = MoE(router=TopKRouter(d_model=d, num_experts=e, top_k=k), experts=MLPExperts(d_model=d, hidden=h, num_experts=e))
        lin = torch.nn.Linear(d, d)
        for t in tokens if d * h <= 64 * 64 else tokens[:4]:  # the big layer only where the dense path can win
            x = torch.randn(t, d, requires_grad=True)
            wasted = t * (e - k) * 2 * d * h  # the dense path's multiply-adds on unrouted (token, expert) pairs
            row = {"d_model": d, "hidden": h, "experts": e, "top_k": k, "tokens": t, "unrouted_macs": wasted,
                   "auto_dense": wasted <= DENSE_MACS}
            for phase in ("forward", "train"):
                samples: dict[str, list[float]] = {"sorted": [], "dense": []}
                for _ in range(2):  # interleave the two paths
                    for name, flag in (("sorted", False), ("dense", True)):
                        moe.dense_dispatch = flag
                        samples[name] += _time(lambda m=moe, x=x, p=phase: _step(m, x, p), n, repeats)
                row[f"{phase}_sorted_us"] = st.median(samples["sorted"])
                row[f"{phase}_dense_us"] = st.median(samples["dense"])
                row[f"{phase}_linear_us"] = st.median(_time(lambda m=lin, x=x, p=phase: _step(m, x, p), n, repeats))
            records.append(row)
            print(f"D={d} H={h} E={e} k={k} T={t:5d} unrouted macs={row['unrouted_macs']:>11,} auto={'dense ' if row['auto_dense'] else 'sorted'} "
                  f"fwd sorted/dense {row['forward_sorted_us']:7.0f}/{row['forward_dense_us']:7.0f} us  "
                  f"fwd+bwd sorted/dense {row['train_sorted_us']:7.0f}/{row['train_dense_us']:7.0f} us  "
                  f"(Linear {row['forward_linear_us']:.0f}/{row['train_linear_us']:.0f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"records": records, "dense_macs": DENSE_MACS, "threads": 1}, indent=1))


if __name__ == "__main__":
    main()
