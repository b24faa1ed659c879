"""A run killed mid-training and resumed from ``last.ckpt`` ends exactly where an uninterrupted run ends; a
crash while a checkpoint is written never replaces a good checkpoint with a truncated one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeparadigms.checkpoint import AtomicCheckpointIO, safe_load

from .helpers import ROOT, cli, last_checkpoint, max_abs_diff, state

CONTINUAL = ["--config", "tasks/continual/split_digits.yaml", "--config", "configs/continual/expert_growth.yaml",
             "--data.init_args.n_experiences=5", "--data.init_args.epochs_per_experience=1", "--trainer.max_epochs=5",
             "--trainer.limit_train_batches=8", "--trainer.enable_progress_bar=false", "--model.init_args.plots=false"]


def _run_and_kill(args: list[str], root: Path, killed_after: str, timeout: float = 180) -> None:
    """Start ``moeparadigms fit`` and SIGKILL it as soon as a checkpoint file matching ``killed_after`` exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "moeparadigms.cli", "fit", *args, f"--trainer.default_root_dir={root}"],
                         cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    try:
        while not list(root.rglob(killed_after)):
            if p.poll() is not None:
                raise AssertionError(f"the run ended (code {p.returncode}) before {killed_after} appeared:\n{p.stderr.read()[-4000:]}")
            if time.time() - t0 > timeout:
                raise AssertionError(f"no {killed_after} after {timeout} s")
            time.sleep(0.05)
        time.sleep(0.3)  # let it get into the next epoch (the Pause callback keeps it there)
        assert p.poll() is None, "the run finished before it could be killed"
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()


def test_resume_continual_killed_after_growth_equals_uninterrupted(tmp_path):
    """5 experiences, one new expert each: killed in experience 2 (after two growths), resumed from
    ``last.ckpt`` (written after experience 1), it grows three more times and ends bit-identical."""
    pause = ["--trainer.callbacks+=tests.reliability.helpers.Pause", "--trainer.callbacks.init_args.after_epoch=2"]
    _run_and_kill([*CONTINUAL, *pause], tmp_path / "killed", killed_after="epoch=1-step=*.ckpt")
    ckpt = last_checkpoint(tmp_path / "killed")
    assert safe_load(ckpt)["epoch"] == 1, "last.ckpt should be the end of experience 1"
    cli("fit", *CONTINUAL, f"--ckpt_path={ckpt}", f"--trainer.default_root_dir={tmp_path / 'killed'}")
    cli("fit", *CONTINUAL, f"--trainer.default_root_dir={tmp_path / 'straight'}")
    resumed, straight = (last_checkpoint(tmp_path / d) for d in ("killed", "straight"))
    assert resumed != ckpt and safe_load(resumed)["epoch"] == 4
    a, b = state(resumed), state(straight)
    assert a["moe.router.gate.weight"].shape[0] == 5, "the resumed run did not keep growing"
    assert max_abs_diff(a, b) == 0.0, "resumed and uninterrupted runs differ"


def test_resume_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A crash half-way through writing leaves the previous checkpoint intact and no partial file behind."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3)}, "epoch": 1}
    io.save_checkpoint(good, path)

    def crash(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "epoch": 2}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    loaded = io.load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
