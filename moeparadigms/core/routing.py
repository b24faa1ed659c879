"""Routers (gates): decide which experts see which tokens, with which weights.

Every router returns a :class:`~moeparadigms.core.router_base.Routing` (Soft MoE: a
:class:`~moeparadigms.core.router_base.SoftRouting`) and subclasses :class:`~moeparadigms.core.router_base.Router`,
which keeps its expert-indexed parameters in :class:`~moeparadigms.core.params.ExpertParam` so that experts can be
added, pruned and frozen with the router kept consistent (all three are importable from here too, as before).
The aux-loss-free router's per-step bias update (:func:`update_router_biases`) is here as well.

Routers compute in float32 even under autocast (small matmuls, and routing decisions are sensitive).

Shape legend:
    T  tokens   D  model width   E  experts   K  experts per token   C  tokens per expert (expert choice)
    A  assignments   G  groups (sequences) for Soft MoE   N  tokens per group   S  slots (E * slots_per_expert)
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..checks import check_positive
from ._dist import sum_over_ranks
from .experts import Init
from .params import ExpertParam
from .router_base import Router, Routing, SoftRouting, fp32, fresh_rows, no_autocast, softmax_probs_on_read


def _check_top_k(top_k: int, num_experts: int) -> None:
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_finite_logits(logits: Tensor, name: str = "router logits") -> None:
    # one reduction and one host read: a NaN/inf element makes the sum NaN/inf; only then (or if finite logits
    # overflowed the sum) the element-wise test, which is several kernels
    if math.isfinite(float(logits.detach().sum())) or bool(torch.isfinite(logits).all()):
        return
    bad = int((~torch.isfinite(logits)).sum())
    raise FloatingPointError(
        f"{name} contain {bad} non-finite values (NaN/inf): check the layer input for NaN/inf "
        "or lower the learning rate"
    )


def _token_choice(probs_TE: Tensor, top_k: int, renormalize: bool, select_TE: Tensor | None = None) -> Routing:
    """Top-k of ``select_TE`` (default: the probabilities); weights from ``probs_TE``. The Routing's ``token_A``
    is built on first read; logits and probabilities are for the caller to fill in."""
    if select_TE is None:
        weights_TK, ids_TK = torch.topk(probs_TE, top_k, dim=-1)
    else:
        ids_TK = torch.topk(select_TE, top_k, dim=-1).indices
        weights_TK = probs_TE.gather(-1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
    return Routing(None, ids_TK.view(-1), weights_TK.view(-1), None, None, ids_TK=ids_TK, weights_TK=weights_TK)  # type: ignore[arg-type]


class TopKRouter(Router):
    """Token-choice top-k softmax gate (Shazeer et al. 2017), optionally noisy.

    ``logits = x W_g / temperature``; with ``noisy=True`` (training only) the logits get Gaussian noise
    of learned scale ``softplus(x W_noise)`` as in Shazeer's noisy top-k gating, and the routing carries
    the smooth load probabilities for his load loss. Weights are the softmax probabilities of the
    chosen experts, renormalised to sum to one over the k chosen (``renormalize``, default for k > 1;
    with k = 1 renormalising would make every weight 1 and cut the router off from the task gradient).
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        noisy: bool = False,
        temperature: float = 1.0,
        renormalize: bool | None = None,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        _check_top_k(top_k, num_experts)
        _check_temperature(temperature)
        if noisy and top_k >= num_experts:
            raise ValueError(f"noisy=True needs top_k < num_experts (load probabilities), got top_k={top_k}")
        self.top_k, self.noisy, self.temperature = top_k, noisy, temperature
        self.renormalize = (top_k > 1) if renormalize is None else renormalize
        self.gate = ExpertParam(fresh_rows(num_experts, d_model))
        # Shazeer initialises the noise weights to zero: the noise starts at softplus(0) = 0.69
        self.noise = ExpertParam(torch.zeros(num_experts, d_model)) if noisy else None

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, noisy={self.noisy}, temperature={self.temperature}, renormalize={self.renormalize}"

    def _fresh(self, p: ExpertParam, n: int) -> Tensor:
        return torch.zeros(n, self.d_model) if p is self.noise else fresh_rows(n, self.d_model)

    def _scores(self, x_TD: Tensor, task_id_T: Tensor | None) -> Tensor:
        return F.linear(x_TD, self.gate.full().to(x_TD.dtype))

    def forward(self, x_TD: Tensor, *, task_id_T: Tensor | None = None) -> Routing:
        # few ops: at the small batches of RL and meta-learning each costs more than its arithmetic
        with no_autocast(x_TD):
            x = fp32(x_TD)
            clean = self._scores(x, task_id_T)
            if self._checks():
                _check_finite_logits(clean)
            logits, load_prob = clean, None
            if self.noisy and self.training:
                std = F.softplus(F.linear(x, self.noise.full().to(x.dtype))) + 1e-2  # type: ignore[union-attr]
                logits = clean + torch.randn_like(clean) * std
                load_prob = _load_probabilities(clean, logits, std, self.top_k)
            if self.temperature != 1.0:
                logits = logits / self.temperature
            if self.renormalize:
                # softmax over the k chosen logits = the chosen probabilities renormalised (the top-k of the
                # logits are the top-k of the probabilities: softmax keeps the order), in two ops, and the
                # full softmax only if the losses or statistics read probs_TE
                vals_TK, ids_TK = torch.topk(logits, self.top_k, dim=-1)
                w_TK = torch.softmax(vals_TK, dim=-1)
                r = Routing(None, ids_TK.view(-1), w_TK.view(-1), logits, None, load_prob, ids_TK=ids_TK, weights_TK=w_TK)  # type: ignore[arg-type]
                return softmax_probs_on_read(r)
            probs = torch.softmax(logits, dim=-1)
            r = _token_choice(probs, self.top_k, False)
        r.logits_TE, r.probs_TE, r.load_prob_TE = logits, probs, load_prob
        return r


