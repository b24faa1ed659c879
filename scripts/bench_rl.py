"""RL benchmark: Stable-Baselines3 PPO against our PPO (dense and MoE actor-critics), same env steps, same process.

Every run gets the SB3 zoo's hyperparameters for its environment (ours copies them; differences are listed
in ``ZOO``'s comments), one torch thread, and its own seed; the three methods run back to back per seed so
they see the same machine load. Records (``--out``): ``{"env", "method", "seed", "steps", "final_return",
"steps_to_threshold", "wall_s", "active_params", "total_params", "curve"}`` (parameters: of our actor network;
None for SB3): ``final_return`` is the mean return of the last 20 episodes,
``steps_to_threshold`` the env steps at which that running mean first reaches ``THRESHOLD[env]`` (null if
never), ``wall_s`` the wall time of training, ``rollout_s`` / ``update_s`` the part of it spent collecting rollouts
and in the PPO epochs (both libraries' two phases, timed around their own methods). The printed tables add each
method's wall time over another's of the same seed (medians of the paired ratios). Learning curves are written as PNG under ``--plots``.

    python scripts/bench_rl.py --out benchmarks/results/rl.json --plots benchmarks/results/rl_plots
    python scripts/bench_rl.py --quick --out /tmp/rl.json          # seconds-long smoke run
    python scripts/bench_rl.py --combine new.json --compare benchmarks/results/rl.json --out both.json  # reproduced?
    python scripts/bench_rl.py --profile ppo-moe --envs CartPole-v1    # where one run's time goes

Multi-task suites (``--envs cartpole-mt``): ``moeparadigms/CartPoleMT-v0`` (four CartPole physics, the task id
one-hot at the end of the observation, a task drawn per episode) with CartPole's zoo settings; methods
``ppo-dense-multihead`` (dense 64-64 trunk, one actor and one critic head per task) and ``ppo-moe-task`` (the
middle layer is a top-1 MoE of 4 experts routed by task id alone, ``TaskConditionedRouter(conditioning=
"task_only")``, same per-task heads; about equal active parameters, counts recorded as ``active_params``).
``--envs minigrid-mt``: ``moeparadigms/MiniGridMT3-v0`` (LavaGapS7, RedBlueDoors-6x6, MemoryS11) with the zoo's
MiniGrid settings, the same two methods with three task heads. Suite records also carry
``final_return_per_task`` (mean of each task's last 20 episodes) and ``final_return_task_mean``; MiniGrid's
``final_success_per_task`` / ``final_success_task_mean`` (success = a positive return). The printed table adds
the steps until each method's running mean reaches SB3's median final return on that env.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics as st
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

THRESHOLD = {"CartPole-v1": 475.0, "Acrobot-v1": -100.0, "LunarLander-v3": 200.0, "cartpole-mt": 475.0,
             "minigrid-mt": 0.5}
STEPS = {"CartPole-v1": 100_000, "Acrobot-v1": 100_000, "LunarLander-v3": 300_000, "cartpole-mt": 100_000,
         "minigrid-mt": 300_000}
METHODS = ("sb3-ppo", "ppo-dense", "ppo-moe")
# suite -> (Gymnasium id, zoo settings of, number of tasks)
SUITES = {"cartpole-mt": ("moeparadigms/CartPoleMT-v0", "CartPole-v1", 4),
          "minigrid-mt": ("moeparadigms/MiniGridMT3-v0", "MiniGrid", 3)}
SUITE_METHODS = ("ppo-dense-multihead", "ppo-moe-task")
# issue 14's controls: the same trunk with routing removed or fixed (scripts/bench_controls.py runs them paired by seed)
#   ppo-moe-dense-trunk: ppo-moe's residual block with one always-on expert of hidden 128 (= top-2 x 64: the active
#     expert parameters); ppo-moe-hash: ppo-moe's 4 experts under a fixed random-projection (hash) router, top-2;
#   ppo-soft-moe: Soft MoE (4 tokens of 16 per sample, 4 experts x 1 slot); ppo-soft-moe-one-expert: Sokar et al.'s
#     control, the same tokenisation and 4 slots into one expert scaled to the 4 experts' parameters (hidden 256)
#   multi-task suites (cartpole-mt): ppo-moe-task-learned: ppo-moe-task's 4 experts of hidden 32, top-1, under a
#     learned gate that sees the token and a task embedding (TaskConditionedRouter(conditioning="concat")), against
#     ppo-moe-task (routing by the task id alone: moe-task-only), ppo-moe-task-hash (the hash router, top-1) and
#     ppo-moe-task-dense-trunk (one expert of hidden 32 = top-1 x 32, the active expert parameters); ppo-moe-task is
#     also compared in its turn with the last two (does routing by the task id alone beat fixed or no routing?)
CONTROLS = {"ppo-moe": ("ppo-moe-dense-trunk", "ppo-moe-hash"), "ppo-soft-moe": ("ppo-soft-moe-one-expert",),
            "ppo-moe-task-learned": ("ppo-moe-task", "ppo-moe-task-hash", "ppo-moe-task-dense-trunk"),
            "ppo-moe-task": ("ppo-moe-task-dense-trunk", "ppo-moe-task-hash")}
# issue 14's attempts (run by bench_controls only when named): more experts and top-1 in the residual block.
# ppo-moe-8e: 8 experts of hidden 64, top-2 (its dense trunk is ppo-moe's, one expert of hidden 128: the same active
# parameters, the same run); ppo-moe-top1: ppo-moe's 4 experts, top-1 (its dense trunk: one expert of hidden 64)
RL_VARIANTS = {"8e": dict(num_experts=8, top_k=2), "top1": dict(num_experts=4, top_k=1)}
CONTROLS.update({"ppo-moe-8e": ("ppo-moe-dense-trunk", "ppo-moe-8e-hash"),
                 "ppo-moe-top1": ("ppo-moe-top1-dense-trunk", "ppo-moe-top1-hash")})
ATTEMPT_METHODS = ("ppo-moe-8e", "ppo-moe-8e-hash", "ppo-moe-top1", "ppo-moe-top1-dense-trunk", "ppo-moe-top1-hash")
CONTROL_METHODS = tuple(dict.fromkeys(m for moe, controls in CONTROLS.items() for m in (moe, *controls)))
ALL_METHODS = tuple(dict.fromkeys(METHODS + SUITE_METHODS + CONTROL_METHODS))
# the methods that need a multi-task suite (per-task heads, a task id to route by) and run only there
TASK_METHODS = ("ppo-dense-multihead", "ppo-moe-task", "ppo-moe-task-learned", "ppo-moe-task-hash", "ppo-moe-task-dense-trunk")
# rl-baselines3-zoo hyperparams/ppo.yml; lr_linear: the zoo's lin_ learning rate and clip range (CartPole), our
# anneal_lr + anneal_clip. VecNormalize (Acrobot, MiniGrid) is our norm_obs + norm_reward.
ZOO = {
    "CartPole-v1": dict(n_envs=8, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0,
                        lr=1e-3, lr_linear=True, clip=0.2, normalize=False),
    "Acrobot-v1": dict(n_envs=16, n_steps=256, batch_size=64, gae_lambda=0.94, gamma=0.99, n_epochs=4, ent_coef=0.0,
                       lr=3e-4, lr_linear=False, clip=0.2, normalize=True),
    "LunarLander-v3": dict(n_envs=16, n_steps=1024, batch_size=64, gae_lambda=0.98, gamma=0.999, n_epochs=4,
                           ent_coef=0.01, lr=3e-4, lr_linear=False, clip=0.2, normalize=False),
    # the zoo's MiniGrid-DoorKey-5x5 / FourRooms settings (VecNormalize on, as for Acrobot)
    "MiniGrid": dict(n_envs=8, n_steps=128, batch_size=64, gae_lambda=0.95, gamma=0.99, n_epochs=10, ent_coef=0.0,
                     lr=2.5e-4, lr_linear=False, clip=0.2, normalize=True),
}


def _first_reach(history: list[tuple[int, float]], threshold: float) -> int | None:
    window: deque[float] = deque(maxlen=20)
    for steps, r, *_ in history:
        window.append(r)
        if len(window) == 20 and sum(window) / 20 >= threshold:
            return int(steps)
    return None


def run_sb3(env_id: str, seed: int, steps: int) -> tuple[list[tuple[int, float]], float, dict[str, float]]:
    from stable_baselines3 import PPO as SB3PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    z = ZOO[env_id]
    history: list[tuple[int, float]] = []

    class Episodes(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    history.append((self.num_timesteps, float(info["episode"]["r"])))
            return True

    phases = {"rollout": 0.0, "update": 0.0}

    class TimedPPO(SB3PPO):  # the same PPO, its two phases timed
        def collect_rollouts(self, *a, **kw):
            t = time.perf_counter()
            try:
                return super().collect_rollouts(*a, **kw)
            finally:
                phases["rollout"] += time.perf_counter() - t

        def train(self) -> None:
            t = time.perf_counter()
            super().train()
            phases["update"] += time.perf_counter() - t

    env = make_vec_env(env_id, n_envs=z["n_envs"], seed=seed)
    if z["normalize"]:
        env = VecNormalize(env, gamma=z["gamma"])
    lr = (lambda p: p * z["lr"]) if z["lr_linear"] else z["lr"]
    clip = (lambda p: p * z["clip"]) if z["lr_linear"] else z["clip"]
    model = TimedPPO("MlpPolicy", env, n_steps=z["n_steps"], batch_size=z["batch_size"], gae_lambda=z["gae_lambda"],
                   gamma=z["gamma"], n_epochs=z["n_epochs"], ent_coef=z["ent_coef"], learning_rate=lr, clip_range=clip,
                   seed=seed, device="cpu", verbose=0)
    t0 = time.perf_counter()
    model.learn(steps, callback=Episodes())
    return history, time.perf_counter() - t0, phases


def build_ours(env_id: str, seed: int, steps: int, method: str, ppo_cls=None):
    """Our PPO for ``method`` on ``env_id`` with the zoo's settings, and its ``GymEnvs`` (seeded; not trained)."""
    import pytorch_lightning as pl

    from moeparadigms.core import HashRouter, MLPExperts, MoE, SoftMoERouter, TaskConditionedRouter, TopKRouter
    from moeparadigms.paradigms.rl import PPO, GymEnvs

    ppo_cls = ppo_cls or PPO
    gym_id, zoo_of, num_tasks = SUITES.get(env_id, (env_id, env_id, 1))
    z = ZOO[zoo_of]
    pl.seed_everything(seed, verbose=False)
    moe, network = None, "dense"
    if method == "ppo-moe":
        network = "moe"
        moe = MoE(router=TopKRouter(d_model=64, num_experts=4, top_k=2), experts=MLPExperts(d_model=64, hidden=64, num_experts=4),
                  load_balance_coef=0.01, z_loss_coef=0.001)
    if method == "ppo-moe-dense-trunk":
        network = "moe"
        moe = MoE(router=TopKRouter(d_model=64, num_experts=1, top_k=1), experts=MLPExperts(d_model=64, hidden=128, num_experts=1))
    if method == "ppo-moe-hash":
        network = "moe"
        moe = MoE(router=HashRouter(d_model=64, num_experts=4, top_k=2, seed=seed),
                  experts=MLPExperts(d_model=64, hidden=64, num_experts=4))
    variant = next((v for v in RL_VARIANTS if method.startswith(f"ppo-moe-{v}")), None)
    if variant is not None:  # the attempts: ppo-moe's block with another expert count / top_k, and its controls
        network, v = "moe", RL_VARIANTS[variant]
        E, k = v["num_experts"], v["top_k"]
        if method.endswith("-dense-trunk"):
            moe = MoE(router=TopKRouter(d_model=64, num_experts=1, top_k=1), experts=MLPExperts(d_model=64, hidden=64 * k, num_experts=1))
        else:
            router = (HashRouter(d_model=64, num_experts=E, top_k=k, seed=seed) if method.endswith("-hash")
                      else TopKRouter(d_model=64, num_experts=E, top_k=k))
            moe = MoE(router=router, experts=MLPExperts(d_model=64, hidden=64, num_experts=E),
                      **({} if method.endswith("-hash") else dict(load_balance_coef=0.01, z_loss_coef=0.001)))
    if method in ("ppo-soft-moe", "ppo-soft-moe-one-expert"):
        network = "soft_moe"
        e, hidden = (4, 64) if method == "ppo-soft-moe" else (1, 256)
        moe = MoE(router=SoftMoERouter(d_model=16, num_experts=e, slots_per_expert=4 // e),
                  experts=MLPExperts(d_model=16, hidden=hidden, num_experts=e))
    if method == "ppo-moe-task":  # top-1 of 4 experts of hidden 32: about the dense 64x64 layer's active parameters
        network = "moe"
        moe = MoE(router=TaskConditionedRouter(d_model=64, num_experts=4, num_tasks=num_tasks, top_k=1, conditioning="task_only"),
                  experts=MLPExperts(d_model=64, hidden=32, num_experts=4), load_balance_coef=0.01)
    if method in ("ppo-moe-task-learned", "ppo-moe-task-hash", "ppo-moe-task-dense-trunk"):  # issue 14's controls
        network = "moe"
        e = 1 if method == "ppo-moe-task-dense-trunk" else 4
        router = {"ppo-moe-task-learned": lambda: TaskConditionedRouter(d_model=64, num_experts=4, num_tasks=num_tasks, top_k=1),
                  "ppo-moe-task-hash": lambda: HashRouter(d_model=64, num_experts=4, top_k=1, seed=seed),
                  "ppo-moe-task-dense-trunk": lambda: TopKRouter(d_model=64, num_experts=1, top_k=1)}[method]()
        moe = MoE(router=router, experts=MLPExperts(d_model=64, hidden=32, num_experts=e), load_balance_coef=0.01)
    model = ppo_cls(network=network, moe=moe, hidden=64, num_steps=z["n_steps"], gamma=z["gamma"], gae_lambda=z["gae_lambda"],
                update_epochs=z["n_epochs"], minibatch_size=z["batch_size"], clip_coef=z["clip"], ent_coef=z["ent_coef"],
                lr=z["lr"], anneal_lr=z["lr_linear"], anneal_clip=z["lr_linear"], norm_obs=z["normalize"],
                norm_reward=z["normalize"], torch_threads=1, plots=False,
                task_heads=env_id in SUITES)
    dm = GymEnvs(env_id=gym_id, num_envs=z["n_envs"], total_steps=steps, seed=seed)
    return model, dm


def param_counts(env_id: str, method: str) -> tuple[int, int]:
    """(active, total) parameters of ``method``'s actor on ``env_id``, from the built network (no training; the
    counts do not depend on the seed)."""
    model, dm = build_ours(env_id, 0, 1_000, method)
    try:
        model.build(dm.spec)
    finally:
        dm.teardown()
    return param_counts_of(model.actor)


def run_ours(env_id: str, seed: int, steps: int, method: str) -> tuple[list[tuple[int, float, int]], float, tuple[int, int], dict[str, float]]:
    import pytorch_lightning as pl

    from moeparadigms.paradigms.rl import PPO

    phases = {"rollout": 0.0, "update": 0.0}

    class TimedPPO(PPO):  # the same PPO, its two phases timed
        def collect_rollout(self, envs):
            t = time.perf_counter()
            try:
                return super().collect_rollout(envs)
            finally:
                phases["rollout"] += time.perf_counter() - t

        def update(self, r, opt) -> None:
            t = time.perf_counter()
            super().update(r, opt)
            phases["update"] += time.perf_counter() - t

    model, dm = build_ours(env_id, seed, steps, method, TimedPPO)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0)  # SB3 evaluates nothing either
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    wall = time.perf_counter() - t0
    return list(model.history), wall, param_counts_of(model.actor), phases


