"""PPO: GAE against a hand computation (terminated and truncated episodes), the rollout against Gymnasium's
NEXT_STEP autoreset, identical seeded runs, a trivial env learned in seconds, a killed run resumed exactly,
the project's environments under check_env, evaluation with video, and bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from gymnasium.utils.env_checker import check_env

from moeparadigms.benchmarks.rl_envs import REGISTERED
from moeparadigms.core import MLPExperts, MoE, SoftMoERouter, TopKRouter
from moeparadigms.paradigms.rl import PPO, GymEnvs, gae

ROOT = Path(__file__).resolve().parents[2]


def test_gae_matches_hand_computation_with_terminated_and_truncated_episodes():
    g, lam = 0.9, 0.5
    # one env, 5 steps: step 1 terminates, step 2 is the reset step, step 4 is truncated (bootstrap V(final obs))
    r = torch.tensor([[1.0], [2.0], [0.0], [1.0], [3.0]])
    v = torch.tensor([[0.5], [0.4], [9.0], [0.2], [0.3]])
    term = torch.tensor([[0.0], [1.0], [0.0], [0.0], [0.0]])
    trunc = torch.tensor([[0.0], [0.0], [0.0], [0.0], [1.0]])
    valid = torch.tensor([[1.0], [1.0], [0.0], [1.0], [1.0]])
    v_final = torch.tensor([0.7])  # value of the observation returned with truncated=True
    adv, ret = gae(r, v, v_final, term, trunc, valid, g, lam)
    d4 = 3.0 + g * 0.7 - 0.3  # truncated: bootstrap
    d3 = 1.0 + g * 0.3 - 0.2
    a4, a3 = d4, d3 + g * lam * d4
    d1 = 2.0 - 0.4  # terminated: nothing bootstrapped
    d0 = 1.0 + g * 0.4 - 0.5
    a1, a0 = d1, d0 + g * lam * d1
    expect = torch.tensor([[a0], [a1], [0.0], [a3], [a4]])
    torch.testing.assert_close(adv, expect)
    torch.testing.assert_close(ret, expect + v)


class _Tagged(gym.Env):
    """Observation = [episode index, step in episode]; terminates after 3 steps."""

    observation_space = gym.spaces.Box(-1e6, 1e6, (2,), dtype=np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.ep = getattr(self, "ep", -1) + 1
        self.t = 0
        return np.array([self.ep, 0], dtype=np.float32), {}

    def step(self, action):
        self.t += 1
        return np.array([self.ep, self.t], dtype=np.float32), 1.0, self.t == 3, False, {}


def test_rollout_masks_next_step_autoreset_transitions():
    if "moeparadigms-test/Tagged-v0" not in gym.registry:
        gym.register("moeparadigms-test/Tagged-v0", entry_point=_Tagged)
    dm = GymEnvs(env_id="moeparadigms-test/Tagged-v0", num_envs=1, total_steps=100)
    m = PPO(num_steps=9)
    tr = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    m.trainer = tr
    tr.datamodule = dm  # the attributes setup() reads
    dm.setup()
    m.build(2, PPO.describe_action_space(dm.envs.single_action_space))
    obs, _ = dm.envs.reset(seed=0)
    m.next_obs, m.next_autoreset = torch.as_tensor(obs), torch.zeros(1)
    r = m.collect_rollout(dm.envs)
    seen = r["obs"][:, 0].tolist()  # norm_obs is off: raw observations
    # steps 0-2 episode 0, step 3 is fed the final obs [0, 3] (reset step, masked), then episode 1 ...
    assert seen[:5] == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]
    assert r["valid"][:, 0].tolist() == [1, 1, 1, 0, 1, 1, 1, 0, 1]
    assert r["terminated"][:, 0].tolist() == [0, 0, 1, 0, 0, 0, 1, 0, 0]
    assert r["advantages"][3, 0] == 0 and r["advantages"][7, 0] == 0
    assert int(m.env_steps) == 7, "reset steps are not environment transitions"
    dm.teardown()


class _NaNAt2(_Tagged):
    """Returns a NaN observation at its second step (the MoE layers do not check with autograd off)."""

    def step(self, action):
        obs, r, term, trunc, info = super().step(action)
        if self.t == 2:
            obs[0] = np.nan
        return obs, r, term, trunc, info


def test_bad_input_nan_observation_in_a_rollout_is_one_clear_error():
    if "moeparadigms-test/NaNAt2-v0" not in gym.registry:
        gym.register("moeparadigms-test/NaNAt2-v0", entry_point=_NaNAt2)
    moe = MoE(router=TopKRouter(d_model=16, num_experts=4, top_k=2), experts=MLPExperts(d_model=16, hidden=16, num_experts=4))
    m = PPO(network="moe", moe=moe, hidden=16, num_steps=8, plots=False)
    dm = GymEnvs(env_id="moeparadigms-test/NaNAt2-v0", num_envs=1, total_steps=100)
    tr = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    m.trainer = tr
    tr.datamodule = dm
    dm.setup()
    m.build(2, PPO.describe_action_space(dm.envs.single_action_space))
    obs, _ = dm.envs.reset(seed=0)
    m.next_obs, m.next_autoreset = torch.as_tensor(obs), torch.zeros(1)
    with pytest.raises(FloatingPointError, match=r"moeparadigms-test/NaNAt2-v0 returned a NaN/inf observation or reward"):
        m.collect_rollout(dm.envs)
    with pytest.raises(FloatingPointError, match="NaN/inf observation"):
        m.act(np.array([[np.nan, 0.0]], dtype=np.float32))
    dm.teardown()


def _fit(network: str = "dense", total: int = 3000, env_id: str = "CartPole-v1", **kw) -> PPO:
    pl.seed_everything(0)
    moe = None
    if network == "moe":
        moe = MoE(router=TopKRouter(d_model=64, num_experts=4, top_k=2), experts=MLPExperts(d_model=64, hidden=64, num_experts=4))
    if network == "soft_moe":
        moe = MoE(router=SoftMoERouter(d_model=16, num_experts=4), experts=MLPExperts(d_model=16, hidden=32, num_experts=4))
    m = PPO(network=network, moe=moe, plots=False, **kw)
    dm = GymEnvs(env_id=env_id, num_envs=4, total_steps=total)
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               deterministic=True).fit(m, dm)
    return m


@pytest.mark.parametrize("network", ["dense", "moe", "soft_moe"])
def test_determinism_ppo_seeded_runs_identical(network):
    a, b = _fit(network, 1024), _fit(network, 1024)
    assert a.history == b.history
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


def test_ppo_learns_identity_env_in_seconds():
    m = _fit("dense", 6000, env_id="moeparadigms/Identity-v0", num_steps=64, minibatch_size=64, update_epochs=4, lr=3e-3)
    assert np.mean(m.recent_returns) >= 9.0, list(m.recent_returns)


@pytest.mark.parametrize("env_id", sorted(REGISTERED))
def test_registered_envs_pass_check_env(env_id):
    check_env(gym.make(env_id).unwrapped)


def test_bad_input_env_id():
    with pytest.raises(ValueError, match=r"env_id='CartPole-v9' is not a registered Gymnasium environment.*"):
        GymEnvs(env_id="CartPole-v9")
    with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
        GymEnvs(total_steps=0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(network="moe"), "needs moe"),
    (dict(network="transformer"), "network='transformer'"),
    (dict(gamma=1.5), "gamma must be in"),
])
def test_bad_input_ppo_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PPO(**kwargs)


RUN = ["--config", "tasks/rl/cartpole.yaml", "--config", "configs/rl/ppo_dense.yaml", "--data.init_args.total_steps=3600",
       "--data.init_args.num_envs=4", "--model.init_args.update_epochs=4", "--model.init_args.minibatch_size=32",
       "--trainer.callbacks.init_args.every_n_train_steps=40", "--trainer.enable_progress_bar=false"]
# 4 envs x 32 steps = 128 transitions (minus reset steps) per update, 4 epochs x 4 minibatches = 16 optimizer steps


def test_resume_ppo_killed_mid_training_equals_uninterrupted(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pause = ["--trainer.callbacks+=tests.reliability.helpers.Pause", "--trainer.callbacks.init_args.after_epoch=0",
             "--trainer.callbacks.init_args.seconds=0.25"]
    killed = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "moeparadigms.cli", "fit", *RUN, *pause, f"--trainer.default_root_dir={killed}"],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(killed.rglob("*step=80.ckpt")):
        assert p.poll() is None, f"run ended before the checkpoint:\n{p.stderr.read()[-3000:]}"
        assert time.time() - t0 < 180
        time.sleep(0.05)
    time.sleep(0.3)
    assert p.poll() is None, "finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    last = sorted(killed.rglob("last.ckpt"))[-1]
    at_kill = torch.load(last, weights_only=True)
    assert 0 < at_kill["rl"]["rollout"]["next_obs"].abs().sum() and at_kill["global_step"] == 80
    from tests.reliability.helpers import cli

    cli("fit", *RUN, f"--ckpt_path={last}", f"--trainer.default_root_dir={killed}")
    cli("fit", *RUN, f"--trainer.default_root_dir={tmp_path / 'straight'}")
    a = torch.load(sorted(killed.rglob("last.ckpt"))[-1], weights_only=True)
    b = torch.load(sorted((tmp_path / "straight").rglob("last.ckpt"))[-1], weights_only=True)
    assert a["global_step"] == b["global_step"] > 80
    assert a["rl"]["rollout"]["history"] == b["rl"]["rollout"]["history"], "episode returns differ after resuming"
    for k in b["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_evaluate_runs_a_saved_policy_and_records_video(tmp_path):
    from tests.reliability.helpers import cli

    cli("fit", *RUN, "--data.init_args.total_steps=600", f"--trainer.default_root_dir={tmp_path}")
    ckpt = sorted(tmp_path.rglob("last.ckpt"))[-1]
    out = subprocess.run([sys.executable, "-m", "moeparadigms.cli", "evaluate", "--ckpt", str(ckpt), "--episodes", "2",
                          "--video-dir", str(tmp_path / "videos")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 episodes: return" in out.stdout
    assert len(list((tmp_path / "videos").glob("*.mp4"))) == 2
    from moeparadigms.paradigms.rl_eval import evaluate

    with pytest.raises(ValueError, match="is not a registered Gymnasium environment"):
        evaluate(ckpt, 1, env_id="NoSuchEnv-v0")
    json.dumps(evaluate(ckpt, 1))  # plain floats


def test_bench_rl_quick_smoke(tmp_path):
    out = tmp_path / "rl.json"
    p = subprocess.run([sys.executable, str(ROOT / "scripts/bench_rl.py"), "--quick", "--out", str(out), "--plots", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = json.loads(out.read_text())["records"]
    keys = {"env", "method", "seed", "steps", "final_return", "steps_to_threshold", "wall_s", "rollout_s", "update_s"}
    assert {(r["env"], r["method"]) for r in recs} == {("CartPole-v1", "sb3-ppo"), ("CartPole-v1", "ppo-dense"), ("CartPole-v1", "ppo-moe"),
                                                      ("cartpole-mt", "ppo-dense-multihead"), ("cartpole-mt", "ppo-moe-task"),
                                                      ("minigrid-mt", "ppo-dense-multihead"), ("minigrid-mt", "ppo-moe-task")}
    assert all(keys <= r.keys() for r in recs)
    assert all(set(r["final_return_per_task"]) <= {"0", "1", "2", "3"} for r in recs if r["env"] == "cartpole-mt")
    for r in (r for r in recs if r["env"] == "minigrid-mt"):
        assert set(r["final_success_per_task"]) <= {"0", "1", "2"} and 0 <= r["final_success_task_mean"] <= 1
    assert all(r["steps"] == 2000 and r["wall_s"] > 0 for r in recs)
    # both libraries' phases timed, inside the run's wall time; the paired per-seed ratios printed
    assert all(0 < r["rollout_s"] and 0 < r["update_s"] and r["rollout_s"] + r["update_s"] < r["wall_s"] for r in recs)
    assert "| CartPole-v1 | ppo-moe ÷ ppo-dense | 1 |" in p.stdout and "| CartPole-v1 | ppo-dense ÷ sb3-ppo | 1 |" in p.stdout
    assert (tmp_path / "CartPole-v1.png").exists()
    # the reproduction check against an earlier file: a file against itself is identical curve for curve
    c = subprocess.run([sys.executable, str(ROOT / "scripts/bench_rl.py"), "--combine", str(out), "--compare", str(out),
                        "--out", str(tmp_path / "both.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr[-3000:]
    row = next(line for line in c.stdout.splitlines() if line.startswith("| CartPole-v1 | ppo-moe | 1 |"))
    assert row.endswith("| 0/1 | " + row.split(" | ")[6] + " | 1/1 |")


def test_norm_reward_scales_by_the_running_return_std():
    """SB3 VecNormalize(norm_reward=True) semantics: rewards divided by the std of the running discounted return;
    the logged episode returns stay in the environment's units."""
    m = _fit("dense", 1024, norm_reward=True, gamma=0.98)
    assert float(m.ret_rms.count) > 100 and float(m.ret_rms.var) > 0
    env = gym.wrappers.vector.RecordEpisodeStatistics(gym.make_vec("CartPole-v1", 4, vectorization_mode="sync"))
    obs, _ = env.reset(seed=0)
    m.next_obs, m.next_autoreset = torch.as_tensor(obs), torch.zeros(4)
    r = m.collect_rollout(env)
    scale = 1.0 / float((m.ret_rms.var + 1e-8).sqrt())
    valid = r["valid"].bool()
    assert torch.allclose(r["rewards"][valid], torch.full_like(r["rewards"][valid], scale), rtol=0.2)
    assert all(ret >= 8 for _, ret, *rest in m.history), "episode returns are logged unscaled"


