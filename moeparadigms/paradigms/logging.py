"""Shared helpers: log MoE auxiliary losses and routing statistics from any LightningModule.

Routing statistics are logged the Lightning way: every scalar is a torchmetrics ``Metric`` passed to
``self.log``, so Lightning computes (and, under DDP, synchronises) them at its own fixed point at the end of
the epoch, in the same order on every rank. Computing a synchronised metric inside an epoch-end hook
instead deadlocks under DDP: rank 0's progress bar computes the other logged metrics (a collective) in the
callbacks' ``on_train_epoch_end``, before the module's hook, while the other ranks, whose progress bars are
disabled, enter the module's collective first.
"""
from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from ..core import RoutingMetrics, RoutingStats
from ..plots import plot_expert_load  # noqa: F401  (re-exported: its old home)

SCALARS = ("dropped_fraction", "router_entropy", "normalized_entropy", "utilization", "load_cv", "max_load")


class _RoutingScalar(Metric):
    """One scalar of a :class:`RoutingMetrics`, as a Metric Lightning can log: it holds no state of its own
    and reads the (synchronised, cached) result of its source; resetting it resets the source."""

    full_state_update = False

    def __init__(self, source: RoutingMetrics, name: str) -> None:
        super().__init__()
        self._source = (source,)  # a tuple: not registered as a submodule (the source belongs to RoutingLog)
        self.name = name

    def update(self) -> None:  # type: ignore[override]
        pass  # the source is updated by RoutingLog.update; this only counts the update for torchmetrics

    def compute(self) -> Tensor:  # type: ignore[override]
        return self._source[0].compute()[self.name]

    def reset(self) -> None:
        super().reset()
        self._source[0].reset()


class RoutingLog(nn.Module):
    """Routing statistics of a network's MoE layers for one stage (train / val / test).

    Call :meth:`update` with the layers' ``RoutingStats`` and :meth:`log` in the step; Lightning logs
    ``{stage}/moe{i}/{statistic}`` once per epoch and resets the counts. :meth:`shares` (each layer's share of
    tokens per expert, for plots) reads the epoch's synchronised result: call it from ``on_validation_end``
    / ``on_train_end``-type hooks, after Lightning has computed the epoch's metrics.
    """

    def __init__(self, num_experts: Sequence[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList([RoutingMetrics(e) for e in num_experts])
        # registered (Lightning looks logged Metrics up among the module's attributes); they hold no state
        self.views = nn.ModuleList([nn.ModuleList([_RoutingScalar(m, name) for name in SCALARS]) for m in self.layers])

    def update(self, stats: Sequence[RoutingStats]) -> None:
        for m, views, s in zip(self.layers, self.views, stats, strict=True):
            m.update(s)
            for v in views:
                v.update()

    def log(self, module: pl.LightningModule, stage: str) -> None:
        for i, views in enumerate(self.views):
            for v in views:
                module.log(f"{stage}/moe{i}/{v.name}", v, on_step=False, on_epoch=True)

    def shares(self) -> list[Tensor]:
        """Each layer's share of tokens per expert over the epoch (empty layers give zeros)."""
        return [m.compute()["tokens_per_expert"].detach().cpu() if m.update_called else torch.zeros(m.counts.numel())
                for m in self.layers]
