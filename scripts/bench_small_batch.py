"""Small-batch MoE cost: the sorted (grouped-GEMM) path, the dense all-experts path and a dense MLP, side by side.

RL rollouts and few-shot episodes feed the MoE a few to a few hundred tokens, where the sorted path's
fixed cost (sort, gathers, a host sync) dominates. This times ``MoE(dense_dispatch=False/True)`` on the
same layer and inputs (forward under no_grad with the default statistics, and forward+backward with the aux
loss), the RL-rollout forward (no_grad, ``stats_in_inference=False``, the path ``"auto"`` picks), and a dense
MLP of equal *active* parameters (``Linear(D, k*H) -> GELU -> Linear(k*H, D)``, no biases, like the experts;
the router's ``D*E`` weights not counted) plus a ``Linear(D, D)`` for scale; all interleaved in turns of
100 calls (10 turns each), medians, one thread. Ratios are the path ``"auto"`` picks over the dense MLP. It
picks the ``DENSE_MACS`` crossover; where that is the dense path and the layer is one ``core/fused.py`` supports,
``"auto"`` trains through the fused step instead, timed as "fused" (forward+backward only: it has no
inference role). ``--compile`` adds ``torch.compile`` of the whole layer at a few sizes (compile time of the first
call, then steady-state medians against the same MLP).

    python scripts/bench_small_batch.py --compile --out benchmarks/results/small_batch.json
    python scripts/bench_small_batch.py --quick --out /tmp/sb.json
    python scripts/bench_small_batch.py --shapes 64/64/4/2 64/32/4/1 --tokens 8 64 256 --out sb.json   # a subset
    python scripts/bench_small_batch.py --markdown benchmarks/results/small_batch.json   # the BENCHMARKS tables
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


ROUNDS = 10


def count_ops(module, x, phase: str) -> int:
    """Top-level aten ops of one call of ``_step`` (profiler events whose parent is not an aten op): at these sizes each
    op's dispatch, not its arithmetic, is the cost."""
    from torch.profiler import profile

    _step(module, x, phase)  # warm
    with profile() as prof:
        _step(module, x, phase)
    return sum(1 for e in prof.events() if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def _interleaved(fns: dict, n: int, repeats: int, rounds: int | None = None) -> dict[str, float]:
    """Median microseconds per call of each function, the functions timed in turn ``rounds`` times (fine-grained
    turns, so a burst of load from other processes hits every function alike)."""
    rounds = ROUNDS if rounds is None else rounds
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name] += _time(fn, n, repeats)
    return {name: st.median(v) for name, v in samples.items()}


def _mlp(d: int, h: int, k: int) -> torch.nn.Module:
    """A dense MLP with the MoE's active parameters: k experts' worth of hidden units, no biases."""
    return torch.nn.Sequential(torch.nn.Linear(d, k * h, bias=False), torch.nn.GELU(), torch.nn.Linear(k * h, d, bias=False))


def _compiled(moe, mlp, d: int, tokens: list[int], n: int, repeats: int) -> list[dict]:
    """torch.compile of the whole layer (dense path, rollout settings for the forward): first-call compile
    seconds, then medians against the MLP."""
    out = []
    cmoe = torch.compile(moe)
    for t in tokens:
        x = torch.randn(t, d, requires_grad=True)
        t0 = time.perf_counter()
        _step(cmoe, x, "forward")
        compile_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        _step(cmoe, x, "train")
        compile_train = time.perf_counter() - t0
        row = {"tokens": t, "compile_forward_s": compile_fwd, "compile_train_s": compile_train}
        for phase in ("forward", "train"):
            m = _interleaved({"moe": lambda p=phase: _step(cmoe, x, p), "mlp": lambda p=phase: _step(mlp, x, p)}, n, repeats)  # noqa: B023 (timed at once, in this iteration)
            row[f"{phase}_compiled_us"], row[f"{phase}_mlp_us"] = m["moe"], m["mlp"]
            row[f"{phase}_ratio"] = m["moe"] / m["mlp"]
        out.append(row)
        print(f"compiled T={t:4d}: first call fwd {compile_fwd:.1f} s, fwd+bwd {compile_train:.1f} s; "
              f"fwd {row['forward_compiled_us']:.0f} us = {row['forward_ratio']:.2f}x MLP, "
              f"fwd+bwd {row['train_compiled_us']:.0f} us = {row['train_ratio']:.2f}x MLP")
    return out


