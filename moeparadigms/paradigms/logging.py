"""Shared helpers: log MoE auxiliary losses and routing statistics from any LightningModule."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl

from ..core import RoutingMetrics, RoutingStats


def update_routing_metrics(metrics: Sequence[RoutingMetrics], stats: Sequence[RoutingStats]) -> None:
    for m, s in zip(metrics, stats, strict=True):
        m.update(s)


def log_routing_metrics(module: pl.LightningModule, metrics: Sequence[RoutingMetrics], stage: str) -> list:
    """Log scalar routing statistics per MoE layer (``{stage}/moe{i}/...``), reset the metrics, and return
    each layer's share of tokens per expert (synchronised across ranks), for plots."""
    shares = []
    for i, m in enumerate(metrics):
        values = m.compute()
        shares.append(values["tokens_per_expert"].detach().cpu())
        for name, v in values.items():
            if v.dim() == 0:
                module.log(f"{stage}/moe{i}/{name}", v, sync_dist=False)
        m.reset()
    return shares


def plot_expert_load(shares: Sequence, path: str | Path, *, title: str = "expert load") -> Path:
    """Bar chart of each MoE layer's share of tokens per expert, with the uniform share as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(shares), 1, figsize=(max(4.0, 0.35 * max(len(s) for s in shares) + 1.5), 1.8 * len(shares)),
                             squeeze=False)
    for i, (ax, share) in enumerate(zip(axes[:, 0], shares)):
        share = [float(v) for v in share]
        ax.bar(range(len(share)), share, color="tab:blue")
        ax.axhline(1.0 / len(share), color="gray", ls="--", lw=1, label="uniform")
        ax.set_ylabel(f"layer {i}\nshare of tokens", fontsize=8)
        ax.set_xticks(range(len(share)))
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
