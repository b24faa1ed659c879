"""Expert lifecycle benchmark: upcycling, drop-upcycling, MC-SMoE merging vs usage pruning, post-hoc aggregation.

Three experiments, each over ``--seeds`` seeds, offline data only:

* ``upcycle`` (MNIST-1D, generated procedurally, 20,000 training sequences): a dense network (``MoEMLP`` with one expert, hidden 128) is
  trained ``--pretrain`` steps; then, from that checkpoint, ``--steps`` more steps of (a) the dense network,
  (b) the network upcycled to 8 experts, top-2 (copies), (c) drop-upcycled (``drop_ratio`` 0.5), each with a
  fresh AdamW at the same learning rate and the same batch order. Recorded: the step-0 output difference of the
  copy-upcycled model from the dense one (float32, and float64 for the construction alone), validation
  loss/accuracy curves, and the first step at which each
  upcycled model's validation loss reaches the continued dense model's *final* validation loss.
* ``merge``: each trained copy-upcycled model (8 experts) is reduced to 4 experts without retraining by MC-SMoE
  merging (router-logit grouping, hidden-unit alignment, frequency-weighted averaging), with the router kept and
  its choices mapped to groups (``merge-group``, as MC-SMoE), reduced to the dominant experts' rows
  (``merge-dominant``) or to frequency-weighted mean rows (``merge-average``); ``merge-group-noalign`` skips the
  alignment; ``keep-group`` keeps the groups and the grouped router but the dominant expert's weights unaveraged
  (an ablation of the averaging); ``prune`` is usage pruning (the baseline). The same for an 8-expert model trained from scratch for
  the same steps. Calibration: 512 training samples.
* ``aggregate`` (digits with a shortcut): a one-hot block naming the label is appended to each image, agreeing
  with the label 95% of the time in training and in the in-distribution test, never in the shifted test.
  Honda et al.'s mixture of expert classifiers (``PredictionMoE``, 8 experts, their router loss) is trained once
  and evaluated with the router's combination, the uniform mean and the pessimistic ``min_k p_k``; so is the
  project's ``MoEMLP`` (8 experts, top-2) with its experts' own predictions (every token forced onto one expert).

Records go to ``--out`` (JSON) and PNG plots beside it (``--plots``, default ``<out stem>_plots``).

    python scripts/bench_lifecycle.py --out benchmarks/results/lifecycle.json --plots benchmarks/results/lifecycle_plots
    python scripts/bench_lifecycle.py --quick --out /tmp/lifecycle.json      # seconds-long smoke run
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

D_MODEL, HIDDEN, E, TOP_K = 64, 128, 8, 2
#: merge-<router>[-noalign]: MC-SMoE merging with the router kept as groups (MC-SMoE), the dominant expert's row,
#: or the frequency-weighted mean row; noalign skips the hidden-unit permutation; prune: usage pruning
#: keep-group: the groups and the grouped router, but the dominant expert's weights unaveraged (ablation)
MERGES = ("merge-group", "merge-group-noalign", "merge-dominant", "merge-average", "keep-group", "prune")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- data
@functools.lru_cache(maxsize=1)
def mnist1d(n_val: int, num_samples: int) -> tuple[torch.Tensor, ...]:
    """MNIST-1D generated procedurally (no download): ``num_samples`` sequences, 80/20 train/test split (the
    published set is 5,000; more samples keep a small MLP from overfitting within the run)."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    d = make_dataset(args)  # seed 42
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    x, y, xt, yt = f(d["x"]), torch.as_tensor(d["y"]).long(), f(d["x_test"]), torch.as_tensor(d["y_test"]).long()
    return x, y, xt[:n_val], yt[:n_val]


def digits_shortcut(seed: int) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    from moeparadigms.lifecycle import shortcut_features

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[: int(0.75 * len(y))], perm[int(0.75 * len(y)) :]
    cat = lambda idx, agree: torch.cat([x[idx], shortcut_features(y[idx], 10, agree, generator=g)], 1)  # noqa: E731
    return {"x": cat(tr, 0.95), "y": y[tr], "x_id": cat(te, 0.95), "x_ood": cat(te, 0.0), "y_test": y[te]}


