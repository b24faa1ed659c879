"""The routing results and the router base class: what every router returns, and the growth, pruning and freezing
of the router's expert-indexed parameters that every router shares.

Token-choice and expert-choice routers return a :class:`Routing`: a flat list of assignments (token, expert,
weight) plus the router's logits/probabilities for losses and statistics. Soft MoE returns a :class:`SoftRouting`
(dense dispatch and combine weights over slots). The routers themselves are in :mod:`moeparadigms.core.routing`.

Shape legend:
    T  tokens   D  model width   E  experts   K  experts per token   A  assignments
    G  groups (sequences) for Soft MoE   N  tokens per group   S  slots (E * slots_per_expert)
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..checks import check_positive
from .experts import Init, check_init
from .params import ExpertParam, Remap, merge_remaps


@dataclass
class Routing:
    """Assignments of tokens to experts.

    ``token_A``/``expert_A``/``weight_A`` list every (token, expert) pair with its combine weight.
    ``logits_TE`` (what enters the softmax/sigmoid) and ``probs_TE`` (router probabilities, rows sum
    to 1) feed the losses and statistics; both are None for a router without learned scores (hash).
    ``load_prob_TE`` is the probability under the gating noise that each expert is in a token's top-k
    (noisy top-k only, Shazeer's load loss). ``presorted`` marks assignments already grouped by expert.
    """

    token_A: Tensor  # a token-choice router may pass None: built from ids_TK on first read (see below)
    expert_A: Tensor
    weight_A: Tensor
    logits_TE: Tensor | None
    probs_TE: Tensor | None
    load_prob_TE: Tensor | None = None
    presorted: bool = False
    #: token-choice routers: the (T, K) expert ids and weights (every token has exactly K assignments)
    ids_TK: Tensor | None = None
    weights_TK: Tensor | None = None


def _token_A_get(self: Routing) -> Tensor:
    t = self.__dict__["_token_A"]
    if t is None:
        if self.ids_TK is None:
            raise ValueError("Routing needs token_A (or ids_TK to build it from)")
        T, K = self.ids_TK.shape
        t = self.__dict__["_token_A"] = torch.arange(T, device=self.ids_TK.device).repeat_interleave(K)
    return t


def _token_A_set(self: Routing, value: Tensor | None) -> None:
    self.__dict__["_token_A"] = value


def _probs_get(self: Routing) -> Tensor | None:
    p = self.__dict__["_probs_TE"]
    if p is None and self.__dict__.get("_probs_are_softmax") and self.logits_TE is not None:
        p = self.__dict__["_probs_TE"] = torch.softmax(self.logits_TE, dim=-1)
    return p


def _probs_set(self: Routing, value: Tensor | None) -> None:
    self.__dict__["_probs_TE"] = value


# token-choice assignments are token-major (token t's K choices at t*K .. t*K+K-1), so token_A is a function of
# ids_TK: built lazily, since the paths that read it (the generic sort, the importance loss) are the rare ones
Routing.token_A = property(_token_A_get, _token_A_set)  # type: ignore[assignment]
# a router whose probabilities are softmax(logits) may leave them to be computed on first read (by the losses
# or the statistics): an inference forward that reads neither never computes them
Routing.probs_TE = property(_probs_get, _probs_set)  # type: ignore[assignment]


def softmax_probs_on_read(r: Routing) -> Routing:
    """Mark ``r``'s probabilities as ``softmax(r.logits_TE)``, computed on first read of ``r.probs_TE`` (routers
    whose losses and statistics may never read them)."""
    r.__dict__["_probs_are_softmax"] = True
    return r


def no_autocast(x: Tensor):
    """``torch.autocast(enabled=False)`` where autocast is on; free otherwise (entering it costs ~10 us)."""
    return torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext()


@dataclass
class SoftRouting:
    """Soft MoE weights: slots = dispatch^T x (softmax over tokens); y = combine @ slot outputs
    (softmax over slots). Shapes ``(G, N, S)``."""

    dispatch_GNS: Tensor
    combine_GNS: Tensor
    logits_GNS: Tensor
    slots_per_expert: int


def fp32(x: Tensor) -> Tensor:
    """Routers run in at least float32 (half-precision inputs are upcast; float64 stays float64)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def fresh_rows(n: int, d: int) -> Tensor:
    bound = 1.0 / math.sqrt(d)
    return torch.empty(n, d).uniform_(-bound, bound)


class Router(nn.Module):
    """Base class. ``forward(x_TD, *, task_id_T=None) -> Routing | SoftRouting``."""

    d_model: int
    num_experts: int
    #: routers whose output depends on other tokens of the batch (expert choice, Soft MoE) set this
    batch_dependent: bool = False
    #: raise on NaN/inf scores (one host sync per forward) while autograd is on; MoE(check_finite=...) sets it.
    #: Inference (autograd off) never checks: no host sync, and a non-finite token routes to NaN weights.
    check_finite: bool = True

    def _checks(self) -> bool:
        return self.check_finite and torch.is_grad_enabled()

    def __init__(self, *, d_model: int, num_experts: int) -> None:
        super().__init__()
        check_positive(d_model=d_model, num_experts=num_experts)
        self.d_model, self.num_experts = d_model, num_experts

    def forward(self, x_TD: Tensor, *, task_id_T: Tensor | None = None) -> Routing | SoftRouting:
        raise NotImplementedError  # pragma: no cover

    # -- growth: every ExpertParam child grows/prunes/freezes together; buffers via _grow_buffers
    def _expert_params(self) -> list[ExpertParam]:
        return [m for m in self.children() if isinstance(m, ExpertParam)]

    def grow(self, n: int, init: Init = "fresh", source: Sequence[int] | None = None) -> Remap:
        """Add ``n`` experts' router rows: copies of ``source`` rows, their mean, or fresh."""
        src = check_init(init, n, source, self.num_experts)
        remaps = [p.grow_init(n, init, src, lambda m, p=p: self._fresh(p, m)) for p in self._expert_params()]
        self._grow_buffers(n, init, src)
        self.num_experts += n
        return merge_remaps(*remaps)

    def _fresh(self, p: ExpertParam, n: int) -> Tensor:
        return fresh_rows(n, int(torch.tensor(p.shape[1:]).prod())).reshape(n, *p.shape[1:])

    def reset_parameters(self) -> None:
        """Re-draw the router's expert-indexed parameters, in place."""
        with torch.no_grad():
            for p in self._expert_params():
                for _, b in p.layout():
                    b.copy_(self._fresh(p, b.shape[0]).to(b))

    def _grow_buffers(self, n: int, init: Init, src: list[int]) -> None:
        pass

    def prune(self, keep_E: Tensor) -> Remap:
        remap = merge_remaps(*(p.select(keep_E) for p in self._expert_params()))
        self._prune_buffers(keep_E.to(torch.bool))
        self.num_experts = int(keep_E.to(torch.bool).sum())
        return remap

    def _prune_buffers(self, keep_E: Tensor) -> None:
        pass

    def set_frozen(self, ids: Sequence[int], frozen: bool = True) -> Remap:
        """Freeze (or unfreeze) the router rows of experts ``ids``: their logits stop changing."""
        return merge_remaps(*(p.set_frozen(ids, frozen) for p in self._expert_params()))


__all__ = ["Routing", "SoftRouting", "Router", "softmax_probs_on_read", "no_autocast", "fp32", "fresh_rows"]