def _load_probabilities(clean_TE: Tensor, noisy_TE: Tensor, std_TE: Tensor, k: int) -> Tensor:
    """P(expert i in top-k of token t) when only i's noise is resampled (Shazeer et al. 2017, eq. 9)."""
    top = torch.topk(noisy_TE, k + 1, dim=-1).values
    kth_in, kth_out = top[:, k : k + 1], top[:, k - 1 : k]  # threshold if i is in / out of the top-k
    is_in = noisy_TE > kth_in
    threshold = torch.where(is_in, kth_in, kth_out)
    normal = torch.distributions.Normal(0.0, 1.0)
    return normal.cdf((clean_TE - threshold) / std_TE)


class SwitchRouter(TopKRouter):
    """Switch Transformer top-1 router (Fedus et al. 2021): weight = router probability of the chosen
    expert (no renormalisation), optional multiplicative input jitter in training."""

    def __init__(self, *, d_model: int, num_experts: int, jitter: float = 0.0, temperature: float = 1.0) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=1, temperature=temperature, renormalize=False)
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        self.jitter = jitter

    def _scores(self, x_TD: Tensor, task_id_T: Tensor | None) -> Tensor:
        if self.jitter and self.training:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        return F.linear(x_TD, self.gate.full().to(x_TD.dtype))


