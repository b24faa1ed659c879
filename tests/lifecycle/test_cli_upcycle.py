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
    assert sorted(ck["upcycle"]["converted"]) == ["actor.trunk.blocks.0.moe", "critic.trunk.blocks.0.moe"]
    assert ck["state_dict"]["actor.trunk.blocks.0.moe.experts.w1.weight"].shape[0] == 8
    dense = safe_load(dense_ckpt)["state_dict"]
    # the dense policy was loaded: its observation statistics continue instead of restarting (a fresh run of the
    # same length counts exactly as many observations as the dense run did)
    assert ck["state_dict"]["obs_rms.count"].item() > dense["obs_rms.count"].item()
    policy = PPO.load_from_checkpoint(up_ckpt)
    assert policy.actor.trunk.blocks[0].moe.num_experts == 8 and policy.critic.trunk.blocks[0].moe.num_experts == 8
    assert all(torch.equal(v, ck["state_dict"][k]) for k, v in policy.state_dict().items())


def _yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _upcycle_cb(path: Path, ckpt: Path, num_experts: int, top_k: int = 2) -> Path:
    return _yaml(path, {"trainer": {"callbacks": [{"class_path": "moeparadigms.lifecycle.Upcycle", "init_args": {
        "init_from": str(ckpt), "num_experts": num_experts, "top_k": top_k, "seed": 0}}]}})


