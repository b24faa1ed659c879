"""Bad input gets a clear error naming the field, the value and what is allowed: from the CLI (unknown
``class_path``, wrong types, impossible settings), from checkpoints (another architecture, unsafe pickles),
and from data (NaN inputs, an empty stream). The core layer's own checks are in tests/core/test_bad_input.py;
environment ids in tests/rl."""
from __future__ import annotations

import pickle

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from moeparadigms.callbacks import FailFast
from moeparadigms.checkpoint import safe_load
from moeparadigms.cli import main
from moeparadigms.core import MLPExperts, MoE, TopKRouter
from moeparadigms.paradigms.supervised import MoEClassifier

from .helpers import cli, last_checkpoint

SUP = ["--config", "tasks/supervised/digits.yaml", "--config", "configs/supervised/moe_mlp.yaml"]
ROUTER = "--model.init_args.moe.init_args.router.init_args"


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as e:
        main(["fit", *args, "--trainer.fast_dev_run=true"])
    assert e.value.code not in (0, None)
    return capsys.readouterr().err


def test_bad_input_unknown_class_path(capsys):
    err = _cli_error(capsys, *SUP, "--model.init_args.moe.init_args.experts.class_path=moeparadigms.core.NoSuchExperts")
    assert "moeparadigms.core.NoSuchExperts" in err and "experts" in err


def test_bad_input_wrong_type_in_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    lr: fast\n")
    err = _cli_error(capsys, *SUP, "--config", str(bad))
    assert "lr" in err and "fast" in err and "float" in err


def test_bad_input_top_k_larger_than_experts_from_yaml(capsys):
    err = _cli_error(capsys, *SUP, f"{ROUTER}.top_k=9")
    assert "top_k" in err and "9" in err and "num_experts" in err


def test_bad_input_checkpoint_of_another_architecture(tmp_path):
    cli("fit", *SUP, "--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}")
    ckpt = last_checkpoint(tmp_path)
    with pytest.raises(AssertionError) as e:  # cli() raises AssertionError carrying the run's stderr
        cli("validate", *SUP, f"{ROUTER}.num_experts=16", "--model.init_args.moe.init_args.experts.init_args.num_experts=16",
            f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path}")
    msg = str(e.value)
    assert "checkpoint does not match this MoEClassifier" in msg
    assert "(8, 64)" in msg and "(16, 64)" in msg, "the shapes in both"
    assert "num_experts=8 vs 16" in msg, "the hyperparameter that differs"


def test_bad_input_checkpoint_that_would_run_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "payload": print}, f)  # a reference to a callable: unpickling could run it
    with pytest.raises(ValueError, match="weights_only=True"):
        safe_load(path)


def test_bad_input_truncated_checkpoint(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated or not a torch checkpoint"):
        safe_load(path)


def _model() -> MoEClassifier:
    moe = MoE(router=TopKRouter(d_model=16, num_experts=4, top_k=2), experts=MLPExperts(d_model=16, hidden=16, num_experts=4))
    return MoEClassifier(in_features=8, num_classes=3, moe=moe)


def _trainer() -> pl.Trainer:
    return pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[FailFast()])


def test_bad_input_nan_inputs_fail_fast_with_the_step():
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    x[3 * 8 + 5, 2] = float("nan")  # in the 4th batch of 8
    with pytest.raises(FloatingPointError, match=r"global step 3 \(epoch 0, batch 3\).*batch\[0\].*1 NaN/inf"):
        _trainer().fit(_model(), DataLoader(TensorDataset(x, y), batch_size=8))


def test_bad_input_empty_data_stream():
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=8)
    with pytest.raises(ValueError, match="training stream is empty"):
        _trainer().fit(_model(), empty)
