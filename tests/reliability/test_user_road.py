"""The user's road, with default settings (progress bar on, default callbacks and loggers): resuming with
``--ckpt_path last``, ``last.ckpt`` holding the final weights, ``predict``, ``fast_dev_run`` for every
paradigm, the continual stream setting its own epochs, interpolated overrides, the saved config, and every
mistake a user can make ending in one ``moeparadigms: error:`` line with no traceback, no usage dump and no
orphan ``version_N`` directory. (RL's own road: tests/rl.)"""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from pytorch_lightning import Callback

from moeparadigms.cli import main

from .helpers import ROOT, cli, last_checkpoint, max_abs_diff, state

SUP = ["--config", "tasks/supervised/digits.yaml", "--config", "configs/supervised/moe_mlp.yaml"]
PARADIGM_RUNS = {
    "supervised": SUP,
    "multitask": ["--config", "tasks/multitask/digits.yaml", "--config", "configs/multitask/mmoe.yaml"],
    "continual": ["--config", "tasks/continual/split_digits.yaml", "--config", "configs/continual/expert_growth.yaml",
                  "--data.init_args.n_experiences=2", "--data.init_args.epochs_per_experience=1"],
    "meta": ["--config", "tasks/meta/sinusoid.yaml", "--config", "configs/meta/moe_maml.yaml",
             "--data.init_args.num_test_tasks=4", "--data.init_args.eval_batch_size=4", "--data.init_args.meta_iterations=7"],
    "rl": ["--config", "tasks/rl/cartpole.yaml", "--config", "configs/rl/ppo_moe.yaml", "--data.init_args.total_steps=300",
           "--model.init_args.eval_episodes=1"],
}


def run_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The console script as a user runs it (a fresh process, default settings); returns whatever happened."""
    return subprocess.run([sys.executable, "-m", "moeparadigms.cli", *args], cwd=cwd, timeout=timeout,
                          capture_output=True, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode == 2, f"exit code {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    err = p.stderr
    assert "Traceback" not in err, err[-4000:]
    assert "usage:" not in err, "no usage dump:\n" + err[-2000:]
    assert "weights_only=False" not in err, "never advise unsafe loading:\n" + err
    lines = [ln for ln in err.splitlines() if ln.startswith("moeparadigms: error:")]
    assert len(lines) == 1, err[-3000:]
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def version_dirs(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs").glob("version_*")) if (root / "lightning_logs").is_dir() else []


# ------------------------------------------------------------------------------------------- resume
def test_resume_ckpt_path_last_continues_the_newest_run(tmp_path):
    root = f"--trainer.default_root_dir={tmp_path}"
    cli("fit", *SUP, "--trainer.max_steps=5", "--trainer.limit_val_batches=1", root, cwd=ROOT)
    p = cli("fit", *SUP, "--trainer.max_steps=9", "--trainer.limit_val_batches=1", root, "--ckpt_path", "last", cwd=ROOT)
    assert "resuming from" in p.stderr and "version_0" in p.stderr
    for noise in ("args parameter is intended", "LeafSpec", "dirpath has changed"):
        assert noise not in p.stderr, f"a warning of the project's own making: {noise}"
    assert [d.name for d in version_dirs(tmp_path)] == ["version_0"], "the resumed run logs into its own directory"
    ck = torch.load(last_checkpoint(tmp_path), weights_only=True)
    assert ck["global_step"] == 9, f"resumed to step {ck['global_step']}, not 9: trained from scratch?"


# ------------------------------------------------------------------------------------------- last.ckpt
class DumpWeightsCallback(Callback):
    """Test stand-in callback (``--trainer.callbacks+=tests.reliability.test_user_road.DumpWeightsCallback``):
    the module's state_dict at the end of fit, written where the test can compare it with last.ckpt."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.save({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}, self.path)