def _cli(stage: str, root: Path, *args: str) -> None:
    main([stage, *args, f"--trainer.default_root_dir={root}", "--trainer.logger=false",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"])


def _dense(root: Path, base: list[str]) -> Path:
    """Fit the one-expert config ``base`` under ``root``; its last checkpoint."""
    _cli("fit", root, *base)
    return next(root.rglob("last.ckpt"))


def _upcycled(tmp_path: Path, base: list[str], dense_ckpt: Path, num_experts: int = 4) -> tuple[Path, Path]:
    """Fit ``base`` again with the Upcycle callback from ``dense_ckpt``: (the callback's YAML, the last checkpoint)."""
    up = _upcycle_cb(tmp_path / "up.yaml", dense_ckpt, num_experts=num_experts)
    _cli("fit", tmp_path / "up", *base, "--config", str(up))
    return up, next((tmp_path / "up").rglob("last.ckpt"))


CONTINUAL_TASK = ROOT / "tasks" / "continual" / "split_digits.yaml"
CONTINUAL_FIXED = ROOT / "configs" / "continual" / "fixed.yaml"
CONTINUAL_ONE = ["--model.init_args.moe.init_args.router.init_args.num_experts=1",
                 "--model.init_args.moe.init_args.router.init_args.top_k=1"]
# a short stream: 2 experiences x 1 epoch, a few batches each
CONTINUAL_SHORT = ["--data.init_args.n_experiences=2", "--data.init_args.epochs_per_experience=1", "--trainer.max_epochs=2",
                   "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1"]


CONTINUAL_BASE = ["--config", str(CONTINUAL_TASK), "--config", str(CONTINUAL_FIXED), *CONTINUAL_ONE, *CONTINUAL_SHORT]


@pytest.fixture(scope="module")
def continual_dense(tmp_path_factory) -> Path:
    """One dense (one-expert) continual run, shared by the continual tests."""
    return _dense(tmp_path_factory.mktemp("continual_dense"), CONTINUAL_BASE)


def test_a_trained_dense_continual_backbone_starts_an_upcycled_stream_from_yaml(tmp_path, continual_dense):
    """The continual module builds from the stream in its own setup: the callback builds it, loads the one-expert
    backbone trained on the stream, and upcycles it into 4 experts; the checkpoint reloads from its file alone and
    tests through the CLI."""
    from moeparadigms.paradigms.continual import ContinualMoE

    base, dense_ckpt = CONTINUAL_BASE, continual_dense
    up, up_ckpt = _upcycled(tmp_path, base, dense_ckpt)
    ck, dense = safe_load(up_ckpt), safe_load(dense_ckpt)
    # the module keeps its MoE under two names (moe, trunk.blocks.0.moe): one layer, converted once
    assert ck["upcycle"]["converted"] == ["moe"] and ck["upcycle"]["num_experts"] == 4
    assert dense["state_dict"]["trunk.blocks.0.moe.experts.w1.weight"].shape[0] == 1
    assert ck["state_dict"]["trunk.blocks.0.moe.experts.w1.weight"].shape[0] == 4
    # the dense input layer was loaded and then trained on (FixedExperts freezes nothing)
    assert not torch.equal(ck["state_dict"]["trunk.inp.weight"], dense["state_dict"]["trunk.inp.weight"])
    model = ContinualMoE.load_from_checkpoint(up_ckpt)
    assert model.moe.num_experts == 4 and model.moe.router.top_k == 2 and model.trunk.blocks[0].moe is model.moe
    assert all(torch.equal(v, ck["state_dict"][k]) for k, v in model.state_dict().items())
    _cli("test", tmp_path / "test", *base, "--config", str(up), "--ckpt_path", str(up_ckpt), "--trainer.limit_test_batches=1")


def test_upcycled_continual_model_equals_the_dense_backbone_at_step0(continual_dense):
    from moeparadigms.paradigms.continual import ContinualMoE

    dense_ckpt = continual_dense
    dense, fresh = ContinualMoE.load_from_checkpoint(dense_ckpt), ContinualMoE.load_from_checkpoint(dense_ckpt)
    Upcycle(init_from=str(dense_ckpt), num_experts=4, top_k=2).setup(SimpleNamespace(ckpt_path=None), fresh, "fit")
    assert fresh.moe.num_experts == 4 and fresh.trunk.blocks[0].moe is fresh.moe
    dense.eval(), fresh.eval()
    x = torch.rand(64, dense.in_features)
    # log-probabilities reach -200 for classes not seen yet (fp32 spacing 1.5e-5 there): probabilities to 1e-6
    # absolute, log-probabilities to 1e-6 relative
    assert (fresh(x).exp() - dense(x).exp()).abs().max().item() <= 1e-6
    torch.testing.assert_close(fresh(x), dense(x), rtol=1e-6, atol=1e-6)


META_TASK = ROOT / "tasks" / "meta" / "sinusoid.yaml"
META_MOE = ROOT / "configs" / "meta" / "moe_fomaml.yaml"
META_ONE = ["--model.init_args.moe.init_args.router.init_args.num_experts=1",
            "--model.init_args.moe.init_args.router.init_args.top_k=1",
            "--model.init_args.moe.init_args.experts.init_args.num_experts=1"]
META_SHORT = ["--data.init_args.meta_iterations=4", "--data.init_args.meta_batch_size=2",
              "--data.init_args.num_test_tasks=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1"]


def test_a_trained_dense_meta_learner_starts_an_upcycled_meta_training_from_yaml(tmp_path):
    from moeparadigms.paradigms.meta import MetaMoE

    base = ["--config", str(META_TASK), "--config", str(META_MOE), *META_ONE, *META_SHORT]
    _, up_ckpt = _upcycled(tmp_path, base, _dense(tmp_path / "dense", base))
    ck = safe_load(up_ckpt)
    assert ck["upcycle"]["num_experts"] == 4 and ck["upcycle"]["converted"]
    model = MetaMoE.load_from_checkpoint(up_ckpt)
    assert [m.num_experts for m in model.modules() if type(m).__name__ == "MoE"] == [4]
    assert all(torch.equal(v, ck["state_dict"][k]) for k, v in model.state_dict().items())


MT_TASK = ROOT / "tasks" / "multitask" / "mmoe_synthetic.yaml"
MT_TASK_MOE = ROOT / "configs" / "multitask" / "task_moe.yaml"
MT_ONE = ["--model.init_args.architecture.init_args.num_experts=1", "--model.init_args.architecture.init_args.top_k=1"]
MT_SHORT = ["--data.init_args.n_train=256", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1"]


def test_a_trained_dense_task_moe_starts_an_upcycled_multitask_run_from_yaml(tmp_path):
    """Task-MoE trained with one expert (a dense residual trunk) upcycles into 4 task-conditioned experts: the
    routers stay task-conditioned with the trained task embedding, the output equals the dense model's at step 0,
    and the checkpoint reloads as the 4-expert Task-MoE from its file alone."""
    from moeparadigms.core import TaskConditionedRouter
    from moeparadigms.paradigms.multitask import MultiTaskMoE

    base = ["--config", str(MT_TASK), "--config", str(MT_TASK_MOE), *MT_ONE, *MT_SHORT]
    dense_ckpt = _dense(tmp_path / "dense", base)

    dense, fresh = MultiTaskMoE.load_from_checkpoint(dense_ckpt), MultiTaskMoE.load_from_checkpoint(dense_ckpt)
    Upcycle(init_from=str(dense_ckpt), num_experts=4, top_k=2).setup(SimpleNamespace(ckpt_path=None), fresh, "fit")
    routers = [m for m in fresh.modules() if isinstance(m, TaskConditionedRouter)]
    assert routers and all(r.num_experts == 4 and r.top_k == 2 for r in routers)
    dense.eval(), fresh.eval()
    x = torch.randn(32, 100)
    assert max((a - b).abs().max().item() for a, b in zip(fresh(x), dense(x), strict=True)) <= 1e-6
    with pytest.raises(ValueError, match="top_k >= 2"):
        Upcycle(init_from=str(dense_ckpt), num_experts=4, top_k=1).setup(
            SimpleNamespace(ckpt_path=None), MultiTaskMoE.load_from_checkpoint(dense_ckpt), "fit")

    _, up_ckpt = _upcycled(tmp_path, base, dense_ckpt)
    ck = safe_load(up_ckpt)
    assert ck["upcycle"]["num_experts"] == 4 and ck["upcycle"]["converted"]
    assert ck["hyper_parameters"]["architecture"]["init_args"]["num_experts"] == 4
    model = MultiTaskMoE.load_from_checkpoint(up_ckpt)
    assert all(r.num_experts == 4 and r.renormalize for r in model.modules() if isinstance(r, TaskConditionedRouter))
    assert all(torch.equal(v, ck["state_dict"][k]) for k, v in model.state_dict().items())
