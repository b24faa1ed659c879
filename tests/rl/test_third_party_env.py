"""An environment from another package, on the user's road: Gymnasium's ``module:EnvId`` form and observation
wrappers declared in YAML, through fit, validate and ``moeparadigms evaluate`` (the wrappers must reach the
evaluation envs too), and one clear line when the package or the wrappers are missing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("minigrid")

from moeparadigms.cli import main  # noqa: E402
from moeparadigms.paradigms.rl import GymEnvs, make_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TASK = ["--config", str(ROOT / "tasks/rl/minigrid_doorkey.yaml"), "--config", str(ROOT / "configs/rl/ppo_moe.yaml"),
        "--data.init_args.total_steps=256", "--data.init_args.num_envs=2", "--model.init_args.num_steps=64",
        "--model.init_args.update_epochs=1", "--model.init_args.minibatch_size=64", "--model.init_args.eval_episodes=1"]


def test_minigrid_fit_validate_evaluate_with_yaml_wrappers(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", *TASK])
    ckpt = sorted(tmp_path.rglob("last.ckpt"))[-1]
    main(["validate", *TASK, f"--ckpt_path={ckpt}"])
    out = capsys.readouterr().out
    assert "val/return" in out
    p = subprocess.run([sys.executable, "-m", "moeparadigms.cli", "evaluate", "--ckpt", str(ckpt), "--episodes", "2"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "2 episodes: return" in p.stdout


def test_module_prefix_and_wrappers_shape_the_observation():
    dm = GymEnvs(env_id="minigrid:MiniGrid-Empty-5x5-v0", num_envs=2, total_steps=10,
                 wrappers=[{"class_path": "minigrid.wrappers.ImgObsWrapper"},
                           {"class_path": "gymnasium.wrappers.FlattenObservation"}])
    envs = dm.make()
    assert envs.single_observation_space.shape == (147,)
    assert dm.make_single().observation_space.shape == (147,)
    envs.close()


def test_bad_input_env_package_missing_and_bad_wrappers():
    with pytest.raises(ValueError, match=r"the package 'no_such_pkg' that registers it cannot be imported.*pip install no_such_pkg"):
        GymEnvs(env_id="no_such_pkg:Foo-v0")
    with pytest.raises(ValueError, match=r"package:EnvId"):
        GymEnvs(env_id="MiniGrid-NoSuch-v0")
    with pytest.raises(ValueError, match=r"wrappers\[0\].class_path='gymnasium.wrappers.NoSuch' cannot be imported"):
        GymEnvs(env_id="CartPole-v1", wrappers=[{"class_path": "gymnasium.wrappers.NoSuch"}])
    with pytest.raises(ValueError, match=r"wrappers\[0\].class_path='torch.nn.Linear' is not a gymnasium.Wrapper"):
        make_env("CartPole-v1", wrappers=[{"class_path": "torch.nn.Linear"}])


def test_bad_input_dict_observations_without_wrappers_one_line(tmp_path):
    """A dict-observation env without wrappers ends with one line that says which wrappers to add."""
    task = [a for a in TASK if "minigrid_doorkey" not in a and a != "--config"]
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "tasks/rl/minigrid_doorkey.yaml").read_text().split("    wrappers:")[0]
                   + "    total_steps: 256\n")
    p = subprocess.run([sys.executable, "-m", "moeparadigms.cli", "fit", "--config", str(bad), "--config",
                        str(ROOT / "configs/rl/ppo_moe.yaml"), *[a for a in task if a.startswith("--model")]],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("moeparadigms: error:")]
    assert len(err) == 1 and "not a 1-D Box" in err[0] and "data.init_args.wrappers" in err[0], p.stderr[-2000:]


def test_rl_metric_names_loss_env_step_curves_and_per_task_curves(tmp_path, monkeypatch):
    """``train/loss`` as in every paradigm; episode returns also against environment steps; per-task curves."""
    import csv

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "tasks/rl/cartpole_mt.yaml"), "--config", str(ROOT / "configs/rl/ppo_moe_task.yaml"),
          "--data.init_args.total_steps=1024", "--data.init_args.num_envs=4", "--model.init_args.num_steps=64",
          "--model.init_args.update_epochs=1", "--model.init_args.eval_episodes=1", "--trainer.log_every_n_steps=1"])
    rows = list(csv.DictReader(open(sorted(tmp_path.rglob("metrics.csv"))[-1])))
    cols = set(rows[0])
    assert {"train/loss", "train/episode_return", "env_steps/episode_return"} <= cols, sorted(cols)
    assert any(c.startswith("train/episode_return/task_") for c in cols), sorted(cols)
    env_rows = [r for r in rows if r.get("env_steps/episode_return")]
    steps = [int(r["step"]) for r in env_rows]
    assert steps == sorted(steps) and steps[-1] >= 512, "the env-step curve's x axis is environment steps"
