"""Robustness benchmark in the spirit of MoE-RBench, in small: MoE vs dense vs the matched control.

Models (each ``Linear(64, 64) -> residual block -> LayerNorm -> Linear(64, 10)``, trained identically on
scikit-learn's digits, 8x8 in [0, 1], 75/25 split):

* ``moe``: the block is an MoE, 8 experts of hidden 64, top-2 (renormalised gates);
* ``dense``: one always-on FFN of hidden 512 (the MoE's total expert parameters);
* ``control``: one always-on FFN of hidden 128 (the MoE's *active* expert parameters per token: top-2 x 64);
* knobs on the MoE: ``moe-expdrop`` (expert dropout 0.2 in training) and ``moe-frozen-router`` (the router keeps
  its random initialisation).

Evaluated on the clean test split, every corruption of ``moeparadigms.lifecycle.CORRUPTIONS`` at severities
1-3 (noise, impulse noise, pixel dropout, contrast, blur, and translation, an out-of-distribution covariate
shift), FGSM and PGD (10 steps, random start) at L-inf eps 0.02, 0.05, 0.1, and the shortcut-shift task (a
one-hot block naming the label 95% of the time in training and in the in-distribution test, a wrong class in
the shifted test; each model retrained on it). Every number is the mean over ``--seeds`` seeds with a 95%
Student-t confidence interval.

    python scripts/bench_robustness.py --out benchmarks/results/robustness.json
    python scripts/bench_robustness.py --quick --out /tmp/robustness.json    # seconds-long smoke run
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MODELS = ("moe", "dense", "control", "moe-expdrop", "moe-frozen-router")
EPS = (0.02, 0.05, 0.1)
SEVERITIES = (1, 2, 3)
D_MODEL, HIDDEN, E, TOP_K = 64, 64, 8, 2


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def digits(seed: int, shortcut: bool) -> dict[str, torch.Tensor]:
    from sklearn.datasets import load_digits

    from moeparadigms.lifecycle import shortcut_features

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(1000 + seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[: int(0.75 * len(y))], perm[int(0.75 * len(y)) :]
    if not shortcut:
        return {"x": x[tr], "y": y[tr], "x_test": x[te], "y_test": y[te]}
    cat = lambda idx, agree: torch.cat([x[idx], shortcut_features(y[idx], 10, agree, generator=g)], 1)  # noqa: E731
    return {"x": cat(tr, 0.95), "y": y[tr], "x_id": cat(te, 0.95), "x_ood": cat(te, 0.0), "y_test": y[te]}


def build(name: str, in_features: int):
    from moeparadigms.core import MLPExperts, MoE, TopKRouter
    from moeparadigms.nets import MoEMLP

    if name.startswith("moe"):
        moe = MoE(router=TopKRouter(d_model=D_MODEL, num_experts=E, top_k=TOP_K, renormalize=True),
                  experts=MLPExperts(d_model=D_MODEL, hidden=HIDDEN, num_experts=E))
    else:  # one always-on expert: an MoE with a single expert is a dense FFN (its gate is exactly 1)
        hidden = HIDDEN * E if name == "dense" else HIDDEN * TOP_K
        moe = MoE(router=TopKRouter(d_model=D_MODEL, num_experts=1, top_k=1),
                  experts=MLPExperts(d_model=D_MODEL, hidden=hidden, num_experts=1))
    net = MoEMLP(in_features=in_features, out_features=10, moe=moe)
    if name == "moe-frozen-router":
        net.blocks[0].moe.router.set_frozen(range(E))
    return net


def train(net, name: str, x, y, steps: int, seed: int, lr: float):
    from moeparadigms.lifecycle import expert_dropout

    handle = expert_dropout(net.blocks[0].moe, 0.2, generator=torch.Generator().manual_seed(seed)) if name == "moe-expdrop" else None
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    perm = torch.empty(0, dtype=torch.long)
    net.train()
    for _ in range(steps):
        if perm.numel() < 64:
            perm = torch.cat([perm, torch.randperm(len(y), generator=g)])
        idx, perm = perm[:64], perm[64:]
        out = net(x[idx])
        loss = F.cross_entropy(out.y, y[idx]) + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if handle is not None:
        handle.remove()
    net.eval()


def run_seed(seed: int, a) -> list[dict]:
    from moeparadigms.lifecycle import accuracy, corrupt, fgsm, pgd
    from moeparadigms.nets import active_params_per_token, count_params

    d = digits(seed, shortcut=False)
    ds = digits(seed, shortcut=True)
    out = []
    for name in a.models:
        torch.manual_seed(seed)
        net = build(name, 64)
        t0 = time.time()
        train(net, name, d["x"], d["y"], a.steps, seed, a.lr)
        fn = lambda z, net=net: net(z).y  # noqa: E731
        x, y = d["x_test"], d["y_test"]
        base = dict(seed=seed, model=name, params=count_params(net), active_params=active_params_per_token(net))
        out.append(dict(base, probe="clean", severity=0, acc=accuracy(fn, x, y)))
        g = torch.Generator().manual_seed(10_000 + seed)
        for c in a.corruptions:
            for s in SEVERITIES:
                out.append(dict(base, probe=c, severity=s, acc=accuracy(fn, corrupt(x, c, s, generator=g), y)))
        for s, eps in enumerate(EPS, start=1):
            out.append(dict(base, probe="fgsm", severity=s, eps=eps, acc=accuracy(fn, fgsm(fn, x, y, eps), y)))
            xa = pgd(fn, x, y, eps, steps=a.pgd_steps, generator=g)
            out.append(dict(base, probe="pgd", severity=s, eps=eps, acc=accuracy(fn, xa, y)))
        torch.manual_seed(seed)
        net = build(name, ds["x"].shape[1])
        train(net, name, ds["x"], ds["y"], a.steps, seed, a.lr)
        fn = lambda z, net=net: net(z).y  # noqa: E731
        for split in ("id", "ood"):
            out.append(dict(base, probe=f"shortcut-{split}", severity=0, acc=accuracy(fn, ds[f"x_{split}"], ds["y_test"])))
        mine = {(r["probe"], r["severity"]): r["acc"] for r in out if r["model"] == name}
        log(f"seed {seed} {name}: clean {mine[('clean', 0)]:.3f} pgd@{EPS[-1]} {mine[('pgd', len(EPS))]:.3f} "
            f"shortcut id {mine[('shortcut-id', 0)]:.3f} ood {mine[('shortcut-ood', 0)]:.3f} ({time.time() - t0:.0f}s)")
    return out


def summarise(records: list[dict]) -> list[dict]:
    from moeparadigms.lifecycle import mean_ci95

    rows = []
    keys = sorted({(r["probe"], r["severity"]) for r in records}, key=lambda k: (k[0] != "clean", k[0], k[1]))
    for probe, sev in keys:
        row = {"probe": probe, "severity": sev}
        eps = next((r.get("eps") for r in records if r["probe"] == probe and r["severity"] == sev), None)
        if eps is not None:
            row["eps"] = eps
        for m in dict.fromkeys(r["model"] for r in records):
            vals = [r["acc"] for r in records if r["probe"] == probe and r["severity"] == sev and r["model"] == m]
            if vals:
                mean, h = mean_ci95(vals)
                row[m] = {"mean": mean, "ci95": h, "n": len(vals)}
        rows.append(row)
    return rows


def paired(records: list[dict], a: str, b: str) -> list[dict]:
    """Per probe and severity, the seed-paired accuracy difference ``a - b`` (mean, 95% CI): the same seed
    shares the data split, the corruption draws and the attack budget, so pairing removes that variance."""
    from moeparadigms.lifecycle import mean_ci95

    acc = {(r["model"], r["probe"], r["severity"], r["seed"]): r["acc"] for r in records}
    out = []
    for probe, sev in sorted({(r["probe"], r["severity"]) for r in records}, key=lambda k: (k[0] != "clean", k[0], k[1])):
        seeds = sorted({r["seed"] for r in records if (a, probe, sev, r["seed"]) in acc and (b, probe, sev, r["seed"]) in acc})
        if seeds:
            m, h = mean_ci95([acc[(a, probe, sev, s)] - acc[(b, probe, sev, s)] for s in seeds])
            out.append({"probe": probe, "severity": sev, "diff": m, "ci95": h, "n": len(seeds)})
    return out


def paired_table(records: list[dict], models: list[str]) -> str:
    pairs = [(a, b) for a, b in (("moe", "dense"), ("moe", "control")) if a in models and b in models]
    if not pairs:
        return ""
    cols = {p: {(r["probe"], r["severity"]): r for r in paired(records, *p)} for p in pairs}
    keys = list(next(iter(cols.values())))
    lines = ["| probe | severity | " + " | ".join(f"{a} - {b} (points)" for a, b in pairs) + " |", "|" + "---|" * (len(pairs) + 2)]
    for k in keys:
        cells = []
        for p in pairs:
            r = cols[p][k]
            sig = "*" if abs(r["diff"]) > r["ci95"] else ""
            cells.append(f"{100 * r['diff']:+.1f} ± {100 * r['ci95']:.1f}{sig}")
        lines.append(f"| {k[0]} | {k[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rows: list[dict], models: list[str]) -> str:
    head = "| probe | severity | " + " | ".join(models) + " |"
    lines = [head, "|" + "---|" * (len(models) + 2)]
    for r in rows:
        sev = f"eps {r['eps']}" if "eps" in r else str(r["severity"])
        cells = [f"{100 * r[m]['mean']:.1f} ± {100 * r[m]['ci95']:.1f}" if m in r else "" for m in models]
        lines.append(f"| {r['probe']} | {sev} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], models: list[str], path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probes = [p for p in dict.fromkeys(r["probe"] for r in rows) if p not in ("clean",) and not p.startswith("shortcut")]
    cols = 4
    nrows = -(-len(probes) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    for ax, probe in zip(axes.flat, probes):
        rs = [r for r in rows if r["probe"] == probe]
        xs = [r["severity"] for r in rs]
        for m in models:
            ax.errorbar(xs, [r[m]["mean"] for r in rs], yerr=[r[m]["ci95"] for r in rs], label=m, capsize=2, marker="o", ms=3)
        ax.set_title(probe, fontsize=9)
        ax.set_xticks(xs)
        ax.set_xlabel("severity", fontsize=8)
    for ax in list(axes.flat)[len(probes):]:
        ax.axis("off")
    axes[0, 0].set_ylabel("test accuracy")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def main(argv: list[str] | None = None) -> dict:
    from moeparadigms.lifecycle import CORRUPTIONS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--plots", default=None, help="folder for the PNG plot (default: <out stem>_plots beside --out)")
    p.add_argument("--quick", action="store_true", help="a seconds-long smoke run (1 seed, 2 models, few steps)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=800, help="training steps (batch 64)")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {MODELS}")
    p.add_argument("--resummarise", default=None, metavar="JSON",
                   help="recompute the tables and plot from the records of an earlier run's JSON (no training)")
    a = p.parse_args(argv)
    a.models = a.models.split(",")
    bad = [m for m in a.models if m not in MODELS]
    if bad:
        raise SystemExit(f"--models: unknown {bad}; choose from {list(MODELS)}")
    a.corruptions = list(CORRUPTIONS)
    if a.quick:
        a.seeds, a.steps, a.pgd_steps, a.models, a.corruptions = 1, 30, 2, ["moe", "control"], ["gaussian_noise", "translate"]
    for name in ("seeds", "steps", "pgd_steps"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    torch.set_num_threads(1)
    t0 = time.time()
    records: list[dict] = []
    previous: dict = {}
    if a.resummarise:
        previous = json.loads(Path(a.resummarise).read_text())
        records = previous["records"]
        a.models = list(dict.fromkeys(r["model"] for r in records))
    else:
        for seed in range(a.seeds):
            records += run_seed(seed, a)
    rows = summarise(records)
    out = Path(a.out)
    plots = Path(a.plots) if a.plots else out.with_name(out.stem + "_plots")
    md = table(rows, a.models)
    md_paired = paired_table(records, a.models)
    command = " ".join(["python", "scripts/bench_robustness.py", *(argv if argv is not None else sys.argv[1:])])
    result = {"config": previous.get("config") or {k: v for k, v in vars(a).items()}, "table": rows,
              "paired": {f"{x}-{y}": paired(records, x, y) for x, y in (("moe", "dense"), ("moe", "control"))
                         if x in a.models and y in a.models},
              "records": records, "markdown": md, "markdown_paired": md_paired,
              "plots": [plot(rows, a.models, plots / "robustness.png")],
              "wall_s": previous.get("wall_s", time.time() - t0), "command": previous.get("command", command)}
    if previous:
        result["resummarised_with"] = command
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(md + "\n\n" + md_paired)
    log(f"wrote {out} ({time.time() - t0:.0f}s)")
    return result


if __name__ == "__main__":
    main()
