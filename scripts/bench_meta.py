"""Meta-learning benchmark: MAML over an MoE network against MAML over dense networks of the same size.

For each benchmark (sinusoid, multimodal regression, few-shot digits), shots K in {5, 10}, seed and method,
one MetaMoE is meta-trained with the same budget (meta-iterations, meta-batch, inner steps, outer
optimiser) and evaluated on the same fixed held-out tasks after 0..10 inner steps. Methods:

* ``dense-maml``: second-order MAML, a 2-hidden-layer ReLU MLP whose width is chosen so its parameter count
  matches the MoE network's (reported as ``params``);
* ``moe-maml``: second-order MAML over ``Linear -> ReLU -> residual MoE block (4 experts, top-2, differentiable
  experts) -> head``; every parameter (router included) adapts in the inner loop.

(A CAVIA context vector fed to the router was tried: with inner learning rates of 1.0 and 0.1 it diverged
on the multimodal targets, so neither network uses one; ``MetaMoE(context_dim=...)`` keeps the option.)

Records (``--out``): ``{"benchmark", "method", "K", "steps", "seed", "metric", "mean", "ci95", "params",
"meta_iterations", "tasks", "train_s"}`` for steps 0, 1 and 10; ``mean``/``ci95`` over the held-out tasks.
Adaptation curves (mean over seeds, 95% CI band over tasks) are written as PNG under ``--plots``.

    python scripts/bench_meta.py --out benchmarks/results/meta.json --plots benchmarks/results/meta_plots
    python scripts/bench_meta.py --quick --out /tmp/meta.json             # seconds-long smoke run

``--timing`` measures the cost instead (issue 15): wall time per meta-iteration (the whole training step:
inner adaptation, outer loss, backward, Adam) of ``moe-maml`` and ``dense-maml`` at matched parameter
counts, in one process, the methods alternating in rounds; records ``{"benchmark", "method", "K", "params",
"us_per_iter", "us_per_iter_rounds", "ratio_to_dense"}`` (medians over iterations after a warm-up):

    python scripts/bench_meta.py --timing --out benchmarks/results/meta_timing.json
"""
from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

BENCHMARKS = {"sinusoid": "SinusoidTasks", "multimodal": "MultimodalTasks", "fewshot-digits": "FewShotDigits"}
METHODS = ("dense-maml", "moe-maml")
# variants run with --methods (not in the default run): only the router and the head adapt
VARIANTS = ("moe-maml-router",)
# Finn et al. use 0.01 (sinusoid) and 0.4 (Omniglot). Here 0.4 and 0.01 made the MoE diverge on digits and on
# the multimodal targets (|y| up to ~18); the same rate serves both networks of a benchmark.
INNER_LR = {"sinusoid": 0.01, "multimodal": 0.001, "fewshot-digits": 0.1}


def _moe(d_model: int):
    from moeparadigms.core import MLPExperts, MoE, TopKRouter

    return MoE(router=TopKRouter(d_model=d_model, num_experts=4, top_k=2),
               experts=MLPExperts(d_model=d_model, hidden=d_model, num_experts=4, backend="autograd"),
               load_balance_coef=0.01, z_loss_coef=0.0)


def _count(model) -> int:
    return sum(p.numel() for p in model.net.parameters())


def _model(method: str, dm, width: int | None, inner_lr: float):
    from moeparadigms.paradigms.meta import MetaMoE

    kw = dict(algorithm="maml", adapt=["all"], inner_steps=1, inner_lr=inner_lr, eval_steps=10, outer_lr=1e-3,
              plots=False, in_features=dm.in_features, out_features=dm.out_features, task_kind=dm.kind)
    if method == "moe-maml":
        return MetaMoE(moe=_moe(32), **kw)
    if method == "moe-maml-router":
        return MetaMoE(moe=_moe(32), **{**kw, "adapt": ["router", "head"]})
    return MetaMoE(width=width, depth=2, **kw)


def _matched_width(method: str, dm, inner_lr: float, target: int) -> int:
    """The dense width whose parameter count is closest to ``target`` (the MoE network's)."""
    return min(range(8, 400), key=lambda w: abs(_count(_model(method, dm, w, inner_lr)) - target))


