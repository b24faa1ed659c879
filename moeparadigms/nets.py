"""Small networks built from the core, shared by the paradigms.

Shape legend: B batch, D model width, C classes.
"""
from __future__ import annotations

import copy
from typing import NamedTuple

from torch import Tensor, nn

from .core import MoE, MoEOutput, RoutingStats
from .core.experts import reinitialize


class BlockOutput(NamedTuple):
    y: Tensor
    aux_loss: Tensor
    stats: list[RoutingStats]


class MoEBlock(nn.Module):
    """Pre-norm residual MoE block: ``x + moe(norm(x)).y``."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(moe.d_model)
        self.moe = moe

    def forward(self, x: Tensor, *, task_id: int | Tensor | None = None) -> MoEOutput:
        out = self.moe(self.norm(x), task_id=task_id)
        return out._replace(y=x + out.y)


class MoEMLP(nn.Module):
    """``Linear(in, D) -> [MoEBlock] * depth -> LayerNorm -> Linear(D, out)``.

    ``moe`` is the first block's MoE layer; further blocks are deep copies of it, re-initialised
    (every submodule's ``reset_parameters``), so blocks start independent.
    """

    def __init__(self, *, in_features: int, out_features: int, moe: MoE, depth: int = 1) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.inp = nn.Linear(in_features, moe.d_model)
        self.blocks = nn.ModuleList([MoEBlock(moe if i == 0 else reinitialize(copy.deepcopy(moe))) for i in range(depth)])
        self.norm = nn.LayerNorm(moe.d_model)
        self.head = nn.Linear(moe.d_model, out_features)

    def forward(self, x: Tensor, *, task_id: int | Tensor | None = None) -> BlockOutput:
        h = self.inp(x.flatten(1) if x.dim() > 2 else x)
        aux = h.new_zeros(())
        stats = []
        for block in self.blocks:
            out = block(h, task_id=task_id)
            h, aux = out.y, aux + out.aux_loss
            stats.append(out.stats)
        return BlockOutput(self.head(self.norm(h)), aux, stats)

    def moe_layers(self) -> list[MoE]:
        return [b.moe for b in self.blocks]


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def active_params_per_token(module: nn.Module) -> int:
    """Parameters a token touches: dense parameters plus, for each MoE, top_k/E of its expert parameters."""
    total = 0
    moe_params: set[int] = set()
    for m in module.modules():
        if isinstance(m, MoE):
            k = getattr(m.router, "top_k", 1)
            ep = list(m.experts.parameters())
            moe_params |= {id(p) for p in ep}
            total += int(sum(p.numel() for p in ep) * min(k, m.num_experts) / m.num_experts)
    total += sum(p.numel() for p in module.parameters() if id(p) not in moe_params)
    return total


__all__ = ["MoEBlock", "MoEMLP", "BlockOutput", "count_params", "active_params_per_token"]