@pytest.mark.parametrize("paradigm", sorted(PARADIGM_RUNS))
def test_last_ckpt_holds_the_final_weights(paradigm, tmp_path, monkeypatch):
    """A ModelCheckpoint saving every 3 optimizer steps (as the RL recipes do), in a run that stops between
    two saves: last.ckpt must still hold the weights the fit ended with."""
    monkeypatch.chdir(ROOT)
    dump = tmp_path / "final.pt"
    extra = {"rl": [], "meta": ["--trainer.val_check_interval=1.0"], "continual": [],
             "multitask": ["--trainer.max_steps=7"], "supervised": ["--trainer.max_steps=7"]}[paradigm]
    main(["fit", *PARADIGM_RUNS[paradigm], *extra, "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}",
          "--trainer.limit_train_batches=7" if paradigm == "continual" else "--trainer.log_every_n_steps=1",
          "--trainer.callbacks+=pytorch_lightning.callbacks.ModelCheckpoint",
          "--trainer.callbacks.every_n_train_steps=3", "--trainer.callbacks.save_last=true",
          "--trainer.callbacks+=tests.reliability.test_user_road.DumpWeightsCallback",
          f"--trainer.callbacks.path={dump}"])
    final = torch.load(dump, weights_only=True)
    ck = torch.load(last_checkpoint(tmp_path), weights_only=True)
    assert ck["global_step"] % 3 != 0, f"the run must stop between two saves (step {ck['global_step']})"
    assert max_abs_diff(final, ck["state_dict"]) == 0.0, "last.ckpt is behind the trained model"


# ------------------------------------------------------------------------------------------- fast_dev_run, predict
@pytest.mark.parametrize("paradigm", sorted(PARADIGM_RUNS))
def test_fast_dev_run_works_for_every_paradigm(paradigm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a if not a.endswith(".yaml") else str(ROOT / a) for a in PARADIGM_RUNS[paradigm]]
    main(["fit", *args, "--trainer.fast_dev_run=true"])
    assert not version_dirs(tmp_path), "fast_dev_run writes no logs or checkpoints"


@pytest.mark.parametrize("paradigm,keys", [("supervised", {"pred", "probs"}), ("continual", {"pred", "experience"}),
                                           ("multitask", {"digit", "parity", "ge5", "mod3"})])