def fit_and_test(model, dm) -> tuple[float, dict]:
    """Meta-train ``model`` for one epoch of ``dm`` (no validation) and test it on the held-out tasks: (training
    wall seconds, ``model.eval_results["test"]``)."""
    import pytorch_lightning as pl

    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", inference_mode=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    train_s = time.perf_counter() - t0
    trainer.test(model, dm, verbose=False)
    return train_s, model.eval_results["test"]


def run_one(job: dict) -> dict:
    import pytorch_lightning as pl
    import torch

    from moeparadigms.benchmarks import meta as M

    torch.set_num_threads(1)
    pl.seed_everything(job["seed"], workers=True, verbose=False)
    dm_kw = dict(shots=job["K"], query=job["query"], meta_batch_size=job["meta_batch"], meta_iterations=job["iters"],
                 num_test_tasks=job["tasks"], eval_batch_size=100, seed=job["seed"])
    dm = getattr(M, BENCHMARKS[job["benchmark"]])(**dm_kw)
    inner_lr = INNER_LR[job["benchmark"]]
    target = _count(_model("moe-maml", dm, None, inner_lr))
    width = None if job["method"].startswith("moe-") else _matched_width(job["method"], dm, inner_lr, target)
    pl.seed_everything(job["seed"], workers=True, verbose=False)
    model = _model(job["method"], dm, width, inner_lr)
    train_s, r = fit_and_test(model, dm)
    return {**job, "params": _count(model), "width": width, "train_s": train_s, "curve_mean": r["mean"],
            "curve_ci95": r["ci95"], "n_tasks": r["tasks"], "metric": "mse" if dm.kind == "regression" else "accuracy"}


