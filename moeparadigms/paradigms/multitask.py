"""Multi-task learning with mixtures of experts: shared-bottom, OMoE, MMoE, CGC, PLE and Task-MoE.

One :class:`MultiTaskMoE` LightningModule; the architecture is a typed component chosen in YAML
(``architecture: {class_path: ...MMoE, init_args: {...}}``). Architectures are small *specs* that
``build(in_features=, num_tasks=)`` their network, because the input width and the number of tasks
belong to the benchmark (``tasks/multitask/*.yaml``) while the architecture belongs to the method
(``configs/multitask/*.yaml``).

Two families:

* **Sample-level mixtures** (OMoE, MMoE, CGC, PLE, and shared-bottom as the one-expert case): every
  expert runs on every sample and a softmax gate mixes the experts' outputs (Ma et al. 2018; Tang et al.
  2020). They are one module, :class:`ExtractionNet`: levels of shared and task-specific experts with
  per-task gates. The gating is written here (a ``Linear`` + softmax per task, all experts computed in
  one einsum) rather than through the core's sparse dispatch: nothing is sparse, so dispatch would only
  add sorting.
* **Task-MoE** (Kudugunta et al. 2021): token-level sparse routing conditioned on the task, using the
  core's :class:`~moeparadigms.core.TaskConditionedRouter` inside :class:`~moeparadigms.core.MoE`, in any
  number of residual blocks.

Batches are ``(x_BF, y_BT)`` (every sample labelled for every task; classification targets are class
indices stored as floats) or ``(x_BF, task_id_B, y_B)`` (one task per sample). Loss balancing: fixed
weights, uncertainty weighting (Kendall et al. 2018) or PCGrad (Yu et al. 2020).

Shape legend: B batch, F input features, T tasks, E experts, H expert output width, C classes.
"""
from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Literal, NamedTuple

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from ..benchmarks.specs import TaskSpec  # re-exported: YAMLs and user code import it from here too
from ..checkpoint import check_compatible
from ..core import MLPExperts, MoE, TaskConditionedRouter
from ..nets import MoEBlock


def _positive(**fields: int) -> None:
    for name, v in fields.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")


# ---------------------------------------------------------------------------------------------------
# Sample-level mixtures: one module for shared-bottom, OMoE, MMoE, CGC and PLE
# ---------------------------------------------------------------------------------------------------


class NetOutput(NamedTuple):
    reps: list[Tensor]  # T tensors (B, H): each task's representation, fed to its tower
    aux_loss: Tensor  # () router losses (Task-MoE); zero for dense gating
    # True when the net was given per-sample task ids and reps[t] holds only the rows of task t (B_t, H)
    per_task_rows: bool = False


class ExpertBank(nn.Module):
    """``E`` one-hidden-layer experts ``relu(x W_e + b_e)`` over ``G`` input groups, all in one einsum.

    ``forward(x_GBF) -> (G, B, E, H)``; group ``g`` is seen by experts ``g*E/G .. (g+1)*E/G - 1`` when
    ``groups > 1`` (task-specific experts, each task its own input), by all experts when ``groups == 1``.
    """

    def __init__(self, *, in_features: int, hidden: int, num_experts: int, groups: int = 1) -> None:
        super().__init__()
        _positive(in_features=in_features, hidden=hidden, num_experts=num_experts, groups=groups)
        if num_experts % groups:
            raise ValueError(f"num_experts={num_experts} must be a multiple of groups={groups}")
        self.groups, self.per_group = groups, num_experts // groups
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's initialisation, per expert
        self.weight = nn.Parameter(torch.empty(groups, self.per_group, in_features, hidden).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(groups, self.per_group, hidden).uniform_(-bound, bound))

    def forward(self, x_GBF: Tensor) -> Tensor:
        return F.relu(torch.einsum("gbf,gefh->gbeh", x_GBF, self.weight) + self.bias.unsqueeze(1))


