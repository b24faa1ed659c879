"""Callbacks the ``moeparadigms`` CLI adds to every run (and that Python users can add themselves).

* :class:`FailFast` stops at once, naming the step, when an input batch holds NaN/inf, when the loss is
  not finite, or when the training stream is empty (Lightning itself only warns and "trains" nothing).
* :class:`ListPlots` prints, at the end of fit/test, every PNG the run wrote (accuracy matrices, expert
  load, learning curves), so a user knows where the pictures are.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import Tensor

__all__ = ["FailFast", "ListPlots"]


def _float_tensors(obj: Any, path: str = "batch") -> Iterator[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        if obj.is_floating_point() or obj.is_complex():
            yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _float_tensors(v, f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _float_tensors(v, f"{path}[{i}]")


class FailFast(Callback):
    """Raise at the first non-finite input or loss, with the global step, epoch and batch index.

    Args:
        check_inputs: scan every floating-point tensor of each training batch.
        check_loss: check the loss before each backward (one host sync per step on GPU).
    """

    def __init__(self, *, check_inputs: bool = True, check_loss: bool = True) -> None:
        self.check_inputs, self.check_loss = check_inputs, check_loss

    @staticmethod
    def _where(trainer: pl.Trainer, batch_idx: int | None = None) -> str:
        b = "" if batch_idx is None else f", batch {batch_idx}"
        return f"global step {trainer.global_step} (epoch {trainer.current_epoch}{b})"

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning skips the whole fit loop (no train hooks run) when the loader is empty, and only logs it
        if trainer.num_training_batches == 0 and trainer.limit_train_batches != 0 and trainer.global_step == 0:
            dm = trainer.datamodule
            raise ValueError(
                f"the training stream is empty: train_dataloader() of {type(dm).__name__ if dm else 'the model'} "
                "yields no batches (an empty dataset, or batch_size larger than the data with drop_last=True); "
                "nothing would be trained"
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.check_inputs:
            return
        for path, t in _float_tensors(batch):
            if not torch.isfinite(t).all():
                n = int((~torch.isfinite(t)).sum())
                raise FloatingPointError(
                    f"non-finite training input at {self._where(trainer, batch_idx)}: {path} (shape {tuple(t.shape)}) "
                    f"has {n} NaN/inf values; clean the data or drop those samples"
                )

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.check_loss and not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"the training loss is {loss.detach().float().cpu().tolist()} at {self._where(trainer)}; "
                "lower the learning rate, enable gradient clipping, or check the inputs"
            )


class ListPlots(Callback):
    """Print the PNG files written during a run: the module's ``plot_paths`` and any under the log dir."""

    def __init__(self) -> None:
        self._since = time.time()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._since = time.time()

    on_test_start = on_fit_start

    def _report(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks, rank 0 prints
        if not trainer.is_global_zero:
            return
        found = {Path(p) for p in getattr(pl_module, "plot_paths", []) or []}
        if log_dir and Path(log_dir).is_dir():
            found |= {p for p in Path(log_dir).rglob("*.png") if p.stat().st_mtime >= self._since - 1}
        plots = sorted(p for p in found if p.is_file())
        if plots:
            print("Plots written:\n" + "\n".join(f"  {p}" for p in plots))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # teardown, not on_fit_end: Lightning runs the callbacks' on_fit_end before the module's, where
        # paradigms draw their plots
        if stage in ("fit", "test"):
            self._report(trainer, pl_module)
