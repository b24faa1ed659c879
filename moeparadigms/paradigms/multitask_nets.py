"""Multi-task networks and the architecture specs that build them: shared-bottom, OMoE, MMoE, CGC, PLE,
Task-MoE and single-task (the networks :class:`~moeparadigms.paradigms.multitask.MultiTaskMoE` trains).

Architectures are small *specs* that ``build(in_features=, num_tasks=)`` their network, because the input
width and the number of tasks belong to the benchmark (its :class:`~moeparadigms.benchmarks.specs.MultiTaskSpec`)
while the architecture belongs to the method (``configs/multitask/*.yaml``). They are re-exported from
:mod:`moeparadigms.paradigms.multitask`, the path the YAMLs name.

Two families:

* **Sample-level mixtures** (OMoE, MMoE, CGC, PLE, and shared-bottom as the one-expert case): every
  expert runs on every sample and a softmax gate mixes the experts' outputs (Ma et al. 2018; Tang et al.
  2020). They are one module, :class:`ExtractionNet`: levels of shared and task-specific experts with
  per-task gates. The gating is written here (a ``Linear`` + softmax per task, all experts computed in
  one einsum) rather than through the core's sparse dispatch: nothing is sparse, so dispatch would only
  add sorting.
* **Task-MoE** (Kudugunta et al. 2021): token-level sparse routing conditioned on the task, using the
  core's :class:`~moeparadigms.core.TaskConditionedRouter` inside :class:`~moeparadigms.core.MoE`, in the
  shared trunk (:class:`~moeparadigms.nets.MoETrunk`).

Shape legend: B batch, F input features, T tasks, E experts, H expert output width.
"""
from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checks import check_positive
from ..core import MLPExperts, MoE, TaskConditionedRouter
from ..nets import BlockOutput, Trunk

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
        check_positive(in_features=in_features, hidden=hidden, num_experts=num_experts, groups=groups)
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
        check_positive(in_features=in_features, hidden=hidden, num_tasks=num_tasks)
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
        check_positive(num_levels=num_levels)
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


class TaskMoENet(Trunk):
    """The shared :class:`~moeparadigms.nets.Trunk` (``Linear(F, D) -> [pre-norm residual MoE block] * depth ->
    LayerNorm``), every MoE routed by the core's :class:`~moeparadigms.core.TaskConditionedRouter`; the task heads
    live in :class:`~moeparadigms.paradigms.multitask.MultiTaskMoE`.

    ``forward(x, task_id)`` routes each sample by its own task id (one pass over the batch: the compute task
    routing exists to save); ``forward(x)`` without ids runs the batch once per task (all tasks stacked in
    one call), so each task gets its own routing of the same input, as when every sample carries every
    task's label (the shape of Avalanche's ``MultiTaskModule.forward``)."""

    def __init__(self, *, in_features: int, num_tasks: int, depth: int, moe_factory: Callable[[], MoE]) -> None:
        check_positive(in_features=in_features, num_tasks=num_tasks, depth=depth)
        # one factory call per block (independent initialisations), all before the input layer, as always
        super().__init__(in_features=in_features, moe=[moe_factory() for _ in range(depth)])
        self.num_tasks = num_tasks

    def _run(self, x: Tensor, task_id_N: Tensor) -> BlockOutput:
        return Trunk.forward(self, x, task_id=task_id_N)  # (y normed, aux, stats per block)

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
        check_positive(hidden=hidden)
        self.hidden = hidden

    def build(self, *, in_features: int, num_tasks: int) -> nn.Module:
        return ExtractionNet(in_features=in_features, num_tasks=num_tasks, hidden=self.hidden, num_shared=1)


class OMoE(Architecture):
    """One-gate MoE: ``num_experts`` shared experts mixed by a single gate shared by all tasks."""

    name = "omoe"

    def __init__(self, *, num_experts: int = 8, expert_hidden: int = 16) -> None:
        check_positive(num_experts=num_experts, expert_hidden=expert_hidden)
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
        check_positive(num_levels=num_levels, expert_hidden=expert_hidden)
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
        check_positive(d_model=d_model, num_experts=num_experts, expert_hidden=expert_hidden, top_k=top_k, depth=depth,
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
        check_positive(hidden=hidden)
        self.hidden = hidden

    def build(self, *, in_features: int, num_tasks: int) -> nn.Module:
        return SingleTaskNets(in_features=in_features, num_tasks=num_tasks, hidden=self.hidden)


__all__ = [
    "Architecture", "SharedBottom", "OMoE", "MMoE", "CGC", "PLE", "TaskMoE", "SingleTask",
    "ExtractionNet", "ExtractionLevel", "ExpertBank", "TaskMoENet", "SingleTaskNets", "NetOutput",
]