# ----------------------------------------------------------------------------------------------- models
def moe_mlp(in_features: int, num_experts: int, top_k: int, hidden: int = HIDDEN):
    from moeparadigms.core import MLPExperts, MoE, TopKRouter
    from moeparadigms.nets import MoEMLP

    moe = MoE(router=TopKRouter(d_model=D_MODEL, num_experts=num_experts, top_k=top_k,
                                renormalize=True if num_experts > 1 else None),
              experts=MLPExperts(d_model=D_MODEL, hidden=hidden, num_experts=num_experts))
    return MoEMLP(in_features=in_features, out_features=10, moe=moe)


def batches(n: int, batch: int, steps: int, seed: int):
    """The same batch order for every model of a seed."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if perm.numel() < batch:
            perm = torch.cat([perm, torch.randperm(n, generator=g)])
        idx, perm = perm[:batch], perm[batch:]
        yield idx


@torch.no_grad()
def evaluate(net, x, y) -> tuple[float, float]:
    net.eval()
    logits = net(x).y
    net.train()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


def train(net, data, steps: int, seed: int, *, lr: float, batch: int, eval_every: int | None = None, label: str = ""):
    x, y, xv, yv = data
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    curve = []
    if eval_every:
        curve.append((0, *evaluate(net, xv, yv)))
    net.train()
    t0 = time.time()
    for step, idx in enumerate(batches(len(y), batch, steps, seed), start=1):
        out = net(x[idx])
        loss = F.cross_entropy(out.y, y[idx]) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if eval_every and (step % eval_every == 0 or step == steps):
            curve.append((step, *evaluate(net, xv, yv)))
        if step % max(1, steps // 4) == 0:
            log(f"  {label} step {step}/{steps} ({time.time() - t0:.0f}s)")
    return curve


def steps_to_reach(curve, target: float) -> int | None:
    return next((s for s, loss, _ in curve if loss <= target), None)


# ----------------------------------------------------------------------------------------------- experiments
def run_upcycle_and_merge(seed: int, a) -> tuple[list[dict], list[dict], dict]:
    from moeparadigms.lifecycle import merge_experts, prune_by_usage, routing_profile, upcycle

    data = mnist1d(a.n_val, a.mnist1d_samples)
    x, y, xv, yv = data
    torch.manual_seed(seed)
    dense = moe_mlp(x.shape[1], 1, 1)
    log(f"seed {seed}: dense pretraining {a.pretrain} steps")
    train(dense, data, a.pretrain, seed, lr=a.lr, batch=a.batch, label="dense-pretrain")
    dense.eval()
    base_loss, base_acc = evaluate(dense, xv, yv)
    records, curves = [], {}
    models = {}
    for method in ("dense", "upcycle-copy", "upcycle-drop", "scratch-moe"):
        if method == "dense":
            net = copy.deepcopy(dense)
        elif method == "scratch-moe":
            torch.manual_seed(seed + 7)
            net = moe_mlp(x.shape[1], E, TOP_K)
        else:
            net, _ = upcycle(copy.deepcopy(dense), num_experts=E, top_k=TOP_K, init=method.split("-")[1],
                             drop_ratio=0.5, seed=seed)
        rec = {"experiment": "upcycle", "seed": seed, "method": method, "pretrain_steps": a.pretrain,
               "steps": a.steps, "dense_pretrained_val_loss": base_loss, "dense_pretrained_val_acc": base_acc}
        if method.startswith("upcycle"):
            with torch.no_grad():
                net.eval()
                ref = dense(xv).y
                rec["step0_max_abs_diff"] = float((net(xv).y - ref).abs().max())
                rec["step0_max_abs_logit"] = float(ref.abs().max())
                # the construction itself, free of float32 rounding: both networks in float64
                rec["step0_max_abs_diff_fp64"] = float((copy.deepcopy(net).double()(xv.double()).y
                                                        - copy.deepcopy(dense).double()(xv.double()).y).abs().max())
                # float32 with both networks on the dense-dispatch path (every expert as one batched matmul), so
                # the only difference left is the gate sum w_1 + w_2 = 1 in float32
                same = [copy.deepcopy(m) for m in (net, dense)]
                for m in same:
                    for layer in m.moe_layers():
                        layer.dense_dispatch = True
                rec["step0_max_abs_diff_same_path"] = float((same[0](xv).y - same[1](xv).y).abs().max())
                net.train()
        t0 = time.time()
        curve = train(net, data, a.steps, seed + 1, lr=a.lr, batch=a.batch, eval_every=a.eval_every, label=method)
        rec["train_s"] = time.time() - t0
        rec["final_val_loss"], rec["final_val_acc"] = curve[-1][1], curve[-1][2]
        rec["min_val_loss"] = min(c[1] for c in curve)
        curves[method] = curve
        models[method] = net
        records.append(rec)
    target = curves["dense"][-1][1]
    for rec in records:
        s = steps_to_reach(curves[rec["method"]], target)
        rec["steps_to_dense_final_loss"] = s
        rec["fraction_of_dense_steps"] = None if s is None else s / a.steps
        rec["curve"] = curves[rec["method"]]

    merges = []
    calib = x[:512]
    for source in ("upcycle-copy", "scratch-moe"):
        full = models[source]
        _, acc8 = evaluate(full, xv, yv)
        for how in MERGES:
            net = copy.deepcopy(full)
            prof = routing_profile(net, net.blocks[0].moe, [calib])
            if how == "prune":
                prune_by_usage(net.blocks[0].moe, prof, a.target)
            elif how == "keep-group":
                merge_experts(net.blocks[0].moe, prof, a.target, router="group", weighting="dominant")
            else:
                merge_experts(net.blocks[0].moe, prof, a.target, align=not how.endswith("noalign"),
                              router=how.split("-")[1])
            loss, acc = evaluate(net, xv, yv)
            merges.append({"experiment": "merge", "seed": seed, "source": source, "method": how, "experts_before": E,
                           "experts_after": a.target, "acc_before": acc8, "acc_after": acc, "val_loss_after": loss,
                           "retained": acc / acc8})
        log(f"seed {seed}: merge {source}: " + ", ".join(f"{m['method']} {m['retained']:.3f}" for m in merges if m["source"] == source))
    return records, merges, curves


def run_aggregate(seed: int, a) -> list[dict]:
    from moeparadigms.lifecycle import PredictionMoE, aggregate, forced_expert_logits

    d = digits_shortcut(seed)
    out = []
    torch.manual_seed(seed)
    pm = PredictionMoE(in_features=d["x"].shape[1], num_classes=10, num_experts=E, d_model=D_MODEL, hidden=HIDDEN,
                       router_loss_coef=a.router_loss, topk_mask=8)
    opt = torch.optim.AdamW(pm.parameters(), lr=a.lr)
    for idx in batches(len(d["y"]), 64, a.agg_steps, seed):
        loss = pm.loss(d["x"][idx], d["y"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    pm.eval()
    for how in ("router", "uniform", "pessimistic"):
        acc = {s: float((pm.predict(d[f"x_{s}"], how).argmax(-1) == d["y_test"]).float().mean()) for s in ("id", "ood")}
        out.append({"experiment": "aggregate", "seed": seed, "model": "prediction-moe", "combine": how,
                    "id_acc": acc["id"], "ood_acc": acc["ood"], "steps": a.agg_steps})
    torch.manual_seed(seed)
    net = moe_mlp(d["x"].shape[1], E, TOP_K)
    train(net, (d["x"], d["y"], d["x_id"], d["y_test"]), a.agg_steps, seed, lr=a.lr, batch=64, label="moe-mlp shortcut")
    net.eval()
    with torch.no_grad():
        for s in ("id", "ood"):
            probs = forced_expert_logits(net, d[f"x_{s}"]).softmax(-1)
            d[f"router_{s}"] = net(d[f"x_{s}"]).y.argmax(-1)
            for how in ("uniform", "pessimistic"):
                d[f"{how}_{s}"] = aggregate(probs, how).argmax(-1)
    for how in ("router", "uniform", "pessimistic"):
        out.append({"experiment": "aggregate", "seed": seed, "model": "moe-mlp", "combine": how,
                    "id_acc": float((d[f"{how}_id"] == d["y_test"]).float().mean()),
                    "ood_acc": float((d[f"{how}_ood"] == d["y_test"]).float().mean()), "steps": a.agg_steps})
    log(f"seed {seed}: aggregate " + ", ".join(f"{r['model']}/{r['combine']} id {r['id_acc']:.3f} ood {r['ood_acc']:.3f}" for r in out))
    return out


# ----------------------------------------------------------------------------------------------- summary, plots
def ci(values: list[float]) -> tuple[float, float]:
    from moeparadigms.lifecycle import mean_ci95

    return mean_ci95(values)


def summarise(records: list[dict]) -> dict:
    s: dict = {"upcycle": {}, "merge": {}, "aggregate": {}}
    for m in sorted({r["method"] for r in records if r["experiment"] == "upcycle"}):
        rs = [r for r in records if r["experiment"] == "upcycle" and r["method"] == m]
        fr = [r["fraction_of_dense_steps"] for r in rs]
        s["upcycle"][m] = {
            "final_val_loss": ci([r["final_val_loss"] for r in rs]), "final_val_acc": ci([r["final_val_acc"] for r in rs]),
            "min_val_loss": ci([r["min_val_loss"] for r in rs]),
            "fraction_of_dense_steps": fr, "reached_in_all_seeds": all(f is not None for f in fr),
            "max_step0_diff": max((r.get("step0_max_abs_diff", 0.0) for r in rs), default=0.0),
            "max_step0_diff_fp64": max((r.get("step0_max_abs_diff_fp64", 0.0) for r in rs), default=0.0),
        }
    for src in sorted({r["source"] for r in records if r["experiment"] == "merge"}):
        for m in sorted({r["method"] for r in records if r["experiment"] == "merge"}):
            rs = [r for r in records if r["experiment"] == "merge" and r["source"] == src and r["method"] == m]
            s["merge"][f"{src}/{m}"] = {"retained": ci([r["retained"] for r in rs]), "acc_after": ci([r["acc_after"] for r in rs]),
                                        "acc_before": ci([r["acc_before"] for r in rs])}
    for model in sorted({r["model"] for r in records if r["experiment"] == "aggregate"}):
        for how in ("router", "uniform", "pessimistic"):
            rs = [r for r in records if r["experiment"] == "aggregate" and r["model"] == model and r["combine"] == how]
            s["aggregate"][f"{model}/{how}"] = {"id_acc": ci([r["id_acc"] for r in rs]), "ood_acc": ci([r["ood_acc"] for r in rs])}
    return s


def markdown(summary: dict) -> str:
    """The summary as the markdown tables of benchmarks/notes/lifecycle.md (mean ± 95% CI over seeds)."""
    f = lambda v, scale=1.0, nd=3: f"{scale * v[0]:.{nd}f} ± {scale * v[1]:.{nd}f}"  # noqa: E731
    out = []
    if summary["upcycle"]:
        out += ["| method | final val loss | final val acc (%) | best val loss | steps to dense's final loss / steps |"
                " max step-0 diff (fp32 / fp64) |", "|---|---|---|---|---|---|"]
        for m, v in summary["upcycle"].items():
            fr = ", ".join("never" if x is None else f"{x:.2f}" for x in v["fraction_of_dense_steps"])
            diff = "" if m in ("dense", "scratch-moe") else f"{v['max_step0_diff']:.1e} / {v['max_step0_diff_fp64']:.1e}"
            out.append(f"| {m} | {f(v['final_val_loss'])} | {f(v['final_val_acc'], 100, 1)} | {f(v['min_val_loss'])} | {fr} | {diff} |")
        out.append("")
    if summary["merge"]:
        out += ["| model / reduction 8 -> 4 | acc before (%) | acc after (%) | accuracy kept |", "|---|---|---|---|"]
        for k, v in summary["merge"].items():
            out.append(f"| {k} | {f(v['acc_before'], 100, 1)} | {f(v['acc_after'], 100, 1)} | {f(v['retained'])} |")
        out.append("")
    if summary["aggregate"]:
        out += ["| model / combination | in-distribution acc (%) | shifted (OOD) acc (%) |", "|---|---|---|"]
        for k, v in summary["aggregate"].items():
            out.append(f"| {k} | {f(v['id_acc'], 100, 1)} | {f(v['ood_acc'], 100, 1)} |")
    return "\n".join(out)


def plot(records: list[dict], summary: dict, plots: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in ("dense", "upcycle-copy", "upcycle-drop", "scratch-moe"):
        rs = [r for r in records if r["experiment"] == "upcycle" and r["method"] == m]
        if not rs:
            continue
        steps = [c[0] for c in rs[0]["curve"]]
        mean = [statistics.fmean(r["curve"][i][1] for r in rs) for i in range(len(steps))]
        ax.plot(steps, mean, label=m)
    ax.set_xlabel("steps after the dense checkpoint")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.set_title("MNIST-1D: continued dense vs upcycled (E=8, top-2)")
    ax.legend()
    fig.tight_layout()
    p = plots / "upcycle_val_loss.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(str(p))

    keys = list(summary["merge"])
    if keys:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        means = [summary["merge"][k]["retained"][0] for k in keys]
        errs = [summary["merge"][k]["retained"][1] for k in keys]
        ax.bar(range(len(keys)), means, yerr=errs, capsize=3)
        ax.axhline(0.95, color="gray", ls="--", lw=1, label="95% target")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("accuracy kept (8 -> 4 experts)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = plots / "merge_retained.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(str(p))

    keys = list(summary["aggregate"])
    if keys:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        w = 0.4
        for j, split in enumerate(("id_acc", "ood_acc")):
            ax.bar([i + j * w for i in range(len(keys))], [summary["aggregate"][k][split][0] for k in keys], w,
                   yerr=[summary["aggregate"][k][split][1] for k in keys], capsize=3, label=split)
        ax.set_xticks([i + w / 2 for i in range(len(keys))])
        ax.set_xticklabels(keys, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("accuracy")
        ax.set_title("shortcut shift (digits): router vs post-hoc aggregation")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = plots / "aggregate_shortcut.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(str(p))
    return paths


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--plots", default=None, help="folder for the PNG plots (default: <out stem>_plots beside --out)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (1 seed, a few steps)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--pretrain", type=int, default=1000, help="dense pretraining steps")
    p.add_argument("--steps", type=int, default=3000, help="steps after the dense checkpoint (every method)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--agg-steps", type=int, default=1500, help="training steps of the shortcut-task models")
    p.add_argument("--target", type=int, default=4, help="experts left after merging / pruning")
    p.add_argument("--router-loss", type=float, default=0.5, help="Honda et al.'s router loss weight (their MNLI value)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--n-val", type=int, default=1000)
    p.add_argument("--mnist1d-samples", type=int, default=25000, help="MNIST-1D sequences generated (80%% train)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--experiments", default="upcycle,aggregate", help="comma list of: upcycle (includes merge), aggregate")
    a = p.parse_args(argv)
    if a.quick:
        a.seeds, a.pretrain, a.steps, a.eval_every, a.agg_steps, a.n_val, a.mnist1d_samples = 1, 20, 20, 10, 20, 200, 1000
    for name in ("seeds", "pretrain", "steps", "eval_every", "agg_steps", "target", "batch", "n_val", "mnist1d_samples"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    exps = a.experiments.split(",")
    bad = [e for e in exps if e not in ("upcycle", "aggregate")]
    if bad:
        raise SystemExit(f"--experiments: unknown {bad}; choose from upcycle, aggregate")
    torch.set_num_threads(1)
    t0 = time.time()
    records: list[dict] = []
    for seed in range(a.seeds):
        if "upcycle" in exps:
            up, merges, _ = run_upcycle_and_merge(seed, a)
            records += up + merges
        if "aggregate" in exps:
            records += run_aggregate(seed, a)
    summary = summarise(records)
    out = Path(a.out)
    plots = Path(a.plots) if a.plots else out.with_name(out.stem + "_plots")
    result = {"config": {k: v for k, v in vars(a).items()}, "summary": summary, "markdown": markdown(summary), "records": records,
              "plots": plot(records, summary, plots), "wall_s": time.time() - t0,
              "command": " ".join(["python", "scripts/bench_lifecycle.py", *(argv if argv is not None else sys.argv[1:])])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log(f"wrote {out} ({time.time() - t0:.0f}s)")
    print(result["markdown"])
    return result


if __name__ == "__main__":
    main()
