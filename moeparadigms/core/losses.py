"""Auxiliary losses for routers, as pure functions of routing tensors.

Shape legend:
    T  tokens   E  experts   A  assignments (token, expert pairs)
"""
from __future__ import annotations

import torch
from torch import Tensor


def switch_load_balance_loss(
    probs_TE: Tensor, expert_A: Tensor, num_experts: int, *, counts_E: Tensor | None = None, assigned: int | None = None
) -> Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4), generalised to top-k.

    ``E * sum_i f_i * P_i`` with ``f_i`` the fraction of assignments routed to expert i (before any
    capacity dropping) and ``P_i`` the mean router probability of expert i. Equals 1 when both are
    uniform; only ``P`` carries gradient. ``counts_E``, if given, are the assignment counts ``f`` is
    taken from (e.g. summed over data-parallel ranks: the global-batch balance of Qiu et al. 2025);
    by default they are counted from ``expert_A``. ``assigned``: the sum of ``counts_E`` when the caller
    knows it (saves a reduction); by default it is summed.
    """
    # a dot product of the counts with the summed probabilities, scaled once: a handful of ops, since at the
    # small batches of RL and meta-learning every op costs more than its arithmetic (BENCHMARKS "Small batches")
    dtype = probs_TE.dtype
    if counts_E is None:
        counts_E = torch.bincount(expert_A, minlength=num_experts)
        assigned = expert_A.numel()
    # no tokens: P = 0 and the loss is 0, not NaN
    scale = num_experts / max(probs_TE.shape[0], 1)
    dot = torch.dot(counts_E.to(dtype), probs_TE.sum(0))
    if assigned is not None:
        return dot * (scale / max(assigned, 1))
    return dot * scale / counts_E.sum().clamp_min(1).to(dtype)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2 (0 for no tokens)."""
    lse_T = torch.logsumexp(logits_TE if logits_TE.dtype == torch.float32 else logits_TE.float(), dim=-1)
    return torch.dot(lse_T, lse_T) / max(logits_TE.shape[0], 1)


def cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, Var(v) / Mean(v)^2 (population variance), 0 for one element."""
    v = v.float()
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var(unbiased=False) / (v.mean().square() + eps)


def importance_loss(gates_TE: Tensor) -> Tensor:
    """Shazeer et al. 2017 importance loss: CV^2 of the per-expert sum of gate values over the batch."""
    return cv_squared(gates_TE.sum(0))


def load_loss(load_prob_TE: Tensor) -> Tensor:
    """Shazeer et al. 2017 smooth load loss: CV^2 of sum_t P(x_t, i), the probability (under the gating
    noise) that expert i is among token t's top-k (their eq. 8-10)."""
    return cv_squared(load_prob_TE.sum(0))
