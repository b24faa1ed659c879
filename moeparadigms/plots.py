"""Every PNG plot the paradigms write, in one place (matplotlib imported on first use, Agg backend: files only).

* :func:`plot_expert_load`: each MoE layer's share of tokens per expert (supervised, after fit);
* :func:`plot_expert_usage`: heat map(s) of how each row (a task, an experience) uses each expert
  (multi-task per level/block, continual per experience);
* :func:`plot_accuracy_matrix`: the continual accuracy matrix;
* :func:`plot_adaptation_curves`: meta-learning query metric against inner steps;
* :func:`plot_learning_curve`: RL episode returns against environment steps.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["plot_expert_load", "plot_expert_usage", "plot_accuracy_matrix", "plot_adaptation_curves",
           "plot_learning_curve", "save_figure"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in tests
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Write ``fig`` as a PNG (creating its folder) and release it."""
    plt = _pyplot()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_expert_load(shares: Sequence, path: str | Path, *, title: str = "expert load") -> Path:
    """Bar chart of each MoE layer's share of tokens per expert, with the uniform share as a dashed line."""
    plt = _pyplot()
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
    return save_figure(fig, path)


def plot_expert_usage(usage: Tensor | Sequence[Tensor], path: str | Path, *, row_labels: Sequence[str] | None = None,
                      expert_labels: Sequence[Sequence[str]] | None = None, title: str = "",
                      row_title: str = "task") -> Path:
    """Heat map per level/block: rows (tasks, or experiences), columns experts, cell = the row's share of
    its routing that the expert gets, annotated. ``usage`` is one ``(R, E)`` matrix or a list of them (one
    panel each); ``row_labels`` names the rows (default 0..R-1), ``expert_labels[i]`` panel ``i``'s columns."""
    import numpy as np

    plt = _pyplot()
    panels = [usage] if isinstance(usage, Tensor) else list(usage)
    if not panels:
        raise ValueError("no expert usage to plot (this architecture has no experts)")
    R = panels[0].shape[0]
    rows = list(row_labels) if row_labels is not None else [str(r) for r in range(R)]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.0 + 0.55 * sum(u.shape[1] for u in panels) + 1.5 * len(panels),
                                                      0.6 * len(rows) + 1.6), squeeze=False)
    for i, (ax, u) in enumerate(zip(axes[0], panels)):
        u = u.detach().double().cpu().numpy()
        im = ax.imshow(u, vmin=0.0, vmax=max(float(u.max()), 1e-6), cmap="viridis", aspect="auto")
        labels = list(expert_labels[i]) if expert_labels is not None else [str(e) for e in range(u.shape[1])]
        if len(labels) != u.shape[1]:
            raise ValueError(f"expert_labels[{i}] has {len(labels)} names for {u.shape[1]} experts")
        ax.set_xticks(range(u.shape[1]), labels=labels, rotation=45 if max(map(len, labels)) > 2 else 0)
        ax.set_yticks(range(len(rows)), labels=rows)
        ax.set_xlabel("expert")
        ax.set_ylabel(row_title)
        ax.set_title(f"level {i}" if len(panels) > 1 else "expert usage")
        for (r, c), v in np.ndenumerate(u):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 * u.max() else "k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_accuracy_matrix(R: Tensor, path: str | Path, *, title: str = "accuracy matrix") -> Path:
    """Heatmap of ``R`` (rows: trained up to; columns: evaluated on), values annotated, saved as PNG."""
    plt = _pyplot()
    R = R.detach().double().cpu()
    T = R.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * T, 0.8 + 0.6 * T))
    im = ax.imshow(R.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(T):
        for j in range(T):
            if not torch.isnan(R[i, j]):
                v = float(R[i, j])
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 0.6 else "black")
    ax.set_xlabel("evaluated on experience")
    ax.set_ylabel("after training on experience")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, label="accuracy")
    return save_figure(fig, path, dpi=110)


def plot_adaptation_curves(curves: dict[str, dict[str, list[float]]], path: str | Path, *, ylabel: str,
                           title: str = "adaptation on held-out tasks") -> Path:
    """Query metric (mean with a 95% CI band) against inner steps, one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, r in curves.items():
        m, ci = torch.tensor(r["mean"]), torch.tensor(r["ci95"])
        steps = range(len(m))
        ax.plot(steps, m, marker="o", ms=3, label=name)
        ax.fill_between(steps, m - ci, m + ci, alpha=0.2)
    ax.set_xlabel("inner steps")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_learning_curve(steps: Sequence[int], returns: Sequence[float], path: str | Path, *, title: str) -> Path:
    """Episode returns (dots) and their running mean over the last 20 episodes against environment steps."""
    import numpy as np

    plt = _pyplot()
    steps, rets = np.asarray(steps), np.asarray(returns, dtype=float)
    smooth = np.array([rets[max(0, i - 19) : i + 1].mean() for i in range(len(rets))])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, rets, ".", ms=2, alpha=0.3, label="episode return")
    ax.plot(steps, smooth, label="mean of last 20")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
