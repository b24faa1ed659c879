"""The MoE layer: router -> dispatch -> experts -> combine, with auxiliary losses and statistics returned.

Shape legend:
    T  tokens (all leading dims flattened)   D  model width   E  experts   A  assignments
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import dispatch as dsp
from . import fused
from . import losses as L
from ._dist import data_parallel_world, sum_over_ranks
from .dispatchers import DENSE, PERMUTATION, SORTED, Dispatcher, region
from .experts import Experts, Init
from .params import Remap, merge_remaps
from .routing import Router, Routing, SoftMoERouter, SoftRouting

#: ``dense_dispatch="auto"`` computes every expert on every token (no sort, no gathers) while the multiply-adds
#: it spends on experts a token was not routed to stay below this (the crossover of a side-by-side timing of
#: both paths on CPU, ``scripts/bench_small_batch.py``; BENCHMARKS.md "Small batches"; 2.5M before the dense path
#: folded its combine into the second matmul, issue 15)
DENSE_MACS = 8_000_000


class RoutingStats(NamedTuple):
    """Detached routing statistics of one forward (feed them to :class:`RoutingMetrics`)."""

    tokens_per_expert: Tensor  # (E,) assignments each expert processed (after capacity dropping)
    dropped: Tensor  # () assignments dropped by the capacity limit
    assigned: Tensor  # () assignments before dropping
    entropy_sum: Tensor  # () sum over tokens of the router's entropy (nats)
    num_tokens: Tensor  # ()


class MoEOutput(NamedTuple):
    """``y`` has the input's shape; ``aux_loss`` is the weighted sum of ``losses`` (add it to the task
    loss); ``losses`` holds each unweighted auxiliary term for logging.

    In inference (a forward with autograd off, see :class:`MoE` ``aux_in_inference``/``stats_in_inference``)
    the losses are skipped unless asked for: ``aux_loss`` is then a zero scalar and ``losses`` is empty; and
    ``stats`` is None when the statistics are switched off for inference."""

    y: Tensor
    aux_loss: Tensor
    losses: dict[str, Tensor]
    stats: RoutingStats | None


class MoE(nn.Module):
    """Mixture-of-Experts layer.

    Args:
        router: a :class:`~moeparadigms.core.routing.Router` (top-k, switch, expert choice, Soft MoE, hash,
            task-conditioned, bias-balanced).
        experts: an :class:`~moeparadigms.core.experts.Experts` bank with as many experts as the router.
        shared_experts: an optional always-on module added to every token's output (DeepSeekMoE's shared
            experts; :class:`~moeparadigms.core.experts.FFN` with ``num_shared``).
        capacity_factor: None for dropless dispatch; otherwise each expert takes at most
            ``ceil(capacity_factor * assignments / E)`` assignments and the overflow is dropped (its
            contribution is zero; counted in ``stats.dropped``).
        load_balance_coef, z_loss_coef, importance_coef, load_coef: weights of the Switch load-balancing
            loss, ST-MoE router z-loss and Shazeer's importance and (noisy top-k only) load losses.
        check_finite: raise on NaN/inf router logits (one host sync per forward). Only with autograd on: in
            inference (below) there is no check and no host sync; a non-finite token's output row is NaN.
        balance_across_ranks: under data parallelism (an initialised ``torch.distributed`` group), take
            the load-balancing loss's expert fractions ``f`` from the token counts summed over all ranks,
            so DDP training equals one process on the same global batch (``P`` stays local and DDP's
            gradient averaging makes it global). False: each rank balances its own batch (Switch/GShard).
        dense_dispatch: for stacked banks (:class:`MLPExperts`, :class:`GLUExperts`) and dropless dispatch:
            ``True`` computes every expert on every token and combines with the (mostly zero) gate matrix,
            the same function with no sort or per-expert gather, plain autograd (so also twice
            differentiable); ``False`` always sorts; ``"auto"`` takes the dense path while the whole bank's
            multiply-adds on unrouted (token, expert) pairs stay under ``DENSE_MACS`` (small batches: RL
            rollouts, few-shot episodes), where the sorted path's fixed cost dominates.
        aux_in_inference: compute the auxiliary losses in inference too. "Inference" is a forward with
            autograd off (``torch.no_grad()``, ``torch.inference_mode()``: RL rollouts, evaluation), where no
            loss can be trained; by default the layer then skips them (``aux_loss`` is a zero scalar and
            ``losses`` is empty) and skips the finite-logits check's host sync.
        stats_in_inference: compute the routing statistics in inference (default True: validation loops
            feed them to :class:`RoutingMetrics`, continual learning reads ``tokens_per_expert``). False:
            ``stats`` is None in inference (RL rollouts that never read them; a few ops less per call).
            With autograd on, losses and statistics are always computed.

    Dispatch (moving tokens to their experts and back) is a :class:`~moeparadigms.core.dispatchers.Dispatcher`
    chosen per forward by :meth:`select_dispatcher` from the settings above. Setting :attr:`dispatcher` installs
    one for every forward instead (``ExpertParallelMoE`` installs its all-to-all dispatcher this way).
    """

    # class-level defaults too, so a layer pickled whole before these options existed still runs
    aux_in_inference: bool = False
    stats_in_inference: bool = True
    #: None: :meth:`select_dispatcher` chooses per forward; a Dispatcher: used for every forward
    dispatcher: Dispatcher | None = None

    def __init__(
        self,
        *,
        router: Router,
        experts: Experts,
        shared_experts: nn.Module | None = None,
        capacity_factor: float | None = None,
        load_balance_coef: float = 0.01,
        z_loss_coef: float = 0.001,
        importance_coef: float = 0.0,
        load_coef: float = 0.0,
        check_finite: bool = True,
        balance_across_ranks: bool = True,
        dense_dispatch: bool | str = "auto",
        aux_in_inference: bool = False,
        stats_in_inference: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(router, Router):
            raise TypeError(f"router must be a moeparadigms Router, got {type(router).__name__}")
        if not isinstance(experts, Experts):
            raise TypeError(f"experts must be a moeparadigms Experts bank, got {type(experts).__name__}")
        if router.num_experts != experts.num_experts:
            raise ValueError(
                f"router.num_experts={router.num_experts} but experts.num_experts={experts.num_experts}: they must match"
            )
        if router.d_model != experts.d_model:
            raise ValueError(f"router.d_model={router.d_model} but experts.d_model={experts.d_model}: they must match")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 (or None for dropless), got {capacity_factor!r}")
        for name, v in dict(
            load_balance_coef=load_balance_coef, z_loss_coef=z_loss_coef, importance_coef=importance_coef, load_coef=load_coef
        ).items():
            if not v >= 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        self.router, self.experts, self.shared_experts = router, experts, shared_experts
        self.capacity_factor = capacity_factor
        self.coefs = {"load_balance": load_balance_coef, "z_loss": z_loss_coef, "importance": importance_coef, "load": load_coef}
        self.check_finite = check_finite
        self.balance_across_ranks = balance_across_ranks
        if dense_dispatch not in (True, False, "auto"):
            raise ValueError(f"dense_dispatch must be True, False or 'auto', got {dense_dispatch!r}")
        self.dense_dispatch = dense_dispatch
        self.aux_in_inference, self.stats_in_inference = bool(aux_in_inference), bool(stats_in_inference)
        router.check_finite = check_finite

    @property
    def d_model(self) -> int:
        return self.router.d_model

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def extra_repr(self) -> str:
        return f"capacity_factor={self.capacity_factor}, coefs={self.coefs}"

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, task_id: int | Tensor | None = None) -> MoEOutput:
        """Route every token of ``x`` (shape ``[..., D]``) to its experts.

        Args:
            x: tokens, any leading shape, last dim ``d_model``. Soft MoE mixes tokens within the
                second-to-last dim (the sequence); every dim before it is a separate group.
            task_id: for task-conditioned routers: an int for the whole batch, or a LongTensor of shape
                ``x.shape[:-1]`` (one id per token) or ``x.shape[:1]`` (one per sample).
        Returns:
            :class:`MoEOutput` ``(y [..., D], aux_loss (), losses {name: ()}, stats)``.
        """
        router = self.router
        d_model = router.d_model
        if x.dim() < 1 or x.shape[-1] != d_model:
            raise ValueError(f"input last dim must equal d_model={d_model}, got input shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x_TD = x if x.dim() == 2 else x.reshape(-1, d_model)  # no view node for the common 2-D input
        task_id_T = self.task_ids(task_id, lead, x.device)
        grad = torch.is_grad_enabled()
        want_aux, want_stats = grad or self.aux_in_inference, grad or self.stats_in_inference
        if isinstance(router, SoftMoERouter):
            # explicit group count: a 0-sized dim makes reshape(-1, ...) ambiguous
            groups = x.reshape(lead[:-1].numel(), x.shape[-2], d_model) if x.dim() >= 3 else x_TD.unsqueeze(0)
            soft = router(groups, task_id_T=task_id_T)
            y_TD, losses, stats = self._soft(groups, soft, want_aux, want_stats)
        elif (grad and self.dispatcher is None and fused.supports(self, x_TD)
              and self._dense_pays(x_TD.shape[0], x_TD.shape[0] * router.top_k, self.experts)):
            with region("moe/fused"):  # a small training batch: the whole step as one node (core/fused.py)
                y_TD, losses, counts, entropy = fused.topk_moe(self, x_TD)
            T = torch.scalar_tensor(x_TD.shape[0], dtype=torch.long)
            stats = RoutingStats(counts, counts.new_zeros(()), T * router.top_k, entropy, T)
        else:
            with region("moe/router"):
                routing = router(x_TD, task_id_T=task_id_T)
            y_TD, losses, stats = self._sparse(x_TD, routing, want_aux, want_stats)
        if self.shared_experts is not None:
            y_TD = y_TD + self.shared_experts(x_TD)
        aux = self.weighted_aux_loss(losses) if losses else torch.zeros((), device=x_TD.device)
        if aux.device != x_TD.device:
            aux = aux.to(x_TD.device)
        y = y_TD if x.dim() == 2 else y_TD.reshape(*lead, y_TD.shape[-1])
        return MoEOutput(y if y.dtype == x.dtype else y.to(x.dtype), aux, losses, stats)

    def task_ids(self, task_id: int | Tensor | None, lead: torch.Size, device: torch.device) -> Tensor | None:
        """``task_id`` as forward takes it, as one id per token: a flat LongTensor of ``lead.numel()`` ids on
        ``device`` (None stays None). ``lead`` is the input's shape without its last dim; an int or 0-d tensor is
        broadcast to every token, a tensor of a prefix of ``lead`` (e.g. one id per sample) over the rest.
        Raises ``ValueError`` for float ids, a shape that is not a prefix, or ids outside the router's
        ``num_tasks``."""
        if task_id is None:
            return None
        num_tasks = getattr(self.router, "num_tasks", None)
        t = torch.as_tensor(task_id, device=device)
        if t.is_floating_point() or t.is_complex():
            raise ValueError(f"task_id must be an integer or an integer tensor, got dtype {t.dtype}")
        t = t.long()
        if t.dim() == 0:
            t = t.expand(lead)
        elif tuple(t.shape) == tuple(lead[: t.dim()]):
            t = t.reshape(*t.shape, *([1] * (len(lead) - t.dim()))).expand(lead)
        else:
            raise ValueError(f"task_id has shape {tuple(t.shape)}; expected () or a prefix of the token shape {tuple(lead)}")
        if num_tasks is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_tasks):
            bad = int(t.min()) if int(t.min()) < 0 else int(t.max())
            raise ValueError(f"task_id {bad} out of range: this router has num_tasks={num_tasks} (ids 0..{num_tasks - 1})")
        return t.reshape(-1)

    def select_dispatcher(self, num_tokens: int, routing: Routing) -> Dispatcher:
        """The dispatcher a forward of ``num_tokens`` tokens with this ``routing`` uses: :attr:`dispatcher` if one
        is installed; else :data:`~moeparadigms.core.dispatchers.DENSE` where ``dense_dispatch`` asks for it (never
        with a capacity limit); else :data:`~moeparadigms.core.dispatchers.PERMUTATION` for token-choice routings
        on banks with their own backward; else :data:`~moeparadigms.core.dispatchers.SORTED`."""
        if self.dispatcher is not None:
            return self.dispatcher
        return self._policy(num_tokens, routing, self.experts)

    def _policy(self, T: int, routing: Routing, e: Experts) -> Dispatcher:
        # one call per forward, as before dispatch became a component: at small batches every Python call counts
        if self.dense_dispatch is not False and self.capacity_factor is None and hasattr(e, "forward_dense"):
            if self.dense_dispatch is True or self._dense_pays(T, routing.expert_A.numel(), e):
                return DENSE
        if routing.ids_TK is not None and routing.weights_TK is not None and not e.plain_autograd:
            return PERMUTATION
        return SORTED

    @staticmethod
    def _dense_pays(T: int, assignments: int, e: Experts) -> bool:
        # every expert on every token wastes (T * E - assignments) * (D * H_in + H * D) multiply-adds on unrouted
        # pairs; below DENSE_MACS that is cheaper than the sorted path's fixed cost (sort, gathers, a host sync)
        per_pair = e.d_model * ((2 if e.glu else 1) * e.hidden + e.hidden)  # D * H1 + H * D, as w1 and w2
        return (T * e.num_experts - assignments) * per_pair <= DENSE_MACS

    def _sparse(
        self, x_TD: Tensor, routing: Routing, want_aux: bool = True, want_stats: bool = True
    ) -> tuple[Tensor, dict[str, Tensor], RoutingStats | None]:
        cf = self.capacity_factor
        cap = None if cf is None else dsp.capacity(routing.expert_A.numel(), self.router.num_experts, cf)
        experts = self._modules["experts"]  # one dict lookup, not Module.__getattr__ (this runs per forward)
        dispatcher = self.dispatcher
        if dispatcher is None:
            dispatcher = self._policy(x_TD.shape[0], routing, experts)  # type: ignore[arg-type]
        y_TD, counts, dropped, total = dispatcher(x_TD, routing, experts, cap, want_aux or want_stats)  # type: ignore[arg-type]
        # the counts before any dropping serve the load-balancing loss too
        losses = self.router_losses(routing, counts if cap is None else None) if want_aux else {}
        if not want_stats:
            return y_TD, losses, None
        assert counts is not None
        stats = RoutingStats(
            counts,  # integer tensors: never part of a graph
            counts.new_zeros(()) if dropped is None else dropped,
            torch.scalar_tensor(total, dtype=torch.long),
            self._entropy(routing.probs_TE, routing.weight_A),
            torch.scalar_tensor(x_TD.shape[0], dtype=torch.long),
        )
        return y_TD, losses, stats

    @staticmethod
    def _entropy(probs_TE: Tensor | None, like: Tensor) -> Tensor:
        """Sum over tokens of the router's entropy (nats), detached; 0 for a router without probabilities."""
        if probs_TE is None:
            return like.new_zeros((), dtype=torch.float32)
        return torch.special.entr(probs_TE.detach()).sum()

    def router_losses(self, routing: Routing, counts_E: Tensor | None = None) -> dict[str, Tensor]:
        """The unweighted auxiliary losses a routing supports (``{name: ()}``; weight them with
        :meth:`weighted_aux_loss`). ``counts_E``: the assignments per expert of
        this routing before any dropping, if the caller already counted them."""
        E = self.router.num_experts
        losses: dict[str, Tensor] = {}
        probs = routing.probs_TE
        if probs is not None:
            assigned = None
            if self.balance_across_ranks and self.training and data_parallel_world() > 1:
                counts_E = sum_over_ranks(torch.bincount(routing.expert_A, minlength=E))
            elif counts_E is not None:
                assigned = routing.expert_A.numel()
            losses["load_balance"] = L.switch_load_balance_loss(
                probs, routing.expert_A, E, counts_E=counts_E, assigned=assigned
            )
            if self.coefs["importance"]:
                gates = probs.new_zeros(probs.shape).index_put(
                    (routing.token_A, routing.expert_A), routing.weight_A.to(probs.dtype), accumulate=True
                )
                losses["importance"] = L.importance_loss(gates)
        if routing.logits_TE is not None:
            losses["z_loss"] = L.router_z_loss(routing.logits_TE)
        if routing.load_prob_TE is not None:
            losses["load"] = L.load_loss(routing.load_prob_TE)
        return losses

    def weighted_aux_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """sum of coefficient * loss over the configured auxiliary losses (at least float32)."""
        aux: Tensor | None = None
        for name, value in losses.items():
            c = self.coefs.get(name, 0.0)
            if c:
                aux = value * c if aux is None else torch.add(aux, value, alpha=c)
        if aux is None:
            return next(iter(losses.values())).new_zeros((), dtype=torch.float32) if losses else torch.zeros(())
        return aux if aux.dtype in (torch.float32, torch.float64) else aux.float()

    def _soft(
        self, x_GND: Tensor, r: SoftRouting, want_aux: bool = True, want_stats: bool = True
    ) -> tuple[Tensor, dict[str, Tensor], RoutingStats | None]:
        G, N, D = x_GND.shape
        E, spe = self.num_experts, r.slots_per_expert
        slots_GSD = torch.einsum("gns,gnd->gsd", r.dispatch_GNS.to(x_GND.dtype), x_GND)
        x_AD = slots_GSD.reshape(G, E, spe, D).transpose(0, 1).reshape(E * G * spe, D)
        counts = torch.full((E,), G * spe, dtype=torch.long, device=x_GND.device)
        y_AD = self.experts(x_AD, counts)
        y_GSD = y_AD.reshape(E, G, spe, D).transpose(0, 1).reshape(G, E * spe, D)
        y_GND = torch.einsum("gns,gsd->gnd", r.combine_GNS.to(y_GSD.dtype), y_GSD)
        losses = {"z_loss": L.router_z_loss(r.logits_GNS.reshape(G * N, E * spe))} if want_aux else {}
        stats = None
        if want_stats:
            entropy = torch.special.entr(r.combine_GNS.detach()).sum()
            stats = RoutingStats(counts, counts.new_zeros(()), torch.tensor(E * G * spe), entropy, torch.tensor(G * N))
        return y_GND.reshape(G * N, D), losses, stats

    # ------------------------------------------------------------------ growth
    def add_experts(self, n: int = 1, *, init: Init = "fresh", source: Sequence[int] | None = None) -> Remap:
        """Add ``n`` experts (router rows included): ``"copy"`` of ``source`` experts (default the last),
        ``"mean"`` of all, or ``"fresh"``. Existing experts' outputs are unchanged. Returns the
        parameter remap to pass to :func:`~moeparadigms.core.params.remap_optimizer`."""
        r1 = self.experts.grow(n, init, source)
        r2 = self.router.grow(n, init, source)
        return merge_remaps(r1, r2)

    def prune_experts(self, ids: Sequence[int]) -> Remap:
        """Remove experts ``ids`` (and their router rows); the others keep their order."""
        keep = torch.ones(self.num_experts, dtype=torch.bool)
        for e in ids:
            if not 0 <= int(e) < self.num_experts:
                raise ValueError(f"expert id {e} out of range: {self.num_experts} experts (0..{self.num_experts - 1})")
            keep[int(e)] = False
        return merge_remaps(self.experts.prune(keep), self.router.prune(keep))

    def freeze_experts(self, ids: Sequence[int], *, router: bool = True, frozen: bool = True) -> Remap:
        """Freeze experts ``ids`` (and, with ``router=True``, their router rows, so their logits stop
        drifting). Frozen parameters get no gradient, so no optimizer changes them."""
        r = self.experts.set_frozen(list(ids), frozen)
        if router:
            r = merge_remaps(r, self.router.set_frozen(list(ids), frozen))
        return r

    def unfreeze_experts(self, ids: Sequence[int], *, router: bool = True) -> Remap:
        return self.freeze_experts(ids, router=router, frozen=False)

