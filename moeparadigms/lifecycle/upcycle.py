"""Sparse upcycling: turn the dense feed-forward blocks of a trained network into MoE layers.

* ``init="copy"``: every expert is a copy of the dense block (Komatsuzaki et al., "Sparse Upcycling:
  Training Mixture-of-Experts from Dense Checkpoints", ICLR 2023). With a softmax-then-top-k router whose
  k gates are renormalised to sum to one, the layer's output is ``sum_k w_k f(x) = f(x)``: the upcycled
  network computes the dense network's function at step 0 (up to float rounding).
* ``init="drop"``: drop-upcycling (Nakamura et al., "Drop-Upcycling: Training Sparse Mixture of Experts with
  Partial Re-initialization", ICLR 2025): each expert starts as a copy, then a random ``drop_ratio`` of its
  hidden units (a column of ``W1``, the matching row of ``W2``, and the ``b1`` entry; the gate and up columns
  of a GLU) is re-drawn from a normal with the mean and standard deviation of the dense weight matrix it
  belongs to; each expert draws its own units. The step-0 output then differs from the dense one by design.

What is converted (:func:`upcycle`):

* ``nn.Sequential(Linear(D, H), activation, Linear(H, D))`` with a GELU/ReLU/SiLU module: replaced by an
  :class:`UpcycledFFN` (an ``nn.Module`` returning a tensor, so the parent's ``forward`` is unchanged);
* the project's dense :class:`~moeparadigms.core.FFN` (MLP or GLU): replaced by an :class:`UpcycledFFN`;
* a :class:`~moeparadigms.core.MoE` with a single expert (the project's trunks, e.g.
  :class:`~moeparadigms.nets.MoEMLP` built with ``num_experts=1``): replaced by an E-expert ``MoE`` with the
  same coefficients and shared experts, so the block that holds it still gets an ``MoEOutput``.

Blocks that cannot become a core MoE layer (``Linear(D, H) -> act -> Linear(H, D')`` with ``D' != D``, other
activations) are listed in the report's ``skipped`` and left dense.

Shape legend: D model width, H hidden width, E experts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from ..core import FFN, GLUExperts, MLPExperts, MoE, MoEOutput, TaskConditionedRouter, TopKRouter

Stacked = MLPExperts | GLUExperts  # the core's stacked banks: weights W1 (E, D, H or 2H), W2 (E, H, D)

UpcycleInit = Literal["copy", "drop"]

_ACTIVATIONS: dict[type, str] = {nn.ReLU: "relu", nn.SiLU: "silu"}


def _activation_name(m: nn.Module) -> str | None:
    if isinstance(m, nn.GELU):
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    return _ACTIVATIONS.get(type(m))


@dataclass
class UpcycleReport:
    """What :func:`upcycle` did: the converted submodules (dotted names, ``""`` for the root), the skipped
    ones with the reason, and the settings (all plain values, so it can be stored in a checkpoint)."""

    num_experts: int
    top_k: int
    init: str
    drop_ratio: float
    seed: int | None
    converted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


class UpcycledFFN(nn.Module):
    """An MoE layer standing in for a dense block inside a module whose ``forward`` expects a tensor.

    ``forward(x [..., D]) -> y [..., D]``. The layer's full :class:`~moeparadigms.core.MoEOutput` of the last
    call (auxiliary losses, routing statistics) is kept in ``last_output`` on this module (not a global): sum
    them into the task loss with :func:`aux_loss`.
    """

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.moe = moe
        self.last_output: MoEOutput | None = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.moe(x)
        self.last_output = out
        return out.y


def aux_loss(module: nn.Module) -> Tensor:
    """Sum of the auxiliary losses of every :class:`UpcycledFFN` inside ``module`` from its last forward
    (zero if none ran)."""
    total = torch.zeros(())
    for m in module.modules():
        if isinstance(m, UpcycledFFN) and m.last_output is not None:
            total = total.to(m.last_output.aux_loss.device) + m.last_output.aux_loss
    return total


def check_upcycle_args(num_experts: int, top_k: int, init: str, drop_ratio: float) -> None:
    if not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(f"num_experts must be an integer >= 2 (the number of experts after upcycling), got {num_experts!r}")
    if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, num_experts={num_experts}], got {top_k!r}")
    if init not in ("copy", "drop"):
        raise ValueError(f"init={init!r} is not supported; choose one of ['copy', 'drop']")
    if not 0.0 <= drop_ratio <= 1.0:
        raise ValueError(f"drop_ratio must be in [0, 1], got {drop_ratio!r}")


def _stacked(bank_cls: type[MLPExperts] | type[GLUExperts], *, w1_DH: Tensor, w2_HD: Tensor, b1_H: Tensor | None,
             b2_D: Tensor | None, num_experts: int, activation: str, hidden: int) -> Stacked:
    """A stacked bank of ``num_experts`` copies of one expert (``w1_DH``: (D, H1), ``w2_HD``: (H, D))."""
    D = w1_DH.shape[0]
    bias = b1_H is not None or b2_D is not None
    bank = bank_cls(d_model=D, hidden=hidden, num_experts=num_experts, activation=activation, bias=bias)  # type: ignore[arg-type]
    with torch.no_grad():
        bank.w1.block0.copy_(w1_DH.unsqueeze(0).expand(num_experts, *w1_DH.shape))
        bank.w2.block0.copy_(w2_HD.unsqueeze(0).expand(num_experts, *w2_HD.shape))
        if bias:
            assert bank.b1 is not None and bank.b2 is not None
            bank.b1.block0.copy_((b1_H if b1_H is not None else w1_DH.new_zeros(w1_DH.shape[1])).expand(num_experts, -1))
            bank.b2.block0.copy_((b2_D if b2_D is not None else w1_DH.new_zeros(D)).expand(num_experts, -1))
    return bank.to(w1_DH.device, w1_DH.dtype)


def drop_reinit_(bank: Stacked, drop_ratio: float, generator: torch.Generator) -> None:
    """Drop-upcycling's partial re-initialisation, in place: for each expert, ``round(drop_ratio * H)`` hidden
    units drawn at random (independently per expert) get their ``W1`` columns (gate and up columns for a GLU),
    ``b1`` entries and ``W2`` rows re-drawn from ``N(mean, std)`` of the whole matrix they belong to, the
    statistics taken before any re-drawing (all experts are copies of the dense block at that point)."""
    H, E = bank.hidden, bank.num_experts
    n_drop = round(drop_ratio * H)
    if n_drop == 0:
        return
    params = {"w1": bank.w1.full().detach(), "w2": bank.w2.full().detach()}
    if bank.b1 is not None:
        params["b1"] = bank.b1.full().detach()
    stats = {k: (v[0].mean().item(), v[0].std().item() if v[0].numel() > 1 else 0.0) for k, v in params.items()}
    new = {k: v.clone() for k, v in params.items()}

    def normal(shape: tuple[int, ...], key: str) -> Tensor:
        mean, std = stats[key]
        return (torch.randn(shape, generator=generator) * std + mean).to(new[key])

    for e in range(E):
        units = torch.randperm(H, generator=generator)[:n_drop]
        cols = torch.cat([units, units + H]) if bank.glu else units  # a GLU's W1 holds [gate | up]
        new["w1"][e][:, cols] = normal((bank.d_model, cols.numel()), "w1")
        new["w2"][e][units, :] = normal((n_drop, bank.d_model), "w2")
        if "b1" in new:
            new["b1"][e][cols] = normal((cols.numel(),), "b1")
    with torch.no_grad():
        for name, value in new.items():
            p = getattr(bank, name)
            for start, b in p.layout():
                b.copy_(value[start : start + b.shape[0]])


def _new_moe(bank: Stacked, top_k: int, *, like: MoE | None, moe_kwargs: dict) -> MoE:
    old = None if like is None else like.router
    if isinstance(old, TaskConditionedRouter):
        # a task-conditioned layer stays task-conditioned (multi-task Task-MoE): the same conditioning, the dense
        # model's learned task embedding kept, fresh gate rows (any renormalised gates give the dense output at step 0)
        router: TopKRouter = TaskConditionedRouter(
            d_model=bank.d_model, num_experts=bank.num_experts, num_tasks=old.num_tasks, top_k=top_k,
            conditioning=old.conditioning, task_dim=old.task_dim, temperature=old.temperature, renormalize=True)
        if old.conditioning != "gate":
            router.task_embedding.load_state_dict(old.task_embedding.state_dict())
    else:
        router = TopKRouter(d_model=bank.d_model, num_experts=bank.num_experts, top_k=top_k, renormalize=True)
    router = router.to(bank.w1.block0.device, bank.w1.block0.dtype)
    if like is not None:
        kw = dict(shared_experts=like.shared_experts, capacity_factor=like.capacity_factor,
                  load_balance_coef=like.coefs["load_balance"], z_loss_coef=like.coefs["z_loss"],
                  importance_coef=like.coefs["importance"], load_coef=like.coefs["load"],
                  check_finite=like.check_finite, balance_across_ranks=like.balance_across_ranks,
                  dense_dispatch=like.dense_dispatch, aux_in_inference=like.aux_in_inference,
                  stats_in_inference=like.stats_in_inference)
        kw.update(moe_kwargs)
        return MoE(router=router, experts=bank, **kw)
    return MoE(router=router, experts=bank, **moe_kwargs)


def _from_sequential(seq: nn.Sequential) -> tuple[dict, str] | tuple[None, str]:
    """The dense weights of ``Sequential(Linear(D, H), act, Linear(H, D))``, or None and why not."""
    if len(seq) != 3 or not isinstance(seq[0], nn.Linear) or not isinstance(seq[2], nn.Linear):
        return None, "not Sequential(Linear, activation, Linear)"
    act = _activation_name(seq[1])
    if act is None:
        return None, f"activation {type(seq[1]).__name__} is not one of GELU, ReLU, SiLU"
    fc1, fc2 = seq[0], seq[2]
    if fc1.in_features != fc2.out_features or fc1.out_features != fc2.in_features:
        return None, (f"maps {fc1.in_features} -> {fc2.out_features} features; an MoE layer maps D -> D "
                      f"(and the hidden widths must agree: {fc1.out_features} vs {fc2.in_features})")
    return dict(w1_DH=fc1.weight.detach().t(), w2_HD=fc2.weight.detach().t(),
                b1_H=None if fc1.bias is None else fc1.bias.detach(), b2_D=None if fc2.bias is None else fc2.bias.detach(),
                activation=act, hidden=fc1.out_features, glu=False), ""


def _from_ffn(ffn: FFN) -> dict:
    width = ffn.fc2.in_features
    return dict(w1_DH=ffn.fc1.weight.detach().t(), w2_HD=ffn.fc2.weight.detach().t(),
                b1_H=None if ffn.fc1.bias is None else ffn.fc1.bias.detach(),
                b2_D=None if ffn.fc2.bias is None else ffn.fc2.bias.detach(),
                activation=ffn.activation, hidden=width, glu=ffn.glu)


def _from_moe(moe: MoE) -> tuple[dict, str] | tuple[None, str]:
    bank = moe.experts
    if moe.num_experts != 1:
        return None, f"already an MoE with {moe.num_experts} experts"
    if not isinstance(bank, (MLPExperts, GLUExperts)):
        return None, f"expert bank {type(bank).__name__} is not a stacked MLPExperts/GLUExperts bank"
    return dict(w1_DH=bank.w1.row(0).detach(), w2_HD=bank.w2.row(0).detach(),
                b1_H=None if bank.b1 is None else bank.b1.row(0).detach(),
                b2_D=None if bank.b2 is None else bank.b2.row(0).detach(),
                activation=bank.activation, hidden=bank.hidden, glu=bank.glu), ""


def _convert(dense: dict, num_experts: int, top_k: int, init: str, drop_ratio: float, gen: torch.Generator,
             like: MoE | None, moe_kwargs: dict) -> MoE:
    glu = dense.pop("glu")
    bank = _stacked(GLUExperts if glu else MLPExperts, num_experts=num_experts, **dense)
    if init == "drop":
        drop_reinit_(bank, drop_ratio, gen)
    return _new_moe(bank, top_k, like=like, moe_kwargs=moe_kwargs)


def upcycle(
    module: nn.Module,
    *,
    num_experts: int,
    top_k: int = 2,
    init: UpcycleInit = "copy",
    drop_ratio: float = 0.5,
    seed: int | None = None,
    moe_kwargs: dict | None = None,
) -> tuple[nn.Module, UpcycleReport]:
    """Replace the dense feed-forward blocks of ``module`` by ``num_experts``-expert MoE layers.

    Args:
        module: any module; its convertible submodules are replaced in place. If ``module`` itself is a dense
            block, the returned module is a new :class:`UpcycledFFN`.
        num_experts: experts per upcycled layer (>= 2).
        top_k: experts per token; the router is a :class:`~moeparadigms.core.TopKRouter` (a
            :class:`~moeparadigms.core.TaskConditionedRouter` of the same conditioning, keeping the task embedding,
            where the single-expert layer had one) with
            ``renormalize=True`` (also for ``top_k=1``, where each gate is then exactly 1 and the router learns
            from the auxiliary losses only), which keeps the step-0 output of ``init="copy"`` equal to the dense
            block's.
        init: ``"copy"`` (sparse upcycling) or ``"drop"`` (drop-upcycling).
        drop_ratio: fraction of each expert's hidden units re-drawn with ``init="drop"``.
        seed: seeds the routers' initialisation and the drop-upcycling draws (None: torch's global RNG).
        moe_kwargs: extra :class:`~moeparadigms.core.MoE` arguments for new layers (``load_balance_coef``...);
            a converted single-expert ``MoE`` keeps its own settings unless overridden here.
    Returns:
        ``(module, report)``: the converted module and an :class:`UpcycleReport`.
    """
    check_upcycle_args(num_experts, top_k, init, drop_ratio)
    report = UpcycleReport(num_experts, top_k, init, float(drop_ratio), seed)
    gen = torch.Generator()
    gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    kwargs = dict(moe_kwargs or {})
    state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)  # the new routers' rows are drawn from the global RNG
    try:
        return _walk(module, "", num_experts, top_k, init, drop_ratio, gen, kwargs, report, {}), report
    finally:
        if seed is not None:
            torch.random.set_rng_state(state)


def _walk(m: nn.Module, name: str, E: int, k: int, init: str, r: float, gen: torch.Generator, kwargs: dict,
          report: UpcycleReport, done: dict[int, nn.Module]) -> nn.Module:
    """``m`` with its dense blocks converted. ``done`` maps converted modules (by id) to their replacement: a block
    registered under two names (a paradigm keeping ``self.moe`` beside ``self.trunk.blocks[0].moe``) becomes one MoE."""
    if id(m) in done:
        return done[id(m)]
    new = _convert_one(m, name, E, k, init, r, gen, kwargs, report)
    if new is not None:
        done[id(m)] = new
        return new
    for child_name, child in list(m.named_children()):
        new = _walk(child, f"{name}.{child_name}" if name else child_name, E, k, init, r, gen, kwargs, report, done)
        if new is not child:
            setattr(m, child_name, new)
    return m


def _convert_one(m: nn.Module, name: str, E: int, k: int, init: str, r: float, gen: torch.Generator, kwargs: dict,
                 report: UpcycleReport) -> nn.Module | None:
    """The upcycled replacement of ``m`` when ``m`` itself is a convertible block, else None."""
    if isinstance(m, MoE):
        dense, why = _from_moe(m)
        if dense is None:
            report.skipped.append(f"{name or '<root>'}: {why}")
            return None
        report.converted.append(name)
        return _convert(dense, E, k, init, r, gen, m, kwargs)
    if isinstance(m, FFN):
        report.converted.append(name)
        return UpcycledFFN(_convert(_from_ffn(m), E, k, init, r, gen, None, kwargs))
    if isinstance(m, nn.Sequential) and len(m) == 3 and isinstance(m[0], nn.Linear) and isinstance(m[2], nn.Linear):
        dense, why = _from_sequential(m)
        if dense is not None:
            report.converted.append(name)
            return UpcycledFFN(_convert(dense, E, k, init, r, gen, None, kwargs))
        report.skipped.append(f"{name or '<root>'}: {why}")
    return None


__all__ = ["upcycle", "drop_reinit_", "UpcycleReport", "UpcycledFFN", "aux_loss", "UpcycleInit"]

