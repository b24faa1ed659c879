"""Continual-learning benchmark: our expert growth against Avalanche's strategies, measured side by side.

Every method sees the same Avalanche stream (built by our DataModules), the same seeds, epochs per
experience, batch size and optimizer (Adam, lr 1e-3); Avalanche's strategies train a 2x256 MLP (task-masked
at test time in the task-incremental setting), ours a growing MoE of about the same final size.
Every method is scored by the same code: after each experience, accuracy on every test experience fills
the accuracy matrix, from which avg_acc / forgetting / BWT follow Avalanche's definitions
(``moeparadigms.paradigms.continual_metrics``).

    python scripts/bench_continual.py --out benchmarks/results/continual.json      # full run
    python scripts/bench_continual.py --demo                                       # README demo, minutes
    python scripts/bench_continual.py --quick --out /tmp/c.json                    # smoke test, seconds
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
AVALANCHE = ("naive", "ewc", "lwf", "replay-50", "replay-200", "der-200", "joint")
OURS = ("moe-growth", "moe-growth-replay-50")
METHODS = AVALANCHE + OURS
SUITES = {  # name -> (benchmark, setting)
    "split-digits-ci": ("split-digits", "class-incremental"),
    "split-digits-ti": ("split-digits", "task-incremental"),
    "mnist1d-ci": ("mnist1d", "class-incremental"),
}


def make_stream(benchmark: str, setting: str, epochs: int, seed: int):
    from moeparadigms.benchmarks.continual import MNIST1D, SplitDigits

    cls = SplitDigits if benchmark == "split-digits" else MNIST1D
    dm = cls(setting=setting, epochs_per_experience=epochs, batch_size=32, seed=seed)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------- Avalanche side
def avalanche_model(dm, hidden: int):
    """The 2-hidden-layer MLP the issue's reference numbers used. One output layer in every setting: in
    the task-incremental one, evaluation keeps only the logits of the given task's classes (a multi-head
    MultiTaskModule breaks Avalanche 0.6's DER, which calls the model without task labels)."""
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(dm.in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, dm.num_classes))


