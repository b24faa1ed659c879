"""Dispatch helpers: turn (token, expert, weight) assignments into an expert-sorted layout and back.

Pure functions, no parameters. Every router produces a flat list of assignments (one per chosen
(token, expert) pair); dispatch sorts them by expert so that each expert's tokens are one contiguous
slice, optionally drops assignments that overflow an expert's capacity, and combines the expert
outputs back into token order.

Shape legend:
    T  tokens            D  model width         E  experts
    A  assignments (token, expert pairs); T*K for top-k routers, E*C for expert choice
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor


class Dispatch(NamedTuple):
    """Assignments sorted by expert (the layout every expert bank consumes)."""

    token_A: Tensor  # long, token index of each kept assignment, grouped by expert
    expert_A: Tensor  # long, expert index, non-decreasing
    weight_A: Tensor  # combine weight of each kept assignment
    counts_E: Tensor  # long, kept assignments per expert (sums to A)
    dropped: Tensor  # long scalar, assignments removed by the capacity limit
    total: int  # assignments before dropping


def count_assignments(expert_A: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert. On CUDA ``bincount`` reads its input's max on the host (a sync); a scatter-add
    into ``num_experts`` zeros does not. On CPU ``bincount`` is one op."""
    if expert_A.is_cuda:
        return torch.zeros(num_experts, dtype=torch.long, device=expert_A.device).scatter_add_(
            0, expert_A, torch.ones_like(expert_A)
        )
    return torch.bincount(expert_A, minlength=num_experts)


def sort_by_expert(token_A: Tensor, expert_A: Tensor, weight_A: Tensor, num_experts: int) -> Dispatch:
    """Dropless dispatch: a stable sort of the assignments by expert (token order kept inside an expert)."""
    expert_sorted, order = torch.sort(expert_A, stable=True)
    counts = count_assignments(expert_sorted, num_experts)
    return Dispatch(
        token_A[order], expert_sorted, weight_A[order], counts, counts.new_zeros(()), int(expert_A.numel())
    )


def capacity(num_assignments: int, num_experts: int, capacity_factor: float) -> int:
    """Switch Transformer capacity: ceil(capacity_factor * assignments / experts), at least 1."""
    return max(1, math.ceil(capacity_factor * num_assignments / num_experts))


def limit_capacity(dispatch: Dispatch, cap: int, priority_A: Tensor | None = None) -> Dispatch:
    """Keep at most ``cap`` assignments per expert and report how many were dropped.

    Without ``priority_A`` the earliest tokens win (Switch Transformer); with it, the assignments with
    the highest priority inside each expert win (V-MoE's batch-prioritised routing, e.g. priority =
    router weight). The kept assignments stay grouped by expert and in token order inside an expert.
    """
    if cap <= 0:
        raise ValueError(f"capacity must be > 0, got {cap}")
    token, expert, weight, counts = dispatch.token_A, dispatch.expert_A, dispatch.weight_A, dispatch.counts_E
    starts = torch.cumsum(counts, 0) - counts
    if priority_A is None:
        rank = torch.arange(token.numel(), device=token.device) - starts[expert]
    else:
        # rank inside each expert by descending priority: two stable sorts (priority, then expert)
        by_priority = torch.argsort(priority_A.detach(), descending=True, stable=True)
        order = by_priority[torch.argsort(expert[by_priority], stable=True)]
        rank = torch.empty_like(token)
        rank[order] = torch.arange(token.numel(), device=token.device) - starts[expert[order]]
    keep = rank < cap
    kept_counts = torch.clamp(counts, max=cap)
    return Dispatch(
        token[keep], expert[keep], weight[keep], kept_counts, (~keep).sum(), dispatch.total
    )


def combine(y_AD: Tensor, dispatch: Dispatch, num_tokens: int) -> Tensor:
    """Weighted sum of expert outputs back into token order: y_TD[t] = sum_a w_a * y_a over a with token t."""
    weighted = y_AD * dispatch.weight_A.unsqueeze(-1).to(y_AD.dtype)
    out = y_AD.new_zeros(num_tokens, y_AD.shape[-1])
    return out.index_add(0, dispatch.token_A, weighted)


# ---------------------------------------------------------------------------------------------------
# Dropless top-k fast path: every token has exactly K assignments, so the sort is a permutation of the
# token-major (T*K) layout and both directions are gathers (no scatter-add, no atomics).
# ---------------------------------------------------------------------------------------------------
class TopKPermutation(NamedTuple):
    order_A: Tensor  # kept sorted position -> token-major index t*K + k
    inverse_A: Tensor  # token-major index -> kept sorted position (dropped ones: the index one past the end)
    token_A: Tensor  # token of each kept sorted row (order // K)
    counts_E: Tensor  # kept rows per expert
    dropped: Tensor  # long scalar
    top_k: int
    has_drops: bool  # a capacity was applied (the inverse may point at the zero row past the end)


