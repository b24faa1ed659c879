"""The shared trunk every paradigm builds its network from, and small helpers.

Shape legend: B batch (any leading dims), F input features, D model width, N tokens per sample, C classes.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .core import MoE, MoEOutput, RoutingStats
from .core.experts import reinitialize

ACTIVATIONS = {"identity": lambda h: h, "relu": torch.relu, "tanh": torch.tanh}


class BlockOutput(NamedTuple):
    y: Tensor
    aux_loss: Tensor
    stats: list[RoutingStats]


class MoEBlock(nn.Module):
    """Pre-norm residual MoE block: ``x + moe(norm(x)).y``."""

    def __init__(self, moe: MoE) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(moe.d_model)
        self.moe = moe

    def forward(self, x: Tensor, *, task_id: int | Tensor | None = None) -> MoEOutput:
        out = self.moe(self.norm(x), task_id=task_id)
        return out._replace(y=x + out.y)


class Trunk(nn.Module):
    """The one network body of every paradigm; the paradigms add only their heads and losses::

        x [B, F] -> inp: Linear(F, N*D) -> activation -> (N given: view as [B, N, D])
          -> [MoEBlock] * depth (task_id passed to every block) -> (N given: flatten to [B, N*D])
          -> LayerNorm(D) or nothing  ->  BlockOutput(y, aux_loss summed over blocks, stats per block)

    Args:
        in_features: F.
        moe: either one MoE (the first block's; blocks 2..depth are deep copies of it, re-initialised by
            every submodule's ``reset_parameters`` *after* ``inp`` is built, so blocks start independent), or a
            sequence of pre-built MoEs, one per block (then ``inp`` is built after them). The two orders are the
            ones the paradigms drew their random numbers in before the trunk existed, so seeded runs (and the
            committed numbers) are unchanged; ``parameters()`` follows the same order, so the position-indexed
            optimizer state of an older checkpoint still lines up.
        depth: blocks, with a single ``moe`` (a sequence sets it by its length).
        activation: after ``inp``: ``"identity"`` (supervised, continual, multi-task), ``"relu"`` (meta),
            ``"tanh"`` (RL).
        tokens: None: each sample is one token of width D (``inp`` is ``Linear(F, D)``). N: each sample is its own
            sequence of N tokens of width D (``inp`` is ``Linear(F, N*D)``), as Soft MoE needs so no sample's
            output depends on another sample.
        final_norm: a LayerNorm after the last block (False: the meta and RL networks, which never had one).

    Routing off is a config value, not another class: ``moe`` with ``num_experts: 1`` and ``top_k: 1`` (one
    always-on expert; set the router's and the experts' ``init_args`` in any paradigm's MoE YAML, or
    ``architecture.init_args`` for ``TaskMoE``) gives the same trunk with a dense MLP block; with the expert's
    hidden width ``top_k x`` the MoE's, its active parameters match (``scripts/bench_controls.py``'s
    ``dense-same-trunk`` controls).
    """

    def __init__(self, *, in_features: int, moe: MoE | Sequence[MoE], depth: int = 1, activation: str = "identity",
                 tokens: int | None = None, final_norm: bool = True) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; choose one of {list(ACTIVATIONS)}")
        if tokens is not None and tokens < 1:
            raise ValueError(f"tokens must be None or >= 1, got {tokens!r}")
        self.activation, self.tokens = activation, tokens
        if isinstance(moe, MoE):
            if depth < 1:
                raise ValueError(f"depth must be >= 1, got {depth}")
            self.d_model = moe.d_model
            self.inp = nn.Linear(in_features, self.d_model * (tokens or 1))
            moes = [moe] + [reinitialize(copy.deepcopy(moe)) for _ in range(depth - 1)]
            self.blocks = nn.ModuleList([MoEBlock(m) for m in moes])
        else:
            moes = list(moe)
            if not moes or not all(isinstance(m, MoE) for m in moes):
                raise TypeError("moe must be an MoE or a non-empty sequence of MoEs")
            if len({m.d_model for m in moes}) != 1:
                raise ValueError(f"every block's MoE needs the same d_model, got {[m.d_model for m in moes]}")
            self.d_model = moes[0].d_model
            self.blocks = nn.ModuleList([MoEBlock(m) for m in moes])
            self.inp = nn.Linear(in_features, self.d_model * (tokens or 1))
        self.norm = nn.LayerNorm(self.d_model) if final_norm else None
        self.out_features = self.d_model * (tokens or 1)

    def embed(self, x: Tensor) -> Tensor:
        """``[B, F]`` -> the first block's input: ``[B, D]``, or ``[B, N, D]`` with ``tokens``."""
        h = ACTIVATIONS[self.activation](self.inp(x))
        return h if self.tokens is None else h.view(*h.shape[:-1], self.tokens, self.d_model)

    def router_input(self, x: Tensor) -> Tensor:
        """What the first block's router sees for ``x``: ``blocks[0].norm(embed(x))``."""
        return self.blocks[0].norm(self.embed(x))

    def forward(self, x: Tensor, *, task_id: int | Tensor | None = None) -> BlockOutput:
        """``x [B, F]``, ``task_id`` (an int or ``[B]`` long; for task-routed MoEs) -> ``BlockOutput``: ``y [B, N*D]``
        (``[B, D]`` without ``tokens``), ``aux_loss ()`` summed over the blocks, ``stats`` one per block."""
        h = self.embed(x)
        aux = h.new_zeros(())
        stats = []
        for block in self.blocks:
            out = block(h, task_id=task_id)
            h, aux = out.y, aux + out.aux_loss
            stats.append(out.stats)
        if self.tokens is not None:
            h = h.flatten(-2)
        return BlockOutput(h if self.norm is None else self.norm(h), aux, stats)

    def moe_layers(self) -> list[MoE]:
        return [b.moe for b in self.blocks]