def test_predict_writes_predictions(paradigm, keys, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    args = [*PARADIGM_RUNS[paradigm], f"--trainer.default_root_dir={tmp_path}"]
    main(["fit", *args, "--trainer.max_epochs=2" if paradigm == "continual" else "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"])
    main(["predict", *args, f"--ckpt_path={last_checkpoint(tmp_path)}"])
    assert "Predictions" in capsys.readouterr().out
    out = sorted(tmp_path.rglob("predictions.pt"))
    assert out, "predict wrote no predictions.pt"
    pred = torch.load(out[-1], weights_only=True)
    assert set(pred) == keys
    n = {len(v) for v in pred.values()}
    assert len(n) == 1 and n.pop() > 100, "one prediction per held-out sample"


def test_predict_is_refused_in_one_line_where_it_makes_no_sense(tmp_path):
    p = run_cli("predict", *[str(ROOT / a) if a.endswith(".yaml") else a for a in PARADIGM_RUNS["meta"]], cwd=tmp_path)
    assert_one_line_error(p, "predict")


# ------------------------------------------------------------------------------------------- config ergonomics
def test_continual_stream_sets_max_epochs_and_config_records_what_ran(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(["fit", *PARADIGM_RUNS["continual"], "--trainer.limit_train_batches=2", f"--trainer.default_root_dir={tmp_path}",
          "--model.init_args.plots=false"])
    ck = torch.load(last_checkpoint(tmp_path), weights_only=True)
    assert ck["epoch"] == 1, "2 experiences x 1 epoch: the stream set max_epochs=2"
    saved = yaml.safe_load(next(tmp_path.rglob("config.yaml")).read_text())
    assert saved["trainer"]["max_epochs"] == 2
    paths = [c["class_path"] for c in saved["trainer"]["callbacks"]]
    for name in ("FailFast", "FinalCheckpoint", "ListPlots", "ModelCheckpoint", "RichProgressBar"):
        assert any(p.endswith(name) for p in paths), f"{name} missing from the saved config: {paths}"
    assert [lg["class_path"].rsplit(".", 1)[-1] for lg in saved["trainer"]["logger"]] == ["CSVLogger", "TensorBoardLogger"]
    assert saved["trainer"]["plugins"][0]["class_path"] == "moeparadigms.checkpoint.AtomicCheckpointIO"


def test_override_of_an_interpolated_value_propagates(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(["fit", *SUP, "--model.init_args.moe.init_args.router.init_args.num_experts=4", "--trainer.max_steps=1",
          "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={tmp_path}"])
    sd = state(last_checkpoint(tmp_path))
    shapes = {k: tuple(v.shape) for k, v in sd.items() if "experts" in k and v.dim() >= 2}
    assert shapes and all(s[0] == 4 for s in shapes.values()), f"experts did not follow the router's num_experts: {shapes}"


def test_setting_is_inferred_when_every_experience_holds_the_same_classes(capsys):
    from moeparadigms.benchmarks.continual import PermutedDigits, SplitDigits

    class Unset(PermutedDigits):  # PermutedDigits' own default is domain-incremental: unset it
        def __init__(self, **kw):
            super().__init__(**kw)
            self.setting = None

    dm = Unset(n_experiences=2)
    dm.setup()
    assert dm.setting == "domain-incremental"
    dm = SplitDigits(n_experiences=2)
    dm.setup()
    assert dm.setting == "class-incremental"


def test_empty_experience_is_named():
    from avalanche.benchmarks import tensors_benchmark

    from moeparadigms.benchmarks.continual import AvalancheStream

    x, y = torch.randn(20, 4), torch.arange(20) % 2
    bm = tensors_benchmark([(x, y), (x[:0], y[:0])], [(x, y), (x, y)], task_labels=[0, 0])
    with pytest.raises(ValueError, match="experience 1 of the benchmark's train_stream is empty"):
        AvalancheStream(benchmark=bm).setup()


# ------------------------------------------------------------------------------------------- one-line errors
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    cli("fit", *SUP, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", f"--trainer.default_root_dir={root}", cwd=ROOT)
    return last_checkpoint(root)


def _bad_checkpoints(tmp_path: Path, good: Path) -> dict[str, Path]:
    rnd = tmp_path / "random.ckpt"
    rnd.write_bytes(bytes(range(256)) * 40)
    trunc = tmp_path / "truncated.ckpt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return {"missing": tmp_path / "nope.ckpt", "random": rnd, "truncated": trunc}


@pytest.mark.parametrize("kind", ["missing", "random", "truncated"])
@pytest.mark.parametrize("sub", ["fit", "test"])
def test_bad_input_bad_checkpoint_one_line(sub, kind, trained, tmp_path):
    ck = _bad_checkpoints(tmp_path, trained)[kind]
    p = run_cli(sub, *[str(ROOT / a) if a.endswith(".yaml") else a for a in SUP], f"--ckpt_path={ck}",
                "--trainer.max_steps=1", cwd=tmp_path)
    assert_one_line_error(p, ck.name)
    assert not version_dirs(tmp_path), "a failed run leaves no orphan version directory"


@pytest.mark.parametrize("case", ["top_k_two", "empty_yaml", "not_a_module", "max_epochs_vs_stream", "unknown_command",
                                  "missing_config"])
def test_bad_input_config_one_line(case, tmp_path):
    y = lambda a: str(ROOT / a) if a.endswith(".yaml") else a  # noqa: E731
    sup = [y(a) for a in SUP]
    if case == "top_k_two":
        bad = tmp_path / "bad.yaml"
        bad.write_text("model:\n  init_args:\n    moe:\n      init_args:\n        router:\n          init_args:\n            top_k: two\n")
        p, needles = run_cli("fit", *sup, "--config", str(bad), cwd=tmp_path), ("top_k", "two")
    elif case == "empty_yaml":
        empty = tmp_path / "empty.yaml"
        empty.write_text("")
        p, needles = run_cli("fit", *sup, "--config", str(empty), cwd=tmp_path), ("empty.yaml", "empty")
    elif case == "not_a_module":
        p = run_cli("fit", "--config", y("tasks/supervised/digits.yaml"), "--model.class_path=torch.nn.Linear",
                    "--model.init_args.in_features=2", "--model.init_args.out_features=2", cwd=tmp_path)
        needles = ("torch.nn.Linear",)
    elif case == "max_epochs_vs_stream":
        p = run_cli("fit", *[y(a) for a in PARADIGM_RUNS["continual"]], "--trainer.max_epochs=3", cwd=tmp_path)
        needles = ("max_epochs=3", "2")
    elif case == "unknown_command":
        p, needles = run_cli("train", *sup, cwd=tmp_path), ("train",)
    else:
        p, needles = run_cli("fit", "--config", str(tmp_path / "nothere.yaml"), cwd=tmp_path), ("nothere.yaml",)
    assert_one_line_error(p, *needles)
    assert not version_dirs(tmp_path), "a failed run leaves no orphan version directory"


# ------------------------------------------------------------------------------------------- Python-built models
def test_python_built_models_reload_from_the_checkpoint_alone(tmp_path):
    """Built in Python (not from YAML), an MoE policy and an MoE classifier still store their MoE as plain
    values: ``load_from_checkpoint(path)`` with no other argument rebuilds them, weights_only."""
    import numpy as np
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from moeparadigms.core import MLPExperts, MoE, TopKRouter
    from moeparadigms.paradigms.rl import PPO, GymEnvs
    from moeparadigms.paradigms.supervised import MoEClassifier

    def moe(d):
        return MoE(router=TopKRouter(d_model=d, num_experts=4, top_k=2), experts=MLPExperts(d_model=d, hidden=16, num_experts=4))

    def fit(model, dm_or_loader, root):
        ck = pl.callbacks.ModelCheckpoint(dirpath=root, save_last=True)
        pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   callbacks=[ck], default_root_dir=root).fit(model, dm_or_loader)  # plots go there, not into the cwd
        return Path(root) / "last.ckpt"

    policy = PPO(network="moe", moe=moe(16), hidden=16, num_steps=16, minibatch_size=32, update_epochs=1, eval_episodes=1)
    path = fit(policy, GymEnvs(env_id="CartPole-v1", num_envs=2, total_steps=64), tmp_path / "rl")
    again = PPO.load_from_checkpoint(path, weights_only=True)
    obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    assert np.array_equal(again.act(obs, deterministic=True), policy.act(obs, deterministic=True))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), policy.state_dict().values()))

    clf = MoEClassifier(in_features=8, num_classes=3, moe=moe(8))
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    path = fit(clf, DataLoader(TensorDataset(x, y), batch_size=8), tmp_path / "sup")
    again = MoEClassifier.load_from_checkpoint(path, weights_only=True).eval()
    assert torch.equal(again(x), clf.eval()(x))