def topk_permutation(ids_TK: Tensor, num_experts: int, cap: int | None = None) -> TopKPermutation:
    """Sort the T*K (token, expert) choices by expert (stable: token order inside an expert). With
    ``cap``, each expert keeps its first ``cap`` tokens (Switch's token-order priority); the dropped
    choices map to a zero row so both directions stay plain gathers."""
    K = ids_TK.shape[-1]
    flat = ids_TK.reshape(-1)
    expert_sorted, order = torch.sort(flat, stable=True)
    counts = count_assignments(expert_sorted, num_experts)
    A = order.numel()
    arange = torch.arange(A, device=order.device)
    if cap is None:
        inverse = torch.empty_like(order)
        inverse[order] = arange
        return TopKPermutation(order, inverse, order // K, counts, counts.new_zeros(()), K, False)
    if cap <= 0:
        raise ValueError(f"capacity must be > 0, got {cap}")
    starts = torch.cumsum(counts, 0) - counts
    keep = (arange - starts[expert_sorted]) < cap
    kept_order = order[keep]
    n_kept = kept_order.numel()
    inverse = torch.full_like(order, n_kept)
    inverse[kept_order] = torch.arange(n_kept, device=order.device)
    kept_counts = torch.clamp(counts, max=cap)
    return TopKPermutation(kept_order, inverse, kept_order // K, kept_counts, A - kept_counts.sum(), K, True)


def _with_zero_row(t_AD: Tensor) -> Tensor:
    return torch.cat([t_AD, t_AD.new_zeros(1, t_AD.shape[-1])], 0)


def unpermute_grad(g_AD: Tensor, perm: TopKPermutation) -> Tensor:
    """Gradient of ``x_TD.index_select(0, perm.token_A)``: a gather through the inverse permutation and a
    sum over each token's K rows (dropped choices read a zero row)."""
    if perm.has_drops:
        g_AD = _with_zero_row(g_AD)
    inverse_TK = perm.inverse_A.view(-1, perm.top_k)
    g = g_AD.index_select(0, inverse_TK[:, 0])
    for k in range(1, perm.top_k):  # one (T, D) temporary at a time, not a (T*K, D) one
        g.add_(g_AD.index_select(0, inverse_TK[:, k]))
    return g


class _Permute(torch.autograd.Function):
    """x_AD = x_TD[token_A]; each token appears at most K times, so the backward is a gather through the
    inverse permutation and a sum over K (no scatter-add)."""

    @staticmethod
    def forward(ctx, x_TD, perm):  # type: ignore[override]
        ctx.perm = perm
        return x_TD.index_select(0, perm.token_A)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_AD):  # type: ignore[override]
        return unpermute_grad(g_AD, ctx.perm), None


class _Unpermute(torch.autograd.Function):
    """y_TD = sum_k w_TK[t, k] * y_AD[inverse(t, k)] as one batched matmul over the K rows of each token
    (a dropped choice reads the zero row)."""

    @staticmethod
    def forward(ctx, y_AD, w_TK, perm):  # type: ignore[override]
        K = perm.top_k
        src = _with_zero_row(y_AD) if perm.has_drops else y_AD
        y_TKD = src.index_select(0, perm.inverse_A).view(-1, K, y_AD.shape[-1])
        w = w_TK.to(y_AD.dtype)
        ctx.save_for_backward(y_TKD, w)
        ctx.perm = perm
        return torch.bmm(w.unsqueeze(1), y_TKD).squeeze(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_TD):  # type: ignore[override]
        y_TKD, w = ctx.saved_tensors
        perm = ctx.perm
        g_TD = g_TD.contiguous()
        g_w = torch.bmm(y_TKD, g_TD.unsqueeze(-1)).squeeze(-1) if ctx.needs_input_grad[1] else None
        g_y = None
        if ctx.needs_input_grad[0]:
            w_A = w.reshape(-1).index_select(0, perm.order_A)
            g_y = g_TD.index_select(0, perm.token_A).mul_(w_A.unsqueeze(-1))
        return g_y, g_w, None


def permute_topk(x_TD: Tensor, perm: TopKPermutation) -> Tensor:
    return _Permute.apply(x_TD, perm)


def unpermute_topk(y_AD: Tensor, w_TK: Tensor, perm: TopKPermutation) -> Tensor:
    return _Unpermute.apply(y_AD, w_TK, perm)
