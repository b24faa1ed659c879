"""From YAML: the supervised paradigm starts from a dense checkpoint, upcycled by the Upcycle callback, through
``moeparadigms.cli.main``; the upcycled checkpoint reloads (from its file alone, and through the CLI)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from moeparadigms.checkpoint import safe_load
from moeparadigms.cli import main
from moeparadigms.lifecycle import Upcycle
from moeparadigms.paradigms.supervised import MoEClassifier

ROOT = Path(__file__).resolve().parents[2]
TASK = ROOT / "tasks" / "supervised" / "digits.yaml"


def dense_config(path: Path) -> Path:
    router = {"class_path": "moeparadigms.core.TopKRouter", "init_args": {"d_model": 32, "num_experts": 1, "top_k": 1}}
    experts = {"class_path": "moeparadigms.core.MLPExperts", "init_args": {"d_model": 32, "hidden": 64, "num_experts": 1}}
    cfg = {"model": {"class_path": "moeparadigms.paradigms.supervised.MoEClassifier",
                     "init_args": {"in_features": 64, "num_classes": 10, "depth": 2, "lr": 3e-3,
                                   "moe": {"class_path": "moeparadigms.core.MoE",
                                           "init_args": {"router": router, "experts": experts}}}}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def upcycle_config(path: Path, dense_ckpt: Path, init: str = "copy") -> Path:
    cb = {"class_path": "moeparadigms.lifecycle.Upcycle",
          "init_args": {"init_from": str(dense_ckpt), "num_experts": 8, "top_k": 2, "init": init, "seed": 0}}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [cb]}}))
    return path


def fit(root: Path, *configs: Path, steps: int = 4) -> Path:
    args = ["fit", "--config", str(TASK)]
    for c in configs:
        args += ["--config", str(c)]
    main([*args, f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"])
    return next(root.rglob("last.ckpt"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upcycle_cli")
    dense_cfg = dense_config(tmp / "dense.yaml")
    dense_ckpt = fit(tmp / "dense", dense_cfg)
    up_cfg = upcycle_config(tmp / "upcycle.yaml", dense_ckpt)
    up_ckpt = fit(tmp / "up", dense_cfg, up_cfg)
    return SimpleNamespace(tmp=tmp, dense_cfg=dense_cfg, dense_ckpt=dense_ckpt, up_cfg=up_cfg, up_ckpt=up_ckpt)


def test_upcycled_run_writes_what_it_did_into_the_checkpoint(runs):
    ck = safe_load(runs.up_ckpt)
    assert ck["upcycle"]["num_experts"] == 8 and ck["upcycle"]["converted"] == ["net.blocks.0.moe", "net.blocks.1.moe"]
    assert ck["upcycle"]["init_from"] == str(runs.dense_ckpt)
    moe_hp = ck["hyper_parameters"]["moe"]["init_args"]
    assert moe_hp["router"]["init_args"] == {"d_model": 32, "num_experts": 8, "top_k": 2, "renormalize": True}
    assert moe_hp["experts"]["init_args"]["num_experts"] == 8
    assert ck["state_dict"]["net.blocks.0.moe.experts.w1.weight"].shape == (8, 32, 64)
    dense = safe_load(runs.dense_ckpt)["state_dict"]
    assert dense["net.blocks.0.moe.experts.w1.weight"].shape == (1, 32, 64)
    # trained after upcycling: the experts moved away from the dense weights they were copied from
    assert not torch.allclose(ck["state_dict"]["net.blocks.0.moe.experts.w1.weight"][0], dense["net.blocks.0.moe.experts.w1.weight"][0])


def test_upcycled_checkpoint_reloads_from_the_file_alone(runs):
    model = MoEClassifier.load_from_checkpoint(runs.up_ckpt)
    assert [m.num_experts for m in model.net.moe_layers()] == [8, 8]
    sd = safe_load(runs.up_ckpt)["state_dict"]
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())


def test_upcycled_checkpoint_tests_through_the_cli_with_the_callback(runs, tmp_path):
    main(["test", "--config", str(TASK), "--config", str(runs.dense_cfg), "--config", str(runs.up_cfg),
          "--ckpt_path", str(runs.up_ckpt), f"--trainer.default_root_dir={tmp_path}", "--trainer.limit_test_batches=1",
          "--trainer.enable_progress_bar=false", "--trainer.logger=false"])


def test_callback_setup_upcycles_the_dense_checkpoint_exactly_at_step0(runs):
    dense = MoEClassifier.load_from_checkpoint(runs.dense_ckpt)
    fresh = MoEClassifier.load_from_checkpoint(runs.dense_ckpt)
    with torch.no_grad():  # scramble: the callback must bring back the checkpoint's weights
        for p in fresh.parameters():
            p.add_(1.0)
    cb = Upcycle(init_from=str(runs.dense_ckpt), num_experts=8, top_k=2)
    cb.setup(SimpleNamespace(ckpt_path=None), fresh, "fit")
    x = torch.rand(100, 64)
    dense.eval(), fresh.eval()
    assert [m.num_experts for m in fresh.net.moe_layers()] == [8, 8]
    assert (fresh(x) - dense(x)).abs().max().item() <= 1e-6
    cb.setup(SimpleNamespace(ckpt_path=None), fresh, "test")  # a second setup (fit then test) does nothing
    assert [m.num_experts for m in fresh.net.moe_layers()] == [8, 8]


def test_bad_callback_settings(runs, tmp_path):
    with pytest.raises(ValueError, match="num_experts"):
        Upcycle(init_from="x.ckpt", num_experts=1)
    with pytest.raises(ValueError, match="init"):
        Upcycle(init_from="x.ckpt", num_experts=4, init="fresh")
    dense = MoEClassifier.load_from_checkpoint(runs.dense_ckpt)
    with pytest.raises(FileNotFoundError, match="init_from"):
        Upcycle(init_from=str(tmp_path / "missing.ckpt"), num_experts=4).setup(SimpleNamespace(ckpt_path=None), dense, "fit")
    with pytest.raises(ValueError, match="does not fit"):  # an upcycled checkpoint is not a dense one
        Upcycle(init_from=str(runs.up_ckpt), num_experts=4).setup(SimpleNamespace(ckpt_path=None), dense, "fit")


RL_TASK = ROOT / "tasks" / "rl" / "cartpole.yaml"
RL_MOE = ROOT / "configs" / "rl" / "ppo_moe.yaml"
ONE_EXPERT = ["--model.init_args.moe.init_args.router.init_args.num_experts=1",
              "--model.init_args.moe.init_args.router.init_args.top_k=1",
              "--model.init_args.moe.init_args.experts.init_args.num_experts=1"]


def _ppo_fit(root: Path, *extra: str) -> Path:
    main(["fit", "--config", str(RL_TASK), "--config", str(RL_MOE), *ONE_EXPERT, *extra,
          f"--trainer.default_root_dir={root}", "--data.init_args.total_steps=512", "--data.init_args.num_envs=4",
          "--model.init_args.update_epochs=1", "--model.init_args.minibatch_size=64", "--model.init_args.norm_obs=true",
          "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])
    return next(root.rglob("last.ckpt"))


def test_a_trained_one_expert_ppo_policy_starts_an_upcycled_run_from_yaml(tmp_path):
    """PPO builds its networks from the env in its own setup (after the callbacks'): the callback builds them
    first, loads the dense policy, upcycles actor and critic; the checkpoint reloads as the 8-expert policy."""
    from moeparadigms.paradigms.rl import PPO

    dense_ckpt = _ppo_fit(tmp_path / "dense")
    cb = {"class_path": "moeparadigms.lifecycle.Upcycle",
          "init_args": {"init_from": str(dense_ckpt), "num_experts": 8, "top_k": 2, "seed": 0}}
    (tmp_path / "up.yaml").write_text(yaml.safe_dump({"trainer": {"callbacks": [cb]}}))
    up_ckpt = _ppo_fit(tmp_path / "up", "--config", str(tmp_path / "up.yaml"))
    ck = safe_load(up_ckpt)
    assert sorted(ck["upcycle"]["converted"]) == ["actor.block.moe", "critic.block.moe"]
    assert ck["state_dict"]["actor.block.moe.experts.w1.weight"].shape[0] == 8
    dense = safe_load(dense_ckpt)["state_dict"]
    # the dense policy was loaded: its observation statistics continue instead of restarting (a fresh run of the
    # same length counts exactly as many observations as the dense run did)
    assert ck["state_dict"]["obs_rms.count"].item() > dense["obs_rms.count"].item()
    policy = PPO.load_from_checkpoint(up_ckpt)
    assert policy.actor.block.moe.num_experts == 8 and policy.critic.block.moe.num_experts == 8
    assert all(torch.equal(v, ck["state_dict"][k]) for k, v in policy.state_dict().items())
