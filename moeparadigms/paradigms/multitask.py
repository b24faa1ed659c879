"""Multi-task learning with mixtures of experts: shared-bottom, OMoE, MMoE, CGC, PLE and Task-MoE.

One :class:`MultiTaskMoE` LightningModule; the architecture is a typed component chosen in YAML
(``architecture: {class_path: ...MMoE, init_args: {...}}``), built for the benchmark's
:class:`~moeparadigms.benchmarks.specs.MultiTaskSpec` (input width and tasks, from the DataModule). The
networks and architectures live in :mod:`moeparadigms.paradigms.multitask_nets` and are re-exported here,
the path the YAMLs name.

Batches are ``(x_BF, y_BT)`` (every sample labelled for every task; classification targets are class
indices stored as floats) or ``(x_BF, task_id_B, y_B)`` (one task per sample). Loss balancing: fixed
weights, uncertainty weighting (Kendall et al. 2018) or PCGrad (Yu et al. 2020).

Shape legend: B batch, F input features, T tasks, E experts, H expert output width, C classes.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from .. import plots
from ..benchmarks.specs import (  # TaskSpec re-exported: YAMLs and user code import it from here too
    MultiTaskSpec,
    TaskSpec,
)
from ..checkpoint import hparams_ignore
from ..checks import check_positive
from .base import OptimizerCallable, ParadigmModule
from .multitask_nets import (  # re-exported: the class paths the YAMLs name
    CGC,
    PLE,
    Architecture,
    ExpertBank,
    ExtractionLevel,
    ExtractionNet,
    MMoE,
    NetOutput,
    OMoE,
    SharedBottom,
    SingleTask,
    SingleTaskNets,
    TaskMoE,
    TaskMoENet,
)

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
        grow = usage_TE.shape[-1] - self.total.shape[-1]
        if grow < 0:
            raise ValueError(f"usage has {usage_TE.shape[-1]} experts, the metric counts {self.total.shape[-1]}")
        if grow:  # the layer was upcycled or grew after the metric was built: earlier batches used no new expert
            self.total = torch.nn.functional.pad(self.total, (0, grow))
        self.total += usage_TE.to(self.total)
        self.batches += 1

    def compute(self) -> Tensor:  # type: ignore[override]
        return (self.total / self.batches.clamp_min(1)).float()


def plot_expert_usage(
    usage: Sequence[Tensor], task_names: Sequence[str], path: str | Path, title: str = "",
    expert_labels: Sequence[Sequence[str]] | None = None,
) -> Path:
    """:func:`moeparadigms.plots.plot_expert_usage` with the rows named by ``task_names`` (the multi-task call form)."""
    return plots.plot_expert_usage(usage, path, row_labels=task_names, expert_labels=expert_labels, title=title)


# ---------------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------------


class StepOutput(NamedTuple):
    loss: Tensor  # () balanced task loss + auxiliary loss (what automatic optimisation minimises)
    losses: Tensor  # (T,) unweighted per-task losses (0 for a task with no sample in the batch)
    present: Tensor  # (T,) bool: tasks that had samples in the batch
    aux_loss: Tensor  # () router losses


class MultiTaskMoE(ParadigmModule):
    """Multi-task network: an architecture's shared part, one tower per task, balanced task losses.

    Args:
        in_features: input width (inputs are flattened).
        tasks: one :class:`TaskSpec` per task (regression and classification may be mixed). With
            ``in_features``, None (the YAML way) takes both from the DataModule's
            :class:`~moeparadigms.benchmarks.specs.MultiTaskSpec` at ``setup``: the task list is stated once.
        architecture: :class:`SharedBottom`, :class:`OMoE`, :class:`MMoE`, :class:`CGC`, :class:`PLE`,
            :class:`TaskMoE` or :class:`SingleTask`.
        tower_hidden: hidden width of each task's tower ``Linear(H, tower_hidden) -> ReLU -> Linear``.
        balancing: ``"fixed"`` (``task_weights``), ``"uncertainty"`` (Kendall et al. 2018, learned
            ``log sigma^2`` per task) or ``"pcgrad"`` (Yu et al. 2020; manual optimisation, the fixed weights
            are applied before projecting).
        task_weights: fixed per-task weights (default all 1).
        lr, weight_decay: AdamW settings (decoupled weight decay), the default optimizer.
        optimizer: a LightningCLI optimizer config replacing the default ``AdamW(lr, weight_decay)``.
        usage_plot: write ``expert_usage.png`` (per-task expert usage on the validation data) into the
            trainer's log directory at the end of ``fit``.
    """

    checkpoint_key = "multitask"
    spec_type = MultiTaskSpec

    def __init__(
        self,
        *,
        in_features: int | None = None,
        tasks: Sequence[TaskSpec] | None = None,
        architecture: Architecture | dict,
        tower_hidden: int = 8,
        balancing: Balancing = "fixed",
        task_weights: Sequence[float] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        usage_plot: bool = True,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer)
        check_positive(tower_hidden=tower_hidden)
        if (in_features is None) != (tasks is None):
            raise ValueError("give both in_features and tasks, or neither (then they come from the data's spec)")
        architecture = Architecture.from_config(architecture)
        if balancing not in BALANCING:
            raise ValueError(f"balancing={balancing!r} is not supported; choose one of {list(BALANCING)}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        # hyperparameters as plain data, so checkpoints load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["tasks", "architecture", *hparams_ignore("optimizer")])
        self.hparams["architecture"] = architecture.config()
        self.architecture = architecture
        if in_features is not None and tasks is not None:
            self.build(MultiTaskSpec(in_features=in_features, tasks=tuple(tasks)))

    def _build(self, spec: MultiTaskSpec) -> None:
        tasks, h = list(spec.tasks), self.hparams
        task_weights = h.task_weights
        weights = [1.0] * len(tasks) if task_weights is None else [float(w) for w in task_weights]
        if len(weights) != len(tasks) or any(not w >= 0 for w in weights):
            raise ValueError(f"task_weights={task_weights!r}: give {len(tasks)} non-negative weights (one per task)")
        self.hparams["in_features"] = spec.in_features
        self.hparams["tasks"] = [asdict(t) for t in tasks]
        self.tasks = tasks
        self.net = self.architecture.build(in_features=spec.in_features, num_tasks=len(tasks))
        self.towers = nn.ModuleList([
            nn.Sequential(nn.Linear(self.net.out_features, h.tower_hidden), nn.ReLU(), nn.Linear(h.tower_hidden, t.out_features))
            for t in tasks
        ])
        self.register_buffer("task_weights", torch.tensor(weights), persistent=False)
        self.register_buffer("is_regression", torch.tensor([t.kind == "regression" for t in tasks]), persistent=False)
        # log sigma^2 per task; only uncertainty weighting trains (and therefore owns) it
        self.log_var = nn.Parameter(torch.zeros(len(tasks))) if h.balancing == "uncertainty" else None
        self.automatic_optimization = h.balancing != "pcgrad"
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

    def spec_mismatch(self, spec: MultiTaskSpec) -> str:
        mine, theirs = [asdict(t) for t in self.tasks], [asdict(t) for t in spec.tasks]
        if mine != theirs:
            return (f"model tasks {mine} differ from the data's tasks {theirs}: list the data's tasks, in order, under "
                    "model.init_args.tasks, or leave tasks and in_features out to take them from the data")
        return f"the model was built for in_features={self.hparams.in_features}; the data has {spec.in_features}"

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
        if stage == "train":  # evaluation runs with autograd off, where the MoE layers skip their aux losses
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
        folder = self.plot_dir()
        if self.hparams.usage_plot and self.last_usage and folder is not None:
            names = [t.name for t in self.tasks]
            labels = self.net.expert_labels(names) if isinstance(self.net, ExtractionNet) else None
            title = f"{type(self.architecture).__name__}: per-task expert usage (validation)"
            self.plot_paths.append(plots.plot_expert_usage(self.last_usage, folder / "expert_usage.png", row_labels=names,
                                                           title=title, expert_labels=labels))

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        # fused: one kernel for every parameter instead of a Python loop over them (torch's CPU default is the
        # loop, ~3 ms a step for these small networks, more than their forward)
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True)

__all__ = [
    "TaskSpec", "Architecture", "SharedBottom", "OMoE", "MMoE", "CGC", "PLE", "TaskMoE", "SingleTask",
    "ExtractionNet", "ExtractionLevel", "ExpertBank", "TaskMoENet", "SingleTaskNets", "MultiTaskMoE",
    "uncertainty_weighted_loss", "pcgrad", "TaskExpertUsage", "plot_expert_usage", "BALANCING", "NetOutput",
]
