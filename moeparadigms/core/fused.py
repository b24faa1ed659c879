"""A training step of a small top-k MoE as one autograd node, with the backward written out (CPU, issue 15).

At the batch sizes of RL updates and few-shot episodes (tens to hundreds of tokens) the layer's cost is its
op count and, on the dense path, arithmetic on (token, expert) pairs no token was routed to. This computes
router logits -> top-k -> softmax over the k chosen (the renormalised weights) -> each expert on its own
tokens only -> gate-weighted combine, plus the load-balancing loss and the z-loss, in one
``torch.autograd.Function`` whose backward is the hand-derived gradient of the same function: one graph node
instead of ~40, and half the expert arithmetic of the dense path at top-2 of 4. The numbers are those of the
layer's other paths up to float rounding (``tests/core/test_fused.py`` checks outputs, losses and every
gradient, router included, against the per-token reference).

Scope (:func:`supports`): ``TopKRouter`` without noise (renormalised weights or not), ``MLPExperts`` without biases
on the ``auto`` backend, dropless dispatch, float32 on CPU, autograd on, leaf parameters (weights produced by a
graph, as ``torch.func.functional_call`` fast weights in MAML are, take the plain-autograd dense path, which
can be differentiated again), no importance loss, no cross-rank balancing, no forward hooks on the router (the
step computes the routing itself: a hook that rewrites it, as ``lifecycle.expert_dropout`` does, takes the plain
path). The layer uses it where its
``dense_dispatch="auto"`` rule would pick the dense path. Its gradients are not differentiable: a
``create_graph=True`` backward through it raises (build the layer with ``dense_dispatch=True`` for that).

Shape legend: T tokens, D model width, H expert hidden width, E experts, K experts per token,
A = T*K assignments (sorted by expert).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dist import data_parallel_world
from .experts import MLPExperts
from .routing import TopKRouter

#: from this many tokens each expert runs on its own tokens only (half the arithmetic at top-2 of 4, a few more
#: ops); below, every expert on every token. A side-by-side timing of the two (one thread, fwd+bwd, D = 64, top-2
#: and top-1 of 4) put the crossover between 64 and 128 tokens; at 256 the sorted variant was 15-20 % faster
SORTED_FROM = 128

_ACT = {
    "gelu": (F.gelu, lambda g, h: torch.ops.aten.gelu_backward(g, h)),
    "gelu_tanh": (lambda h: F.gelu(h, approximate="tanh"), lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh")),
    "relu": (F.relu, lambda g, h: torch.ops.aten.threshold_backward(g, h, 0)),
    "silu": (F.silu, lambda g, h: torch.ops.aten.silu_backward(g, h)),
}


def supports(moe: Any, x_TD: Tensor) -> bool:
    """Whether :func:`topk_moe` computes this layer's training forward (see the module docstring)."""
    router, experts = moe.router, moe.experts
    return (
        type(router) is TopKRouter
        and not router.noisy
        # the step never calls the router module: a hook on it (lifecycle.expert_dropout) needs the plain path
        and not (router._forward_hooks or router._forward_pre_hooks)
        and type(experts) is MLPExperts
        and experts.backend == "auto"
        and not experts.bias
        and experts.activation in _ACT
        and moe.dense_dispatch == "auto"
        and moe.capacity_factor is None
        and not moe.coefs["importance"]
        and x_TD.device.type == "cpu"
        and x_TD.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and torch.is_grad_enabled()
        and all(p.is_leaf and p.dtype == torch.float32 for p in moe.parameters())
        and not (moe.balance_across_ranks and moe.training and data_parallel_world() > 1)
    )


