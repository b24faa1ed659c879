"""Routing statistics accumulated over batches as a torchmetrics ``Metric``."""
from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from .layer import RoutingStats


class RoutingMetrics(Metric):
    """Tokens per expert, dropped fraction, router entropy and expert utilisation over many batches.

    ``update(stats)`` takes the :class:`~moeparadigms.core.layer.RoutingStats` of a forward; ``compute()``
    returns a dict of tensors:

    * ``tokens_per_expert`` (E,): fraction of the processed assignments each expert received;
    * ``dropped_fraction``: assignments dropped by the capacity limit / assignments routed;
    * ``router_entropy``: mean entropy of the router distribution per token, in nats;
    * ``normalized_entropy``: the same divided by log(E) (1 = uniform routing);
    * ``utilization``: fraction of experts that received at least ``active_threshold`` of a uniform share;
    * ``load_cv``: coefficient of variation of the load (0 = perfectly balanced);
    * ``max_load``: the busiest expert's load relative to a uniform share (1 = balanced).

    The number of experts may grow between updates (expert growth); counts are padded with zeros.
    """

    full_state_update = False

    def __init__(self, num_experts: int, active_threshold: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.active_threshold = active_threshold
        self.add_state("counts", default=torch.zeros(num_experts, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("dropped", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("assigned", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("entropy_sum", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, stats: RoutingStats) -> None:  # type: ignore[override]
        c = stats.tokens_per_expert.to(self.counts.device, torch.float64)
        if c.numel() > self.counts.numel():
            self.counts = torch.cat([self.counts, self.counts.new_zeros(c.numel() - self.counts.numel())])
        self.counts[: c.numel()] += c
        self.dropped += stats.dropped.to(self.dropped.device, torch.float64)
        self.assigned += stats.assigned.to(self.assigned.device, torch.float64)
        self.entropy_sum += stats.entropy_sum.to(self.entropy_sum.device, torch.float64)
        self.tokens += stats.num_tokens.to(self.tokens.device, torch.float64)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        E = self.counts.numel()
        total = self.counts.sum().clamp_min(1e-12)
        share = self.counts / total
        uniform = 1.0 / E
        entropy = self.entropy_sum / self.tokens.clamp_min(1)
        return {
            "tokens_per_expert": share.float(),
            "dropped_fraction": (self.dropped / self.assigned.clamp_min(1)).float(),
            "router_entropy": entropy.float(),
            "normalized_entropy": (entropy / math.log(E)).float() if E > 1 else torch.ones(()),
            "utilization": (share >= self.active_threshold * uniform).float().mean(),
            "load_cv": (share.std(unbiased=False) / share.mean()).float() if E > 1 else torch.zeros(()),
            "max_load": (share.max() / uniform).float(),
        }
