"""The CPU expert kernel: every expert's feed-forward ``act(x W1 + b1) W2 + b2`` on expert-sorted rows, forward
and backward, as one autograd node over the C++ extension (:mod:`moeparadigms.core._kernels`): whole experts
as tasks across threads where it is built, a grouped GEMM per layer of the FFN otherwise.

Each GEMM (forward, input gradient, weight gradient) writes straight into slices of preallocated buffers, so no
per-expert weight gradient is ever zero-filled at full size (the cost that makes a naive ``W[e]`` loop 10x slower
on CPU). The expert banks in :mod:`moeparadigms.core.experts` call :class:`GroupedFFN`.

Shape legend:
    A  assignments (rows), sorted by expert   D  model width   H  expert hidden width   E  experts
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _kernels
from ._kernels import grouped_mm_out
from .dispatch import unpermute_grad

ACT_FORWARD: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
ACT_BACKWARD: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gelu": lambda g, h: torch.ops.aten.gelu_backward(g, h),
    "gelu_tanh": lambda g, h: torch.ops.aten.gelu_backward(g, h, approximate="tanh"),
    "relu": lambda g, h: torch.ops.aten.threshold_backward(g, h, 0),
    "silu": lambda g, h: torch.ops.aten.silu_backward(g, h),
}


# ---------------------------------------------------------------------------------------------------
# The per-expert GEMM loop as one autograd node
# ---------------------------------------------------------------------------------------------------
_ACT_CODE = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}  # the extension's activation codes

#: False: the per-GEMM grouped path even where the fused per-expert kernel is available (side-by-side
#: benchmarks, tests of both paths)
FUSED = True


def expert_rows(layout: Sequence[int], num_experts: int) -> list[tuple[int, int]]:
    """(block index, row in block) for each expert, from the block sizes."""
    out = []
    for b, size in enumerate(layout):
        out += [(b, r) for r in range(size)]
    assert len(out) == num_experts
    return out


def act_fwd(h: Tensor, act: str, glu: bool) -> Tensor:
    if not glu:
        return ACT_FORWARD[act](h)
    gate, up = h.chunk(2, dim=-1)
    return ACT_FORWARD[act](gate) * up


def act_bwd(da: Tensor, h: Tensor, act: str, glu: bool) -> Tensor:
    """Gradient wrt the pre-activation ``h``; may overwrite ``da`` (it is dead afterwards)."""
    if not glu:
        if act == "relu":
            return da.masked_fill_(h <= 0, 0.0)
        if act in ("gelu", "gelu_tanh"):
            approx = "tanh" if act == "gelu_tanh" else "none"
            return torch.ops.aten.gelu_backward.grad_input(da, h, approximate=approx, grad_input=da)
        return ACT_BACKWARD[act](da, h)
    gate, up = h.chunk(2, dim=-1)
    dh = torch.empty_like(h)
    d_gate, d_up = dh.chunk(2, dim=-1)
    torch.mul(da, ACT_FORWARD[act](gate), out=d_up)
    torch.mul(da, up, out=d_gate)
    d_gate.copy_(ACT_BACKWARD[act](d_gate, gate))
    return dh


class GroupedFFN(torch.autograd.Function):
    """y_a = act(x_a @ W1[e] + b1[e]) @ W2[e] + b2[e] for rows a of expert e (GLU: act(gate) * up).

    With the extension (CPU): one C++ call for the forward and one for the backward, each running whole
    experts as tasks across the intra-op threads (``ffn_forward``/``ffn_backward`` in
    :mod:`~moeparadigms.core._kernels`). Every per-expert intermediate (the expert's gathered input rows, its
    activation, the activation's gradient) is a temporary of that expert's rows used while it is in cache:
    only the pre-activation ``h`` (A, H1) is saved (and nothing under ``no_grad``), and the backward's
    full-size buffers are the weight gradients and the sorted input gradient.

    Otherwise (no extension, other devices, or ``FUSED = False``): the layer-at-a-time path, one
    :func:`~moeparadigms.core._kernels.grouped_mm_out` call per GEMM over per-expert views built in Python,
    with full-size ``h``, activation and activation-gradient buffers. With ``perm`` the rows are gathered
    from the token-order input inside the function (and again in the backward) instead of keeping the
    (K times larger) sorted copy alive. Both paths write each expert's weight gradient exactly once
    (experts without rows get zeros), into gradients returned to autograd as usual.
    """

    @staticmethod
    def forward(ctx, x, perm, bounds, rows, act, glu, nb, *params):  # type: ignore[override]
        ext = _kernels.extension() if FUSED and x.device.type == "cpu" else None
        if ext is not None:
            keep = any(ctx.needs_input_grad)  # under no_grad nothing is kept: h lives per expert only
            A = bounds[-1][1] if bounds else 0
            h = x.new_empty((A, params[0].shape[-1]) if keep else (0,))
            y = x.new_empty(A, params[nb].shape[-1])
            starts, ends = [s for s, _ in bounds], [t for _, t in bounds]
            b = list(params[2 * nb :])
            ext.ffn_forward(x, _index(perm, x), starts, ends, [r[0] for r in rows], [r[1] for r in rows],
                            list(params[:nb]), list(params[nb : 2 * nb]), b[:nb], b[nb:], _ACT_CODE[act], glu, h, y,
                            torch.is_inference_mode_enabled())
        else:
            h, y = _grouped_forward(x, perm, bounds, rows, act, glu, nb, params)
        ctx.save_for_backward(x, h, *params)
        ctx.meta = (perm, bounds, rows, act, glu, nb, ext)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        # grad mode is on inside a backward only under create_graph=True (double backward, second-order
        # MAML, torch.func hessians): this kernel's gradients are not differentiable, so refuse instead of
        # silently returning first-order terms
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the grouped expert kernel (backend='loop', or 'auto' on CPU) is differentiable once only; "
                "a second derivative (create_graph=True, e.g. second-order MAML) needs the experts built with "
                "backend='autograd' (or the layer built with dense_dispatch=True)"
            )
        return GroupedFFN._backward(ctx, dy)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def _backward(ctx, dy):
        perm, bounds, rows, act, glu, nb, ext = ctx.meta
        x, h, *params = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_p = needs[7:]
        if ext is not None:
            return _fused_backward(ext, x, h, params, dy.contiguous(), needs, perm, bounds, rows, act, glu, nb)
        w1, w2 = params[:nb], params[nb : 2 * nb]
        has_bias = len(params) > 2 * nb
        dy = dy.contiguous()
        live = [(e, s, t) for e, (s, t) in enumerate(bounds) if t > s]
        counts = torch.tensor([t - s for s, t in bounds])
        g: list[Tensor | None] = [None] * len(params)

        def weight_grads(offset: int, lhs: Tensor, rhs: Tensor) -> None:
            # dW[e] = lhs[s:t]^T @ rhs[s:t] for the blocks that need it; experts without rows get zeros
            for bi in range(nb):
                if not need_p[offset + bi]:
                    continue
                p = params[offset + bi]
                g[offset + bi] = grad = torch.empty_like(p)
                start = sum(params[offset + j].shape[0] for j in range(bi))
                mine = [(e, s, t) for e, s, t in live if rows[e][0] == bi]
                grouped_mm_out([lhs[s:t].t() for _, s, t in mine], [rhs[s:t] for _, s, t in mine],
                               [grad[rows[e][1]] for e, _, _ in mine])
                empty = counts[start : start + p.shape[0]] == 0
                if empty.any():
                    grad[empty] = 0

        def bias_grads(offset: int, rhs: Tensor) -> None:
            if not has_bias or not any(need_p[offset : offset + nb]):
                return
            per_expert = torch.segment_reduce(rhs, "sum", lengths=counts.to(rhs.device), axis=0)
            start = 0
            for bi in range(nb):
                n = params[offset + bi].shape[0]
                if need_p[offset + bi]:
                    g[offset + bi] = per_expert[start : start + n].clone()
                start += n

        if any(need_p[nb : 2 * nb]):
            weight_grads(nb, act_fwd(h, act, glu), dy)  # the activation, recomputed, dies right after
        bias_grads(3 * nb, dy)
        dx = None
        need_dh = needs[0] or any(need_p[:nb]) or (has_bias and any(need_p[2 * nb : 3 * nb]))
        if need_dh:
            W2t = [w2[rows[e][0]][rows[e][1]].t() for e, _, _ in live]
            da = dy.new_empty(h.shape[0], w2[0].shape[1])
            grouped_mm_out([dy[s:t] for _, s, t in live], W2t, [da[s:t] for _, s, t in live])
            dh = act_bwd(da, h, act, glu)
            del da
            xs = x if perm is None else x.index_select(0, perm.token_A)
            weight_grads(0, xs, dh)
            del xs
            bias_grads(2 * nb, dh)
            if needs[0]:
                dxs = dh.new_empty(dh.shape[0], x.shape[-1])
                W1t = [w1[rows[e][0]][rows[e][1]].t() for e, _, _ in live]
                grouped_mm_out([dh[s:t] for _, s, t in live], W1t, [dxs[s:t] for _, s, t in live])
                dx = dxs if perm is None else unpermute_grad(dxs, perm)
        return (dx, None, None, None, None, None, None, *g)


def _index(perm, x: Tensor) -> Tensor:
    return x.new_empty(0, dtype=torch.long) if perm is None else perm.token_A


def _grouped_forward(x, perm, bounds, rows, act, glu, nb, params):
    """One grouped GEMM call per layer of the FFN over Python-built per-expert views (the path without
    the extension, where ``grouped_mm_out`` is a loop of ``torch.mm``)."""
    w1, w2 = params[:nb], params[nb : 2 * nb]
    b1, b2 = (params[2 * nb : 3 * nb], params[3 * nb :]) if len(params) > 2 * nb else (None, None)
    xs = x if perm is None else x.index_select(0, perm.token_A)
    live = [(e, s, t) for e, (s, t) in enumerate(bounds) if t > s]
    W1 = [w1[rows[e][0]][rows[e][1]] for e, _, _ in live]
    W2 = [w2[rows[e][0]][rows[e][1]] for e, _, _ in live]
    h = xs.new_empty(xs.shape[0], w1[0].shape[-1])
    grouped_mm_out([xs[s:t] for _, s, t in live], W1, [h[s:t] for _, s, t in live],
                   bias=None if b1 is None else [b1[rows[e][0]][rows[e][1]] for e, _, _ in live])
    a = act_fwd(h, act, glu)
    y = xs.new_empty(xs.shape[0], w2[0].shape[-1])
    grouped_mm_out([a[s:t] for _, s, t in live], W2, [y[s:t] for _, s, t in live],
                   bias=None if b2 is None else [b2[rows[e][0]][rows[e][1]] for e, _, _ in live])
    return h, y


def _fused_backward(ext, x, h, params, dy, needs, perm, bounds, rows, act, glu, nb):
    need_p = needs[7:]
    has_bias = len(params) > 2 * nb
    g: list[Tensor | None] = [p.new_empty(p.shape) if need else None for p, need in zip(params, need_p, strict=True)]
    none = x.new_empty(0)

    def grads(k: int) -> list[Tensor]:  # the k-th parameter group's gradient per block (placeholders where not needed)
        return [none if t is None else t for t in g[k * nb : (k + 1) * nb]] if k < 2 or has_bias else []

    def flags(k: int) -> list[bool]:
        return list(need_p[k * nb : (k + 1) * nb]) if k < 2 or has_bias else [False] * nb

    A = h.shape[0]
    dxs = x.new_empty(A, x.shape[-1]) if needs[0] else none
    ext.ffn_backward(x, _index(perm, x), [s for s, _ in bounds], [t for _, t in bounds], [r[0] for r in rows],
                     [r[1] for r in rows], list(params[:nb]), list(params[nb : 2 * nb]), _ACT_CODE[act], glu, h, dy,
                     dxs, grads(0), grads(1), grads(2), grads(3), flags(0), flags(1), flags(2), flags(3),
                     torch.is_inference_mode_enabled())
    dx = None
    if needs[0]:
        dx = dxs if perm is None else unpermute_grad(dxs, perm)
    return (dx, None, None, None, None, None, None, *g)


def expert_bounds(counts_E: Tensor) -> list[tuple[int, int]]:
    ends = torch.cumsum(counts_E, 0).tolist()
    starts = [0] + ends[:-1]
    return list(zip(starts, ends, strict=True))

