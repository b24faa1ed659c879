"""Post-hoc expert merging (MC-SMoE) and usage pruning, on any trained MoE with a stacked expert bank.

MC-SMoE (Li et al., "Merge, Then Compress: Demystify Efficient SMoE with Hints from Its Routing Policy",
ICLR 2024), as implemented here by :func:`merge_experts`:

1. on calibration data, measure each expert's routing frequency and its router-logit profile (the column
   of router logits over the calibration tokens; :func:`routing_profile`);
2. the ``target`` most frequently used experts are the *dominant* experts; every other expert joins the group
   of the dominant expert whose router-logit profile is most similar (cosine similarity);
3. within a group, each member's hidden units are permuted to best match the dominant expert's (weight
   matching: the similarity of hidden unit ``i`` of one expert and ``j`` of another is the dot product of
   their ``W1`` columns (+ ``b1``) plus that of their ``W2`` rows; the permutation maximising the summed
   similarity is found with ``scipy.optimize.linear_sum_assignment``). Permuting hidden units leaves an
   expert's function unchanged;
4. the group's aligned weights are averaged with the routing frequencies as weights, the result replaces the
   dominant expert, and the other members are removed with :meth:`MoE.prune_experts`; the dominant expert's
   router row is kept (``router="dominant"``) or replaced by the frequency-weighted mean of the group's rows
   (``router="average"``); or (``router="group"``) the router keeps all its rows and choices, and a choice of
   any group member is sent to the group's merged expert (:class:`GroupedRouter`). The last is what MC-SMoE's
   released code does: it copies the merged weights into every member's slot and leaves the router unchanged.

:func:`prune_by_usage` is the baseline: keep the ``target`` most used experts, remove the rest.
Both return the core's parameter :data:`~moeparadigms.core.Remap` for :func:`~moeparadigms.core.remap_optimizer`.

Shape legend: T calibration tokens, D model width, H expert hidden width, E experts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..core import GLUExperts, MLPExperts, MoE, Remap, Router, Routing

Stacked = MLPExperts | GLUExperts


@dataclass
class RoutingProfile:
    """Calibration statistics of one MoE layer: ``frequency_E`` (share of assignments each expert got) and
    ``logits_TE`` (router logits of every calibration token)."""

    frequency_E: Tensor
    logits_TE: Tensor


@torch.no_grad()
def routing_profile(model: nn.Module, moe: MoE, batches: Iterable[Any], forward: Callable[[Any], Any] | None = None) -> RoutingProfile:
    """Run ``model`` over ``batches`` (each passed to ``forward``, default ``model(batch)``; a tuple
    ``(x, y)`` gives ``model(x)``) and record ``moe``'s routing: assignment frequency and router logits."""
    counts = torch.zeros(moe.num_experts, dtype=torch.float64)
    logits: list[Tensor] = []

    def hook(_m: nn.Module, _inp: Any, routing: Any) -> None:
        counts.add_(torch.bincount(routing.expert_A.detach().cpu(), minlength=moe.num_experts).double())
        if routing.logits_TE is not None:
            logits.append(routing.logits_TE.detach().float().cpu())

    handle = moe.router.register_forward_hook(hook)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if forward is not None:
                forward(batch)
            else:
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        handle.remove()
        model.train(was_training)
    if counts.sum() == 0:
        raise ValueError("routing_profile saw no tokens: the calibration batches are empty or do not reach this MoE layer")
    if not logits:
        raise ValueError(f"router {type(moe.router).__name__} returns no logits; merging groups experts by router logits")
    return RoutingProfile((counts / counts.sum()).float(), torch.cat(logits))


def _bank(moe: MoE) -> Stacked:
    if not isinstance(moe.experts, (MLPExperts, GLUExperts)):
        raise ValueError(f"merging needs a stacked MLPExperts/GLUExperts bank, got {type(moe.experts).__name__}")
    return moe.experts


def _check_target(moe: MoE, target: int) -> None:
    if not isinstance(target, int) or not 1 <= target <= moe.num_experts:
        raise ValueError(f"target must be an integer in [1, num_experts={moe.num_experts}], got {target!r}")
    k = getattr(moe.router, "top_k", 1)
    if target < k:
        raise ValueError(f"target={target} is below the router's top_k={k}; keep at least top_k experts")


def _write_row(p: Any, e: int, value: Tensor) -> None:
    with torch.no_grad():
        for start, b in p.layout():
            if start <= e < start + b.shape[0]:
                b[e - start].copy_(value)
                return
    raise IndexError(e)


