"""Running the ``moeparadigms`` CLI in a subprocess, and comparing what runs leave behind."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from pytorch_lightning import Callback

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path | None = None, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m moeparadigms.cli <args>`` with 1 intra-op thread per process; raises with the output on failure."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run([sys.executable, "-m", "moeparadigms.cli", *args], cwd=cwd or ROOT, env=e, timeout=timeout,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"moeparadigms {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def last_checkpoint(root: Path) -> Path:
    found = sorted(Path(root).rglob("last.ckpt"))
    assert found, f"no last.ckpt under {root}"
    return found[-1]


def state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), f"different entries: {sorted(set(a) ^ set(b))}"
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() and a[k].is_floating_point() else
               float((a[k] != b[k]).any()) for k in a)


class Pause(Callback):
    """Test stand-in callback (given to the CLI as ``--trainer.callbacks+=tests.reliability.helpers.Pause``):
    sleeps after each training batch from epoch ``after_epoch`` on, so a test can kill the run at a known
    point without racing it to the end."""

    def __init__(self, seconds: float = 0.2, after_epoch: int = 1) -> None:
        self.seconds, self.after_epoch = seconds, after_epoch

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.current_epoch >= self.after_epoch:
            time.sleep(self.seconds)
