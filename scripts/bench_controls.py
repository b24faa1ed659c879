"""Does routing help? Each MoE method against controls built from the same network with routing removed or fixed,
paired by seed (issue 14).

Records (``--out``, ``benchmarks/results/controls.json``): ``{"paradigm", "benchmark", "method", "control", "seed",
"metric", "higher_is_better", "value"}`` (``control``: ``None`` for an MoE method, else the control's kind), plus
``wall_s``, ``active_params`` and ``total_params`` (RL: of the actor network; older RL records get ``total_params``
from the rebuilt network, ``fill_rl_total_params``), RL records ``steps``, the others ``budget``, the run's settings. The summary (``effects``) is, per benchmark and MoE method,
"routing effect = MoE - best control" with the 95% bootstrap interval of the seed-paired difference and a verdict
(:mod:`moeparadigms.benchmarks.stats`); ``effects_per_control`` the same against each control alone; RL adds
each method's interquartile mean with rliable's stratified-bootstrap interval. The JSON is rewritten after every run, so a stopped run keeps what it finished (``--resume`` skips
the runs an earlier --out already holds, matched on paradigm, benchmark, method, seed and budget).

Control kinds: ``dense-same-trunk`` (the same block with one always-on expert of the MoE's active size: top_k x
the expert hidden width), ``moe-fixed-routing`` (the same experts, same initialisation, under the core's fixed
hash router), ``moe-task-only`` (routing by the task id alone), ``moe-learned-routing`` (continual: a learned
router instead of the experience inference), ``single-scaled-expert`` (Soft MoE's slots into
one expert of the four's parameters). Active parameters: what one sample's forward uses (top_k experts of a bank);
total parameters: every parameter.

Paradigms (``--paradigms``, default all):

* ``rl``: PPO on CartPole-v1 and Acrobot-v1 (SB3 zoo settings, 100k steps, 10 seeds), metric: final return (mean
  of the last 20 episodes). ``ppo-moe`` (residual top-2 of 4 experts) against ``ppo-moe-dense-trunk``
  (``dense-same-trunk``) and ``ppo-moe-hash`` (``moe-fixed-routing``); ``ppo-soft-moe`` against Sokar et al.'s
  ``ppo-soft-moe-one-expert`` (``single-scaled-expert``). Multi-task RL on ``cartpole-mt`` (four CartPole physics,
  per-task heads; metric: the mean over tasks of each task's last 20 episodes, ``final_return_task_mean``):
  ``ppo-moe-task-learned`` (top-1 of 4 experts of hidden 32, a learned gate over the token and a task embedding)
  against ``ppo-moe-task`` (``moe-task-only``: the task id alone), ``ppo-moe-task-hash`` and
  ``ppo-moe-task-dense-trunk`` (one expert of hidden 32); ``ppo-moe-task`` is compared in its turn with the last
  two. The task-routed methods run only on the suite, the others only on the single envs. The methods are defined
  in ``scripts/bench_rl.py``.
* ``multitask``: Task-MoE (configs/multitask/task_moe.yaml: residual block of width 32, 8 experts of hidden 21,
  top-2, task embedding concatenated into the gate) on the MMoE synthetic data at p=0.5 and p=0.1 (the harder
  conflict), trained as scripts/bench_multitask.py trains it (4,000 samples, 30 epochs, batch 128, lr 1e-2),
  metric: test MSE averaged over the two tasks. Controls: ``task-moe-dense-trunk`` (one expert of hidden 42),
  ``task-moe-hash`` (the 8 experts under a HashRouter, top-2), ``task-moe-task-only``
  (``conditioning="task_only"``).
* ``meta``: second-order MAML over ``Linear -> ReLU -> residual MoE block (4 experts of hidden 32, top-2) -> head``
  (scripts/bench_meta.py's ``moe-maml``) on 5-shot sinusoid (``--meta-benchmarks`` adds multimodal), metric: test MSE after 10 inner steps
  on held-out tasks. Controls: ``moe-maml-dense-trunk`` (one expert of hidden 64) and ``moe-maml-hash``.
* ``continual``: expert growth with Gaussian experience inference (configs/continual/expert_growth.yaml: one
  expert of hidden 128 per experience, old ones frozen) on class-incremental split digits (10 epochs per
  experience), metric: final average accuracy. Control: ``moe-growth-one-expert`` (``dense-same-trunk``): the same
  module, Gaussian inference and per-experience heads over ONE shared expert of hidden 128, no growth, nothing
  frozen (``FixedExperts``); ``moe-growth-learned-router`` (``moe-learned-routing``): the same growth and freezing
  without the inference (``ContinualMoE(task_inference="router")``: a learned top-1 router over every grown expert,
  never masked, picks the experience's head), itself also compared with ``moe-growth-one-expert``.
* ``supervised``: ``MoEClassifier`` (configs/supervised/moe_mlp.yaml: width 64, 8 experts of hidden 128, top-2) on
  scikit-learn's digits (the seed's stratified 75/25 split, 20 epochs, batch 64, AdamW 3e-3; 10 seeds), metric:
  held-out accuracy. Controls: ``moe-mlp-dense-trunk`` (one expert of hidden 256) and ``moe-mlp-hash``.

Attempts where no effect was found (run only when named in ``--methods``): ``task-moe-top1*`` / ``task-moe-16e*``
(multitask, use ``--mt-p 0.1``), ``moe-maml-8e-top1*`` / ``moe-maml-16e*`` (meta; ``--meta-benchmarks
multimodal10``: multimodal regression over 10 function families instead of MMAML's 5), ``moe-growth-one-expert-640``
(continual, kind ``dense-same-total-params``: one shared expert of hidden 640, the grown network's total expert
parameters, with the same inference; its own row against ``moe-growth``), and for RL ``--rl-steps N``: the benchmark
``<env>@<N/1000>k`` with the steps to bench_rl's threshold as a second metric. Runs made in parallel into other
files are joined with ``--merge``.

    python scripts/bench_controls.py --out benchmarks/results/controls.json
    python scripts/bench_controls.py --paradigms multitask meta continual --out benchmarks/results/controls.json --resume
    python scripts/bench_controls.py --quick --out /tmp/controls.json      # smoke run of every paradigm (seconds)
    python scripts/bench_controls.py --report --out benchmarks/results/controls.json   # BENCHMARKS.md's tables
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rl  # noqa: E402  (the RL methods, the zoo settings and one run)

from moeparadigms.benchmarks.stats import bonferroni_level, effects_table, fmt, rl_aggregate, routing_effect  # noqa: E402

PARADIGMS = ("rl", "multitask", "meta", "continual", "supervised")
# each paradigm's MoE methods and their controls (rl: bench_rl.CONTROLS)
MT_CONTROLS = {"task-moe": ("task-moe-dense-trunk", "task-moe-hash", "task-moe-task-only")}
META_CONTROLS = {"moe-maml": ("moe-maml-dense-trunk", "moe-maml-hash")}
# continual: the learned-router control is also compared with the one-expert control (growth + freezing without the
# inference against one shared expert with it)
CL_CONTROLS = {"moe-growth": ("moe-growth-one-expert", "moe-growth-learned-router"),
               "moe-growth-learned-router": ("moe-growth-one-expert",)}
# supervised: MoEClassifier (configs/supervised/moe_mlp.yaml) on scikit-learn's digits
SUP_CONTROLS = {"moe-mlp": ("moe-mlp-dense-trunk", "moe-mlp-hash")}
SUP_VARIANTS = {"top1": dict(k=1)}  # an attempt: top-1 of the 8 experts (its dense trunk: one expert of hidden 128)
for _v in SUP_VARIANTS:
    SUP_CONTROLS[f"moe-mlp-{_v}"] = tuple(f"moe-mlp-{_v}-{c}" for c in ("dense-trunk", "hash"))
# further comparisons of a method already compared above, each its own row (its controls run only when named in
# --methods; the method's main row keeps its own controls and seeds): continual, one shared expert matched in TOTAL
# parameters (hidden 640: 82,624 expert parameters against the grown five experts' 82,880) with the same inference
EXTRA_COMPARISONS = {"continual": [("moe-growth", ("moe-growth-one-expert-640",))]}
# the literature's attempts where no effect was found, run only when named in --methods: each its own MoE method
# with its own controls (the same three kinds, sized to it). Multi-task: Task-MoE top-1 of the 8 experts, and 16
# experts top-2; meta: 8 experts of hidden 32, top-1, and 16 experts of hidden 32, top-2.
MT_VARIANTS = {"top1": dict(top_k=1), "16e": dict(num_experts=16)}
META_VARIANTS = {"8e-top1": dict(E=8, k=1), "16e": dict(E=16, k=2)}
for _v in MT_VARIANTS:
    MT_CONTROLS[f"task-moe-{_v}"] = tuple(f"task-moe-{_v}-{c}" for c in ("dense-trunk", "hash", "task-only"))
for _v in META_VARIANTS:
    META_CONTROLS[f"moe-maml-{_v}"] = tuple(f"moe-maml-{_v}-{c}" for c in ("dense-trunk", "hash"))
ATTEMPTS = {m for g in (MT_CONTROLS, META_CONTROLS, SUP_CONTROLS) for moe, cs in g.items()
            if moe not in ("task-moe", "moe-maml", "moe-mlp")
            for m in (moe, *cs)} | {c for extra in EXTRA_COMPARISONS.values() for _, cs in extra for c in cs} | set(
    bench_rl.ATTEMPT_METHODS)
CONTROLS = {"rl": bench_rl.CONTROLS, "multitask": MT_CONTROLS, "meta": META_CONTROLS, "continual": CL_CONTROLS,
            "supervised": SUP_CONTROLS}
CONTROL_KIND = {"ppo-moe-dense-trunk": "dense-same-trunk", "ppo-moe-hash": "moe-fixed-routing",
                "ppo-soft-moe-one-expert": "single-scaled-expert", "ppo-moe-task": "moe-task-only",
                "ppo-moe-task-hash": "moe-fixed-routing", "ppo-moe-task-dense-trunk": "dense-same-trunk",
                "task-moe-dense-trunk": "dense-same-trunk", "task-moe-hash": "moe-fixed-routing",
                "task-moe-task-only": "moe-task-only",
                "moe-maml-dense-trunk": "dense-same-trunk", "moe-maml-hash": "moe-fixed-routing",
                "moe-growth-one-expert": "dense-same-trunk", "moe-growth-learned-router": "moe-learned-routing",
                "moe-growth-one-expert-640": "dense-same-total-params",
                "moe-mlp-dense-trunk": "dense-same-trunk", "moe-mlp-hash": "moe-fixed-routing"}
_SUFFIX_KIND = {"-dense-trunk": "dense-same-trunk", "-hash": "moe-fixed-routing", "-task-only": "moe-task-only"}
CONTROL_KIND.update({m: k for m in ATTEMPTS for suffix, k in _SUFFIX_KIND.items() if m.endswith(suffix)})
RL_METHODS = bench_rl.CONTROL_METHODS  # each MoE method followed by its controls


def _methods(groups: dict) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for moe, controls in groups.items() for m in (moe, *controls)))


METHODS = {p: (RL_METHODS if p == "rl" else _methods({**g, **dict(EXTRA_COMPARISONS.get(p, []))})) for p, g in CONTROLS.items()}
ALL_METHODS = tuple(m for p in PARADIGMS for m in METHODS[p])
DEFAULT_METHODS = tuple(m for m in ALL_METHODS if m not in ATTEMPTS)
DIGITS = {"rl": 1, "multitask": 4, "meta": 3, "continual": 4, "supervised": 4}  # table digits per paradigm's metric

# budgets (full / quick); every record keeps its budget, --resume matches on it
MT_P = (0.5, 0.1)
MT_BUDGET = {"full": dict(n_train=4000, n_test=4000, epochs=30, batch_size=128, lr=1e-2),
             "quick": dict(n_train=256, n_test=256, epochs=1, batch_size=128, lr=1e-2)}
META_BUDGET = {"full": dict(K=5, query=10, meta_batch=8, iters=500, tasks=300),
               "quick": dict(K=5, query=10, meta_batch=4, iters=3, tasks=10)}
CL_BUDGET = {"full": dict(epochs=10), "quick": dict(epochs=1)}
SUP_BUDGET = {"full": dict(epochs=20, batch_size=64, test_fraction=0.25), "quick": dict(epochs=1, batch_size=64, test_fraction=0.25)}
SEEDS = {"full": {"rl": 10, "multitask": 10, "meta": 5, "continual": 10, "supervised": 10},
         "quick": dict.fromkeys(PARADIGMS, 2)}
# meta benchmarks beyond bench_meta's: multimodal regression over more function families (modes), bench_meta's
# multimodal settings otherwise
META_EXTRA = {"multimodal10": dict(families=10)}


def rl_record(rec: dict) -> dict | list[dict]:
    """The final return at the zoo's budget; at another budget (``--rl-steps``, benchmark ``<env>@<k>k``) also the
    steps until the running mean of 20 episodes first reaches bench_rl's threshold, censored at the budget (the
    value is the budget when it never does; ``reached`` says which)."""
    env, steps = rec["env"], rec["steps"]
    suite = env in bench_rl.SUITES  # multi-task: the mean over tasks of each task's last 20 episodes
    base = {"paradigm": "rl", "benchmark": env, "method": rec["method"], "control": CONTROL_KIND.get(rec["method"]),
            "seed": rec["seed"], "metric": "final_return_task_mean" if suite else "final_return", "higher_is_better": True,
            "value": rec["final_return_task_mean" if suite else "final_return"],
            "wall_s": rec["wall_s"], "active_params": rec["active_params"], "total_params": rec.get("total_params"),
            "steps": steps}
    if steps == bench_rl.STEPS[env]:
        return base
    base.update(benchmark=f"{env}@{steps // 1000}k", env=env)
    hit = rec["steps_to_threshold"]
    return [base, {**base, "metric": f"steps_to_{bench_rl.THRESHOLD[env]:g}", "higher_is_better": False,
                   "value": steps if hit is None else hit, "reached": hit is not None}]


def fill_rl_total_params(records: list[dict]) -> None:
    """RL records written before runs recorded their total parameters get them from the built network: exact, the
    count depends on neither training nor seed. The recorded active count must match the rebuilt one (else the
    method's network has changed since it ran, and the record is left alone with a warning)."""
    cache: dict[tuple[str, str], tuple[int, int]] = {}
    for r in records:
        if r["paradigm"] != "rl" or r.get("total_params") is not None or r.get("active_params") is None:
            continue
        key = (r.get("env", r["benchmark"]), r["method"])
        if key not in cache:
            cache[key] = bench_rl.param_counts(*key)
        active, total = cache[key]
        if active != r["active_params"]:
            print(f"{key}: recorded active_params {r['active_params']} != rebuilt {active}: total_params not filled",
                  file=sys.stderr)
            continue
        r["total_params"] = total


def _record(job: dict, metric: str, higher: bool, value: float, wall: float, active: int, total: int, **extra) -> dict:
    return {"paradigm": job["paradigm"], "benchmark": job["benchmark"], "method": job["method"],
            "control": CONTROL_KIND.get(job["method"]), "seed": job["seed"], "metric": metric, "higher_is_better": higher,
            "value": value, "wall_s": wall, "active_params": active, "total_params": total, "budget": job["budget"], **extra}


def _active(total: int, moe) -> int:
    """``total`` less the experts one sample does not use: of a bank of E experts, top_k run per token."""
    bank = sum(p.numel() for p in moe.experts.parameters())
    k = getattr(moe.router, "top_k", moe.experts.num_experts)
    return total - bank + bank * k // moe.experts.num_experts


# ---------------------------------------------------------------------------------------------- multitask
def run_multitask(job: dict) -> dict:
    """Task-MoE or one of its controls on the MMoE synthetic data at ``job["p"]`` (bench_multitask's data,
    training loop and evaluation)."""
    import bench_multitask as bm
    import torch

    from moeparadigms.benchmarks.multitask import SYNTHETIC_TASKS, MMoESyntheticProblem
    from moeparadigms.core import HashRouter, MoE
    from moeparadigms.paradigms.multitask import MultiTaskMoE, TaskMoE

    torch.set_num_threads(1)
    b, seed, method = job["budget"], job["seed"], job["method"]
    # configs/multitask/task_moe.yaml's sizes
    kw = dict(d_model=32, num_experts=8, expert_hidden=21, top_k=2, depth=1, conditioning="concat", task_dim=8,
              load_balance_coef=0.01, z_loss_coef=0.001)
    for v, extra in MT_VARIANTS.items():  # an attempt: its settings, then the same method names as the base
        if method.startswith(f"task-moe-{v}"):
            kw.update(extra)
            method = "task-moe" + method[len(f"task-moe-{v}"):]
    if method == "task-moe-dense-trunk":  # one always-on expert of the active size
        kw.update(num_experts=1, expert_hidden=kw["top_k"] * kw["expert_hidden"], top_k=1)
    if method == "task-moe-task-only":
        kw.update(conditioning="task_only")
    prob = MMoESyntheticProblem(p=job["p"], seed=bm.PROBLEM_SEED)  # bench_multitask's instance and sample seeds
    (xtr, ytr), (xte, yte) = prob.sample(b["n_train"], seed=10_000 + seed), prob.sample(b["n_test"], seed=20_000 + seed)
    torch.manual_seed(seed)
    model = MultiTaskMoE(in_features=xtr.shape[1], tasks=SYNTHETIC_TASKS, architecture=TaskMoE(**kw), tower_hidden=8,
                         lr=b["lr"], usage_plot=False)
    if method == "task-moe-hash":  # the same experts (same initial draw) under a fixed hash router
        for block in model.net.blocks:
            block.moe = MoE(router=HashRouter(d_model=kw["d_model"], num_experts=kw["num_experts"], top_k=kw["top_k"],
                                              seed=seed), experts=block.moe.experts)
    total = sum(p.numel() for p in model.parameters())
    active = total
    for block in model.net.blocks:
        active = _active(active, block.moe)
    t0 = time.perf_counter()
    bm.train(model, xtr, ytr, epochs=b["epochs"], batch_size=b["batch_size"], seed=seed)
    wall = time.perf_counter() - t0
    rows = bm.evaluate(model, xte, yte)
    value = sum(v for _, _, v in rows) / len(rows)
    return _record(job, "test_mse_mean_of_tasks", False, value, wall, active, total, per_task={t: v for t, _, v in rows})


# ---------------------------------------------------------------------------------------------- meta
def run_meta(job: dict) -> dict:
    """MoE MAML or one of its controls (bench_meta's network, data and settings): post-adaptation test MSE."""
    import bench_meta
    import pytorch_lightning as pl
    import torch

    from moeparadigms.benchmarks import meta as M
    from moeparadigms.core import HashRouter, MLPExperts, MoE, TopKRouter
    from moeparadigms.paradigms.meta import MetaMoE

    torch.set_num_threads(1)
    b, seed, method = job["budget"], job["seed"], job["method"]
    pl.seed_everything(seed, workers=True, verbose=False)
    base = job["benchmark"].split("@")[0]  # "<benchmark>@<N>it": another meta-training length (--meta-iters)
    bench = "multimodal" if base in META_EXTRA else base  # its class and inner lr
    dm = getattr(M, bench_meta.BENCHMARKS[bench])(
        shots=b["K"], query=b["query"], meta_batch_size=b["meta_batch"], meta_iterations=b["iters"],
        num_test_tasks=b["tasks"], eval_batch_size=100, seed=seed, **META_EXTRA.get(base, {}))
    pl.seed_everything(seed, workers=True, verbose=False)
    D, E, H, k = 32, 4, 32, 2  # bench_meta's moe-maml block
    for v, extra in META_VARIANTS.items():  # an attempt: more experts / another top_k, then the base method names
        if method.startswith(f"moe-maml-{v}"):
            E, k = extra["E"], extra["k"]
            method = "moe-maml" + method[len(f"moe-maml-{v}"):]
    if method == "moe-maml":
        moe = MoE(router=TopKRouter(d_model=D, num_experts=E, top_k=k),
                  experts=MLPExperts(d_model=D, hidden=H, num_experts=E, backend="autograd"),
                  load_balance_coef=0.01, z_loss_coef=0.0)
    elif method == "moe-maml-dense-trunk":
        moe = MoE(router=TopKRouter(d_model=D, num_experts=1, top_k=1),
                  experts=MLPExperts(d_model=D, hidden=k * H, num_experts=1, backend="autograd"),
                  load_balance_coef=0.01, z_loss_coef=0.0)
    elif method == "moe-maml-hash":
        TopKRouter(d_model=D, num_experts=E, top_k=k)  # drawn and dropped: the experts get moe-maml's initial draw
        moe = MoE(router=HashRouter(d_model=D, num_experts=E, top_k=k, seed=seed),
                  experts=MLPExperts(d_model=D, hidden=H, num_experts=E, backend="autograd"),
                  load_balance_coef=0.0, z_loss_coef=0.0)
    else:
        raise ValueError(f"unknown meta method {method!r}")
    model = MetaMoE(moe=moe, algorithm="maml", adapt=["all"], inner_steps=1, inner_lr=bench_meta.INNER_LR[bench],
                    eval_steps=10, outer_lr=1e-3, plots=False, in_features=dm.in_features, out_features=dm.out_features,
                    task_kind=dm.kind)
    wall, r = bench_meta.fit_and_test(model, dm)
    total = sum(p.numel() for p in model.net.parameters())
    return _record(job, "test_mse_after_10_steps", False, float(r["mean"][10]), wall, _active(total, moe), total,
                   mse_before_adaptation=float(r["mean"][0]), mse_after_1_step=float(r["mean"][1]),
                   median_after_10_steps=float(r["median"][10]), diverged_tasks=r["diverged_tasks"])


# ---------------------------------------------------------------------------------------------- continual
def run_continual(job: dict) -> dict:
    """Expert growth with Gaussian experience inference, or the same module over one shared expert (bench_continual's
    stream, sizes and Trainer)."""
    import bench_continual
    import pytorch_lightning as pl
    import torch

    from moeparadigms.core import MLPExperts, MoE
    from moeparadigms.paradigms.continual import ContinualMoE, ExperienceRouter, ExpertPerExperience, FixedExperts
    from moeparadigms.paradigms.continual_metrics import continual_summary

    torch.set_num_threads(1)
    b, seed, method = job["budget"], job["seed"], job["method"]
    dm = bench_continual.make_stream("split-digits", "class-incremental", b["epochs"], seed)
    pl.seed_everything(seed, verbose=False)
    D, H = 64, 128  # configs/continual/expert_growth.yaml
    moe = MoE(router=ExperienceRouter(d_model=D, num_experts=1, top_k=1), experts=MLPExperts(d_model=D, hidden=H, num_experts=1),
              load_balance_coef=0.0, z_loss_coef=0.0)
    if method == "moe-growth":
        growth = ExpertPerExperience(experts=1)
    elif method == "moe-growth-one-expert":
        growth = FixedExperts()
    elif method == "moe-growth-one-expert-640":  # one shared expert of the grown network's total expert parameters
        moe = MoE(router=ExperienceRouter(d_model=D, num_experts=1, top_k=1),
                  experts=MLPExperts(d_model=D, hidden=640, num_experts=1), load_balance_coef=0.0, z_loss_coef=0.0)
        growth = FixedExperts()
    elif method == "moe-growth-learned-router":
        growth = ExpertPerExperience(experts=1)
    else:
        raise ValueError(f"unknown continual method {method!r}")
    model = ContinualMoE(moe=moe, growth=growth, lr=1e-3, seed=seed, replay_size=0, plots=False,
                         task_inference="router" if method == "moe-growth-learned-router" else "gaussian")
    trainer = pl.Trainer(max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=1, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    wall = time.perf_counter() - t0
    R, _, trained = model.acc_matrix.matrix()
    s = continual_summary(R, None, trained=trained)
    total = sum(p.numel() for p in model.parameters())
    # one experience's path: the shared layers, the experts it routes to, its own head (the inference then mixes
    # the paths of every experience seen, in both the method and the control)
    head = sum(p.numel() for p in model.heads[0].parameters())
    active = _active(total, model.moe) - (len(model.heads) - 1) * head
    return _record(job, "final_avg_acc", True, float(s["avg_acc"]), wall, active, total,
                   forgetting=float(s["forgetting"]), num_experts=int(model.moe.num_experts))


# ---------------------------------------------------------------------------------------------- supervised
def run_supervised(job: dict) -> dict:
    """MoEClassifier (configs/supervised/moe_mlp.yaml: width 64, 8 experts of hidden 128, top-2) or one of its
    controls on scikit-learn's digits (the seed's stratified 75/25 split): held-out accuracy."""
    import pytorch_lightning as pl
    import torch

    from moeparadigms.benchmarks.digits import DigitsDataModule
    from moeparadigms.core import HashRouter, MLPExperts, MoE, TopKRouter
    from moeparadigms.paradigms.supervised import MoEClassifier

    torch.set_num_threads(1)
    b, seed, method = job["budget"], job["seed"], job["method"]
    D, E, H, k = 64, 8, 128, 2
    for v, extra in SUP_VARIANTS.items():  # an attempt: its top_k, then the base method names
        if method.startswith(f"moe-mlp-{v}"):
            k = extra["k"]
            method = "moe-mlp" + method[len(f"moe-mlp-{v}"):]
    pl.seed_everything(seed, verbose=False)
    if method == "moe-mlp":
        router = TopKRouter(d_model=D, num_experts=E, top_k=k)
    elif method == "moe-mlp-hash":
        TopKRouter(d_model=D, num_experts=E, top_k=k)  # drawn and dropped: the experts get moe-mlp's initial draw
        router = HashRouter(d_model=D, num_experts=E, top_k=k, seed=seed)
    elif method == "moe-mlp-dense-trunk":  # one always-on expert of the active size
        router, E, H = TopKRouter(d_model=D, num_experts=1, top_k=1), 1, k * H
    else:
        raise ValueError(f"unknown supervised method {method!r}")
    moe = MoE(router=router, experts=MLPExperts(d_model=D, hidden=H, num_experts=E), load_balance_coef=0.01,
              z_loss_coef=0.001)
    model = MoEClassifier(in_features=64, num_classes=10, moe=moe, depth=1, lr=3e-3)
    dm = DigitsDataModule(batch_size=b["batch_size"], test_fraction=b["test_fraction"], seed=seed)
    trainer = pl.Trainer(max_epochs=b["epochs"], accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, deterministic=True)
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    wall = time.perf_counter() - t0
    acc = float(trainer.test(model, dm, verbose=False)[0]["test/acc"])
    total = sum(p.numel() for p in model.parameters())
    return _record(job, "test_acc", True, acc, wall, _active(total, model.net.blocks[0].moe), total)


RUNNERS = {"rl": lambda job: rl_record(bench_rl.run_one(job)), "multitask": run_multitask, "meta": run_meta,
           "continual": run_continual, "supervised": run_supervised}


def make_jobs(paradigm: str, quick: bool, seeds: int | None, methods: list[str], envs: list[str],
              meta_benchmarks: list[str], rl_steps: int | None = None, mt_p: tuple[float, ...] = MT_P,
              meta_iters: int | None = None) -> list[dict]:
    """One paradigm's runs, the methods interleaved per seed (the same machine load for a method and its controls)."""
    mode = "quick" if quick else "full"
    n = seeds or SEEDS[mode][paradigm]
    ms = [m for m in METHODS[paradigm] if m in methods]
    if paradigm == "rl":  # the task-routed methods run on the multi-task suite, the others on the single envs
        es, steps = (["CartPole-v1", "cartpole-mt"], 1_000) if quick else (envs, rl_steps)
        return [dict(paradigm="rl", env=e, seed=s, method=m, steps=steps or bench_rl.STEPS[e])
                for e in es for s in range(n) for m in ms if (m in bench_rl.TASK_METHODS) == (e in bench_rl.SUITES)]
    if paradigm == "multitask":
        return [dict(paradigm=paradigm, benchmark=f"mmoe-synthetic-p{p}", p=p, seed=s, method=m, budget=MT_BUDGET[mode])
                for p in mt_p for s in range(n) for m in ms]
    if paradigm == "meta":  # another meta-training length is its own benchmark, "<benchmark>@<N>it"
        other = meta_iters is not None and meta_iters != META_BUDGET[mode]["iters"]
        budget = {**META_BUDGET[mode], "iters": meta_iters} if other else META_BUDGET[mode]
        tag = f"@{meta_iters}it" if other else ""
        return [dict(paradigm=paradigm, benchmark=b + tag, seed=s, method=m, budget=budget)
                for b in meta_benchmarks for s in range(n) for m in ms]
    if paradigm == "supervised":
        return [dict(paradigm=paradigm, benchmark="digits", seed=s, method=m, budget=SUP_BUDGET[mode])
                for s in range(n) for m in ms]
    return [dict(paradigm=paradigm, benchmark="split-digits-ci", seed=s, method=m, budget=CL_BUDGET[mode])
            for s in range(n) for m in ms]


def job_key(job_or_record: dict) -> tuple:
    r = job_or_record
    if r["paradigm"] == "rl":
        return ("rl", r.get("env", r.get("benchmark")), r["method"], r["seed"], r["steps"])
    return (r["paradigm"], r["benchmark"], r["method"], r["seed"], json.dumps(r["budget"], sort_keys=True))


@functools.lru_cache(maxsize=16)
def _iqm(scores_json: str) -> dict:
    """rliable's IQM per method (cached: the stratified bootstrap takes tens of seconds on a busy machine, and the
    summary is rewritten after every run of every paradigm)."""
    return {m: dict(zip(("iqm", "ci_low", "ci_high"), v)) for m, v in rl_aggregate(json.loads(scores_json)).items()}


def summarise(records: list[dict], verbose: bool = True) -> dict:
    effects, per_control, iqm, tables, compared = [], [], {}, {}, []
    for (paradigm, bench, metric) in dict.fromkeys((r["paradigm"], r["benchmark"], r["metric"]) for r in records):
        recs = [r for r in records if (r["paradigm"], r["benchmark"], r["metric"]) == (paradigm, bench, metric)
                and r["value"] is not None]
        for method, controls in [*CONTROLS.get(paradigm, {}).items(), *EXTRA_COMPARISONS.get(paradigm, [])]:
            mine = [r for r in recs if r["method"] in (method, *controls)]
            if not any(r["method"] in controls for r in mine):
                continue  # an extra comparison whose controls were not run
            if not any(r["method"] == method for r in mine):
                continue  # this method was not run on this benchmark
            try:
                effect = routing_effect(mine, method=method, controls=list(controls))
            except ValueError as e:  # too few paired seeds so far: say so (at the end, not after every run)
                if verbose:
                    print(f"{bench}/{method}: {e}", file=sys.stderr)
                continue
            effects.append(effect)
            compared.append((mine, method, list(controls)))
            tables.setdefault(paradigm, []).append(effect)
            if len(controls) > 1:  # and against each control alone (the best one is picked on the same seeds)
                for c in controls:
                    per_control.append(routing_effect([r for r in mine if r["method"] in (method, c)], method=method,
                                                      controls=[c]))
        if paradigm == "rl":
            scores = {}
            for m in dict.fromkeys(r["method"] for r in recs):
                v = [r["value"] for r in recs if r["method"] == m]
                if len(v) >= 2:
                    scores[m] = [[x] for x in v]
            if scores:
                iqm[bench if metric == "final_return" else f"{bench} {metric}"] = _iqm(json.dumps(scores, sort_keys=True))
    # one table, each paradigm's rows with its metric's digits
    parts = [effects_table(es, digits=DIGITS.get(p, 3)).splitlines() for p, es in tables.items()]
    rows = parts[0] + [row for part in parts[1:] for row in part[2:]] if parts else []
    # multiplicity: each paradigm's rows (its MoE methods and attempts, each against its best control) are one
    # family; the same differences with Bonferroni intervals at the family-wise 95 % level
    family = {p: len(es) for p, es in tables.items()}
    out = []
    for e, (mine, method, controls) in zip(effects, compared):
        m = family[e.paradigm]
        adj = routing_effect(mine, method=method, controls=controls, level=bonferroni_level(m))
        out.append({**e.as_dict(), "family_size": m, "ci_low_adjusted": adj.ci_low, "ci_high_adjusted": adj.ci_high,
                    "verdict_adjusted": adj.verdict})
    return {"effects": out, "effects_per_control": [e.as_dict() for e in per_control],
            "iqm": iqm, "markdown": "\n".join(rows)}


def report(data: dict) -> str:
    """BENCHMARKS.md's tables from a written JSON (``--report``): the effects, the effects against each control
    alone, each method's mean ± std with its parameters and wall time, RL's interquartile means."""
    import numpy as np

    digits = {(e["paradigm"], e["benchmark"], e["metric"]): DIGITS.get(e["paradigm"], 3) for e in data["effects"]}
    out = ["Best control per MoE method:", "", data["markdown"], "",
           "The same rows corrected for multiple comparisons: each paradigm's rows are one family of m comparisons, "
           "each interval at the Bonferroni level 1 - 0.05/m (family-wise 95 %):", "",
           "| paradigm | benchmark | metric | MoE | best control | m | MoE - control [Bonferroni CI] | verdict: 95 % -> adjusted |",
           "|---|---|---|---|---|---|---|---|"]
    for e in data["effects"]:
        if "family_size" not in e:  # a JSON written before the correction: rerun --report after any --resume
            continue
        f = functools.partial(fmt, digits=digits[(e['paradigm'], e['benchmark'], e['metric'])])
        out.append(f"| {e['paradigm']} | {e['benchmark']} | {e['metric']} | {e['method']} | {e['control']} | "
                   f"{e['family_size']} | {f(e['diff'])} [{f(e['ci_low_adjusted'])}, {f(e['ci_high_adjusted'])}] | "
                   f"{e['verdict']} -> {e['verdict_adjusted']} |")
    out += ["", "Against each control alone:", "",
           "| benchmark | metric | MoE | control | MoE - control [95% CI] | seeds | verdict |", "|---|---|---|---|---|---|---|"]
    for e in data["effects_per_control"]:
        f = functools.partial(fmt, digits=digits.get((e['paradigm'], e['benchmark'], e['metric']), 3))
        out.append(f"| {e['benchmark']} | {e['metric']} | {e['method']} | {e['control']} | {f(e['diff'])} "
                   f"[{f(e['ci_low'])}, {f(e['ci_high'])}] | {len(e['seeds'])} | {e['verdict']} |")
    out += ["", "Per method (mean ± std over seeds):", "",
            "| paradigm | benchmark | metric | method | control kind | mean ± std | seeds | active params | total params "
            "| train s (mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    recs = [r for r in data["records"] if r["value"] is not None]
    for key in dict.fromkeys((r["paradigm"], r["benchmark"], r["metric"], r["method"]) for r in recs):
        rs = [r for r in recs if (r["paradigm"], r["benchmark"], r["metric"], r["method"]) == key]
        v = np.array([r["value"] for r in rs], dtype=float)
        f = functools.partial(fmt, digits=DIGITS.get(key[0], 3))
        total = rs[0].get("total_params")
        out.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {rs[0]['control'] or '(MoE)'} | {f(v.mean())} ± "
                   f"{f(v.std(ddof=1) if len(v) > 1 else 0.0)} | {len(v)} | {rs[0]['active_params']:,} | "
                   f"{'-' if total is None else f'{total:,}'} | {np.mean([r['wall_s'] for r in rs]):.1f} |")
    out += ["", "RL interquartile means [95% stratified-bootstrap CI]:", ""]
    out += [f"- {bench}: " + "; ".join(f"{m} {v['iqm']:.1f} [{v['ci_low']:.1f}, {v['ci_high']:.1f}]" for m, v in per.items())
            for bench, per in data["iqm"].items()]
    out += ["", "Meta, secondary: the test MSE after 1 inner step (the step count MAML trained with), against each control:",
            "", "| benchmark | MoE | control | MoE - control after 1 step [95% CI] | seeds | verdict |", "|---|---|---|---|---|---|"]
    one = [{**r, "metric": "test_mse_after_1_step", "value": r["mse_after_1_step"]} for r in data["records"]
           if r["paradigm"] == "meta" and r.get("mse_after_1_step") is not None]
    for bench in dict.fromkeys(r["benchmark"] for r in one):
        for method, controls in META_CONTROLS.items():
            for cs in [[c] for c in controls] + [list(controls)]:  # each control alone, then the best of them
                try:
                    e = routing_effect([r for r in one if r["benchmark"] == bench and r["method"] in (method, *cs)],
                                       method=method, controls=cs)
                except ValueError:  # not run on this benchmark
                    continue
                label = f"{e.control}: {fmt(e.control_mean)}" + (" (best)" if len(cs) > 1 else "")
                out.append(f"| {bench} | {method}: {fmt(e.method_mean)} | {label} | {fmt(e.diff)} "
                           f"[{fmt(e.ci_low)}, {fmt(e.ci_high)}] | {len(e.seeds)} | {e.verdict} |")
    out += ["", "Invocations that wrote the JSON:", ""]
    out += [f"- `{run['command']}`: {run['wall_s'] / 60:.1f} min" for run in data.get("runs", [])]
    return "\n".join(out)


def write(path: Path, records: list[dict], verbose: bool = True, **meta) -> dict:
    summary = summarise(records, verbose)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**meta, **summary, "records": records}, indent=1) + "\n")
    tmp.replace(path)
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run of every paradigm (seconds each): tiny budgets, 2 seeds, RL on CartPole and cartpole-mt for "
                         "1,000 steps")
    ap.add_argument("--paradigms", nargs="+", default=list(PARADIGMS), choices=list(PARADIGMS))
    ap.add_argument("--envs", nargs="+", default=["CartPole-v1", "Acrobot-v1", "cartpole-mt"],
                    choices=["CartPole-v1", "Acrobot-v1", "cartpole-mt"],
                    help="rl's environments (cartpole-mt: the multi-task suite, where the task-routed methods run)")
    ap.add_argument("--rl-steps", type=int, default=None,
                    help="rl's budget (default the zoo's 100k); another budget is benchmark <env>@<k>k and adds the "
                         "steps-to-threshold metric")
    ap.add_argument("--meta-benchmarks", nargs="+", default=["sinusoid"], choices=["sinusoid", "multimodal", *META_EXTRA],
                    help="meta's benchmarks; multimodal10: multimodal regression over 10 function families "
                         "(MultimodalTasks(families=10)) instead of MMAML's 5")
    ap.add_argument("--meta-iters", type=int, default=None,
                    help="meta-training iterations (default 500, --quick 3; another count is benchmark <benchmark>@<N>it)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds per paradigm (default: " + ", ".join(f"{p} {n}" for p, n in SEEDS["full"].items()) + ")")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=list(ALL_METHODS),
                    help="run only these methods (of every paradigm in --paradigms; default: all but the attempts "
                         "task-moe-top1*, task-moe-16e*, moe-maml-8e-top1*, moe-maml-16e*, moe-growth-one-expert-640)")
    ap.add_argument("--mt-p", nargs="+", type=float, default=list(MT_P), choices=list(MT_P), help="multitask's correlations")
    ap.add_argument("--report", action="store_true", help="print BENCHMARKS.md's tables from --out and run nothing")
    ap.add_argument("--merge", nargs="+", type=Path, default=[],
                    help="add the records of these JSONs (runs made in parallel into other --out files) before running")
    ap.add_argument("--resume", action="store_true", help="keep the records --out already holds and run the rest")
    args = ap.parse_args(argv)
    if args.meta_iters is not None and args.meta_iters < 1:
        ap.error(f"--meta-iters must be at least 1, got {args.meta_iters}")
    if args.report:
        print(report(json.loads(args.out.read_text())))
        return
    jobs = [j for p in args.paradigms
            for j in make_jobs(p, args.quick, args.seeds, args.methods, args.envs, args.meta_benchmarks, args.rl_steps,
                               tuple(args.mt_p), args.meta_iters)]
    records: list[dict] = []
    runs: list[dict] = []
    if args.resume and args.out.is_file():
        old = json.loads(args.out.read_text())
        records = old["records"]
        # earlier invocations' commands and wall times (the first file kept one at the top level)
        runs = old.get("runs") or ([{"command": old["command"], "wall_s": old["wall_s"]}] if "command" in old else [])
    for other in args.merge:  # records (and invocations) of runs made in parallel into other files
        more = json.loads(other.read_text())
        have = {(job_key(r), r["metric"]) for r in records}
        records += [r for r in more["records"] if (job_key(r), r["metric"]) not in have]
        runs += [run for run in more.get("runs", []) if run not in runs]
    fill_rl_total_params(records)
    if args.resume or args.merge:
        done = {job_key(r) for r in records}
        jobs = [j for j in jobs if job_key(j) not in done]
    import logging
    import warnings

    import pytorch_lightning  # noqa: F401  (it sets its logger's level on import: import it first)
    from rich.progress import track

    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)  # no per-run "Trainer.fit stopped" / GPU-available lines
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning's own
    warnings.filterwarnings("ignore", message=r"ContinualMoE: moe was not built from plain values")  # no checkpoints here
    warnings.filterwarnings("ignore", module=r"pytorch_lightning.*")  # num_workers / log-batch-size notices per fit

    t0 = time.perf_counter()
    cmd = " ".join(["python", "scripts/bench_controls.py", *(sys.argv[1:] if argv is None else argv)])

    def meta() -> dict:
        return {"runs": [*runs, {"command": cmd, "wall_s": time.perf_counter() - t0}]}

    summary = None
    for job in track(jobs, description="controls"):
        new = RUNNERS[job["paradigm"]](job)
        records.extend(new if isinstance(new, list) else [new])
        summary = write(args.out, records, verbose=False, **meta())
    summary = write(args.out, records, **meta())
    print(summary["markdown"])
    for bench, per in summary["iqm"].items():
        for m, v in per.items():
            print(f"{bench} {m}: IQM {v['iqm']:.1f} [{v['ci_low']:.1f}, {v['ci_high']:.1f}]")


if __name__ == "__main__":
    main()