class MoEMLP(Trunk):
    """A classifier: ``Trunk`` (``Linear(in, D) -> [MoEBlock] * depth -> LayerNorm``) then ``head: Linear(D, out)``.

    Inputs with more than two dims are flattened from dim 1. Parameter names are the trunk's (``inp.``,
    ``blocks.i.``, ``norm.``) plus ``head.``.
    """

    def __init__(self, *, in_features: int, out_features: int, moe: MoE, depth: int = 1) -> None:
        super().__init__(in_features=in_features, moe=moe, depth=depth)
        self.head = nn.Linear(moe.d_model, out_features)
        self.out_features = out_features

    def forward(self, x: Tensor, *, task_id: int | Tensor | None = None) -> BlockOutput:
        out = super().forward(x.flatten(1) if x.dim() > 2 else x, task_id=task_id)
        return out._replace(y=self.head(out.y))


def rename_old_keys(module: nn.Module, renames: Mapping[str, str]) -> None:
    """Let ``module`` load weights saved before a rename (``renames``: ``{old: new}`` key prefixes relative to
    ``module``, e.g. ``{"block.": "trunk.blocks.0."}``). Registers a load-state-dict pre-hook, so a plain
    ``load_state_dict`` of ``module`` or of any model holding it maps old keys; :func:`upgrade_old_keys` applies
    the same renames to a checkpoint's state dict up front (``ParadigmModule.on_load_checkpoint`` calls it before
    comparing the checkpoint with the model)."""
    module._old_key_renames = dict(renames)  # type: ignore[assignment]

    def hook(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        _rename(state_dict, prefix, module._old_key_renames)  # type: ignore[arg-type]

    module._register_load_state_dict_pre_hook(hook)


def upgrade_old_keys(model: nn.Module, state_dict: dict[str, Any]) -> None:
    """Rename, in place, the keys of ``state_dict`` (for ``model``) that a submodule registered with
    :func:`rename_old_keys`."""
    for name, m in model.named_modules():
        renames = getattr(m, "_old_key_renames", None)
        if renames:
            _rename(state_dict, f"{name}." if name else "", renames)


def _rename(state_dict: dict[str, Any], prefix: str, renames: Mapping[str, str]) -> None:
    for key in list(state_dict):
        for old, new in renames.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)
                break


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def active_params_per_token(module: nn.Module) -> int:
    """Parameters a token touches: dense parameters plus, for each MoE, top_k/E of its expert parameters."""
    total = 0
    moe_params: set[int] = set()
    for m in module.modules():
        if isinstance(m, MoE):
            k = getattr(m.router, "top_k", 1)
            ep = list(m.experts.parameters())
            moe_params |= {id(p) for p in ep}
            total += int(sum(p.numel() for p in ep) * min(k, m.num_experts) / m.num_experts)
    total += sum(p.numel() for p in module.parameters() if id(p) not in moe_params)
    return total


__all__ = ["Trunk", "MoEBlock", "MoEMLP", "BlockOutput", "rename_old_keys", "upgrade_old_keys", "count_params", "active_params_per_token"]
