"""Every YAML in ``tasks/`` and ``configs/`` instantiates through the CLI, paired with each file of the other
folder for the same paradigm; every compatible pair that needs no download trains one step; and the CLI
front door lists its commands."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from moeparadigms.cli import BENCHMARKS, MoEParadigmsCLI, main

ROOT = Path(__file__).resolve().parents[2]
PARADIGMS = sorted(p.name for p in (ROOT / "tasks").iterdir() if p.is_dir())
# tasks whose data comes from the network (kept as options, never run offline)
NEEDS_DOWNLOAD = {"tasks/continual/split_mnist.yaml"}
# tasks that need an optional extra (the package they import): instantiated always, trained only where installed
NEEDS_EXTRA = {"tasks/rl/metaworld_mt10.yaml": "metaworld"}
# (task, config) pairs that are not meant to go together, and why
INCOMPATIBLE: dict[tuple[str, str], str] = {
    ("tasks/rl/metaworld_mt10.yaml", "configs/rl/ppo_moe_task.yaml"):
        "its TaskConditionedRouter covers 4 tasks, MT10 has 10: use ppo_moe_task_mt10.yaml",
}
# smaller evaluation for the one-step runs (the YAML defaults evaluate 600 tasks / 5 episodes)
ONE_STEP_EXTRA = {"meta": ["--data.init_args.num_test_tasks=4", "--data.init_args.eval_batch_size=4"],
                  "rl": ["--model.init_args.eval_episodes=1"]}


def _pairs() -> list[tuple[str, str]]:
    out = []
    for p in PARADIGMS:
        tasks = sorted((ROOT / "tasks" / p).glob("*.yaml"))
        configs = sorted((ROOT / "configs" / p).glob("*.yaml"))
        out += [(str(t.relative_to(ROOT)), str(c.relative_to(ROOT))) for t in tasks for c in configs]
    return out


PAIRS = _pairs()


def test_every_yaml_is_in_some_pair():
    files = {str(f.relative_to(ROOT)) for d in ("tasks", "configs") for f in (ROOT / d).rglob("*.yaml")}
    used = {f for pair in PAIRS for f in pair}
    assert files == used, f"YAML without a partner in the other folder: {sorted(files - used)}"


@pytest.mark.parametrize("task,config", PAIRS, ids=[f"{Path(t).parent.name}:{Path(t).stem}+{Path(c).stem}" for t, c in PAIRS])
def test_config_pair_instantiates_and_trains_one_step(task, config, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    if (task, config) in INCOMPATIBLE:
        pytest.skip(INCOMPATIBLE[(task, config)])
    args = ["--config", task, "--config", config, f"--trainer.default_root_dir={tmp_path}"]
    cli = MoEParadigmsCLI(args=args, run=False)  # parse + instantiate model, data and trainer
    assert cli.model is not None and cli.datamodule is not None
    if task in NEEDS_DOWNLOAD:
        return
    if task in NEEDS_EXTRA and importlib.util.find_spec(NEEDS_EXTRA[task]) is None:
        pytest.skip(f"{task} needs the optional package {NEEDS_EXTRA[task]!r} to train")
    main(["fit", *args, *ONE_STEP_EXTRA.get(Path(task).parent.name, []), "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false",
          "--trainer.logger=false"])


def test_cli_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("fit", "validate", "test", "predict", "bench", "evaluate", "recipes"):
        assert f"\n  {cmd} " in out, f"{cmd} missing from moeparadigms --help"
    for b in BENCHMARKS:
        assert b in out


def test_cli_defaults_loggers_progress_bar_checkpoints(tmp_path, monkeypatch):
    from pytorch_lightning.callbacks import ModelCheckpoint, RichProgressBar
    from pytorch_lightning.loggers import TensorBoardLogger

    from moeparadigms.callbacks import FailFast, ListPlots
    from moeparadigms.checkpoint import AtomicCheckpointIO
    from moeparadigms.loggers import CSVLogger  # Lightning's, continuing metrics.csv on resume

    monkeypatch.chdir(ROOT)
    cli = MoEParadigmsCLI(args=["--config", "tasks/supervised/digits.yaml", "--config", "configs/supervised/moe_mlp.yaml",
                                f"--trainer.default_root_dir={tmp_path}"], run=False)
    tr = cli.trainer
    assert [type(lg) for lg in tr.loggers] == [CSVLogger, TensorBoardLogger]
    assert tr.loggers[0].log_dir == tr.loggers[1].log_dir, "one version directory for both loggers"
    kinds = {type(c) for c in tr.callbacks}
    assert {RichProgressBar, FailFast, ListPlots, ModelCheckpoint} <= kinds
    assert tr.checkpoint_callback.save_last
    assert isinstance(tr.strategy.checkpoint_io, AtomicCheckpointIO)


def test_cli_lists_plots_at_the_end(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    main(["fit", "--config", "tasks/continual/split_digits.yaml", "--config", "configs/continual/expert_growth.yaml",
          "--data.init_args.n_experiences=2", "--data.init_args.epochs_per_experience=1", "--trainer.max_epochs=2",
          "--trainer.limit_train_batches=2", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "Plots written:" in out and "accuracy_matrix.png" in out and "expert_usage.png" in out


SUBCOMMAND_RUNS = {
    "supervised": ["--config", "tasks/supervised/digits.yaml", "--config", "configs/supervised/moe_mlp.yaml"],
    "multitask": ["--config", "tasks/multitask/digits.yaml", "--config", "configs/multitask/mmoe.yaml"],
    "continual": ["--config", "tasks/continual/split_digits.yaml", "--config", "configs/continual/expert_growth.yaml",
                  "--data.init_args.n_experiences=2", "--data.init_args.epochs_per_experience=1", "--trainer.max_epochs=2",
                  "--model.init_args.plots=false"],
    "meta": ["--config", "tasks/meta/sinusoid.yaml", "--config", "configs/meta/moe_maml.yaml",
             "--data.init_args.num_test_tasks=8", "--data.init_args.eval_batch_size=8", "--trainer.val_check_interval=1"],
    "rl": ["--config", "tasks/rl/cartpole.yaml", "--config", "configs/rl/ppo_dense.yaml", "--data.init_args.total_steps=600",
           "--model.init_args.eval_episodes=1"],
}


@pytest.mark.parametrize("paradigm", sorted(SUBCOMMAND_RUNS))
def test_cli_fit_then_validate_and_test_from_checkpoint(paradigm, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [*SUBCOMMAND_RUNS[paradigm], f"--trainer.default_root_dir={tmp_path}"]  # defaults: progress bar on
    main(["fit", *args, "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"])
    ckpt = sorted(tmp_path.rglob("last.ckpt"))[-1]
    for sub in ("validate", "test"):
        main([sub, *args, f"--ckpt_path={ckpt}", "--trainer.limit_val_batches=2", "--trainer.limit_test_batches=2"])
    metrics = sorted(tmp_path.rglob("metrics.csv"))
    assert len(metrics) == 3, "fit, validate and test each log a version"
    assert "test/" in metrics[-1].read_text().splitlines()[0], "the test run logged test metrics"
