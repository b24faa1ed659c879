"""Continual-learning metrics and plots: the accuracy matrix and what is read off it.

Definitions follow Avalanche 0.6 exactly (``avalanche.evaluation.metrics``), so our numbers and an
Avalanche strategy's are comparable (``tests/continual/test_metrics.py`` checks both on one matrix):

* ``R[i, j]``: accuracy on experience ``j``'s test data after training on experiences ``0..i``;
  ``b[j]``: accuracy on ``j`` before any training (Avalanche's "random initialisation" value).
* average accuracy after ``k`` experiences: ``mean_{j<k} R[k-1, j]`` (GEM's ACC; one mean per
  experience, not per sample, so a small experience counts as much as a large one);
* forgetting (``StreamForgetting``): ``mean_{j<k-1} (R[j, j] - R[k-1, j])``: accuracy right after
  learning ``j`` minus accuracy now (Avalanche uses the first value, not the maximum as Chaudhry et al.);
* BWT (``StreamBWT``): ``-forgetting``;
* FWT (``StreamForwardTransfer``): ``mean_{1<=j<=min(k, T-1)} (R[j-1, j] - b[j])``: accuracy on ``j``
  just before training on it, minus the untrained model's.

Shape legend: T experiences; rows of the stored matrix are ``0`` (untrained) and ``i + 1`` (after ``i``).
"""
from __future__ import annotations

import torch
import torchmetrics
from torch import Tensor

from ..plots import plot_accuracy_matrix, plot_expert_usage


def continual_summary(R: Tensor, initial: Tensor | None = None, *, trained: int | None = None) -> dict[str, float]:
    """Average accuracy, forgetting, BWT and FWT after ``trained`` experiences (default: all rows of ``R``).

    Args:
        R: ``(T, T)`` accuracy matrix (row ``i``: after training on experience ``i``). Rows past
            ``trained`` are ignored (they may be NaN).
        initial: ``(T,)`` accuracies of the untrained model; FWT is NaN without it.
        trained: how many experiences have been trained on (``1 <= trained <= T``).
    """
    if R.dim() != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"R must be a square (T, T) accuracy matrix, got shape {tuple(R.shape)}")
    T = R.shape[0]
    k = T if trained is None else int(trained)
    if not 1 <= k <= T:
        raise ValueError(f"trained must be in [1, {T}] (experiences in R), got {trained!r}")
    R = R.double()
    avg_acc = R[k - 1, :k].mean().item()
    if k > 1:
        forgetting = (R.diagonal()[: k - 1] - R[k - 1, : k - 1]).mean().item()
    else:
        forgetting = float("nan")  # Avalanche returns nothing until a second experience is trained
    fwt = float("nan")
    last = min(k, T - 1)
    if initial is not None and last >= 1:
        j = torch.arange(1, last + 1)
        fwt = (R[j - 1, j] - initial.double()[j]).mean().item()
    return {"avg_acc": avg_acc, "forgetting": forgetting, "bwt": -forgetting, "fwt": fwt}


class AccuracyMatrix(torchmetrics.Metric):
    """Accumulates correct/total counts per (row, experience) over batches and reads off the matrix.

    ``update(preds, target, row=i + 1, experience=j)`` after training on ``i`` (``row=0`` for the
    untrained model). ``compute()`` returns the matrix, the initial row, and :func:`continual_summary`
    of the rows filled so far. The states are persistent, so a checkpoint taken mid-stream carries the
    matrix and resumes it.
    """

    full_state_update = False

    def __init__(self, *, num_experiences: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_experiences, int) or num_experiences < 1:
            raise ValueError(f"num_experiences must be an integer >= 1, got {num_experiences!r}")
        self.num_experiences = num_experiences
        shape = (num_experiences + 1, num_experiences)
        self.add_state("correct", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum", persistent=True)
        self.add_state("total", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum", persistent=True)

    def update(self, preds: Tensor, target: Tensor, *, row: int, experience: int) -> None:  # type: ignore[override]
        T = self.num_experiences
        if not 0 <= row <= T:
            raise ValueError(f"row must be in [0, {T}] (0 = untrained, i + 1 = after experience i), got {row}")
        if not 0 <= experience < T:
            raise ValueError(f"experience must be in [0, {T - 1}], got {experience}")
        if preds.shape != target.shape:
            raise ValueError(f"preds shape {tuple(preds.shape)} != target shape {tuple(target.shape)}")
        self.correct[row, experience] += (preds == target).sum()
        self.total[row, experience] += target.numel()

    def matrix(self) -> tuple[Tensor, Tensor, int]:
        """``(R (T, T), initial (T,), trained)``: NaN where nothing was evaluated."""
        acc = self.correct.double() / self.total.double()  # 0/0 -> NaN marks "not evaluated"
        filled = (self.total[1:] > 0).any(1)
        trained = int(filled.nonzero().max()) + 1 if filled.any() else 0
        return acc[1:], acc[0], trained

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        R, initial, trained = self.matrix()
        out: dict[str, Tensor] = {"matrix": R, "initial": initial}
        if trained:
            b = initial if bool((self.total[0] > 0).all()) else None
            out.update({k: torch.tensor(v) for k, v in continual_summary(R, b, trained=trained).items()})
        return out


# plots: moeparadigms.plots (re-exported: scripts import them from here)

__all__ = ["AccuracyMatrix", "continual_summary", "plot_accuracy_matrix", "plot_expert_usage"]