def _unit_features(bank: Stacked, e: int) -> Tensor:
    """Per hidden unit, the vector of weights it owns: ``W1`` column(s) (+ ``b1``) and ``W2`` row, ``(H, F)``."""
    H = bank.hidden
    w1 = bank.w1.row(e).detach()  # (D, H) or (D, 2H) for a GLU
    parts = [w1[:, :H].t(), w1[:, H:].t()] if bank.glu else [w1.t()]
    if bank.b1 is not None:
        b1 = bank.b1.row(e).detach()
        parts += [b1[:H, None], b1[H:, None]] if bank.glu else [b1[:, None]]
    parts.append(bank.w2.row(e).detach())  # (H, D)
    return torch.cat(parts, dim=1).float()


def align_permutation(bank: Stacked, ref: int, other: int) -> Tensor:
    """The permutation ``perm`` (H,) of expert ``other``'s hidden units that best matches expert ``ref``'s:
    unit ``i`` of the aligned expert is unit ``perm[i]`` of ``other`` (weight matching, Hungarian algorithm)."""
    from scipy.optimize import linear_sum_assignment

    sim = _unit_features(bank, ref) @ _unit_features(bank, other).t()  # (H ref units, H other units)
    rows, cols = linear_sum_assignment(sim.cpu().numpy(), maximize=True)
    perm = torch.empty(bank.hidden, dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def permuted_expert(bank: Stacked, e: int, perm: Tensor) -> dict[str, Tensor]:
    """Expert ``e``'s weights with its hidden units reordered by ``perm`` (the same function)."""
    H = bank.hidden
    cols = torch.cat([perm, perm + H]) if bank.glu else perm
    out = {"w1": bank.w1.row(e).detach()[:, cols], "w2": bank.w2.row(e).detach()[perm]}
    if bank.b1 is not None:
        out["b1"] = bank.b1.row(e).detach()[cols]
    if bank.b2 is not None:
        out["b2"] = bank.b2.row(e).detach().clone()
    return out


def group_experts(profile: RoutingProfile, target: int) -> dict[int, list[int]]:
    """MC-SMoE grouping: the ``target`` most used experts lead; every other expert joins the leader whose
    router-logit profile (column of ``logits_TE``) has the highest cosine similarity. Returns
    ``{dominant: [dominant, members...]}``."""
    freq, logits = profile.frequency_E, profile.logits_TE
    E = freq.numel()
    order = torch.argsort(freq, descending=True, stable=True)
    dominant = sorted(order[:target].tolist())
    cols = torch.nn.functional.normalize(logits.t().double(), dim=1)  # (E, T)
    sim = cols @ cols.t()
    groups = {d: [d] for d in dominant}
    for e in range(E):
        if e in groups:
            continue
        best = max(dominant, key=lambda d: (float(sim[e, d]), -d))
        groups[best].append(e)
    return groups


class GroupedRouter(Router):
    """A router that keeps a merged layer's original decisions: ``base`` routes over its ``E`` experts as
    before, and each choice of expert ``e`` goes to merged expert ``group_of[e]`` with the same weight (two
    choices of one group add up). Router probabilities for the load-balancing loss are summed per group.
    The ``E`` router rows stay trainable; growth and pruning of a grouped layer are not supported."""

    def __init__(self, base: Router, group_of: Tensor) -> None:
        num_groups = int(group_of.max()) + 1
        super().__init__(d_model=base.d_model, num_experts=num_groups)
        if group_of.shape != (base.num_experts,) or set(group_of.tolist()) != set(range(num_groups)):
            raise ValueError(f"group_of must map each of the {base.num_experts} experts to a group 0..G-1, got {group_of.tolist()}")
        self.base = base
        self.register_buffer("group_of", group_of.long().clone())

    @property
    def top_k(self) -> int:
        return getattr(self.base, "top_k", 1)

    def forward(self, x_TD: Tensor, *, task_id_T: Tensor | None = None) -> Routing:
        self.base.check_finite = self.check_finite
        r = self.base(x_TD, task_id_T=task_id_T)
        if not isinstance(r, Routing):
            raise TypeError(f"GroupedRouter needs a token-choice base router, got {type(r).__name__}")
        g = self.group_of.to(r.expert_A.device)
        probs = None
        if r.probs_TE is not None:
            probs = r.probs_TE.new_zeros(r.probs_TE.shape[0], self.num_experts).index_add(1, g, r.probs_TE)
        return Routing(r.token_A, g[r.expert_A], r.weight_A, r.logits_TE, probs, None,
                       ids_TK=None if r.ids_TK is None else g[r.ids_TK], weights_TK=r.weights_TK)

    def grow(self, *args, **kwargs) -> Remap:
        raise NotImplementedError("a GroupedRouter (merged layer) cannot grow; add experts before merging")

    def prune(self, keep_E: Tensor) -> Remap:
        raise NotImplementedError("a GroupedRouter (merged layer) cannot be pruned")


def merge_experts(moe: MoE, profile: RoutingProfile, target: int, *, align: bool = True,
                  router: Literal["dominant", "average", "group"] = "dominant",
                  weighting: Literal["frequency", "dominant"] = "frequency") -> tuple[Remap, dict[int, list[int]]]:
    """Merge ``moe``'s experts down to ``target`` (MC-SMoE; module docstring), in place.

    Args:
        moe: an MoE with a stacked expert bank and a router with one row per expert.
        profile: :func:`routing_profile` of this layer on calibration data.
        target: experts left after merging (>= the router's top_k).
        align: permute hidden units to the dominant expert before averaging (False: plain averaging, an
            ablation).
        router: ``"dominant"`` keeps the dominant expert's router row; ``"average"`` takes the frequency-weighted
            mean of the group's rows; ``"group"`` keeps every row and maps choices to groups (:class:`GroupedRouter`).
        weighting: ``"frequency"`` averages the group's weights by routing frequency (MC-SMoE); ``"dominant"``
            keeps the dominant expert's weights unchanged (an ablation: grouping and routing without averaging).
    Returns:
        ``(remap, groups)``: the parameter remap for ``remap_optimizer`` and the groups, by the old expert ids.
    """
    bank = _bank(moe)
    _check_target(moe, target)
    if weighting not in ("frequency", "dominant"):
        raise ValueError(f"weighting={weighting!r} is not supported; choose one of ['dominant', 'frequency']")
    if router not in ("dominant", "average", "group"):
        raise ValueError(f"router={router!r} is not supported; choose one of ['average', 'dominant', 'group']")
    if router == "group" and not isinstance(moe.router, Router):
        raise TypeError(f"router must be a moeparadigms Router, got {type(moe.router).__name__}")
    if profile.frequency_E.numel() != moe.num_experts:
        raise ValueError(f"profile has {profile.frequency_E.numel()} experts, the layer {moe.num_experts}")
    groups = group_experts(profile, target)
    freq = profile.frequency_E.double()
    router_params = [m for m in moe.router.children() if hasattr(m, "layout") and hasattr(m, "row")]
    merged: dict[int, dict[str, Tensor]] = {}
    merged_router: dict[int, list[Tensor]] = {}
    for d, members in groups.items():
        w = freq[members]
        w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1.0 / len(members))
        if weighting == "dominant":  # members[0] is the dominant expert
            w = torch.zeros_like(w)
            w[0] = 1.0
        acc: dict[str, Tensor] = {}
        for m, wm in zip(members, w.tolist()):
            perm = align_permutation(bank, d, m) if (align and m != d) else torch.arange(bank.hidden)
            for k, v in permuted_expert(bank, m, perm).items():
                acc[k] = acc.get(k, 0) + wm * v.double()
        merged[d] = acc
        merged_router[d] = [sum(wm * p.row(m).detach().double() for m, wm in zip(members, w.tolist()))
                            for p in router_params]
    for d, acc in merged.items():
        for k, v in acc.items():
            p = getattr(bank, k)
            _write_row(p, d, v.to(p.row(d).dtype))
        if router == "average":
            for p, v in zip(router_params, merged_router[d]):
                _write_row(p, d, v.to(p.row(d).dtype))
    drop = [e for e in range(moe.num_experts) if e not in groups]
    if router == "group":
        keep = torch.tensor([e in groups for e in range(moe.num_experts)])
        new_id = {d: i for i, d in enumerate(sorted(groups))}
        group_of = torch.empty(moe.num_experts, dtype=torch.long)
        for d, members in groups.items():
            group_of[members] = new_id[d]
        remap = moe.experts.prune(keep)
        moe.router = GroupedRouter(moe.router, group_of)
        return remap, groups
    remap = moe.prune_experts(drop) if drop else {}
    return remap, groups


def prune_by_usage(moe: MoE, profile: RoutingProfile, target: int) -> tuple[Remap, list[int]]:
    """The baseline: keep the ``target`` most used experts (calibration frequency), remove the rest with
    :meth:`MoE.prune_experts`. Returns the remap and the kept expert ids (old numbering)."""
    _check_target(moe, target)
    order = torch.argsort(profile.frequency_E, descending=True, stable=True)
    keep = sorted(order[:target].tolist())
    drop = [e for e in range(moe.num_experts) if e not in keep]
    return (moe.prune_experts(drop) if drop else {}), keep


__all__ = ["GroupedRouter", "RoutingProfile", "routing_profile", "group_experts", "align_permutation", "permuted_expert",
           "merge_experts", "prune_by_usage"]