@contextlib.contextmanager
def quiet_avalanche_deprecations():
    """Avalanche 0.6's own plugins call its deprecated APIs (``storage_policy.update``) on every experience,
    and its ``deprecated`` decorator forces the warning past any filter: record the warnings of the call and
    show only the ones that are not Avalanche's deprecation notices about itself."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for w in caught:
        if not (issubclass(w.category, DeprecationWarning) and "avalanche" in str(w.filename)):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def run_avalanche(method: str, dm, seed: int, epochs: int, hidden: int, lr: float):
    from avalanche.training import DER, EWC, JointTraining, LwF, Naive, Replay
    from avalanche.training.plugins import EvaluationPlugin

    from moeparadigms.paradigms.continual_metrics import AccuracyMatrix

    torch.manual_seed(seed)
    model = avalanche_model(dm, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    common = dict(model=model, optimizer=opt, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=dm.batch_size,
                  train_epochs=epochs, eval_mb_size=1024, device="cpu", evaluator=EvaluationPlugin(loggers=[]))
    if method == "naive":
        strategy = Naive(**common)
    elif method == "ewc":
        strategy = EWC(ewc_lambda=100.0, **common)
    elif method == "lwf":
        strategy = LwF(alpha=1.0, temperature=2.0, **common)
    elif method.startswith("replay-"):
        strategy = Replay(mem_size=int(method.split("-")[1]), **common)
    elif method == "der-200":
        strategy = DER(mem_size=200, alpha=0.1, beta=0.5, **common)
    elif method == "joint":
        strategy = JointTraining(**common)
    else:
        raise ValueError(f"unknown Avalanche method {method!r}; choose one of {list(AVALANCHE)}")
    matrix = AccuracyMatrix(num_experiences=dm.num_experiences)
    stream = dm.benchmark.train_stream
    t0 = time.perf_counter()
    if method == "joint":
        with quiet_avalanche_deprecations():
            strategy.train(stream)
        train_s = time.perf_counter() - t0
        evaluate(model, dm, matrix, row=dm.num_experiences)  # one evaluation after training on everything
    else:
        evaluate(model, dm, matrix, row=0)
        train_s = 0.0
        for i, exp in enumerate(stream):
            t0 = time.perf_counter()
            with quiet_avalanche_deprecations():
                strategy.train(exp)
            train_s += time.perf_counter() - t0
            evaluate(model, dm, matrix, row=i + 1)
    return matrix, sum(p.numel() for p in model.parameters()), train_s


@torch.no_grad()
def evaluate(model, dm, matrix, row: int) -> None:
    model.eval()
    for j, data in enumerate(dm.test_sets):
        x, y, _ = data.tensors
        out = model(x)
        if dm.setting == "task-incremental":  # the task id is known: choose among that task's classes only
            keep = torch.zeros(out.shape[-1], dtype=torch.bool)
            keep[dm.classes_per_experience[j]] = True
            out = out.masked_fill(~keep, float("-inf"))
        matrix.update(out.argmax(-1), y, row=row, experience=j)


# ---------------------------------------------------------------------------------------------- our side
def run_ours(method: str, dm, seed: int, epochs: int, d_model: int, hidden: int, lr: float, plot_dir: Path | None):
    import pytorch_lightning as pl

    from moeparadigms.core import MLPExperts, MoE
    from moeparadigms.paradigms.continual import ContinualMoE, ExperienceRouter, ExpertPerExperience

    pl.seed_everything(seed, verbose=False)
    moe = MoE(router=ExperienceRouter(d_model=d_model, num_experts=1, top_k=1),
              experts=MLPExperts(d_model=d_model, hidden=hidden, num_experts=1))
    model = ContinualMoE(moe=moe, growth=ExpertPerExperience(experts=1), lr=lr, seed=seed,
                         replay_size=50 if method == "moe-growth-replay-50" else 0,
                         plots=plot_dir is not None, plot_dir=str(plot_dir) if plot_dir else None)
    trainer = pl.Trainer(max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    train_s = time.perf_counter() - t0  # includes the per-experience evaluations (Lightning interleaves them)
    return model.acc_matrix, sum(p.numel() for p in model.parameters()), train_s


# ---------------------------------------------------------------------------------------------- tables
def summarise(records: list[dict]) -> list[dict]:
    rows: dict[tuple, list[dict]] = {}
    for r in records:
        rows.setdefault((r["benchmark"], r["setting"], r["method"]), []).append(r)
    out = []
    for (b, s, m), rs in rows.items():
        row = {"benchmark": b, "setting": s, "method": m, "seeds": len(rs)}
        for k in ("avg_acc", "forgetting", "bwt", "params", "train_s"):
            vals = [r[k] for r in rs if r[k] is not None]
            row[k] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0) if vals else None
        out.append(row)
    return out


def markdown_table(summary: list[dict]) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}"

    lines = ["| benchmark | setting | method | avg acc (%) | forgetting (pts) | BWT (pts) | params | train s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['benchmark']} | {r['setting']} | {r['method']} | {pct(r['avg_acc'])} | {pct(r['forgetting'])} | "
                     f"{pct(r['bwt'])} | {int(r['params'][0]):,} | {r['train_s'][0]:.1f} |")
    return "\n".join(lines)


def check_targets(summary: list[dict]) -> list[str]:
    """The issue's targets, read off this run's means ('MISSED' or 'met', never silently skipped)."""
    m = {(r["benchmark"], r["setting"], r["method"]): r for r in summary}

    def acc(b, s, meth):
        r = m.get((b, s, meth))
        return None if r is None or r["avg_acc"] is None else r["avg_acc"][0]

    out = []

    def above(label, a, b):
        if a is None or b is None:
            out.append(f"not measured: {label}")
        else:
            out.append(f"{'met' if a > b else 'MISSED'}: {label} ({100 * a:.1f} vs {100 * b:.1f})")

    ci, ti = ("split-digits", "class-incremental"), ("split-digits", "task-incremental")
    above("split-digits CI: moe-growth > replay-50", acc(*ci, "moe-growth"), acc(*ci, "replay-50"))
    above("split-digits CI: moe-growth-replay-50 > der-200", acc(*ci, "moe-growth-replay-50"), acc(*ci, "der-200"))
    g, j = acc(*ti, "moe-growth"), acc(*ti, "joint")
    f = m.get((*ti, "moe-growth"))
    if g is None or j is None or f is None:
        out.append("not measured: split-digits TI: moe-growth within 0.5 pts of joint, forgetting <= 0.5 pts")
    else:
        fg = f["forgetting"][0]
        ok = g >= j - 0.005 and fg <= 0.005
        out.append(f"{'met' if ok else 'MISSED'}: split-digits TI: moe-growth within 0.5 pts of joint and forgetting <= 0.5 pts "
                   f"({100 * g:.1f} vs joint {100 * j:.1f}; forgetting {100 * fg:.2f} pts)")
    above("mnist1d CI: moe-growth > replay-200", acc("mnist1d", "class-incremental", "moe-growth"),
          acc("mnist1d", "class-incremental", "replay-200"))
    return out


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=None, help="write the JSON records here")
    p.add_argument("--quick", action="store_true", help="smoke version: 1 seed, 1 epoch, split digits CI only")
    p.add_argument("--demo", action="store_true", help="README demo: split digits CI, growth vs Naive and Replay, 3 seeds")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=10, help="epochs per experience, for every method")
    p.add_argument("--methods", type=str, default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--suites", type=str, default=None, help=f"comma-separated subset of {','.join(SUITES)}")
    p.add_argument("--plots", type=Path, default=ROOT / "benchmarks" / "results" / "continual",
                   help="PNG accuracy matrices (seed 0) and expert usage go here")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--table", type=Path, default=None, help="also write the Markdown table here")
    args = p.parse_args(argv)

    torch.set_num_threads(1)  # small models on a shared 2-core machine: one thread is fastest
    warnings.filterwarnings("ignore")
    import logging

    import pytorch_lightning  # noqa: F401 - imported first: importing it sets its logger's level to INFO

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    methods, suites, seeds, epochs = list(METHODS), list(SUITES), args.seeds, args.epochs
    if args.demo:
        methods, suites = ["naive", "replay-50", "replay-200", "moe-growth", "moe-growth-replay-50"], ["split-digits-ci"]
    if args.quick:
        seeds, epochs, suites = 1, 1, ["split-digits-ci"]
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",")]
    if args.suites:
        suites = [s.strip() for s in args.suites.split(",")]
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: {m!r} is not a method; choose from {', '.join(METHODS)}")
    for s in suites:
        if s not in SUITES:
            p.error(f"--suites: {s!r} is not a suite; choose from {', '.join(SUITES)}")
    if seeds < 1 or epochs < 1:
        p.error(f"--seeds and --epochs must be >= 1, got {seeds} and {epochs}")

    from tqdm import tqdm

    from moeparadigms.paradigms.continual_metrics import continual_summary, plot_accuracy_matrix

    records: list[dict] = []
    jobs = [(s, seed, m) for s in suites for seed in range(seeds) for m in methods]
    streams: dict[tuple, object] = {}
    bar = tqdm(jobs, desc="continual bench", unit="run", file=sys.stderr)
    for suite, seed, method in bar:
        benchmark, setting = SUITES[suite]
        bar.set_postfix_str(f"{suite} seed {seed} {method}")
        key = (suite, seed)
        if key not in streams:
            streams = {key: make_stream(benchmark, setting, epochs, seed)}  # one stream alive at a time
        dm = streams[key]
        plot_dir = None if args.no_plots or seed != 0 else args.plots / f"{suite}-{method}"
        d_model = 64
        if method in OURS:
            matrix, params, train_s = run_ours(method, dm, seed, epochs, d_model=d_model, hidden=128, lr=1e-3, plot_dir=plot_dir)
        else:
            matrix, params, train_s = run_avalanche(method, dm, seed, epochs, hidden=256, lr=1e-3)
        R, initial, trained = matrix.matrix()
        s = continual_summary(R, None, trained=trained) if method != "joint" else {"avg_acc": R[-1].mean().item()}
        nan_to_none = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)  # noqa: E731
        records.append({
            "benchmark": benchmark, "setting": setting, "method": method, "seed": seed,
            "avg_acc": float(s["avg_acc"]), "forgetting": nan_to_none(s.get("forgetting")), "bwt": nan_to_none(s.get("bwt")),
            "params": int(params), "train_s": round(train_s, 3),
        })
        if plot_dir is not None and method not in OURS:
            plot_accuracy_matrix(R, plot_dir / "accuracy_matrix.png", title=f"{suite} {method}: avg acc {100 * s['avg_acc']:.1f}%")
    summary = summarise(records)
    table = markdown_table(summary)
    print(table)
    print()
    for line in check_targets(summary):
        print(line)
    if not args.no_plots:
        print(f"\nplots: {args.plots}/<suite>-<method>/accuracy_matrix.png (seed 0) and expert_usage.png for ours")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1) + "\n")
        print(f"records: {args.out}")
    if args.table:
        args.table.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
