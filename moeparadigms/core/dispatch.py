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


def sort_by_expert(token_A: Tensor, expert_A: Tensor, weight_A: Tensor, num_experts: int) -> Dispatch:
    """Dropless dispatch: a stable sort of the assignments by expert (token order kept inside an expert)."""
    expert_sorted, order = torch.sort(expert_A, stable=True)
    counts = torch.bincount(expert_sorted, minlength=num_experts)
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
    order_A: Tensor  # sorted position -> token-major index t*K + k
    inverse_A: Tensor  # token-major index -> sorted position
    token_A: Tensor  # token of each sorted row (order // K)
    counts_E: Tensor
    top_k: int


def topk_permutation(ids_TK: Tensor, num_experts: int) -> TopKPermutation:
    K = ids_TK.shape[-1]
    expert_sorted, order = torch.sort(ids_TK.reshape(-1), stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(expert_sorted, minlength=num_experts)
    return TopKPermutation(order, inverse, order // K, counts, K)


class _Permute(torch.autograd.Function):
    """x_AD = x_TD[token_A] where each token appears exactly K times; backward gathers and sums over K."""

    @staticmethod
    def forward(ctx, x_TD, perm):  # type: ignore[override]
        ctx.perm = perm
        return x_TD.index_select(0, perm.token_A)

    @staticmethod
    def backward(ctx, g_AD):  # type: ignore[override]
        perm = ctx.perm
        g = g_AD.index_select(0, perm.inverse_A)
        if perm.top_k > 1:
            g = g.view(-1, perm.top_k, g.shape[-1]).sum(1)
        return g, None


class _Unpermute(torch.autograd.Function):
    """y_TD = sum_k w_TK[t, k] * y_AD[inverse(t, k)] as one batched matmul over the K rows of each token."""

    @staticmethod
    def forward(ctx, y_AD, w_TK, perm):  # type: ignore[override]
        K = perm.top_k
        y_TKD = y_AD.index_select(0, perm.inverse_A).view(-1, K, y_AD.shape[-1])
        w = w_TK.to(y_AD.dtype)
        ctx.save_for_backward(y_TKD, w)
        ctx.perm = perm
        return torch.bmm(w.unsqueeze(1), y_TKD).squeeze(1)

    @staticmethod
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