def markdown(data: dict) -> str:
    """The BENCHMARKS.md tables of a result file."""
    lines = [
        "| D / H / E / top-k | tokens | auto picks (training) | forward sorted / dense / rollout / MLP (µs) | fwd+bwd sorted / dense / fused / MLP (µs) "
        "| forward ÷ MLP | rollout ÷ MLP | fwd+bwd ÷ MLP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["records"]:
        fused = f"{r['train_fused_us']:.0f}" if "train_fused_us" in r else "–"
        picks = ("fused" if r.get("fused") else "dense") if r["auto_dense"] else "sorted"
        lines.append(
            f"| {r['d_model']} / {r['hidden']} / {r['experts']} / {r['top_k']} | {r['tokens']} | "
            f"{picks} | {r['forward_sorted_us']:.0f} / {r['forward_dense_us']:.0f} / "
            f"{r['forward_rollout_us']:.0f} / {r['forward_mlp_us']:.0f} | {r['train_sorted_us']:.0f} / {r['train_dense_us']:.0f} / "
            f"{fused} / {r['train_mlp_us']:.0f} | **{r['forward_ratio']:.2f}×** | **{r['rollout_ratio']:.2f}×** | **{r['train_ratio']:.2f}×** |"
        )
    if data.get("compiled"):
        lines += ["", "| tokens | first call: forward / fwd+bwd (s) | forward µs (÷ MLP) | fwd+bwd µs (÷ MLP) |", "|---|---|---|---|"]
        for c in data["compiled"]:
            lines.append(
                f"| {c['tokens']} | {c['compile_forward_s']:.1f} / {c['compile_train_s']:.1f} | "
                f"{c['forward_compiled_us']:.0f} ({c['forward_ratio']:.2f}×) | {c['train_compiled_us']:.0f} ({c['train_ratio']:.2f}×) |"
            )
    return "\n".join(lines)


def main() -> None:
    from moeparadigms.core import MLPExperts, MoE, TopKRouter, fused
    from moeparadigms.core.layer import DENSE_MACS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of the layer (64/64/4/2)")
    ap.add_argument("--markdown", type=Path, help="print the tables of a result file and exit")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="token counts (default 8 ... 1,024)")
    ap.add_argument("--shapes", nargs="+", default=None, help="D/H/E/k of each layer, e.g. 64/64/4/2 (default: three)")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if args.out is None:
        ap.error("--out is required (or --markdown FILE)")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    global ROUNDS
    n, repeats, ROUNDS = (5, 2, 2) if args.quick else (100, 1, 10)
    shapes = [(64, 64, 4, 2)] if args.quick else [(64, 64, 4, 2), (64, 32, 4, 1), (256, 512, 8, 2)]
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.split("/")) for sh in args.shapes]
    tokens = args.tokens or ([8, 64] if args.quick else [8, 32, 64, 128, 256, 512, 1024])
    records, compiled = [], []
    for d, h, e, k in shapes:
        moe = MoE(router=TopKRouter(d_model=d, num_experts=e, top_k=k), experts=MLPExperts(d_model=d, hidden=h, num_experts=e))
        rollout = MoE(router=moe.router, experts=moe.experts, stats_in_inference=False)  # same weights, RL settings
        lin, mlp = torch.nn.Linear(d, d), _mlp(d, h, k)
        for t in tokens if d * h <= 64 * 64 else tokens[:4]:  # the big layer only where the dense path can win
            x = torch.randn(t, d, requires_grad=True)
            wasted = t * (e - k) * 2 * d * h  # the dense path's multiply-adds on unrouted (token, expert) pairs
            row = {"d_model": d, "hidden": h, "experts": e, "top_k": k, "tokens": t, "unrouted_macs": wasted,
                   "auto_dense": wasted <= DENSE_MACS, "mlp_hidden": k * h}
            auto = "dense" if row["auto_dense"] else "sorted"
            row["fused"] = row["auto_dense"] and fused.supports(moe, x)
            for phase in ("forward", "train"):

                def moe_step(flag, p=phase, x=x):
                    moe.dense_dispatch = flag  # noqa: B023 (timed at once, in this iteration)
                    _step(moe, x, p)  # noqa: B023 (timed at once, in this iteration)

                fns = {"sorted": lambda: moe_step(False), "dense": lambda: moe_step(True)}
                if phase == "train" and row["fused"]:  # "auto" trains through core/fused.py where it picks the dense path
                    fns["fused"] = lambda: moe_step("auto")
                if phase == "forward":
                    rollout.dense_dispatch = row["auto_dense"]
                    fns["rollout"] = lambda x=x: _step(rollout, x, "forward")  # noqa: B023 (timed at once, in this iteration)
                fns["mlp"] = lambda p=phase, x=x: _step(mlp, x, p)  # noqa: B023 (timed at once, in this iteration)
                fns["linear"] = lambda p=phase, x=x: _step(lin, x, p)  # noqa: B023 (timed at once, in this iteration)
                m = _interleaved(fns, n, repeats)
                for name, us in m.items():
                    row[f"{phase}_{name}_us"] = us
                picked = "fused" if phase == "train" and row["fused"] else auto
                row[f"{phase}_ratio"] = m[picked] / m["mlp"]  # what dense_dispatch="auto" costs over the dense MLP
            row["rollout_ratio"] = row["forward_rollout_us"] / row["forward_mlp_us"]
            for flag, name in ((True, "dense"), ("auto", "fused" if row["fused"] else auto)):
                moe.dense_dispatch = flag
                row[f"train_ops_{name}"] = count_ops(moe, x, "train")
            row["train_ops_mlp"] = count_ops(mlp, x, "train")
            moe.dense_dispatch = "auto"
            records.append(row)
            print(f"D={d} H={h} E={e} k={k} T={t:5d} unrouted macs={wasted:>11,} auto={auto:6s} "
                  f"fwd sorted/dense/rollout/MLP {row['forward_sorted_us']:6.0f}/{row['forward_dense_us']:6.0f}/"
                  f"{row['forward_rollout_us']:6.0f}/{row['forward_mlp_us']:5.0f} us  "
                  f"fwd+bwd sorted/dense/fused/MLP {row['train_sorted_us']:6.0f}/{row['train_dense_us']:6.0f}/"
                  f"{row.get('train_fused_us', float('nan')):6.0f}/{row['train_mlp_us']:5.0f} us  "
                  f"x MLP: fwd {row['forward_ratio']:.2f} rollout {row['rollout_ratio']:.2f} fwd+bwd {row['train_ratio']:.2f}  "
                  f"fwd+bwd aten ops dense/fused/MLP {row['train_ops_dense']}/{row.get('train_ops_fused', '-')}/{row['train_ops_mlp']}")
        if args.compile and (d, h, e, k) == (64, 64, 4, 2):
            moe.dense_dispatch = True
            moe.stats_in_inference = False
            compiled = _compiled(moe, mlp, d, [8, 64, 256], n, repeats)
            moe.dense_dispatch, moe.stats_in_inference = "auto", True
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"mlp": "Linear(D, top_k*H, bias=False) -> GELU -> Linear(top_k*H, D, bias=False)",
            "forward": "no_grad, default MoE (statistics kept)", "rollout": "no_grad, stats_in_inference=False, auto path",
            "train": "forward + backward of y.sum() + aux_loss", "ratio": "auto path / dense MLP", "n": n, "repeats": repeats, "rounds": ROUNDS}
    out = {"records": records, "dense_macs": DENSE_MACS, "threads": 1, "setup": meta}
    if compiled:
        out["compiled"] = compiled
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