def topk_moe(moe: Any, x_TD: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
    """The layer's training forward for a supported ``moe``: ``(y [T, D], {"load_balance": (), "z_loss": ()},
    tokens_per_expert [E] (long), router entropy summed over tokens ())``; the losses unweighted."""
    router, experts = moe.router, moe.experts
    y, lb, z, counts, entropy = _TopKMoE.apply(
        x_TD, router.gate.full(), experts.w1.full(), experts.w2.full(), router.top_k, router.temperature,
        experts.activation, moe.check_finite, x_TD.shape[0] >= SORTED_FROM, router.renormalize,
    )
    return y, {"load_balance": lb, "z_loss": z}, counts, entropy


def _check_finite(logits: Tensor) -> None:
    if math.isfinite(float(logits.sum())) or bool(torch.isfinite(logits).all()):
        return
    bad = int((~torch.isfinite(logits)).sum())
    raise FloatingPointError(f"router logits contain {bad} non-finite values (NaN/inf): check the layer input for "
                             "NaN/inf or lower the learning rate")


# ---------------------------------------------------------------------------------------------------
# The experts, two ways: every expert on every token (few ops; for the smallest batches) or each expert on its
# own tokens (half the arithmetic at top-2 of 4; for the larger ones). Each returns y and what its backward needs.
# ---------------------------------------------------------------------------------------------------
def _experts_all(x, w1, w2, ids_TK, w_TK, act):
    """``y = [g_t1 a_t1 | ... | g_tE a_tE] @ [W2_1; ...; W2_E]`` with ``a_te = act(x_t W1_e)``."""
    T, D = x.shape
    E, _, H = w1.shape
    G = x.new_zeros(T, E).scatter_(1, ids_TK, w_TK)  # the dense gate matrix (top-k ids are distinct)
    W1 = w1.transpose(0, 1).reshape(D, E * H)  # the experts' first weights side by side
    h = torch.mm(x, W1)
    a = _ACT[act][0](h)
    ga = (a.view(T, E, H) * G.unsqueeze(-1)).view(T, E * H)
    return torch.mm(ga, w2.reshape(E * H, D)), (G, W1, h, a, ga)


def _experts_all_backward(dy, x, w1, w2, ids_TK, saved, act):
    G, W1, h, a, ga = saved
    T, D = x.shape
    E, _, H = w1.shape
    dga = torch.mm(dy, w2.reshape(E * H, D).t()).view(T, E, H)
    dw2 = torch.mm(ga.t(), dy).view(E, H, D)
    dw_TK = (dga * a.view(T, E, H)).sum(-1).gather(1, ids_TK)
    dh = _ACT[act][1](dga.mul_(G.unsqueeze(-1)).view(T, E * H), h)
    dw1 = torch.mm(x.t(), dh).view(D, E, H).transpose(0, 1).contiguous()
    return torch.mm(dh, W1.t()), dw1, dw2, dw_TK


def _experts_sorted(x, w1, w2, ids_TK, w_TK, act, counts):
    """Each expert on its own tokens: the T*K assignments sorted by expert (stable), one GEMM pair per expert."""
    k = ids_TK.shape[1]
    order = torch.argsort(ids_TK.reshape(-1), stable=True)
    tok_A = torch.div(order, k, rounding_mode="floor")
    sizes = counts.tolist()
    x_A = x.index_select(0, tok_A)
    h_A = x_A.new_empty(x_A.shape[0], w1.shape[-1])
    u_A = x_A.new_empty(x_A.shape[0], x.shape[1])
    # one view per expert in one op each (split, unbind): at these sizes every op's call costs more than its math
    for xe, he, w in zip(x_A.split(sizes), h_A.split(sizes), w1.unbind(0)):
        torch.mm(xe, w, out=he)
    a_A = _ACT[act][0](h_A)
    for ae, ue, w in zip(a_A.split(sizes), u_A.split(sizes), w2.unbind(0)):
        torch.mm(ae, w, out=ue)
    w_A = w_TK.reshape(-1).index_select(0, order).unsqueeze(1)
    y = x.new_zeros(x.shape).index_add_(0, tok_A, u_A * w_A)
    return y, (order, tok_A, sizes, x_A, h_A, a_A, u_A, w_A)


def _experts_sorted_backward(dy, x, w1, w2, ids_TK, saved, act):
    order, tok_A, sizes, x_A, h_A, a_A, u_A, w_A = saved
    dy_A = dy.index_select(0, tok_A)
    dw_A = (dy_A * u_A).sum(-1)
    du_A = dy_A.mul_(w_A)
    dw1, dw2 = torch.empty_like(w1), torch.empty_like(w2)  # an expert with no tokens: mm over 0 rows gives zeros
    da_A, dx_A = torch.empty_like(a_A), torch.empty_like(x_A)
    for ae, due, dae, w, dw in zip(a_A.split(sizes), du_A.split(sizes), da_A.split(sizes), w2.unbind(0), dw2.unbind(0)):
        torch.mm(ae.t(), due, out=dw)
        torch.mm(due, w.t(), out=dae)
    dh_A = _ACT[act][1](da_A, h_A)
    for xe, dhe, dxe, w, dw in zip(x_A.split(sizes), dh_A.split(sizes), dx_A.split(sizes), w1.unbind(0), dw1.unbind(0)):
        torch.mm(xe.t(), dhe, out=dw)
        torch.mm(dhe, w.t(), out=dxe)
    dx = torch.zeros_like(x).index_add_(0, tok_A, dx_A)
    return dx, dw1, dw2, torch.empty_like(dw_A).index_copy_(0, order, dw_A).view(ids_TK.shape)


class _TopKMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, w1, w2, k, temperature, act, check, sorted_experts, renormalize):  # type: ignore[override]
        T, E = x.shape[0], gate.shape[0]
        clean = torch.mm(x, gate.t())
        if check:
            _check_finite(clean)
        logits = clean if temperature == 1.0 else clean / temperature
        probs = torch.softmax(logits, dim=-1)
        if renormalize:  # the softmax over the k chosen logits, as TopKRouter computes it
            vals_TK, ids_TK = torch.topk(logits, k, dim=-1)
            w_TK = torch.softmax(vals_TK, dim=-1)
        else:  # the chosen probabilities themselves (top-k of the probabilities, as the router takes them)
            w_TK, ids_TK = torch.topk(probs, k, dim=-1)
        lse_T = torch.logsumexp(logits, dim=-1)
        counts = torch.bincount(ids_TK.reshape(-1), minlength=E)
        if sorted_experts:
            y, saved = _experts_sorted(x, w1, w2, ids_TK, w_TK, act, counts)
        else:
            y, saved = _experts_all(x, w1, w2, ids_TK, w_TK, act)
        scale = E / (max(T, 1) * max(T * k, 1))
        lb = torch.dot(counts.to(probs.dtype), probs.sum(0)) * scale  # as losses.switch_load_balance_loss
        z = torch.dot(lse_T, lse_T) / max(T, 1)  # as losses.router_z_loss
        entropy = torch.special.entr(probs).sum()
        ctx.save_for_backward(x, gate, w1, w2, ids_TK, w_TK, probs, lse_T, counts)
        ctx.saved = saved  # non-differentiable intermediates (and python ints): no version checks needed
        ctx.meta = (temperature, act, scale, sorted_experts, renormalize)
        ctx.mark_non_differentiable(counts, entropy)
        return y, lb, z, counts, entropy

    @staticmethod
    def backward(ctx, dy, dlb, dz, _dcounts, _dentropy):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the fused small-batch MoE step's gradient is not differentiable: a second derivative "
                "(create_graph=True) needs the layer built with dense_dispatch=True"
            )
        x, gate, w1, w2, ids_TK, w_TK, probs, lse_T, counts = ctx.saved_tensors
        temperature, act, scale, sorted_experts, renormalize = ctx.meta
        T = x.shape[0]
        bwd = _experts_sorted_backward if sorted_experts else _experts_all_backward
        dx, dw1, dw2, dw_TK = bwd(dy.contiguous(), x, w1, w2, ids_TK, ctx.saved, act)
        ctx.saved = None
        # the losses through the full softmax: lb = scale * counts . sum_t probs; z = mean_t lse_t^2, dlse/dlogits = probs
        c_E = (dlb * scale) * counts.to(probs.dtype)
        z_T1 = (dz * 2.0 / max(T, 1)) * lse_T.unsqueeze(1)
        if renormalize:  # the weights: softmax over the k chosen logits
            dvals = w_TK * (dw_TK - (w_TK * dw_TK).sum(-1, keepdim=True))
            dlogits = torch.zeros_like(probs).scatter_(1, ids_TK, dvals)
            dlogits += probs * (c_E - (probs @ c_E).unsqueeze(1) + z_T1)
        else:  # the weights are probabilities too: one softmax backward for both
            dprobs = torch.zeros_like(probs).scatter_(1, ids_TK, dw_TK) + c_E
            dlogits = probs * (dprobs - (probs * dprobs).sum(-1, keepdim=True) + z_T1)
        if temperature != 1.0:
            dlogits /= temperature
        dx.addmm_(dlogits, gate)
        dgate = torch.mm(dlogits.t(), x)
        return dx, dgate, dw1, dw2, None, None, None, None, None, None


__all__ = ["supports", "topk_moe"]