class BiasBalancedRouter(TopKRouter):
    """Auxiliary-loss-free balancing (DeepSeek-V3, Wang et al. 2024).

    Affinities ``s = sigmoid(x W_g)`` (or softmax); experts are *selected* by top-k of ``s + b`` with a
    per-expert bias ``b`` that is never used in the weights; weights are the selected affinities,
    normalised over the k chosen. The bias follows the load once per optimizer step, as in torchtitan: a
    training forward (train mode, autograd on) only adds its assignments per expert to the buffer
    ``tokens_per_expert``; :meth:`update_bias` then applies ``b_i += rate * sign(mean load - load_i)`` over
    the accumulated load (summed over data-parallel ranks) and resets it. So the update sees every
    micro-batch of a step under gradient accumulation, and every rank applies the same one.

    Call :func:`update_router_biases` (every such router in a model) before each optimizer step, or let an
    optimizer do it (:func:`register_bias_update`). Lightning runs of the paradigm modules do it in
    ``ParadigmModule.on_before_optimizer_step``, for automatic and manual optimization alike. Without
    either the bias stays where it is.
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        top_k: int = 2,
        bias_update_rate: float = 1e-3,
        score: Literal["sigmoid", "softmax"] = "sigmoid",
        renormalize: bool = True,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=top_k, renormalize=renormalize)
        if not bias_update_rate >= 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {bias_update_rate!r}")
        if score not in ("sigmoid", "softmax"):
            raise ValueError(f"score={score!r} is not supported; choose 'sigmoid' or 'softmax'")
        self.bias_update_rate, self.score = bias_update_rate, score
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # integer counts: exact however many micro-batches a step accumulates, untouched by .half()/.double()
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.long))

    def _grow_buffers(self, n: int, init: Init, src: list[int]) -> None:
        b = self.expert_bias
        new = b[torch.tensor(src, device=b.device)] if init == "copy" else b.mean().expand(n)
        self.expert_bias = torch.cat([b, new])
        self.tokens_per_expert = torch.cat([self.tokens_per_expert, self.tokens_per_expert.new_zeros(n)])

    def _prune_buffers(self, keep_E: Tensor) -> None:
        self.expert_bias = self.expert_bias[keep_E.to(self.expert_bias.device)]
        self.tokens_per_expert = self.tokens_per_expert[keep_E.to(self.tokens_per_expert.device)]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        # a state dict saved before the counts existed: nothing was pending (the bias was updated in forward)
        bias, counts = prefix + "expert_bias", prefix + "tokens_per_expert"
        if bias in state_dict and counts not in state_dict:
            state_dict[counts] = torch.zeros(state_dict[bias].shape, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Apply the load accumulated since the last update, ``b += rate * sign(mean(load) - load)`` with the load
        summed over data-parallel ranks (every rank must call it: a collective), and reset the counts. No
        forward since the last update: no change."""
        load = sum_over_ranks(self.tokens_per_expert).float()
        if self.bias_update_rate > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        self.tokens_per_expert.zero_()

    def forward(self, x_TD: Tensor, *, task_id_T: Tensor | None = None) -> Routing:
        with no_autocast(x_TD):
            logits = self._scores(fp32(x_TD), task_id_T)
            if self._checks():
                _check_finite_logits(logits)
            scores = torch.sigmoid(logits) if self.score == "sigmoid" else torch.softmax(logits, -1)
            r = _token_choice(scores, self.top_k, self.renormalize, select_TE=scores.detach() + self.expert_bias)
            if self.training and self.bias_update_rate > 0 and torch.is_grad_enabled():
                with torch.no_grad():  # the load, for update_bias (a scatter-add: no host sync on CUDA)
                    self.tokens_per_expert.index_add_(0, r.expert_A, torch.ones_like(r.expert_A))
            probs = scores / scores.sum(-1, keepdim=True)
        r.logits_TE, r.probs_TE = logits, probs
        return r