def param_counts_of(net) -> tuple[int, int]:
    """(active, total) parameters of a policy network. Active: what one sample's forward uses, all of a dense net;
    of an MoE block, top_k experts of its bank."""
    total = sum(p.numel() for p in net.parameters())
    if net.trunk is None:
        return total, total
    moe = net.trunk.blocks[0].moe
    bank = sum(p.numel() for p in moe.experts.parameters())
    k = getattr(moe.router, "top_k", moe.experts.num_experts)  # Soft MoE: every expert processes its slots
    return total - bank + bank * k // moe.experts.num_experts, total


def run_one(job: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    env_id, seed, steps, method = job["env"], job["seed"], job["steps"], job["method"]
    active = total = None
    if method == "sb3-ppo":
        history, wall, phases = run_sb3(env_id, seed, steps)
    else:
        history, wall, (active, total), phases = run_ours(env_id, seed, steps, method)
    last = [h[1] for h in history[-20:]]
    rec = {"env": env_id, "method": method, "seed": seed, "steps": steps,
           "final_return": sum(last) / len(last) if last else None,
           "steps_to_threshold": _first_reach(history, THRESHOLD[env_id]), "wall_s": wall, "active_params": active,
           "total_params": total,
           "rollout_s": phases["rollout"], "update_s": phases["update"],
           "curve": [[int(h[0]), float(h[1])] for h in history]}
    if env_id in SUITES:
        per, succ = {}, {}
        for task in sorted({h[2] for h in history}):
            rs = [h[1] for h in history if h[2] == task][-20:]
            per[str(task)] = sum(rs) / len(rs)
            succ[str(task)] = sum(r > 0 for r in rs) / len(rs)  # MiniGrid: a positive return is a reached goal
        rec["final_return_per_task"] = per
        rec["final_return_task_mean"] = sum(per.values()) / len(per) if per else None
        if env_id == "minigrid-mt":
            rec["final_success_per_task"] = succ
            rec["final_success_task_mean"] = sum(succ.values()) / len(succ) if succ else None
    return rec


def table(records: list[dict]) -> str:
    """Medians over seeds. Besides the fixed threshold, the issue's own yardstick: env steps until the running
    mean of 20 episodes first reaches SB3's median final return on that env (from the curves)."""
    lines = ["| env | method | steps | final return (median) | steps to threshold (median; reached) | steps to SB3's final "
             "return (median; reached) | wall s (median) | µs / env step |", "|---|---|---|---|---|---|---|---|"]
    for env in dict.fromkeys(r["env"] for r in records):
        sb3 = [r["final_return"] for r in records if r["env"] == env and r["method"] == "sb3-ppo" and r["final_return"] is not None]
        target = st.median(sb3) if sb3 else None
        for m in ALL_METHODS:
            rs = [r for r in records if r["env"] == env and r["method"] == m]
            if not rs:
                continue
            reach = [r["steps_to_threshold"] for r in rs if r["steps_to_threshold"] is not None]
            med_reach = st.median(reach) if len(reach) == len(rs) else None
            finals = [r["final_return"] for r in rs if r["final_return"] is not None]
            wall = st.median(r["wall_s"] for r in rs)
            to_sb3 = "–"
            if target is not None:
                hit = [_first_reach(r["curve"], target) for r in rs]
                ok = [h for h in hit if h is not None]
                to_sb3 = f"{'-' if len(ok) < len(rs) else f'{st.median(ok):,.0f}'} ({len(ok)}/{len(rs)}; {target:.1f})"
            lines.append(f"| {env} | {m} | {rs[0]['steps']:,} | {st.median(finals):.1f} | "
                         f"{'-' if med_reach is None else f'{med_reach:,.0f}'} ({len(reach)}/{len(rs)}) | {to_sb3} | {wall:.1f} | "
                         f"{1e6 * wall / rs[0]['steps']:.0f} |")
    return "\n".join(lines)


def paired_table(records: list[dict]) -> str:
    """Wall time per env step, each method over another *of the same seed* (the methods ran back to back), medians
    over seeds, with the rollout/update split: the timing targets are ratios of paired runs."""
    pairs = (("ppo-moe", "ppo-dense"), ("ppo-moe", "sb3-ppo"), ("ppo-dense", "sb3-ppo"))
    lines = ["| env | ratio | seeds | wall ratio: median (range) | rollout ratio (median) | update ratio (median) | "
             "numerator µs/step: rollout + update (medians) |", "|---|---|---|---|---|---|---|"]
    for env in dict.fromkeys(r["env"] for r in records):
        by = {(r["method"], r["seed"]): r for r in records if r["env"] == env}
        for num, den in pairs:
            seeds = sorted(s for m, s in by if m == num and (den, s) in by)
            if not seeds:
                continue
            a, b = [by[num, s] for s in seeds], [by[den, s] for s in seeds]
            wall = [x["wall_s"] / y["wall_s"] for x, y in zip(a, b)]
            phase = {}
            for k in ("rollout_s", "update_s"):
                ok = [(x[k], y[k]) for x, y in zip(a, b) if x.get(k) and y.get(k)]
                phase[k] = f"{st.median(x / y for x, y in ok):.2f}" if ok else "–"
            us = "–"
            if all(x.get("rollout_s") for x in a):
                us = (f"{1e6 * st.median(x['rollout_s'] / x['steps'] for x in a):.0f} + "
                      f"{1e6 * st.median(x['update_s'] / x['steps'] for x in a):.0f}")
            lines.append(f"| {env} | {num} ÷ {den} | {len(seeds)} | {st.median(wall):.2f} ({min(wall):.2f}–{max(wall):.2f}) | "
                         f"{phase['rollout_s']} | {phase['update_s']} | {us} |")
    return "\n".join(lines)


def compare_table(records: list[dict], old: list[dict]) -> str:
    """Did the learning curves reproduce? Each (env, method) against an earlier file's runs of the same seeds: medians
    old -> new of the final return and the steps to the threshold, the old runs' per-seed range (the noise), how
    many seeds moved up, and how many curves are identical episode for episode."""
    before = {(r["env"], r["method"], r["seed"]): r for r in old}
    lines = ["| env | method | seeds | final return: old → new (median) | old per-seed range | new higher in | "
             "steps to threshold: old → new (median; reached) | identical curves |", "|---|---|---|---|---|---|---|---|"]
    for env in dict.fromkeys(r["env"] for r in records):
        for m in ALL_METHODS:
            pairs = sorted(((before[env, m, r["seed"]], r) for r in records
                            if r["env"] == env and r["method"] == m and (env, m, r["seed"]) in before), key=lambda p: p[1]["seed"])
            if not pairs:
                continue
            fo, fn = [a["final_return"] for a, _ in pairs], [b["final_return"] for _, b in pairs]
            so = [a["steps_to_threshold"] for a, _ in pairs if a["steps_to_threshold"] is not None]
            sn = [b["steps_to_threshold"] for _, b in pairs if b["steps_to_threshold"] is not None]

            def med(v: list, n: int = len(pairs)) -> str:
                return f"{st.median(v):,.0f}" if len(v) == n else "-"

            same = sum(a["curve"] == b["curve"] for a, b in pairs)
            lines.append(f"| {env} | {m} | {len(pairs)} | {st.median(fo):.1f} → {st.median(fn):.1f} | {min(fo):.1f} – {max(fo):.1f} | "
                         f"{sum(b > a for a, b in zip(fo, fn))}/{len(pairs)} | {med(so)} ({len(so)}) → {med(sn)} ({len(sn)}) | "
                         f"{same}/{len(pairs)} |")
    return "\n".join(lines)


def suite_table(records: list[dict]) -> str:
    """The multi-task target: the mean over tasks of each task's final return (and MiniGrid success), per seed."""
    lines = ["| suite | method | task-mean final return: mean over seeds ± s.e. (per seed) | task-mean success (per seed) |",
             "|---|---|---|---|"]
    for env in [e for e in dict.fromkeys(r["env"] for r in records) if e in SUITES]:
        for m in TASK_METHODS:
            rs = sorted((r for r in records if r["env"] == env and r["method"] == m), key=lambda r: r["seed"])
            if not rs:
                continue
            v = [r["final_return_task_mean"] for r in rs]
            se = st.stdev(v) / len(v) ** 0.5 if len(v) > 1 else float("nan")
            succ = [r.get("final_success_task_mean") for r in rs]
            succ_txt = "–" if None in succ else f"{st.mean(succ):.3f} ({', '.join(f'{x:.2f}' for x in succ)})"
            lines.append(f"| {env} | {m} | {st.mean(v):.3f} ± {se:.3f} ({', '.join(f'{x:.3g}' for x in v)}) | {succ_txt} |")
    return "\n".join(lines)


def plots(records: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = []
    for env in dict.fromkeys(r["env"] for r in records):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for m in ALL_METHODS:
            rs = [r for r in records if r["env"] == env and r["method"] == m]
            if not rs:
                continue
            grid = np.linspace(0, rs[0]["steps"], 50)
            ys = []
            for r in rs:
                c = np.array(r["curve"] or [[0, np.nan]], dtype=float)
                ret = np.convolve(c[:, 1], np.ones(20) / 20, mode="full")[: len(c)] if len(c) >= 1 else c[:, 1]
                ys.append(np.interp(grid, c[:, 0], ret, left=np.nan))
            ax.plot(grid, np.nanmedian(np.array(ys), 0), label=f"{m} (median of {len(rs)})")
        ax.axhline(THRESHOLD[env], color="gray", ls="--", lw=1, label="threshold")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("return (mean of last 20 episodes)")
        ax.set_title(env, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{env}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        out.append(path)
    return out


def _write(path: Path, records: list[dict], **meta) -> None:
    """JSON with one record per line (the learning curves make an indented file megabytes long)."""
    body = ",\n".join(json.dumps(r, separators=(",", ":")) for r in records)
    head = json.dumps(meta)[1:-1]
    path.write_text("{" + (head + ", " if head else "") + '"records": [\n' + body + "\n]}\n")


def profile(env_id: str, method: str, steps: int, rows: int = 25) -> None:
    """Where one run's time goes: rollout vs update, then torch.profiler's ops by their own CPU time."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.set_num_threads(1)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _, wall, _, phases = run_ours(env_id, 0, steps, method)
    print(f"{env_id} {method} {steps:,} steps under the profiler (it inflates small ops): wall {wall:.1f} s; "
          f"rollout {1e6 * phases['rollout'] / steps:.0f} us/step, update {1e6 * phases['update'] / steps:.0f} us/step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="the result file (required unless --profile)")
    ap.add_argument("--plots", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="CartPole and the two suites, 2,000 steps, one seed: a smoke run")
    ap.add_argument("--envs", nargs="+", default=["CartPole-v1", "Acrobot-v1", "cartpole-mt"], choices=list(THRESHOLD))
    ap.add_argument("--steps", type=int, default=None, help="env steps per run for every env (default: STEPS[env])")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-start", type=int, default=0, help="first seed (more seeds for an earlier run: --combine them)")
    ap.add_argument("--methods", nargs="+", default=None, choices=list(ALL_METHODS), help="a subset of the methods")
    ap.add_argument("--jobs", type=int, default=1, help="parallel runs (1: the timings are not disturbed by each other)")
    ap.add_argument("--combine", nargs="+", type=Path, default=None,
                    help="merge the records of earlier --out files (a later file's record replaces an earlier one with the same "
                         "env, method and seed) into --out, print the table and plot; trains nothing")
    ap.add_argument("--compare", type=Path, default=None,
                    help="with --combine: also compare the runs with an earlier result file's runs of the same seeds")
    ap.add_argument("--profile", choices=[m for m in ALL_METHODS if m != "sb3-ppo"], default=None,
                    help="run this method once (first --envs env, --steps, default 5,120) under torch.profiler and print "
                         "its phase split and the ops that take the most time; writes nothing")
    args = ap.parse_args()
    if args.profile:
        profile(args.envs[0], args.profile, args.steps or 5_120)
        return
    if args.out is None:
        ap.error("--out is required (unless --profile)")
    if args.combine:
        merged: dict[tuple, dict] = {}
        for f in args.combine:
            for r in json.loads(f.read_text())["records"]:
                merged[(r["env"], r["method"], r["seed"])] = {**r, "source": f.name}
        records = list(merged.values())
        _write(args.out, records, combined_from=[f.name for f in args.combine])
        print(table(records))
        print(paired_table(records))
        print(suite_table(records))
        if args.compare:
            print(compare_table(records, json.loads(args.compare.read_text())["records"]))
        for p in plots(records, args.plots) if args.plots else []:
            print("plot:", p)
        return
    envs, seeds = (["CartPole-v1", "cartpole-mt", "minigrid-mt"], 1) if args.quick else (args.envs, args.seeds)
    def methods_for(env: str) -> list[str]:
        if args.methods is None:
            return list(SUITE_METHODS if env in SUITES else METHODS)
        fits = [m for m in args.methods if (m in TASK_METHODS) == (env in SUITES)]
        if not fits:  # a method that cannot run on an env is an error, never a silently shorter run
            kind = "a multi-task suite" if env in SUITES else "a single env"
            ap.error(f"--methods {' '.join(args.methods)}: none runs on {env} ({kind}); "
                     f"{'suites take' if env in SUITES else 'single envs take'} "
                     f"{', '.join(TASK_METHODS if env in SUITES else [m for m in ALL_METHODS if m not in TASK_METHODS])}")
        return fits

    jobs = [dict(env=e, seed=s, method=m, steps=2_000 if args.quick else args.steps or STEPS[e])
            for e in envs for s in range(args.seed_start, args.seed_start + seeds) for m in methods_for(e)]
    try:
        from rich.progress import track
    except ImportError:  # pragma: no cover
        def track(it, **_):
            return it
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            records = list(track(pool.map(run_one, jobs), total=len(jobs), description="training"))
    else:
        records = [run_one(j) for j in track(jobs, description="training")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    _write(args.out, records, wall_s=time.perf_counter() - t0, jobs=args.jobs, cpu_count=os.cpu_count())
    print(table(records))
    print(paired_table(records))
    print(suite_table(records))
    if args.plots:
        for p in plots(records, args.plots):
            print("plot:", p)


if __name__ == "__main__":
    main()
