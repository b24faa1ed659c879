"""Post-hoc aggregation of the experts' predictions (Honda et al., TACL 2024).

Honda, Oka, Zhang and Mita, "Not Eliminate but Aggregate: Post-Hoc Control over Mixture-of-Experts to
Address Shortcut Shifts in Natural Language Understanding", TACL 12:1268-1289 (2024), arXiv:2406.12060.

Their model is a mixture of experts at the level of predictions: expert ``k`` gives a class distribution
``p_k(y|x)``, a router gives mixture weights ``pi_k(x)``, and training maximises the likelihood of

    p(y|x) = sum_k pi_k(x) p_k(y|x)                                   ("router" combination)

plus a router loss that pushes the routing distributions of different samples apart (the Frobenius norm of
the batch's off-diagonal router-similarity matrix ``R R^T``, restricted to each row's ``topk_mask`` largest
entries, divided by the norm of the off-diagonal mask: :func:`router_diversity_loss`, as in the authors'
released code, ``src/models/bert_mos.py``). At inference the router is set aside and the experts are combined
pessimistically, as the authors' code does (``prob_mode="argmin"``):

    p_pess(y|x) = min_k p_k(y|x),      y_hat = argmax_y min_k p_k(y|x)     ("pessimistic")

This is the worst case of ``sum_k pi_k p_k(y|x)`` over all mixture weights ``pi`` on the simplex (a linear
function's minimum over the simplex is at a vertex; checked in the tests), so a label wins only if no expert
rules it out: an expert that captured a shortcut cannot carry a prediction the others contradict. No retraining
is involved. ``"uniform"`` (the experts' mean) is the other inference mode of the authors' code.

:class:`PredictionMoE` is that model built from the core (a :class:`~moeparadigms.core.TopKRouter` with
``top_k = num_experts``, the core's stacked :class:`~moeparadigms.core.MLPExperts` and one linear head per
expert); :func:`forced_expert_logits` gives per-expert predictions of the project's
:class:`~moeparadigms.nets.MoEMLP` (every MoE layer forced onto one expert), so the same aggregation applies to
an MoE that mixes hidden states.

Shape legend: B batch, D input width, H hidden, E experts, C classes.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import MLPExperts, MoE, TopKRouter
from ..nets import MoEMLP

Combine = Literal["router", "uniform", "pessimistic"]
COMBINE = ("router", "uniform", "pessimistic")


def aggregate(probs_EBC: Tensor, how: Combine, router_BE: Tensor | None = None) -> Tensor:
    """Combine per-expert class probabilities ``probs_EBC`` into ``(B, C)`` scores.

    ``"router"``: ``sum_k router_BE[:, k] * p_k`` (needs ``router_BE``); ``"uniform"``: the mean over experts;
    ``"pessimistic"``: ``min_k p_k`` (Honda et al. 2024; not normalised, use it for the argmax)."""
    if probs_EBC.dim() != 3:
        raise ValueError(f"probs_EBC must have shape (E, B, C), got {tuple(probs_EBC.shape)}")
    if how == "router":
        if router_BE is None:
            raise ValueError("how='router' needs router_BE, the mixture weights (B, E)")
        return torch.einsum("be,ebc->bc", router_BE.to(probs_EBC.dtype), probs_EBC)
    if how == "uniform":
        return probs_EBC.mean(0)
    if how == "pessimistic":
        return probs_EBC.min(0).values
    raise ValueError(f"how={how!r} is not supported; choose one of {list(COMBINE)}")


def router_diversity_loss(router_BE: Tensor, topk_mask: int = 0) -> Tensor:
    """Honda et al.'s router loss: ``||M * (R R^T)||_F / ||M||_F`` with ``R`` the batch's routing
    distributions (B, E) and ``M`` the off-diagonal mask, with each row restricted to its ``topk_mask`` largest
    similarities when ``topk_mask > 0`` (as their code: entries below the row's k-th largest are dropped)."""
    B = router_BE.shape[0]
    if B < 2:
        return router_BE.new_zeros(())
    off = 1.0 - torch.eye(B, device=router_BE.device, dtype=router_BE.dtype)
    sim = (router_BE @ router_BE.t()) * off
    if topk_mask > 0:
        k = min(topk_mask, B)
        kth = torch.topk(sim, k, dim=1).values[:, -1:]
        sim = sim * (sim >= kth).to(sim.dtype)
    return torch.linalg.norm(sim) / torch.linalg.norm(off)


class PredictionMoE(nn.Module):
    """Honda et al.'s mixture of expert classifiers from core parts.

    ``router``: a :class:`~moeparadigms.core.TopKRouter` over the input with ``top_k = num_experts`` (every
    expert gets a softmax weight). Expert ``k``: ``head_k(norm(x + mlp_k(x)))`` where ``mlp_k`` is expert ``k``
    of a core :class:`~moeparadigms.core.MLPExperts` bank on the (linearly embedded) input.

    ``forward(x (B, in)) -> (probs_EBC, router_BE)``; :meth:`loss` is the mixture NLL plus
    ``router_loss_coef * router_diversity_loss``; :meth:`predict` combines by ``how``.
    """

    def __init__(self, *, in_features: int, num_classes: int, num_experts: int = 8, d_model: int = 64,
                 hidden: int = 128, router_loss_coef: float = 0.5, topk_mask: int = 8) -> None:
        super().__init__()
        for name, v in dict(in_features=in_features, num_classes=num_classes, num_experts=num_experts,
                            d_model=d_model, hidden=hidden).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not router_loss_coef >= 0:
            raise ValueError(f"router_loss_coef must be >= 0, got {router_loss_coef!r}")
        self.num_experts, self.num_classes = num_experts, num_classes
        self.router_loss_coef, self.topk_mask = router_loss_coef, topk_mask
        self.embed = nn.Linear(in_features, d_model)
        self.router = TopKRouter(d_model=d_model, num_experts=num_experts, top_k=num_experts, renormalize=False)
        self.experts = MLPExperts(d_model=d_model, hidden=hidden, num_experts=num_experts, backend="autograd")
        self.norm = nn.LayerNorm(d_model)
        bound = 1.0 / math.sqrt(d_model)
        self.head_w = nn.Parameter(torch.empty(num_experts, d_model, num_classes).uniform_(-bound, bound))
        self.head_b = nn.Parameter(torch.zeros(num_experts, num_classes))  # the authors zero the heads' bias

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h_BD = self.embed(x.flatten(1))
        B, E = h_BD.shape[0], self.num_experts
        router_BE = self.router(h_BD).probs_TE
        # every expert on every sample: expert-sorted rows, B per expert
        y = self.experts(h_BD.repeat(E, 1), torch.full((E,), B, dtype=torch.long)).reshape(E, B, -1)
        z_EBD = self.norm(h_BD.unsqueeze(0) + y)
        logits_EBC = torch.baddbmm(self.head_b.unsqueeze(1), z_EBD, self.head_w)
        return logits_EBC.softmax(-1), router_BE

    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        probs_EBC, router_BE = self(x)
        mix = aggregate(probs_EBC, "router", router_BE)
        nll = F.nll_loss(torch.log(mix + 1e-8), y)
        return nll + self.router_loss_coef * router_diversity_loss(router_BE, self.topk_mask)

    @torch.no_grad()
    def predict(self, x: Tensor, how: Combine = "router") -> Tensor:
        probs_EBC, router_BE = self(x)
        return aggregate(probs_EBC, how, router_BE)


class _Force(nn.Module):
    """Stand-in for a MoE layer that sends every token to expert ``e`` with weight 1."""

    def __init__(self, moe: MoE, e: int) -> None:
        super().__init__()
        self.moe, self.e = moe, e

    def forward(self, x: Tensor, *, task_id=None):
        x_TD = x.reshape(-1, x.shape[-1])
        y = self.moe.experts(x_TD, torch.tensor([x_TD.shape[0] if i == self.e else 0 for i in range(self.moe.num_experts)]))
        if self.moe.shared_experts is not None:
            y = y + self.moe.shared_experts(x_TD)
        from ..core import MoEOutput, RoutingStats

        z = x.new_zeros(())
        stats = RoutingStats(torch.zeros(self.moe.num_experts), z, z, z, torch.tensor(x_TD.shape[0]))
        return MoEOutput(y.reshape(x.shape), z, {}, stats)


@torch.no_grad()
def forced_expert_logits(net: MoEMLP, x: Tensor) -> Tensor:
    """``(E, B, C)`` logits of :class:`~moeparadigms.nets.MoEMLP` ``net`` with every MoE layer's tokens sent to
    expert ``e`` (weight 1), for each ``e``: the experts' own predictions, for :func:`aggregate`. All layers
    must have the same number of experts."""
    layers = net.moe_layers()
    E = layers[0].num_experts
    if any(m.num_experts != E for m in layers):
        raise ValueError(f"forced_expert_logits needs the same number of experts in every layer, got {[m.num_experts for m in layers]}")
    out = []
    originals = [b.moe for b in net.blocks]
    try:
        for e in range(E):
            for b, m in zip(net.blocks, originals):
                b.moe = _Force(m, e)
            out.append(net(x).y)
    finally:
        for b, m in zip(net.blocks, originals):
            b.moe = m
    return torch.stack(out)


__all__ = ["aggregate", "router_diversity_loss", "PredictionMoE", "forced_expert_logits", "COMBINE", "Combine"]