class ExtractionLevel(nn.Module):
    """One CGC level (Tang et al. 2020): ``num_shared`` shared experts, ``num_specific`` experts per task,
    and per task a softmax gate over [shared, own specific] experts. ``shared_gate=True`` (every PLE level
    but the last) adds a gate over all experts that feeds the next level's shared experts.
    ``per_task_gates=False`` gives every task the same gate (OMoE). A gate over one expert is the constant 1.
    """

    def __init__(
        self, *, in_features: int, hidden: int, num_tasks: int, num_shared: int, num_specific: int,
        per_task_gates: bool = True, shared_gate: bool = False,
    ) -> None:
        super().__init__()
        _positive(in_features=in_features, hidden=hidden, num_tasks=num_tasks)
        if num_shared < 0 or num_specific < 0 or num_shared + num_specific < 1:
            raise ValueError(f"need num_shared >= 0, num_specific >= 0 and at least one expert; got {num_shared}, {num_specific}")
        if not per_task_gates and num_specific:
            raise ValueError("per_task_gates=False (one gate for all tasks) needs num_specific=0")
        self.num_tasks, self.num_shared, self.num_specific = num_tasks, num_shared, num_specific
        self.shared = ExpertBank(in_features=in_features, hidden=hidden, num_experts=num_shared) if num_shared else None
        self.specific = (
            ExpertBank(in_features=in_features, hidden=hidden, num_experts=num_tasks * num_specific, groups=num_tasks)
            if num_specific else None
        )
        per_gate = num_shared + num_specific
        n_gates = num_tasks if per_task_gates else 1
        self.gates = nn.ModuleList([nn.Linear(in_features, per_gate) for _ in range(n_gates)]) if per_gate > 1 else None
        self.shared_gate = nn.Linear(in_features, num_shared + num_tasks * num_specific) if shared_gate else None

    @property
    def num_experts(self) -> int:
        return self.num_shared + self.num_tasks * self.num_specific

    def forward(self, task_x: list[Tensor], shared_x: Tensor) -> tuple[list[Tensor], Tensor | None, Tensor]:
        """``task_x``: T inputs (B, F) (task k's gate and specific experts read ``task_x[k]``); ``shared_x``
        (B, F) feeds the shared experts. Returns (T outputs (B, H), the shared output (B, H) or None,
        gate weights (T, B, E) over all experts of the level, zero where a task cannot route)."""
        T, B = self.num_tasks, shared_x.shape[0]
        parts = []  # (T, B, e, H) blocks in expert order: shared, then task 0's specific, task 1's, ...
        if self.shared is not None:
            parts.append(self.shared(shared_x.unsqueeze(0))[0].unsqueeze(0).expand(T, -1, -1, -1))
        if self.specific is not None:
            spec = self.specific(torch.stack(task_x))  # (T, B, S, H): task t's input through its own experts
            parts.append(spec)
        experts_TBeH = torch.cat(parts, dim=2)  # (T, B, shared + specific, H): what task t may mix
        if self.gates is None:
            w_TBe = experts_TBeH.new_ones(T, B, 1)
        else:
            w_TBe = torch.stack([torch.softmax(self.gates[min(t, len(self.gates) - 1)](task_x[t]), -1) for t in range(T)])
        outs = torch.einsum("tbe,tbeh->tbh", w_TBe, experts_TBeH).unbind(0)
        usage = self._scatter_usage(w_TBe)
        shared_out = None
        if self.shared_gate is not None:
            blocks = []
            if self.shared is not None:
                blocks.append(experts_TBeH[0, :, : self.num_shared])
            if self.specific is not None:
                blocks.append(spec.permute(1, 0, 2, 3).reshape(B, T * self.num_specific, -1))
            all_BEH = torch.cat(blocks, dim=1)
            shared_out = torch.einsum("be,beh->bh", torch.softmax(self.shared_gate(shared_x), -1), all_BEH)
        return list(outs), shared_out, usage

    def _scatter_usage(self, w_TBe: Tensor) -> Tensor:
        """Gate weights placed on the level's full expert list (T, B, E)."""
        T, B, _ = w_TBe.shape
        full = w_TBe.new_zeros(T, B, self.num_experts)
        full[:, :, : self.num_shared] = w_TBe[:, :, : self.num_shared]
        for t in range(T):
            s = self.num_shared + t * self.num_specific
            full[t, :, s : s + self.num_specific] = w_TBe[t, :, self.num_shared :]
        return full


class ExtractionNet(nn.Module):
    """Stacked :class:`ExtractionLevel` s (PLE); one level is CGC, or MMoE/OMoE/shared-bottom with no
    task-specific experts. Level ``l > 0`` reads the previous level's task and shared outputs."""

    def __init__(
        self, *, in_features: int, num_tasks: int, hidden: int, num_levels: int = 1, num_shared: int = 1,
        num_specific: int = 0, per_task_gates: bool = True,
    ) -> None:
        super().__init__()
        _positive(num_levels=num_levels)
        self.num_tasks, self.out_features = num_tasks, hidden
        self.levels = nn.ModuleList([
            ExtractionLevel(
                in_features=in_features if i == 0 else hidden, hidden=hidden, num_tasks=num_tasks, num_shared=num_shared,
                num_specific=num_specific, per_task_gates=per_task_gates, shared_gate=i < num_levels - 1,
            )
            for i in range(num_levels)
        ])

    def forward(self, x: Tensor) -> NetOutput:
        task_x, shared_x = [x] * self.num_tasks, x
        for level in self.levels:
            task_x, shared_x, _ = level(task_x, shared_x)
        return NetOutput(task_x, x.new_zeros(()))

    def expert_labels(self, task_names: Sequence[str]) -> list[list[str]]:
        """Column names of :meth:`expert_usage` per level: shared experts ``s0..``, then ``<task>:0..`` per task."""
        return [
            [f"s{i}" for i in range(lvl.num_shared)] + [f"{n}:{j}" for n in task_names for j in range(lvl.num_specific)]
            for lvl in self.levels
        ]

    @torch.no_grad()
    def expert_usage(self, x: Tensor) -> list[Tensor]:
        """Per level, the mean gate weight each task gives each expert, (T, E) (columns: :meth:`expert_labels`)."""
        task_x, shared_x, usage = [x] * self.num_tasks, x, []
        for level in self.levels:
            task_x, shared_x, w_TBE = level(task_x, shared_x)
            usage.append(w_TBE.mean(1))
        return usage


