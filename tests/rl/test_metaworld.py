"""Meta-World MT10 (optional extra): without metaworld the env id is registered and building it says how to
install it; with metaworld the env passes Gymnasium's checker, shows Meta-World's state followed by the one-hot
task id, draws all ten tasks reproducibly from the reset seed, truncates at 500 steps, reports success, and a
short multi-task PPO fit runs on it (and, once rl.py imports the module, the YAML pair through the CLI)."""
from __future__ import annotations

import importlib.util
import types
import warnings

import gymnasium as gym
import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from moeparadigms.benchmarks import metaworld as mw
from moeparadigms.core import MLPExperts, MoE, TaskConditionedRouter
from moeparadigms.paradigms import rl
from moeparadigms.paradigms.rl import PPO, GymEnvs

HAVE_METAWORLD = importlib.util.find_spec("metaworld") is not None
T = len(mw.TASKS)


def test_without_metaworld_the_env_is_registered_and_says_how_to_install():
    if HAVE_METAWORLD:
        pytest.skip("metaworld is installed: the missing-package message cannot be seen")
    assert mw.ENV_ID in gym.registry and gym.spec(mw.ENV_ID).max_episode_steps == 500
    GymEnvs(env_id=mw.ENV_ID, num_envs=2)  # the id is accepted: the task YAML instantiates without metaworld
    with pytest.raises(ImportError, match=r"MetaWorldMT10-v0 needs Meta-World .*pip install 'moeparadigms\[metaworld\]'"):
        gym.make(mw.ENV_ID)


@pytest.fixture(scope="module")
def env():
    pytest.importorskip("metaworld")
    e = gym.make(mw.ENV_ID)
    yield e
    e.close()