def test_csv_logger_continues_a_resumed_runs_metrics(tmp_path):
    """Lightning's CSVLogger deletes metrics.csv of the version it logs into; ours keeps the earlier rows up to the
    point the resumed run starts from, and rows logged by hand without an epoch."""
    from moeparadigms.loggers import CSVLogger

    first = CSVLogger(save_dir=tmp_path, name="lightning_logs", version=0)
    for epoch, step in [(0, 4), (0, 9), (1, 14), (1, 19), (2, 24)]:  # epoch 2's row came after the checkpoint
        first.log_metrics({"train/loss": float(step), "epoch": epoch}, step=step)
    first.log_metrics({"env_steps/return": 1.0}, step=1000)
    first.save()
    resumed = CSVLogger(save_dir=tmp_path, name="lightning_logs", version=0)
    resumed.log_metrics({"train/loss": 0.5, "val/acc": 0.9, "epoch": 2}, step=20)  # resumed after epoch 1 (step 20)
    resumed.save()
    rows = list(csv.DictReader((tmp_path / "lightning_logs/version_0/metrics.csv").open()))
    assert [(r["epoch"], r["step"]) for r in rows] == [("0", "4"), ("0", "9"), ("1", "14"), ("1", "19"), ("", "1000"), ("2", "20")]
    assert rows[-1]["val/acc"] == "0.9" and rows[0]["val/acc"] == ""


def test_extension_build_honours_torch_extensions_dir_and_says_it_compiles(tmp_path, monkeypatch, capsys):
    """The grouped-GEMM extension builds under TORCH_EXTENSIONS_DIR (torch's documented override) and prints one
    line while it compiles (load_inline replaced by a recorder: no real compile here)."""
    import torch.utils.cpp_extension as ext

    from moeparadigms.core import _kernels

    seen = {}

    def fake_load_inline(**kw):
        seen.update(kw)
        return "built"

    monkeypatch.setattr(ext, "load_inline", fake_load_inline)
    monkeypatch.setattr(_kernels, "_module", None)
    monkeypatch.setattr(_kernels, "_failed", False)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    monkeypatch.delenv("MOEPARADIGMS_NO_EXTENSION", raising=False)
    capsys.readouterr()  # whatever importing cpp_extension here printed
    assert _kernels._load() == "built"
    assert seen["build_directory"].startswith(str(tmp_path / "ext") + "/moeparadigms_grouped_mm-")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeparadigms: compiling the CPU grouped-GEMM extension once")


@pytest.mark.parametrize("kind", ["missing", "random", "truncated"])
def test_bad_input_bad_checkpoint_one_line_in_evaluate(kind, trained, tmp_path):
    ck = _bad_checkpoints(tmp_path, trained)[kind]
    p = run_cli("evaluate", "--ckpt", str(ck), "--episodes", "1", cwd=tmp_path)
    assert_one_line_error(p, ck.name)
    assert "weights_only=False" not in p.stderr + p.stdout