class SingleTaskNets(nn.Module):
    """One independent ``relu(Linear)`` bottom per task: the no-sharing baseline."""

    def __init__(self, *, in_features: int, num_tasks: int, hidden: int) -> None:
        super().__init__()
        self.out_features = hidden
        self.bottoms = nn.ModuleList([nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU()) for _ in range(num_tasks)])

    def forward(self, x: Tensor) -> NetOutput:
        return NetOutput([b(x) for b in self.bottoms], x.new_zeros(()))

    def expert_usage(self, x: Tensor) -> list[Tensor]:
        return []


class TaskMoENet(nn.Module):
    """``Linear(F, D) -> [pre-norm residual MoE block] * depth -> LayerNorm``, every MoE routed by the core's
    :class:`~moeparadigms.core.TaskConditionedRouter`.

    ``forward(x, task_id)`` routes each sample by its own task id (one pass over the batch: the compute task
    routing exists to save); ``forward(x)`` without ids runs the batch once per task (all tasks stacked in
    one call), so each task gets its own routing of the same input, as when every sample carries every
    task's label (the shape of Avalanche's ``MultiTaskModule.forward``)."""

    def __init__(self, *, in_features: int, num_tasks: int, depth: int, moe_factory: Callable[[], MoE]) -> None:
        super().__init__()
        _positive(in_features=in_features, num_tasks=num_tasks, depth=depth)
        self.num_tasks = num_tasks
        self.blocks = nn.ModuleList([MoEBlock(moe_factory()) for _ in range(depth)])  # independent initialisations
        d_model = self.blocks[0].moe.d_model
        self.out_features = d_model
        self.inp = nn.Linear(in_features, d_model)
        self.norm = nn.LayerNorm(d_model)

    def _run(self, x: Tensor, task_id_N: Tensor) -> tuple[Tensor, Tensor, list]:
        h = self.inp(x)
        aux, stats = h.new_zeros(()), []
        for block in self.blocks:
            out = block(h, task_id=task_id_N)
            h, aux = out.y, aux + out.aux_loss
            stats.append(out.stats)
        return self.norm(h), aux, stats

    def forward(self, x: Tensor, task_id: Tensor | None = None) -> NetOutput:
        if task_id is not None:
            h, aux, _ = self._run(x, task_id)
            return NetOutput([h[task_id == t] for t in range(self.num_tasks)], aux, per_task_rows=True)
        B = x.shape[0]
        task_id = torch.arange(self.num_tasks, device=x.device).repeat_interleave(B)
        h, aux, _ = self._run(x.repeat(self.num_tasks, 1), task_id)
        return NetOutput(list(h.split(B)), aux)

    @torch.no_grad()
    def expert_usage(self, x: Tensor) -> list[Tensor]:
        """Per MoE block, the fraction of each task's routing assignments each expert receives, (T, E)."""
        per_task = []
        for t in range(self.num_tasks):
            _, _, stats = self._run(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
            per_task.append([s.tokens_per_expert.float() / s.tokens_per_expert.sum().clamp_min(1) for s in stats])
        return [torch.stack([pt[i] for pt in per_task]) for i in range(len(self.blocks))]


# ---------------------------------------------------------------------------------------------------
# Architecture specs (what the method YAML names)
# ---------------------------------------------------------------------------------------------------


class Architecture:
    """Base class: hyperparameters of one architecture; ``build`` makes the network for a benchmark."""

    name = "architecture"

    def build(self, *, in_features: int, num_tasks: int) -> nn.Module:  # pragma: no cover - interface
        raise NotImplementedError

    def config(self) -> dict:
        """``{"class_path", "init_args"}``: plain data (checkpoints and hparams.yaml keep it, not the object)."""
        cls = type(self)
        names = [n for n in inspect.signature(cls.__init__).parameters if n != "self"]
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": {n: getattr(self, n) for n in names}}

    @staticmethod
    def from_config(spec: Architecture | dict) -> Architecture:
        """An Architecture, or its :meth:`config` dict (what a checkpoint holds), as an Architecture."""
        if isinstance(spec, Architecture):
            return spec
        if isinstance(spec, dict) and isinstance(spec.get("class_path"), str):
            module, _, name = spec["class_path"].rpartition(".")
            cls = getattr(importlib.import_module(module), name, None)
            if isinstance(cls, type) and issubclass(cls, Architecture):
                return cls(**spec.get("init_args", {}))
        raise TypeError(
            f"architecture must be a multitask Architecture (SharedBottom, OMoE, MMoE, CGC, PLE, TaskMoE, SingleTask) "
            f"or its {{class_path, init_args}} dict, got {spec!r}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.config()['init_args'].items())})"


class SharedBottom(Architecture):
    """One shared ``relu(Linear(F, hidden))`` bottom, a tower per task (Caruana 1997)."""

    name = "shared-bottom"

    def __init__(self, *, hidden: int = 128) -> None:
        _positive(hidden=hidden)
        self.hidden = hidden

    def build(self, *, in_features: int, num_tasks: int) -> nn.Module:
        return ExtractionNet(in_features=in_features, num_tasks=num_tasks, hidden=self.hidden, num_shared=1)


class OMoE(Architecture):
    """One-gate MoE: ``num_experts`` shared experts mixed by a single gate shared by all tasks."""

    name = "omoe"

    def __init__(self, *, num_experts: int = 8, expert_hidden: int = 16) -> None:
        _positive(num_experts=num_experts, expert_hidden=expert_hidden)
        self.num_experts, self.expert_hidden = num_experts, expert_hidden

    def build(self, *, in_features: int, num_tasks: int) -> nn.Module:
        return ExtractionNet(
            in_features=in_features, num_tasks=num_tasks, hidden=self.expert_hidden, num_shared=self.num_experts,
            per_task_gates=False,
        )


class MMoE(OMoE):
    """Multi-gate MoE (Ma et al. 2018): shared experts, one softmax gate per task."""

    name = "mmoe"

    def build(self, *, in_features: int, num_tasks: int) -> nn.Module:
        return ExtractionNet(
            in_features=in_features, num_tasks=num_tasks, hidden=self.expert_hidden, num_shared=self.num_experts
        )


class PLE(Architecture):
    """Progressive Layered Extraction (Tang et al. 2020): ``num_levels`` levels of ``num_shared_experts``
    shared plus ``num_task_experts`` per-task experts; one level is CGC. With ``num_task_experts=0`` a
    level is MMoE."""

    name = "ple"

    def __init__(
        self, *, num_levels: int = 2, num_shared_experts: int = 4, num_task_experts: int = 2, expert_hidden: int = 16
    ) -> None:
        _positive(num_levels=num_levels, expert_hidden=expert_hidden)
        if not isinstance(num_shared_experts, int) or not isinstance(num_task_experts, int):
            raise ValueError(f"num_shared_experts and num_task_experts must be integers, got {num_shared_experts!r}, {num_task_experts!r}")
        if num_shared_experts < 0 or num_task_experts < 0 or num_shared_experts + num_task_experts < 1:
            raise ValueError(
                f"num_shared_experts={num_shared_experts}, num_task_experts={num_task_experts}: both must be >= 0 "
                "and each task needs at least one expert"
            )
        if num_levels > 1 and num_shared_experts < 1:
            raise ValueError("num_levels > 1 needs num_shared_experts >= 1 (the levels communicate through them)")
        self.num_levels, self.num_shared_experts = num_levels, num_shared_experts
        self.num_task_experts, self.expert_hidden = num_task_experts, expert_hidden

    def build(self, *, in_features: int, num_tasks: int) -> nn.Module:
        return ExtractionNet(
            in_features=in_features, num_tasks=num_tasks, hidden=self.expert_hidden, num_levels=self.num_levels,
            num_shared=self.num_shared_experts, num_specific=self.num_task_experts,
        )


class CGC(PLE):
    """Customized Gate Control: one PLE level."""

    name = "cgc"

    def __init__(self, *, num_shared_experts: int = 4, num_task_experts: int = 2, expert_hidden: int = 16) -> None:
        super().__init__(
            num_levels=1, num_shared_experts=num_shared_experts, num_task_experts=num_task_experts, expert_hidden=expert_hidden
        )


class TaskMoE(Architecture):
    """Task-level routing (Kudugunta et al. 2021) with the core: ``depth`` residual MoE blocks of
    ``num_experts`` MLP experts, each routed by a :class:`~moeparadigms.core.TaskConditionedRouter`
    (``conditioning``: ``"concat"`` task embedding added into the token gate, ``"gate"`` one gate per task,
    ``"task_only"`` routing by task alone)."""

    name = "task-moe"

    def __init__(
        self,
        *,
        d_model: int = 32,
        num_experts: int = 8,
        expert_hidden: int = 32,
        top_k: int = 2,
        depth: int = 1,
        conditioning: Literal["concat", "gate", "task_only"] = "concat",
        task_dim: int = 8,
        load_balance_coef: float = 0.01,
        z_loss_coef: float = 0.001,
    ) -> None:
        _positive(d_model=d_model, num_experts=num_experts, expert_hidden=expert_hidden, top_k=top_k, depth=depth,
                  task_dim=task_dim)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} must be <= num_experts={num_experts}")
        if conditioning not in ("concat", "gate", "task_only"):
            raise ValueError(f"conditioning={conditioning!r} is not supported; choose one of ['concat', 'gate', 'task_only']")
        self.d_model, self.num_experts, self.expert_hidden, self.top_k = d_model, num_experts, expert_hidden, top_k
        self.depth, self.conditioning, self.task_dim = depth, conditioning, task_dim
        self.load_balance_coef, self.z_loss_coef = load_balance_coef, z_loss_coef

    def build(self, *, in_features: int, num_tasks: int) -> nn.Module:
        def moe() -> MoE:
            return MoE(
                router=TaskConditionedRouter(
                    d_model=self.d_model, num_experts=self.num_experts, num_tasks=num_tasks, top_k=self.top_k,
                    conditioning=self.conditioning, task_dim=self.task_dim,
                ),
                experts=MLPExperts(d_model=self.d_model, hidden=self.expert_hidden, num_experts=self.num_experts),
                load_balance_coef=self.load_balance_coef, z_loss_coef=self.z_loss_coef,
            )

        return TaskMoENet(in_features=in_features, num_tasks=num_tasks, depth=self.depth, moe_factory=moe)


class SingleTask(Architecture):
    """No sharing: an independent ``relu(Linear(F, hidden))`` bottom per task (size it so the *total*
    matches the other architectures' budget)."""

    name = "single-task"

    def __init__(self, *, hidden: int = 64) -> None:
        _positive(hidden=hidden)
        self.hidden = hidden

    def build(self, *, in_features: int, num_tasks: int) -> nn.Module:
        return SingleTaskNets(in_features=in_features, num_tasks=num_tasks, hidden=self.hidden)


# ---------------------------------------------------------------------------------------------------
# Loss balancing
# ---------------------------------------------------------------------------------------------------

Balancing = Literal["fixed", "uncertainty", "pcgrad"]
BALANCING = ("fixed", "uncertainty", "pcgrad")


def uncertainty_weighted_loss(losses_T: Tensor, log_var_T: Tensor, regression_T: Tensor) -> Tensor:
    """Kendall et al. 2018 with ``s = log sigma^2`` learned per task (``s`` is unconstrained, unlike sigma):
    regression ``L / (2 sigma^2) + log sigma = 0.5 exp(-s) L + 0.5 s``; classification
    ``L / sigma^2 + log sigma = exp(-s) L + 0.5 s``. Summed over tasks."""
    scale = torch.where(regression_T, 0.5, 1.0).to(losses_T.dtype)
    return (scale * torch.exp(-log_var_T) * losses_T + 0.5 * log_var_T).sum()


def pcgrad(grads: Sequence[Tensor], *, generator: torch.Generator | None = None) -> Tensor:
    """PCGrad (Yu et al. 2020) on flattened per-task gradients: each task's gradient, in turn against every
    other task's *original* gradient (in random order), loses its component along that gradient when the
    two conflict (negative dot product); returns the sum of the projected gradients."""
    if len(grads) == 0:
        raise ValueError("pcgrad needs at least one gradient")
    out = []
    for i, g_i in enumerate(grads):
        g = g_i.clone()
        for j in torch.randperm(len(grads), generator=generator).tolist():
            if j == i:
                continue
            dot = torch.dot(g, grads[j])
            if dot < 0:
                g = g - dot / grads[j].pow(2).sum().clamp_min(1e-20) * grads[j]
        out.append(g)
    return torch.stack(out).sum(0)


# ---------------------------------------------------------------------------------------------------
# Per-task expert usage: a torchmetrics Metric and a PNG
# ---------------------------------------------------------------------------------------------------


class TaskExpertUsage(torchmetrics.Metric):
    """Mean share of each expert in each task's routing (gate weight or assignments), over batches."""

    full_state_update = False

    def __init__(self, num_tasks: int, num_experts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(num_tasks, num_experts, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("batches", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, usage_TE: Tensor) -> None:  # type: ignore[override]
        self.total += usage_TE.to(self.total)
        self.batches += 1

    def compute(self) -> Tensor:  # type: ignore[override]
        return (self.total / self.batches.clamp_min(1)).float()


def plot_expert_usage(
    usage: Sequence[Tensor], task_names: Sequence[str], path: str | Path, title: str = "",
    expert_labels: Sequence[Sequence[str]] | None = None,
) -> Path:
    """Heat map per level/block: rows tasks, columns experts, cell = share of the task's routing.
    ``expert_labels`` names each level's columns (e.g. ``ExtractionNet.expert_labels``); default 0..E-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not usage:
        raise ValueError("no expert usage to plot (this architecture has no experts)")
    fig, axes = plt.subplots(1, len(usage), figsize=(1.0 + 0.55 * sum(u.shape[1] for u in usage) + 1.5 * len(usage), 0.6 * len(task_names) + 1.6),
                             squeeze=False)
    for i, (ax, u) in enumerate(zip(axes[0], usage)):
        u = u.detach().cpu().numpy()
        im = ax.imshow(u, vmin=0.0, vmax=max(float(u.max()), 1e-6), cmap="viridis", aspect="auto")
        labels = list(expert_labels[i]) if expert_labels is not None else [str(e) for e in range(u.shape[1])]
        if len(labels) != u.shape[1]:
            raise ValueError(f"expert_labels[{i}] has {len(labels)} names for {u.shape[1]} experts")
        ax.set_xticks(range(u.shape[1]), labels=labels, rotation=45 if max(map(len, labels)) > 2 else 0)
        ax.set_yticks(range(len(task_names)), labels=list(task_names))
        ax.set_xlabel("expert")
        ax.set_title(f"level {i}" if len(usage) > 1 else "expert usage")
        for (r, c), v in np.ndenumerate(u):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 * u.max() else "k")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------------


class StepOutput(NamedTuple):
    loss: Tensor  # () balanced task loss + auxiliary loss (what automatic optimisation minimises)
    losses: Tensor  # (T,) unweighted per-task losses (0 for a task with no sample in the batch)
    present: Tensor  # (T,) bool: tasks that had samples in the batch
    aux_loss: Tensor  # () router losses


class MultiTaskMoE(pl.LightningModule):
    """Multi-task network: an architecture's shared part, one tower per task, balanced task losses.

    Args:
        in_features: input width (inputs are flattened).
        tasks: one :class:`TaskSpec` per task (regression and classification may be mixed).
        architecture: :class:`SharedBottom`, :class:`OMoE`, :class:`MMoE`, :class:`CGC`, :class:`PLE`,
            :class:`TaskMoE` or :class:`SingleTask`.
        tower_hidden: hidden width of each task's tower ``Linear(H, tower_hidden) -> ReLU -> Linear``.
        balancing: ``"fixed"`` (``task_weights``), ``"uncertainty"`` (Kendall et al. 2018, learned
            ``log sigma^2`` per task) or ``"pcgrad"`` (Yu et al. 2020; manual optimisation, the fixed weights
            are applied before projecting).
        task_weights: fixed per-task weights (default all 1).
        lr, weight_decay: Adam(W) settings.
        usage_plot: write ``expert_usage.png`` (per-task expert usage on the validation data) into the
            trainer's log directory at the end of ``fit``.
    """

    def __init__(
        self,
        *,
        in_features: int,
        tasks: Sequence[TaskSpec],
        architecture: Architecture | dict,
        tower_hidden: int = 8,
        balancing: Balancing = "fixed",
        task_weights: Sequence[float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        usage_plot: bool = True,
    ) -> None:
        super().__init__()
        _positive(in_features=in_features, tower_hidden=tower_hidden)
        tasks = [t if isinstance(t, TaskSpec) else TaskSpec(**t) for t in tasks]
        if not tasks:
            raise ValueError("tasks must list at least one TaskSpec")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        architecture = Architecture.from_config(architecture)
        if balancing not in BALANCING:
            raise ValueError(f"balancing={balancing!r} is not supported; choose one of {list(BALANCING)}")
        weights = [1.0] * len(tasks) if task_weights is None else [float(w) for w in task_weights]
        if len(weights) != len(tasks) or any(not w >= 0 for w in weights):
            raise ValueError(f"task_weights={task_weights!r}: give {len(tasks)} non-negative weights (one per task)")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        # hyperparameters as plain data, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["tasks", "architecture"])
        self.hparams["tasks"] = [asdict(t) for t in tasks]
        self.hparams["architecture"] = architecture.config()
        self.tasks, self.architecture = tasks, architecture
        self.net = architecture.build(in_features=in_features, num_tasks=len(tasks))
        self.towers = nn.ModuleList([
            nn.Sequential(nn.Linear(self.net.out_features, tower_hidden), nn.ReLU(), nn.Linear(tower_hidden, t.out_features))
            for t in tasks
        ])
        self.register_buffer("task_weights", torch.tensor(weights), persistent=False)
        self.register_buffer("is_regression", torch.tensor([t.kind == "regression" for t in tasks]), persistent=False)
        # log sigma^2 per task; only uncertainty weighting trains (and therefore owns) it
        self.log_var = nn.Parameter(torch.zeros(len(tasks))) if balancing == "uncertainty" else None
        self.automatic_optimization = balancing != "pcgrad"
        self.metrics = nn.ModuleDict({
            f"{stage}_{i}": self._task_metrics(t, stage) for stage in ("train", "val", "test") for i, t in enumerate(tasks)
        })
        self.usage = nn.ModuleList([TaskExpertUsage(len(tasks), e) for e in self._experts_per_level()])
        self.last_usage: list[Tensor] = []

    @staticmethod
    def _task_metrics(task: TaskSpec, stage: str) -> torchmetrics.MetricCollection:
        prefix = f"{stage}/{task.name}/"
        if task.kind == "regression":
            return torchmetrics.MetricCollection({"mse": torchmetrics.MeanSquaredError()}, prefix=prefix)
        C = task.num_classes
        return torchmetrics.MetricCollection(
            {"acc": torchmetrics.Accuracy(task="multiclass", num_classes=C),
             "auc": torchmetrics.AUROC(task="multiclass", num_classes=C)},
            prefix=prefix,
        )

    def _experts_per_level(self) -> list[int]:
        if isinstance(self.net, ExtractionNet):
            return [lvl.num_experts for lvl in self.net.levels]
        if isinstance(self.net, TaskMoENet):
            return [b.moe.num_experts for b in self.net.blocks]
        return []

    def setup(self, stage: str) -> None:
        # the benchmark YAML states the tasks twice (data and model): catch a mismatch before training
        data_tasks = getattr(getattr(self.trainer, "datamodule", None), "tasks", None)
        if data_tasks is not None and [asdict(t) for t in data_tasks] != [asdict(t) for t in self.tasks]:
            raise ValueError(
                f"model tasks {[asdict(t) for t in self.tasks]} differ from the data's tasks "
                f"{[asdict(t) for t in data_tasks]}: list the data's tasks, in order, under model.init_args.tasks"
            )

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor) -> list[Tensor]:
        """Predictions per task: regression ``(B,)``, classification logits ``(B, C)``."""
        return self._forward(x)[0]

    def _forward(self, x: Tensor, task_id: Tensor | None = None) -> tuple[list[Tensor], Tensor, bool]:
        """Per-task predictions, the aux loss, and whether prediction ``t`` holds only the rows of task ``t``
        (a net that routes by per-sample task id computes each sample for its own task only)."""
        x = x.flatten(1) if x.dim() > 2 else x
        if x.dim() != 2 or x.shape[1] != self.hparams.in_features:
            raise ValueError(f"input must have shape (B, {self.hparams.in_features}), got {tuple(x.shape)}")
        out = self.net(x, task_id) if task_id is not None and isinstance(self.net, TaskMoENet) else self.net(x)
        preds = [tower(r) for tower, r in zip(self.towers, out.reps, strict=True)]
        preds = [p.squeeze(-1) if t.kind == "regression" else p for p, t in zip(preds, self.tasks, strict=True)]
        return preds, out.aux_loss, out.per_task_rows

    # ------------------------------------------------------------------ losses
    def _split_batch(self, batch: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(x, y_BT)`` or ``(x, task_id_B, y_B)`` -> (x, y, task_id or None), validated."""
        T = len(self.tasks)
        if len(batch) == 2:
            x, y = batch
            if y.dim() == 1 and T == 1:
                y = y.unsqueeze(1)
            if y.dim() != 2 or y.shape != (x.shape[0], T):
                raise ValueError(f"multi-label targets must have shape (batch, num_tasks={T}), got {tuple(y.shape)}")
            return x, y, None
        if len(batch) == 3:
            x, task_id, y = batch
            if task_id.is_floating_point() or task_id.shape != (x.shape[0],) or y.shape[:1] != (x.shape[0],):
                raise ValueError(
                    f"(x, task_id, y) batches need integer task_id and y of shape (batch,), got {tuple(task_id.shape)} "
                    f"({task_id.dtype}) and {tuple(y.shape)}"
                )
            if task_id.numel() and (int(task_id.min()) < 0 or int(task_id.max()) >= T):
                bad = int(task_id.min()) if int(task_id.min()) < 0 else int(task_id.max())
                raise ValueError(f"task_id {bad} out of range: this model has {T} tasks (ids 0..{T - 1})")
            return x, y, task_id.long()
        raise ValueError(f"a batch must be (x, y) or (x, task_id, y); got a {type(batch).__name__} of {len(batch)} items")

    def _task_loss(self, t: int, pred: Tensor, y: Tensor) -> Tensor:
        task = self.tasks[t]
        if task.kind == "regression":
            return F.mse_loss(pred, y.to(pred.dtype))
        labels = y.long()
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= task.num_classes):
            bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
            raise ValueError(f"task {task.name!r}: class label {bad} out of range (num_classes={task.num_classes})")
        return F.cross_entropy(pred, labels)

    def combine(self, losses_T: Tensor, present_T: Tensor) -> Tensor:
        """The balanced total of per-task losses (tasks absent from the batch contribute nothing)."""
        if self.log_var is not None:
            return uncertainty_weighted_loss(losses_T[present_T], self.log_var[present_T], self.is_regression[present_T])
        return (self.task_weights * losses_T)[present_T].sum()

    def task_losses(self, batch: Sequence[Tensor]) -> tuple[StepOutput, list[tuple[Tensor, Tensor]]]:
        """Forward a batch; per-task losses (unbalanced) and each task's (prediction, target) pair.
        No logging: plain training loops (the benchmark script) call this and :meth:`combine`."""
        x, y, task_id = self._split_batch(batch)
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"batch contains NaN/inf inputs (global step {self.global_step})")
        preds, aux, per_task_rows = self._forward(x, task_id)
        losses, present, pairs = [], [], []
        for t, pred in enumerate(preds):
            if task_id is None:
                p_t, y_t = pred, y[:, t]
            else:
                mask = task_id == t
                p_t, y_t = (pred if per_task_rows else pred[mask]), y[mask]
            present.append(p_t.shape[0] > 0)
            losses.append(self._task_loss(t, p_t, y_t) if p_t.shape[0] else pred.new_zeros(()))
            pairs.append((p_t, y_t))
        losses_T, present_T = torch.stack(losses), torch.tensor(present, device=x.device)
        return StepOutput(self.combine(losses_T, present_T) + aux, losses_T, present_T, aux), pairs

    def _step(self, batch: Sequence[Tensor], stage: str) -> StepOutput:
        out, pairs = self.task_losses(batch)
        for t, task in enumerate(self.tasks):
            if bool(out.present[t]):
                self.log(f"{stage}/{task.name}/loss", out.losses[t], on_step=False, on_epoch=True, sync_dist=True)
                self._update_metrics(stage, t, pairs[t][0].detach(), pairs[t][1])
        self.log(f"{stage}/loss", out.loss - out.aux_loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True)
        self.log(f"{stage}/aux_loss", out.aux_loss, on_step=False, on_epoch=True, sync_dist=True)
        return out

    def predict_step(self, batch: Sequence[Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Every task's prediction per sample (``moeparadigms predict``): the class for classification
        tasks, the value for regression tasks, keyed by task name."""
        x = self._split_batch(batch)[0] if isinstance(batch, (tuple, list)) else batch
        preds = self._forward(x)[0]
        return {t.name: (p if t.kind == "regression" else p.argmax(-1)) for t, p in zip(self.tasks, preds, strict=True)}

    def _update_metrics(self, stage: str, t: int, pred: Tensor, y: Tensor) -> None:
        m = self.metrics[f"{stage}_{t}"]
        if self.tasks[t].kind == "regression":
            m.update(pred, y.to(pred.dtype))
        else:
            m.update(torch.softmax(pred.float(), -1), y.long())
        self.log_dict(m, on_step=False, on_epoch=True, prog_bar=stage != "train" and t == 0)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx):
        out = self._step(batch, "train")
        if self.log_var is not None:
            for t, task in enumerate(self.tasks):
                self.log(f"train/{task.name}/sigma", torch.exp(0.5 * self.log_var[t].detach()), on_step=False, on_epoch=True, sync_dist=True)
        if self.automatic_optimization:
            return out.loss
        opt = self.optimizers()
        opt.zero_grad()
        self.pcgrad_backward(out)
        opt.step()
        return out.loss.detach()

    def pcgrad_backward(self, out: StepOutput) -> None:
        """Fill ``.grad`` with PCGrad's combination of the weighted task gradients plus the aux-loss gradient."""
        params = [p for p in self.parameters() if p.requires_grad]

        def flat(loss: Tensor) -> Tensor:
            gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])

        task_grads = [flat(self.task_weights[t] * out.losses[t]) for t in range(len(self.tasks)) if out.present[t]]
        total = pcgrad(task_grads)
        if out.aux_loss.requires_grad:
            total = total + flat(out.aux_loss)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = total[offset : offset + n].view_as(p).clone()
            offset += n

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")
        if self.usage:
            x = self._split_batch(batch)[0]
            for metric, u in zip(self.usage, self.net.expert_usage(x.flatten(1) if x.dim() > 2 else x)):
                metric.update(u)

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        if self.usage and any(int(m.batches) for m in self.usage):
            self.last_usage = [m.compute() for m in self.usage]
        for m in self.usage:
            m.reset()

    def on_fit_end(self) -> None:
        log_dir = getattr(self.trainer, "log_dir", None)
        if self.hparams.usage_plot and self.last_usage and log_dir and self.trainer.is_global_zero:
            names = [t.name for t in self.tasks]
            labels = self.net.expert_labels(names) if isinstance(self.net, ExtractionNet) else None
            plot_expert_usage(self.last_usage, names, Path(log_dir) / "expert_usage.png",
                              title=f"{type(self.architecture).__name__}: per-task expert usage (validation)", expert_labels=labels)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_compatible(self, checkpoint, hparams=dict(self.hparams))

    def configure_optimizers(self):
        # fused: one kernel for every parameter instead of a Python loop over them (torch's CPU default is the
        # loop, ~3 ms a step for these small networks, more than their forward)
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True)


__all__ = [
    "TaskSpec", "Architecture", "SharedBottom", "OMoE", "MMoE", "CGC", "PLE", "TaskMoE", "SingleTask",
    "ExtractionNet", "ExtractionLevel", "ExpertBank", "TaskMoENet", "SingleTaskNets", "MultiTaskMoE",
    "uncertainty_weighted_loss", "pcgrad", "TaskExpertUsage", "plot_expert_usage", "BALANCING",
]
