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

__all__ = ["FailFast", "FinalCheckpoint", "ListPlots", "WritePredictions"]


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


class FinalCheckpoint(Callback):
    """Make ``last.ckpt`` hold the final weights of every completed fit.

    Lightning's ``ModelCheckpoint(save_last=True)`` writes ``last.ckpt`` when it saves on its own schedule
    and, at the end of training, only if it never wrote one: with ``every_n_train_steps`` (the RL recipes) a
    fit that stops between two saves leaves ``last.ckpt`` up to ``every_n_train_steps - 1`` optimizer steps
    behind the trained model, and ``test``/``evaluate`` from it silently use the older weights. At the end of
    a completed fit this saves ``last.ckpt`` once more for every such callback that is behind.
    """

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.callbacks import ModelCheckpoint

        for cb in trainer.checkpoint_callbacks:
            # ModelCheckpoint has no public "save last now": its own on_train_end uses the same two members
            if isinstance(cb, ModelCheckpoint) and cb.save_last and not trainer.fast_dev_run \
                    and cb._last_global_step_saved != trainer.global_step:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))


class WritePredictions(Callback):
    """``predict``: write every batch's predictions, concatenated, to ``<log dir>/predictions.pt``
    (``torch.save`` of a tensor, or of a dict of tensors for multi-output models) and print the path."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path
        self._outputs: list[Any] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._outputs = []

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        self._outputs.append(outputs)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from .checkpoint import atomic_torch_save

        outs = [o for o in self._outputs if o is not None]
        if not outs:
            return
        if isinstance(outs[0], dict):
            merged: Any = {k: torch.cat([o[k].detach().cpu() for o in outs]) for k in outs[0]}
        else:
            merged = torch.cat([o.detach().cpu() for o in outs])
        if trainer.world_size > 1:
            rank = f".rank{trainer.global_rank}"
        else:
            rank = ""
        path = Path(self.path or Path(trainer.log_dir or trainer.default_root_dir) / f"predictions{rank}.pt")
        atomic_torch_save(merged, path)
        n = len(next(iter(merged.values()))) if isinstance(merged, dict) else len(merged)
        print(f"Predictions ({n} samples) written to {path}")
