"""Multi-task RL: the CartPole suite's tasks differ in physics and are visible in the observation, per-task heads
and task-conditioned routing follow the task id, seeded task-routed runs are identical, and a router that does
not cover the environment's tasks is refused with the field named."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from moeparadigms.benchmarks.rl_envs import TASKS
from moeparadigms.core import MLPExperts, MoE, TaskConditionedRouter
from moeparadigms.paradigms.rl import PPO, GymEnvs, PolicyNet

MT = "moeparadigms/CartPoleMT-v0"


def test_cartpole_mt_tasks_differ_and_are_one_hot_in_the_observation():
    finals = []
    for task in range(len(TASKS)):
        env = gym.make(MT, task=task)
        obs, info = env.reset(seed=0)
        assert info["task"] == task and obs[4:].tolist() == np.eye(len(TASKS))[task].tolist()
        for _ in range(5):
            obs, *_ = env.step(1)
        finals.append(obs[:4])
    # same seed and actions: the reversed push moves the cart the other way; other physics change the pole
    assert finals[0][1] > 0 > finals[3][1]
    assert not np.allclose(finals[0][2:], finals[1][2:]) and not np.allclose(finals[0][2:], finals[2][2:])
    drawn = {gym.make(MT).reset(seed=s)[1]["task"] for s in range(40)}
    assert drawn == set(range(len(TASKS))), "reset draws every task"
    with pytest.raises(ValueError, match="task=7 is out of range"):
        gym.make(MT, task=7)


def test_task_heads_pick_the_row_of_the_task():
    torch.manual_seed(0)
    net = PolicyNet(6, 3, 8, None, head_gain=1.0, num_heads=2)
    x, task = torch.randn(5, 6), torch.tensor([0, 1, 1, 0, 1])
    out, _, _ = net(x, task)
    z = torch.tanh(net.mid(torch.tanh(net.inp(x))))
    full = net.head(z).view(5, 2, 3)
    for i in range(5):
        torch.testing.assert_close(out[i], full[i, task[i]])


def _task_moe(num_tasks: int = 4) -> MoE:
    return MoE(router=TaskConditionedRouter(d_model=64, num_experts=4, num_tasks=num_tasks, top_k=1, conditioning="task_only"),
               experts=MLPExperts(d_model=64, hidden=32, num_experts=4), load_balance_coef=0.01)


def _fit_mt(total: int = 512) -> PPO:
    pl.seed_everything(0)
    m = PPO(network="moe", moe=_task_moe(), task_heads=True, plots=False)
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               deterministic=True).fit(m, GymEnvs(env_id=MT, num_envs=4, total_steps=total))
    return m


def test_determinism_ppo_task_routed_multitask():
    a, b = _fit_mt(), _fit_mt()
    assert a.history == b.history and {t for *_, t in a.history} <= set(range(len(TASKS)))
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    # task-only routing: every sample of a task goes to the same expert
    obs = torch.cat([torch.randn(8, 4), torch.eye(4).repeat(2, 1)], 1)
    routing = a.actor.trunk.blocks[0].moe.router(a.actor.trunk.router_input(obs), task_id_T=a.task_of(obs))
    ids = routing.ids_TK.flatten()
    assert ids[:4].tolist() == ids[4:].tolist()


def test_bad_input_task_router_does_not_cover_the_env_tasks():
    m = PPO(network="moe", moe=_task_moe(num_tasks=2), task_heads=True)
    with pytest.raises(ValueError, match=r"num_tasks=4 but moe.router.num_tasks=2.*out of range"):
        m.build(8, {"kind": "discrete", "n": 2}, num_tasks=4)


def test_multitask_fit_checkpoint_loads_weights_only_and_evaluates(tmp_path):
    from moeparadigms.paradigms.rl_eval import evaluate
    from tests.reliability.helpers import cli

    cli("fit", "--config", "tasks/rl/cartpole_mt.yaml", "--config", "configs/rl/ppo_moe_task.yaml", "--data.init_args.total_steps=300",
        "--data.init_args.num_envs=4", "--model.init_args.update_epochs=1", "--model.init_args.eval_episodes=1",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}")
    ckpt = sorted(tmp_path.rglob("last.ckpt"))[-1]
    c = torch.load(ckpt, weights_only=True)
    assert c["rl"]["num_tasks"] == len(TASKS)
    returns = evaluate(ckpt, 2)
    assert len(returns) == 2 and all(r >= 1 for r in returns)
