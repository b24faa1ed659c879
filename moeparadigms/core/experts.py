"""Expert banks: many feed-forward experts evaluated on an expert-sorted token layout.

Every bank maps ``x_AD`` (assignments sorted by expert, ``counts_E`` rows per expert) to ``y_AD``.

* :class:`MLPExperts` / :class:`GLUExperts` keep stacked weights ``(E, D, H)`` (as row blocks, see
  :mod:`moeparadigms.core.params`) and compute every expert in one pass: on CUDA with bf16/fp16 through
  ``torch.nn.functional.grouped_mm`` (one fused grouped GEMM), elsewhere through
  :class:`~moeparadigms.core.grouped_ffn.GroupedFFN`, one autograd node whose C++ kernel runs each expert's
  whole feed-forward (forward, and backward) as one task across threads, writing into preallocated buffers.
* :class:`ModuleExperts` holds any ``nn.Module`` per expert (conv experts, user-defined ones).
* :class:`FFN` is the dense MLP/GLU block (shared experts, dense baselines).

Shape legend:
    A  assignments (rows), sorted by expert   D  model width   H  expert hidden width   E  experts
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from .dispatch import TopKPermutation, permute_topk
from .grouped_ffn import ACT_FORWARD, GroupedFFN, expert_bounds, expert_rows
from .grouped_ffn import act_fwd as _act_fwd  # the name forward_dense and FFN use
from .params import ExpertParam, Remap, merge_remaps

# devices on which backend="auto" takes F.grouped_mm for half-precision rows (on CPU the fused C++ kernel is faster)
GROUPED_MM_DEVICES = ("cuda",)


Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]
Init = Literal["copy", "mean", "fresh"]
Backend = Literal["auto", "loop", "grouped_mm", "autograd"]


def check_activation(activation: str) -> None:
    if activation not in ACT_FORWARD:
        raise ValueError(f"activation={activation!r} is not supported; choose one of {sorted(ACT_FORWARD)}")


# ---------------------------------------------------------------------------------------------------
# Expert banks
# ---------------------------------------------------------------------------------------------------
class Experts(nn.Module):
    """Base class of expert banks: ``forward(x_AD, counts_E) -> y_AD`` on expert-sorted rows."""

    num_experts: int
    d_model: int
    #: True when the bank is built from plain differentiable ops (double backward, torch.func); the layer
    #: then also dispatches with plain ops instead of its custom-gradient gathers
    plain_autograd: bool = False

    def forward(self, x_AD: Tensor, counts_E: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward_gathered(self, x_TD: Tensor, perm: TopKPermutation) -> Tensor:
        """Experts applied to the rows ``x_TD[perm.token_A]`` (the dropless top-k layout)."""
        return self(permute_topk(x_TD, perm), perm.counts_E)

    @property
    def frozen(self) -> Tensor:
        """Bool mask ``(E,)`` of frozen experts."""
        raise NotImplementedError

    def grow(self, n: int, init: Init = "fresh", source: Sequence[int] | None = None) -> Remap:
        raise NotImplementedError

    def prune(self, keep_E: Tensor) -> Remap:
        raise NotImplementedError

    def set_frozen(self, ids: Sequence[int], frozen: bool = True) -> Remap:
        raise NotImplementedError


def check_init(init: str, n: int, source: Sequence[int] | None, num_experts: int) -> list[int]:
    if init not in ("copy", "mean", "fresh"):
        raise ValueError(f"init={init!r} is not supported; choose one of ['copy', 'fresh', 'mean']")
    check_positive(n=n)
    if init != "copy":
        return []
    src = list(source) if source is not None else [num_experts - 1]
    if len(src) == 1:
        src = src * n
    if len(src) != n:
        raise ValueError(f"source has {len(src)} entries; give one expert id, or one per new expert ({n})")
    for s in src:
        if not 0 <= s < num_experts:
            raise ValueError(f"source expert {s} out of range: {num_experts} experts exist (0..{num_experts - 1})")
    return src


class _StackedExperts(Experts):
    """Shared code of MLP and GLU banks with stacked weights."""

    glu: bool = False

    def __init__(
        self,
        *,
        d_model: int,
        hidden: int,
        num_experts: int,
        activation: Activation = "gelu",
        bias: bool = False,
        backend: Backend = "auto",
    ) -> None:
        super().__init__()
        check_positive(d_model=d_model, hidden=hidden, num_experts=num_experts)
        check_activation(activation)
        if backend not in ("auto", "loop", "grouped_mm", "autograd"):
            raise ValueError(
                f"backend={backend!r} is not supported; choose one of ['auto', 'autograd', 'grouped_mm', 'loop']"
            )
        self.d_model, self.hidden, self.num_experts = d_model, hidden, num_experts
        self.activation, self.bias, self.backend = activation, bias, backend
        h1 = 2 * hidden if self.glu else hidden
        self.w1 = ExpertParam(self._fresh((num_experts, d_model, h1), d_model))
        self.w2 = ExpertParam(self._fresh((num_experts, hidden, d_model), hidden))
        self.b1 = ExpertParam(self._fresh((num_experts, h1), d_model)) if bias else None
        self.b2 = ExpertParam(self._fresh((num_experts, d_model), hidden)) if bias else None

    def reset_parameters(self) -> None:
        """Re-draw every expert's weights (nn.Linear's initialisation per expert), in place."""
        with torch.no_grad():
            for p in self._params():
                fan_in = self.d_model if p in (self.w1, self.b1) else self.hidden
                for _, b in p.layout():
                    b.copy_(self._fresh(tuple(b.shape), fan_in))

    @staticmethod
    def _fresh(shape: tuple[int, ...], fan_in: int) -> Tensor:
        # nn.Linear's default initialisation, per expert
        bound = 1.0 / math.sqrt(fan_in)
        return torch.empty(shape).uniform_(-bound, bound)

    def _params(self) -> list[ExpertParam]:
        return [p for p in (self.w1, self.w2, self.b1, self.b2) if p is not None]

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, hidden={self.hidden}, num_experts={self.num_experts}, "
            f"activation={self.activation!r}, bias={self.bias}, backend={self.backend!r}"
        )

    @property
    def plain_autograd(self) -> bool:
        return self.backend == "autograd"

    def _use_grouped_mm(self, x: Tensor) -> bool:
        """Whether ``x`` goes through ``F.grouped_mm``: forced by ``backend``, or (``auto``) a CUDA tensor that runs in
        half precision, either its own dtype or the autocast dtype it will be cast to."""
        if self.backend == "grouped_mm":
            return True
        if self.backend != "auto" or x.device.type not in GROUPED_MM_DEVICES or not hasattr(F, "grouped_mm"):
            return False
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return dtype in (torch.bfloat16, torch.float16)

    def forward(self, x_AD: Tensor, counts_E: Tensor) -> Tensor:
        """Apply each expert to its slice of ``x_AD`` (rows sorted by expert, ``counts_E`` per expert)."""
        return self._cast_and_run(x_AD, counts_E, None)

    def forward_gathered(self, x_TD: Tensor, perm: TopKPermutation) -> Tensor:
        """Same as ``forward(permute_topk(x_TD, perm), perm.counts_E)``, without keeping the sorted copy
        of the input alive for the backward (the CPU kernel gathers it again; the grouped_mm path gathers in
        ``_forward``, after any autocast cast)."""
        if self.backend == "autograd":
            return super().forward_gathered(x_TD, perm)
        return self._cast_and_run(x_TD, perm.counts_E, perm)

    def forward_dense(self, x_TD: Tensor, gates_TE: Tensor) -> Tensor:
        """``sum_e gates_TE[t, e] * expert_e(x_TD[t])``: every expert on every token, weighted by a dense gate
        matrix (zero where a token is not routed). The same function as the sorted path (unrouted experts
        get exactly zero gradient), computed in a handful of plain ops and no sort or gather: cheaper for
        small batches, where the sorted path's fixed cost dominates, and differentiable any number of
        times. ``E / K`` times the expert FLOPs of the sorted path, so only for small ``T``.

        The combine is folded into the second matmul: ``y = [g_t1 a_t1 | ... | g_tE a_tE] @ [W2_1; ...; W2_E]``
        (plus ``gates @ b2``), so the experts' outputs are never materialised. The first matmul is one GEMM
        against the experts' first weights side by side (a ``D x E*H`` copy) for ``T > 2 D`` tokens, else a
        batched matmul whose (smaller) activations are then laid side by side. One difference from the sorted path: an unrouted expert whose activation overflows to inf (fp16)
        gives 0 * inf = NaN, which the sorted path never computes."""
        dev = x_TD.device.type
        autocast = torch.is_autocast_enabled(dev)
        dtype = torch.get_autocast_dtype(dev) if autocast else x_TD.dtype
        with torch.autocast(dev, enabled=False) if autocast else nullcontext():
            x = x_TD if x_TD.dtype == dtype else x_TD.to(dtype)
            T, D = x.shape
            E, H = self.num_experts, self.hidden
            H1 = 2 * H if self.glu else H
            mods = self._modules  # one dict lookup each, not Module.__getattr__ (this runs per forward)
            w1, w2 = mods["w1"].full(), mods["w2"].full()  # type: ignore[union-attr]
            if w1.dtype != dtype:
                w1, w2 = w1.to(dtype), w2.to(dtype)
            g = gates_TE if gates_TE.dtype == dtype else gates_TE.to(dtype)
            # the (D, E*H1) weight copy against the (T, E*H) activation copy; measured (bench_small_batch, D = 64):
            # the batched matmul is as fast or faster up to T = 2D, the side-by-side GEMM wins from T = 4D
            side_by_side = T > 2 * D
            if side_by_side:
                W1 = w1.transpose(0, 1).reshape(D, E * H1)
                if self.b1 is None:
                    h = torch.mm(x, W1)
                else:
                    h = torch.addmm(self.b1.full().to(dtype).reshape(E * H1), x, W1)
                h = h.view(T, E, H1)
            else:
                h = torch.bmm(x.expand(E, T, D), w1)
                if self.b1 is not None:
                    h = h + self.b1.full().to(dtype).unsqueeze(1)
                h = h.transpose(0, 1)  # (T, E, H1), a view
            a = _act_fwd(h, self.activation, self.glu)
            ga = (a * g.unsqueeze(-1)).reshape(T, E * H)  # the gate-weighted activations side by side
            W2 = w2.reshape(E * H, D)
            if self.b2 is None:
                return torch.mm(ga, W2)
            return torch.addmm(torch.mm(g, self.b2.full().to(dtype)), ga, W2)

    def _cast_and_run(self, x: Tensor, counts_E: Tensor, perm: TopKPermutation | None) -> Tensor:
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.to(dtype), counts_E, dtype, perm)
        return self._forward(x, counts_E, x.dtype, perm)

    def _forward(self, x: Tensor, counts_E: Tensor, dtype: torch.dtype, perm: TopKPermutation | None = None) -> Tensor:
        params = self._params()
        if self._use_grouped_mm(x):
            if perm is not None:  # rows in token order: gather them into expert order first
                x = permute_topk(x, perm)
            offs = torch.cumsum(counts_E, 0).to(torch.int32)
            h = F.grouped_mm(x, self.w1.full().to(dtype), offs=offs)
            expert_A = None
            if self.b1 is not None or self.b2 is not None:  # output_size: no host sync to size the result
                expert_A = torch.repeat_interleave(torch.arange(self.num_experts, device=x.device), counts_E,
                                                   output_size=x.shape[0])
            if self.b1 is not None:
                h = h + self.b1.full().to(dtype)[expert_A]
            a = _act_fwd(h, self.activation, self.glu)
            y = F.grouped_mm(a, self.w2.full().to(dtype), offs=offs)
            if self.b2 is not None:
                y = y + self.b2.full().to(dtype)[expert_A]
            return y
        if self.backend == "autograd":
            return self._forward_autograd(x, counts_E, dtype)
        layout = [b.shape[0] for b in self.w1.blocks]
        flat = [b.to(dtype) for p in params for b in p.blocks]
        rows = expert_rows(layout, self.num_experts)
        return GroupedFFN.apply(x, perm, expert_bounds(counts_E), rows, self.activation, self.glu, len(layout), *flat)

    def _forward_autograd(self, x: Tensor, counts_E: Tensor, dtype: torch.dtype) -> Tensor:
        """Plain differentiable ops, one expert at a time: slow, but it supports double backward and
        ``torch.func`` transforms (second-order MAML)."""
        outs = []
        for e, (s, t) in enumerate(expert_bounds(counts_E)):
            if t == s and x.shape[0]:  # no rows at all: every expert runs on its empty slice (zero gradients)
                continue
            h = x[s:t] @ self.w1.row(e).to(dtype)
            if self.b1 is not None:
                h = h + self.b1.row(e).to(dtype)
            y = _act_fwd(h, self.activation, self.glu) @ self.w2.row(e).to(dtype)
            if self.b2 is not None:
                y = y + self.b2.row(e).to(dtype)
            outs.append(y)
        return torch.cat(outs, 0) if outs else x.new_zeros(0, self.d_model)

    # ------------------------------------------------------------------ growth
    @property
    def frozen(self) -> Tensor:
        return self.w1.frozen

    def grow(self, n: int, init: Init = "fresh", source: Sequence[int] | None = None) -> Remap:
        """Add ``n`` experts: copies of ``source`` experts (default: the last), the mean of all experts,
        or freshly initialised. Existing experts are untouched (bit-identical outputs)."""
        src = check_init(init, n, source, self.num_experts)
        remaps = []
        for p in self._params():
            fan_in = self.d_model if p in (self.w1, self.b1) else self.hidden
            remaps.append(p.grow_init(n, init, src, lambda m, p=p, f=fan_in: self._fresh((m, *p.shape[1:]), f)))
        self.num_experts += n
        return merge_remaps(*remaps)

    def prune(self, keep_E: Tensor) -> Remap:
        remap = merge_remaps(*(p.select(keep_E) for p in self._params()))
        self.num_experts = self.w1.num_rows
        return remap

    def set_frozen(self, ids: Sequence[int], frozen: bool = True) -> Remap:
        return merge_remaps(*(p.set_frozen(ids, frozen) for p in self._params()))


class MLPExperts(_StackedExperts):
    """E experts ``act(x W1 + b1) W2 + b2`` with stacked weights ``W1 (E, D, H)``, ``W2 (E, H, D)``."""

    glu = False


class GLUExperts(_StackedExperts):
    """E gated experts ``(act(x Wg) * (x Wu)) W2`` (SwiGLU with ``activation="silu"``, GEGLU with
    ``"gelu"``); ``W1 (E, D, 2H)`` holds gate and up projections side by side."""

    glu = True

    def __init__(
        self,
        *,
        d_model: int,
        hidden: int,
        num_experts: int,
        activation: Activation = "silu",
        bias: bool = False,
        backend: Backend = "auto",
    ) -> None:
        super().__init__(
            d_model=d_model, hidden=hidden, num_experts=num_experts, activation=activation, bias=bias, backend=backend
        )


class ModuleExperts(Experts):
    """A bank of arbitrary modules, each mapping ``(n, D) -> (n, D)``; evaluated one expert at a time
    with plain autograd (so double backward and ``torch.func`` work through it).

    Give the list (``experts=[...]``) or one ``prototype`` and ``num_experts`` (deep copies, each
    re-initialised with its submodules' ``reset_parameters``).
    """

    def __init__(
        self,
        *,
        d_model: int,
        experts: Sequence[nn.Module] | None = None,
        prototype: nn.Module | None = None,
        num_experts: int | None = None,
    ) -> None:
        super().__init__()
        if (experts is None) == (prototype is None):
            raise ValueError("give exactly one of experts=[...] or prototype=... (with num_experts)")
        if prototype is not None:
            if num_experts is None:
                raise ValueError("num_experts is required with prototype")
            check_positive(num_experts=num_experts)
            experts = [reinitialize(copy.deepcopy(prototype)) for _ in range(num_experts)]
        assert experts is not None
        if len(experts) == 0:
            raise ValueError("experts must hold at least one module, got an empty list")
        check_positive(d_model=d_model)
        self.d_model = d_model
        self.experts = nn.ModuleList(experts)
        self.register_buffer("_frozen", torch.zeros(len(experts), dtype=torch.bool))

    plain_autograd = True

    @property
    def num_experts(self) -> int:  # type: ignore[override]
        return len(self.experts)

    def forward(self, x_AD: Tensor, counts_E: Tensor) -> Tensor:
        if x_AD.shape[0] == 0:
            # no rows: each expert on the empty batch, so the output stays in the graph (zero gradients)
            return sum((expert(x_AD) for expert in self.experts), x_AD.new_zeros(x_AD.shape))
        outs = []
        for expert, (s, t) in zip(self.experts, expert_bounds(counts_E), strict=True):
            if t > s:
                outs.append(expert(x_AD[s:t]))
        return torch.cat(outs, 0)

    @property
    def frozen(self) -> Tensor:
        return self._frozen

    def grow(self, n: int, init: Init = "fresh", source: Sequence[int] | None = None) -> Remap:
        src = check_init(init, n, source, self.num_experts)
        for i in range(n):
            if init == "copy":
                new = copy.deepcopy(self.experts[src[i]])
            elif init == "mean":
                new = copy.deepcopy(self.experts[0])
                with torch.no_grad():
                    for name, p in new.named_parameters():
                        p.copy_(torch.stack([dict(m.named_parameters())[name] for m in self.experts]).mean(0))
            else:
                new = reinitialize(copy.deepcopy(self.experts[0]))
            for p in new.parameters():
                p.requires_grad_(True)
            self.experts.append(new)
        self._frozen = torch.cat([self._frozen, self._frozen.new_zeros(n)])
        # new modules own new Parameters: the optimizer gets them as fresh rows
        return {p: [(None, p.shape[0] if p.dim() else 1)] for m in self.experts[-n:] for p in m.parameters()}

    def prune(self, keep_E: Tensor) -> Remap:
        keep = keep_E.to(torch.bool).cpu()
        if keep.shape != (self.num_experts,) or not keep.any():
            raise ValueError(f"keep mask must have shape ({self.num_experts},) and keep at least one expert")
        self.experts = nn.ModuleList([m for m, k in zip(self.experts, keep.tolist(), strict=True) if k])
        self._frozen = self._frozen[keep.to(self._frozen.device)]
        return {}

    def set_frozen(self, ids: Sequence[int], frozen: bool = True) -> Remap:
        for e in ids:
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert id {e} out of range: {self.num_experts} experts (0..{self.num_experts - 1})")
            for p in self.experts[e].parameters():
                p.requires_grad_(not frozen)
            self._frozen[e] = frozen
        return {}


def reinitialize(module: nn.Module) -> nn.Module:
    """``module`` with every submodule's ``reset_parameters`` called (a deep copy made independent); returned."""
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return module


class FFN(nn.Module):
    """Dense feed-forward block: ``act(x W1) W2`` or gated ``(act(x Wg) * x Wu) W2``.

    Used for shared (always-on) experts and as the dense baseline; ``num_shared`` always-on experts
    of hidden ``h`` equal one FFN of hidden ``num_shared * h`` (their outputs are summed).
    """

    def __init__(
        self,
        *,
        d_model: int,
        hidden: int,
        num_shared: int = 1,
        activation: Activation = "gelu",
        glu: bool = False,
        bias: bool = False,
    ) -> None:
        super().__init__()
        check_positive(d_model=d_model, hidden=hidden, num_shared=num_shared)
        check_activation(activation)
        width = hidden * num_shared
        self.activation, self.glu = activation, glu
        self.fc1 = nn.Linear(d_model, 2 * width if glu else width, bias=bias)
        self.fc2 = nn.Linear(width, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_act_fwd(self.fc1(x), self.activation, self.glu))