def test_anneal_clip_and_lr_follow_sb3_progress_remaining(monkeypatch):
    """The zoo's lin_0.2 clip range and linear learning rate: both scaled by SB3's progress_remaining,
    1 - env_steps / total_steps counted after each rollout."""
    seen = []
    update = PPO.update

    def spy(self, r, opt):
        seen.append((int(self.env_steps), self.clip, opt.param_groups[0]["lr"]))
        return update(self, r, opt)

    monkeypatch.setattr(PPO, "update", spy)
    _fit("dense", 512, anneal_clip=True, clip_coef=0.3, lr=1e-3, num_steps=32)  # 4 envs x 32 steps per rollout
    steps = [s for s, _, _ in seen]
    assert 100 < steps[0] <= 128 and steps == sorted(steps) and len(steps) >= 4  # after the 4 x 32-step rollout
    for steps, clip, lr in seen:
        frac = max(0.0, 1 - steps / 512)
        assert clip == pytest.approx(0.3 * frac) and lr == pytest.approx(1e-3 * frac)
    seen.clear()
    _fit("dense", 256, clip_coef=0.3, num_steps=32)
    assert seen and all(c == 0.3 for _, c, _ in seen), "without anneal_clip the clip range stays"


def test_bench_rl_profile_smoke():
    p = subprocess.run([sys.executable, str(ROOT / "scripts/bench_rl.py"), "--profile", "ppo-moe", "--envs", "CartPole-v1",
                        "--steps", "300"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "CartPole-v1 ppo-moe 300 steps under the profiler" in p.stdout and "rollout" in p.stdout
    assert "moe/fused" in p.stdout or "_TopKMoE" in p.stdout or "aten::mm" in p.stdout  # the op table


def test_bench_rl_methods_are_run_or_refused_never_dropped(tmp_path):
    """`--methods` named a control (ppo-moe-dense-trunk) that argparse accepted and the job list then silently
    dropped (only the three default methods were kept): a run of the other methods with no word. Now a named method
    runs, and one that cannot run on any named env is an error that names the env and the methods it takes."""
    out = tmp_path / "rl.json"
    p = subprocess.run([sys.executable, str(ROOT / "scripts/bench_rl.py"), "--envs", "CartPole-v1", "--steps", "256",
                        "--methods", "ppo-moe-dense-trunk", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert {r["method"] for r in json.loads(out.read_text())["records"]} == {"ppo-moe-dense-trunk"}
    bad = subprocess.run([sys.executable, str(ROOT / "scripts/bench_rl.py"), "--envs", "CartPole-v1", "--steps", "256",
                          "--methods", "ppo-moe-task", "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "none runs on CartPole-v1" in bad.stderr and "ppo-moe-dense-trunk" in bad.stderr
    assert not (tmp_path / "x.json").exists()


def test_ppo_on_a_gpu_trainer_is_one_clear_error():
    """`--trainer.accelerator gpu` on an H200 crashed at the first rollout step with a cpu/cuda device mismatch deep in
    the policy; PPO now says in one line at setup that it trains on the CPU. Replayed here with a trainer whose
    strategy reports a CUDA root device."""
    from types import SimpleNamespace

    model = PPO(network="dense")
    model._trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    with pytest.raises(ValueError, match=r"PPO trains on the CPU .* the trainer's device is cuda:0: set trainer.accelerator=cpu"):
        model.setup("fit")
