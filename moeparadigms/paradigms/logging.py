"""Shared helpers: log MoE auxiliary losses and routing statistics from any LightningModule."""
from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl

from ..core import RoutingMetrics, RoutingStats


def update_routing_metrics(metrics: Sequence[RoutingMetrics], stats: Sequence[RoutingStats]) -> None:
    for m, s in zip(metrics, stats, strict=True):
        m.update(s)


def log_routing_metrics(module: pl.LightningModule, metrics: Sequence[RoutingMetrics], stage: str) -> None:
    """Log scalar routing statistics per MoE layer (``{stage}/moe{i}/...``) and reset the metrics."""
    for i, m in enumerate(metrics):
        values = m.compute()
        for name, v in values.items():
            if v.dim() == 0:
                module.log(f"{stage}/moe{i}/{name}", v, sync_dist=False)
        m.reset()