class TaskConditionedRouter(TopKRouter):
    """Top-k router whose scores depend on a task id (multi-task and task-incremental learning).

    ``conditioning``:
      * ``"concat"``: logits = W [x; e(task)] = W_x x + W_t e(task) (a learned task embedding enters the gate);
      * ``"gate"``: one gate matrix per task, logits = W_task x (MMoE-style per-task gating);
      * ``"task_only"``: logits = W_t e(task), routing by task alone (Task-MoE, Kudugunta et al. 2021).
    ``task_id_T`` is required: a LongTensor with one id per token, each in [0, num_tasks).
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        num_tasks: int,
        top_k: int = 2,
        conditioning: Literal["concat", "gate", "task_only"] = "concat",
        task_dim: int = 16,
        temperature: float = 1.0,
        renormalize: bool | None = None,
        noisy: bool = False,
    ) -> None:
        super().__init__(
            d_model=d_model, num_experts=num_experts, top_k=top_k, noisy=noisy, temperature=temperature,
            renormalize=renormalize,
        )
        check_positive(num_tasks=num_tasks, task_dim=task_dim)
        if conditioning not in ("concat", "gate", "task_only"):
            raise ValueError(f"conditioning={conditioning!r} is not supported; choose one of ['concat', 'gate', 'task_only']")
        self.num_tasks, self.conditioning, self.task_dim = num_tasks, conditioning, task_dim
        if conditioning == "gate":
            self.gate = ExpertParam(fresh_rows(num_experts * num_tasks, d_model).reshape(num_experts, num_tasks, d_model))
        if conditioning != "gate":
            self.task_embedding = nn.Embedding(num_tasks, task_dim)
            self.task_gate = ExpertParam(fresh_rows(num_experts, task_dim))
        if conditioning == "task_only":
            self.gate = None  # routing ignores the token: no token gate to train (DDP would flag it unused)

    def _fresh(self, p: ExpertParam, n: int) -> Tensor:
        if p is self.gate and self.conditioning == "gate":
            return fresh_rows(n * self.num_tasks, self.d_model).reshape(n, self.num_tasks, self.d_model)
        if getattr(self, "task_gate", None) is p:
            return fresh_rows(n, self.task_dim)
        return super()._fresh(p, n)

    def _scores(self, x_TD: Tensor, task_id_T: Tensor | None) -> Tensor:
        if task_id_T is None:
            raise ValueError("TaskConditionedRouter needs task_id (one id per token); got task_id=None")
        if self.conditioning == "gate":
            W = self.gate.full().to(x_TD.dtype)  # (E, tasks, D)
            all_TEt = F.linear(x_TD, W.reshape(-1, self.d_model)).reshape(-1, self.num_experts, self.num_tasks)
            idx = task_id_T.view(-1, 1, 1).expand(-1, self.num_experts, 1)
            return all_TEt.gather(-1, idx).squeeze(-1)
        task_TE = F.linear(self.task_embedding(task_id_T).to(x_TD.dtype), self.task_gate.full().to(x_TD.dtype))
        if self.conditioning == "task_only":
            return task_TE
        return F.linear(x_TD, self.gate.full().to(x_TD.dtype)) + task_TE


class ExpertChoiceRouter(Router):
    """Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

    ``S = softmax(x W_g)`` over experts (T, E); expert e takes the C tokens with the largest ``S[:, e]``
    and weights them by those scores, with ``C = ceil(capacity_factor * T / E)`` (capacity_factor plays
    the role of the average number of experts per token). Perfect load balance by construction; a token
    may be picked by several experts or by none. Depends on the whole batch (not causal).
    """

    batch_dependent = True

    def __init__(self, *, d_model: int, num_experts: int, capacity_factor: float = 2.0, temperature: float = 1.0) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor!r}")
        _check_temperature(temperature)
        self.capacity_factor, self.temperature = capacity_factor, temperature
        self.gate = ExpertParam(fresh_rows(num_experts, d_model))

    def forward(self, x_TD: Tensor, *, task_id_T: Tensor | None = None) -> Routing:
        with no_autocast(x_TD):
            T = x_TD.shape[0]
            x = fp32(x_TD)
            logits = F.linear(x, self.gate.full().to(x.dtype)) / self.temperature
            if self._checks():
                _check_finite_logits(logits)
            probs = torch.softmax(logits, dim=-1)
            C = min(T, max(1, math.ceil(self.capacity_factor * T / self.num_experts)))
            weights_EC, tokens_EC = torch.topk(probs.t(), C, dim=-1)
            expert_A = torch.arange(self.num_experts, device=x_TD.device).repeat_interleave(C)
        return Routing(tokens_EC.reshape(-1), expert_A, weights_EC.reshape(-1), logits, probs, presorted=True)


class HashRouter(Router):
    """Hash routing (Roller et al. 2021) for continuous inputs: a fixed random projection chooses the
    expert (``argmax_e x R_e``, locality-sensitive: similar tokens share an expert). Nothing is learned;
    weights are ``1/top_k``. The projection comes from ``seed`` so it is the same in every process.
    """

    def __init__(self, *, d_model: int, num_experts: int, top_k: int = 1, seed: int = 0) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        _check_top_k(top_k, num_experts)
        self.top_k, self.seed = top_k, seed
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(num_experts, d_model, generator=g))

    def _grow_buffers(self, n: int, init: Init, src: list[int]) -> None:
        g = torch.Generator().manual_seed(self.seed + self.num_experts)
        new = torch.randn(n, self.d_model, generator=g).to(self.projection)
        self.projection = torch.cat([self.projection, new])

    def _prune_buffers(self, keep_E: Tensor) -> None:
        self.projection = self.projection[keep_E.to(self.projection.device)]

    def forward(self, x_TD: Tensor, *, task_id_T: Tensor | None = None) -> Routing:
        with torch.no_grad(), no_autocast(x_TD):
            x = fp32(x_TD)
            scores = F.linear(x, self.projection.to(x.dtype))
            if self._checks():
                _check_finite_logits(scores, "hash router scores")
            ids_TK = torch.topk(scores, self.top_k, dim=-1).indices
        T = x_TD.shape[0]
        weight_A = torch.full((T * self.top_k,), 1.0 / self.top_k, device=x_TD.device)
        return Routing(
            None, ids_TK.reshape(-1), weight_A, None, None, ids_TK=ids_TK, weights_TK=weight_A.view(T, self.top_k)  # type: ignore[arg-type]
        )


class SoftMoERouter(Router):
    """Soft MoE (Puigcerver et al. 2023): every expert processes ``slots_per_expert`` slots, each a
    convex combination of the tokens of a group; every token's output is a convex combination of all slot
    outputs. Nothing is dropped and routing is fully differentiable.

    ``logits = x Phi`` (G, N, S); dispatch = softmax over tokens N, combine = softmax over slots S.
    Tokens mix *within a group*: the layer passes groups ``(G, N, D)`` (every leading dim but the
    sequence dim is a group); a 2-D input is one group. With ``normalize=True``, x and Phi are
    l2-normalised and Phi scaled by a learned scalar (the paper's recipe for large widths).
    """

    batch_dependent = True

    def __init__(self, *, d_model: int, num_experts: int, slots_per_expert: int = 1, normalize: bool = False) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_positive(slots_per_expert=slots_per_expert)
        self.slots_per_expert, self.normalize = slots_per_expert, normalize
        self.phi = ExpertParam(fresh_rows(num_experts * slots_per_expert, d_model).reshape(num_experts, slots_per_expert, d_model))
        self.scale = nn.Parameter(torch.ones(())) if normalize else None

    def _fresh(self, p: ExpertParam, n: int) -> Tensor:
        return fresh_rows(n * self.slots_per_expert, self.d_model).reshape(n, self.slots_per_expert, self.d_model)

    def forward(self, x_GND: Tensor, *, task_id_T: Tensor | None = None) -> SoftRouting:  # type: ignore[override]
        with no_autocast(x_GND):
            x = fp32(x_GND)
            phi_SD = self.phi.full().reshape(-1, self.d_model).to(x.dtype)
            if self.normalize:
                x = F.normalize(x, dim=-1)
                phi_SD = self.scale * F.normalize(phi_SD, dim=-1)
            logits = torch.einsum("gnd,sd->gns", x, phi_SD)
            if self._checks():
                _check_finite_logits(logits)
            dispatch = torch.softmax(logits, dim=1)
            combine = torch.softmax(logits, dim=2)
        return SoftRouting(dispatch, combine, logits, self.slots_per_expert)


def update_router_biases(model: nn.Module) -> int:
    """Apply and reset the accumulated load of every :class:`BiasBalancedRouter` in ``model``
    (:meth:`BiasBalancedRouter.update_bias`); call it once per optimizer step, before or after ``step()``.
    Returns how many routers it updated."""
    routers = [m for m in model.modules() if isinstance(m, BiasBalancedRouter)]
    for r in routers:
        r.update_bias()
    return len(routers)


def register_bias_update(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Make every ``optimizer.step()`` first call :func:`update_router_biases` on ``model`` (an optimizer step
    pre-hook, torchtitan's way); returns the hook's handle (``.remove()`` undoes it)."""

    def hook(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:  # None: step's arguments unchanged
        update_router_biases(model)

    return optimizer.register_step_pre_hook(hook)


__all__ = [
    "Routing", "SoftRouting", "Router", "TopKRouter", "SwitchRouter", "BiasBalancedRouter", "TaskConditionedRouter",
    "ExpertChoiceRouter", "HashRouter", "SoftMoERouter", "update_router_biases", "register_bias_update",
]