def test_mt10_passes_the_env_checker_and_has_mt10_spaces(env):
    from gymnasium.utils.env_checker import check_env

    fresh = gym.make(mw.ENV_ID).unwrapped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(fresh, skip_render_check=True)
    fresh.close()
    # the checker's only remarks: Meta-World's object coordinates are unbounded (as in its own spaces)
    assert all("infinity" in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert env.observation_space.shape == (39 + T,) and env.observation_space.dtype == np.float32
    assert env.action_space == gym.spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
    assert env.unwrapped.metadata["num_tasks"] == T == 10 and env.spec.max_episode_steps == 500


def test_mt10_observation_is_metaworld_state_then_one_hot_task_id(env):
    bench = mw._benchmark(0)
    for k, name in enumerate(mw.TASKS):
        obs, info = env.reset(seed=k, options={"task": k})
        assert info["task"] == k and obs.dtype == np.float32
        assert obs[-T:].tolist() == np.eye(T)[k].tolist()
        # the first 39 features are what Meta-World's own env of that task and variation shows
        ref = bench.train_classes[name]()
        ref.set_task([t for t in bench.train_tasks if t.env_name == name][info["variation"]])
        state, _ = ref.reset()
        ref.close()
        np.testing.assert_allclose(obs[:39], state.astype(np.float32), rtol=1e-6, atol=1e-6)
        obs, r, term, trunc, info = env.step(env.action_space.sample())
        assert obs[-T:].tolist() == np.eye(T)[k].tolist() and info["task"] == k and not term and not trunc
        assert 0.0 <= r <= 10.0 and info["success"] in (0.0, 1.0)
    with pytest.raises(ValueError, match="task=10 is out of range"):
        gym.make(mw.ENV_ID, task=10)


def test_mt10_seeded_resets_are_identical_and_draw_every_task(env):
    other = gym.make(mw.ENV_ID)
    actions = np.random.default_rng(0).uniform(-1, 1, (30, 4)).astype(np.float32)
    runs = []
    for e in (env, other, env):
        obs, info = e.reset(seed=123)
        traj = [(obs, info["task"], info["variation"])]
        for a in actions:
            obs, r, *_ = e.step(a)
            traj.append((obs, r))
        runs.append(traj)
    other.close()
    for traj in runs[1:]:
        assert traj[0][1:] == runs[0][0][1:]
        for x, y in zip(traj, runs[0]):
            np.testing.assert_array_equal(x[0], y[0])
            assert x[1] == y[1]
    drawn = [env.reset(seed=s)[1] for s in range(40)]
    assert len({(i["task"], i["variation"]) for i in drawn}) > 30, "different seeds draw different tasks/variations"
    env.reset(seed=0)
    infos = [env.reset()[1] for _ in range(150)]
    assert {i["task"] for i in infos} == set(range(T)), "unseeded resets go on drawing every task"
    assert len({i["variation"] for i in infos}) > 20, "and many of the 50 variations"


@pytest.mark.filterwarnings("ignore:Constant:UserWarning")  # the scripted policy's gain note: we clip its actions
def test_mt10_episode_truncates_at_500_and_success_sticks(env):
    from metaworld.policies import SawyerReachV3Policy

    policy = SawyerReachV3Policy()
    obs, _ = env.reset(seed=0, options={"task": mw.TASKS.index("reach-v3")})
    steps, first_success, trunc = 0, None, False
    while not trunc:
        a = np.clip(policy.get_action(obs[:39].astype(np.float64)), -1, 1).astype(np.float32)
        obs, r, term, trunc, info = env.step(a)
        steps += 1
        assert not term, "Meta-World episodes never terminate"
        if info["success"] and first_success is None:
            first_success = steps
        if first_success is not None:
            assert info["is_success"] == 1.0, "an episode that succeeded once is a success"
    assert steps == 500, "truncated at Meta-World's max_path_length"
    assert first_success is not None and first_success < 500, "the scripted reach policy succeeds"
    env.reset(seed=1)
    _, _, _, _, info = env.step(np.zeros(4, dtype=np.float32))
    assert info["is_success"] == 0.0, "reset clears the episode's success"


def _rl_imports_this_module() -> bool:
    return any(isinstance(v, types.ModuleType) and v.__name__ == mw.__name__ for v in vars(rl).values())


def test_mt10_short_multitask_ppo_fit_runs(env):
    pl.seed_everything(0)
    moe = MoE(router=TaskConditionedRouter(d_model=32, num_experts=4, num_tasks=T, top_k=1, conditioning="task_only"),
              experts=MLPExperts(d_model=32, hidden=16, num_experts=4), load_balance_coef=0.01)
    m = PPO(network="moe", moe=moe, task_heads=True, hidden=32, num_steps=128, update_epochs=1, minibatch_size=128,
            norm_obs=True, norm_reward=True, eval_episodes=1, plots=False)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(m, GymEnvs(env_id=mw.ENV_ID, num_envs=2, total_steps=1024, seed=0))
    assert int(m.env_steps) >= 1024 and m.num_tasks == T and m.log_std is not None
    assert m.actor.head.out_features == 4 * T, "one Gaussian-mean head per task"
    assert len(m.history) == 2 and all(0 <= t < T for *_, t in m.history), "each env finished one 500-step episode"
    assert all(torch.isfinite(p).all() for p in m.parameters())
    if hasattr(m, "recent_success"):  # rl.py with the success-rate logging
        assert len(m.recent_success) == 2 and "train/success_rate" in trainer.logged_metrics


def test_mt10_cli_fit_with_the_task_yaml(env, tmp_path):
    if not _rl_imports_this_module():
        pytest.skip("moeparadigms.paradigms.rl does not import moeparadigms.benchmarks.metaworld yet: the CLI cannot "
                    "resolve moeparadigms/MetaWorldMT10-v0")
    from moeparadigms.paradigms.rl_eval import evaluate
    from tests.reliability.helpers import cli, last_checkpoint

    cli("fit", "--config", "tasks/rl/metaworld_mt10.yaml", "--config", "configs/rl/ppo_moe_task_mt10.yaml",
        "--data.init_args.total_steps=256", "--data.init_args.num_envs=2", "--model.init_args.num_steps=128",
        "--model.init_args.update_epochs=1", "--model.init_args.eval_episodes=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}")
    ckpt = last_checkpoint(tmp_path)
    assert torch.load(ckpt, weights_only=True)["rl"]["num_tasks"] == T
    assert len(evaluate(ckpt, 1)) == 1