class _IterTimer:
    """Lightning callback: wall time of every training batch (one meta-iteration), in microseconds."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append((time.perf_counter() - self._t0) * 1e6)


def timing(args) -> list[dict]:
    import statistics as st

    import pytorch_lightning as pl
    import torch
    from pytorch_lightning import Callback

    from moeparadigms.benchmarks import meta as M

    torch.set_num_threads(1)
    timer_cls = type("IterTimer", (_IterTimer, Callback), {})
    iters, warm, rounds = (6, 2, 1) if args.quick else (args.timing_iters, 10, args.timing_rounds)
    records = []
    for b in args.benchmarks:
        K = args.shots[0]
        per_method: dict[str, list[float]] = {m: [] for m in METHODS}
        medians: dict[str, list[float]] = {m: [] for m in METHODS}
        params = {}
        for _ in range(rounds):
            for m in METHODS:
                pl.seed_everything(0, verbose=False)
                dm = getattr(M, BENCHMARKS[b])(shots=K, query=10, meta_batch_size=args.meta_batch, meta_iterations=iters,
                                               num_test_tasks=4, eval_batch_size=4, seed=0)
                inner_lr = INNER_LR[b]
                target = _count(_model("moe-maml", dm, None, inner_lr))
                width = None if m.startswith("moe-") else _matched_width(m, dm, inner_lr, target)
                model = _model(m, dm, width, inner_lr)
                params[m] = _count(model)
                timer = timer_cls()
                pl.Trainer(max_epochs=1, accelerator="cpu", inference_mode=False, logger=False, enable_checkpointing=False,
                           enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                           callbacks=[timer]).fit(model, dm)
                per_method[m] += timer.times[warm:]
                medians[m].append(st.median(timer.times[warm:]))
        dense = st.median(per_method["dense-maml"])
        for m in METHODS:
            us = st.median(per_method[m])
            records.append({"benchmark": b, "method": m, "K": K, "meta_batch": args.meta_batch, "params": params[m],
                            "us_per_iter": us, "us_per_iter_rounds": medians[m], "ratio_to_dense": us / dense})
            print(f"{b:15s} K={K} {m:11s} params {params[m]:6,d}: {us:9.0f} us per meta-iteration ({us / dense:.2f}x dense)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1))
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--plots", type=Path, default=None, help="folder for the adaptation-curve PNGs")
    ap.add_argument("--quick", action="store_true", help="tiny budget, one seed, K=5: a smoke run")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=500, help="meta-iterations per run (same for every method)")
    ap.add_argument("--meta-batch", type=int, default=8)
    ap.add_argument("--tasks", type=int, default=600, help="held-out test tasks")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=list(BENCHMARKS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=[*METHODS, *VARIANTS])
    ap.add_argument("--shots", nargs="+", type=int, default=[5, 10])
    ap.add_argument("--timing", action="store_true", help="wall per meta-iteration, MoE vs dense MAML (issue 15)")
    ap.add_argument("--timing-iters", type=int, default=60, help="meta-iterations per timed fit")
    ap.add_argument("--timing-rounds", type=int, default=3, help="fits per method, alternating")
    args = ap.parse_args()
    if args.timing:
        timing(args)
        return
    shots, seeds, iters, tasks = ([5], 1, 3, 20) if args.quick else (args.shots, args.seeds, args.iters, args.tasks)
    jobs = [dict(benchmark=b, K=K, seed=s, method=m, iters=iters, meta_batch=args.meta_batch, tasks=tasks, query=10)
            for s in range(seeds) for b in args.benchmarks for K in shots for m in args.methods]
    results = []
    try:
        from rich.progress import track
    except ImportError:  # pragma: no cover
        def track(it, **_):
            return it
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            for r in track(pool.map(run_one, jobs), total=len(jobs), description="meta-training"):
                results.append(r)
    else:
        for job in track(jobs, description="meta-training"):
            results.append(run_one(job))
    records = []
    for r in results:
        for k in (0, 1, 10):
            records.append({"benchmark": r["benchmark"], "method": r["method"], "K": r["K"], "steps": k, "seed": r["seed"],
                            "metric": r["metric"], "mean": r["curve_mean"][k], "ci95": r["curve_ci95"][k],
                            "params": r["params"], "meta_iterations": r["iters"], "meta_batch": r["meta_batch"],
                            "tasks": r["n_tasks"], "train_s": r["train_s"]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"records": records, "curves": results, "wall_s": time.perf_counter() - t0}, indent=1))
    print(table(records))
    if args.plots:
        for p in plots(results, args.plots):
            print("plot:", p)


def _agg(records: list[dict]) -> dict:
    import statistics as st

    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["benchmark"], r["K"], r["method"], r["steps"]), []).append(r)
    return {k: (st.mean(x["mean"] for x in v), st.mean(x["ci95"] for x in v), len(v), v[0]["params"]) for k, v in groups.items()}


def table(records: list[dict]) -> str:
    """Markdown: mean over seeds of the per-seed task means, and the mean per-seed 95% CI (over tasks)."""
    agg = _agg(records)
    lines = ["| benchmark | K | method | params | metric | 1 step | 10 steps | seeds |", "|---|---|---|---|---|---|---|---|"]
    metric = {r["benchmark"]: r["metric"] for r in records}
    for b, K, m in sorted({(k[0], k[1], k[2]) for k in agg}):
        s1, s10 = agg.get((b, K, m, 1)), agg.get((b, K, m, 10))
        lines.append(f"| {b} | {K} | {m} | {s1[3]:,} | {metric[b]} | {s1[0]:.3f} ± {s1[1]:.3f} | {s10[0]:.3f} ± {s10[1]:.3f} | {s1[2]} |")
    return "\n".join(lines)


def plots(results: list[dict], folder: Path) -> list[Path]:
    import torch

    from moeparadigms.paradigms.meta import plot_adaptation_curves

    out = []
    for b, K in sorted({(r["benchmark"], r["K"]) for r in results}):
        curves = {}
        for m in (*METHODS, *VARIANTS):
            rs = [r for r in results if (r["benchmark"], r["K"], r["method"]) == (b, K, m)]
            if rs:
                curves[m] = {"mean": torch.tensor([r["curve_mean"] for r in rs]).mean(0).tolist(),
                             "ci95": torch.tensor([r["curve_ci95"] for r in rs]).mean(0).tolist()}
        metric = next(r["metric"] for r in results if r["benchmark"] == b)
        label = "query MSE" if metric == "mse" else "query accuracy"
        out.append(plot_adaptation_curves(curves, folder / f"{b}_K{K}.png", ylabel=label, title=f"{b}, K={K}: held-out tasks"))
    return out


if __name__ == "__main__":
    main()
