"""Dispatchers: how one routing's tokens reach their experts and come back (dispatch -> experts -> combine).

A :class:`Dispatcher` is called as ``dispatcher(x_TD, routing, experts, capacity, count) -> Dispatched`` and
does three things in order: *dispatch* (lay the tokens out the way the expert bank consumes them), *experts*
(one call of the bank) and *combine* (the weighted sum back into token order). :class:`~moeparadigms.core.MoE`
picks one per forward (:meth:`~moeparadigms.core.MoE.select_dispatcher`) and turns the result into its losses
and statistics; the dispatchers hold no parameters and no per-call state, so the built-in ones are shared
instances (:data:`DENSE`, :data:`PERMUTATION`, :data:`SORTED`). Expert parallelism is one more dispatcher,
``moeparadigms.core.parallel.AllToAllDispatcher``, which ``ExpertParallelMoE`` installs on its layer.

One call, not three methods: at the small batches of RL and meta-learning every Python call and temporary
costs more than its arithmetic (BENCHMARKS.md "Small batches"), so each dispatcher runs its three steps inline.

Shape legend:
    T  tokens   D  model width   E  experts   K  experts per token   A  (kept) assignments
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor
from torch.profiler import record_function

from . import dispatch as dsp
from .dispatch import count_assignments
from .experts import Experts
from .routing import Routing


class Dispatched(NamedTuple):
    """What a dispatcher returns: the combined output and the counts the losses and statistics read."""

    y_TD: Tensor  # combined output in token order, the input's dtype
    counts_E: Tensor | None  # long, assignments each expert processed (after dropping); None when not asked for
    dropped: Tensor | None  # long scalar, assignments the capacity limit removed; None where nothing can drop
    total: int  # assignments before dropping


def region(name: str):
    """A profiler label when a profiler is recording; free otherwise (record_function costs ~10 us a call)."""
    return record_function(name) if torch.autograd.profiler._is_profiler_enabled else nullcontext()


class Dispatcher:
    """One way to run a routing through an expert bank: dispatch -> experts -> combine.

    ``__call__(x_TD, routing, experts, capacity=None, count=True)``:

    Args:
        x_TD: tokens ``(T, D)``.
        routing: the router's :class:`~moeparadigms.core.routing.Routing` for these tokens.
        experts: the bank to run (its ``forward``, ``forward_gathered`` or ``forward_dense``).
        capacity: at most this many assignments per expert, the first ones in the routing's order (token order
            for token choice: Switch's priority), the rest dropped; None for dropless. A dispatcher that cannot
            drop raises ``ValueError``.
        count: whether the caller reads ``counts_E`` (a dispatcher that counts anyway may return them regardless).
    Returns:
        :class:`Dispatched` ``(y_TD (T, D), counts_E (E,) | None, dropped () | None, total)``.
    """

    def __call__(
        self, x_TD: Tensor, routing: Routing, experts: Experts, capacity: int | None = None, count: bool = True
    ) -> Dispatched:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DenseDispatcher(Dispatcher):
    """Every expert on every token, combined with the (mostly zero) gate matrix: no sort, no gather, plain
    autograd (twice differentiable). Dispatch builds the ``(T, E)`` gates; the bank's ``forward_dense`` runs the
    experts and folds the combine into its second matmul. Stacked banks only (``forward_dense``), dropless."""

    def __call__(
        self, x_TD: Tensor, routing: Routing, experts: Experts, capacity: int | None = None, count: bool = True
    ) -> Dispatched:
        if capacity is not None:
            raise ValueError(f"DenseDispatcher is dropless: got capacity={capacity}, expected None")
        E = experts.num_experts
        with region("moe/experts_dense"):
            # dispatch: the gate matrix, one scatter into fresh zeros (a repeated id adds, as sorted)
            if routing.ids_TK is not None and routing.weights_TK is not None:
                w = routing.weights_TK
                gates = torch.zeros(x_TD.shape[0], E, dtype=w.dtype, device=w.device).scatter_add_(1, routing.ids_TK, w)
            else:
                gates = x_TD.new_zeros(x_TD.shape[0], E, dtype=routing.weight_A.dtype)
                gates = gates.index_put((routing.token_A, routing.expert_A), routing.weight_A, accumulate=True)
            # experts and combine in one
            y_TD = experts.forward_dense(x_TD, gates)  # type: ignore[attr-defined]
            if y_TD.dtype != x_TD.dtype:
                y_TD = y_TD.to(x_TD.dtype)
        # counted only when a loss or the statistics read them
        counts = count_assignments(routing.expert_A, E) if count else None
        return Dispatched(y_TD, counts, None, routing.expert_A.numel())


class PermutationDispatcher(Dispatcher):
    """Token choice (every token has exactly K assignments, ``routing.ids_TK``): dispatch is a permutation of the
    T*K choices sorted by expert, optionally capacity-limited; the experts gather their rows themselves
    (``forward_gathered``); combine is a gather back through the inverse permutation and a K-term weighted sum
    (no scatter-add). Banks with their own backward (not ``plain_autograd``)."""

    def __call__(
        self, x_TD: Tensor, routing: Routing, experts: Experts, capacity: int | None = None, count: bool = True
    ) -> Dispatched:
        ids_TK, weights_TK = routing.ids_TK, routing.weights_TK
        if ids_TK is None or weights_TK is None:
            raise ValueError("PermutationDispatcher needs a token-choice routing (ids_TK and weights_TK), got None")
        with region("moe/permute"):
            perm = dsp.topk_permutation(ids_TK, experts.num_experts, capacity)
        with region("moe/experts"):
            y_AD = experts.forward_gathered(x_TD, perm)
        with region("moe/unpermute"):
            y_TD = dsp.unpermute_topk(y_AD, weights_TK, perm).to(x_TD.dtype)
        return Dispatched(y_TD, perm.counts_E, perm.dropped, ids_TK.numel())


class SortedDispatcher(Dispatcher):
    """Any routing (expert choice, or any router with a ``plain_autograd`` bank): a stable sort of the flat
    assignments by expert (skipped when the router says they are ``presorted``), optionally capacity-limited;
    the bank runs on the gathered rows; combine is a weighted ``index_add`` into token order."""

    def __call__(
        self, x_TD: Tensor, routing: Routing, experts: Experts, capacity: int | None = None, count: bool = True
    ) -> Dispatched:
        E = experts.num_experts
        if routing.presorted:
            c = torch.bincount(routing.expert_A, minlength=E)
            d = dsp.Dispatch(routing.token_A, routing.expert_A, routing.weight_A, c, c.new_zeros(()), routing.expert_A.numel())
        else:
            d = dsp.sort_by_expert(routing.token_A, routing.expert_A, routing.weight_A, E)
        if capacity is not None:
            d = dsp.limit_capacity(d, capacity)
        y_AD = experts(x_TD[d.token_A], d.counts_E)
        y_TD = dsp.combine(y_AD, d, x_TD.shape[0]).to(x_TD.dtype)
        return Dispatched(y_TD, d.counts_E, d.dropped, d.total)


#: the shared instances :meth:`MoE.select_dispatcher` chooses from (stateless)
DENSE = DenseDispatcher()
PERMUTATION = PermutationDispatcher()
SORTED = SortedDispatcher()

__all__ = [
    "Dispatched", "Dispatcher", "DenseDispatcher", "PermutationDispatcher", "SortedDispatcher", "DENSE", "PERMUTATION",
    "SORTED", "count_assignments", "region",
]
