"""Meta-learning over an MoE: MAML, first-order MAML, Reptile and Meta-SGD with ``torch.func``.

One LightningModule, :class:`MetaMoE`, meta-trains a small network (dense, or with an MoE block) on
episodes of (support, query) tasks from ``moeparadigms.benchmarks.meta``. The inner loop is functional:
``torch.func.functional_call`` runs the network with *fast weights* that are the meta-parameters minus
inner-loop SGD steps, so nothing is copied and second-order MAML differentiates through the steps.

Which parameters adapt in the inner loop is set by ``adapt``: any of ``all``, ``router`` (the MoE's
router), ``experts`` (the MoE's experts), ``head`` (the output layer), ``context`` (a CAVIA-style context
vector fed with the input, Zintgraf et al. 2019) and ``body`` (everything but head and context). The
others stay at their meta-learned values within a task.

Algorithms (``algorithm``):
    * ``maml``: Finn et al. 2017, second order (``create_graph=True`` through the inner steps);
    * ``fomaml``: the same with the inner gradients treated as constants;
    * ``reptile``: Nichol et al. 2018: inner SGD on the task's support and query points, then the meta
      gradient ``theta - phi`` averaged over the meta-batch.
    ``learn_inner_lr=True`` adds Meta-SGD (Li et al. 2017): one learned inner learning rate per adapted
    weight, trained in the outer loop (maml/fomaml).

Second-order MAML needs twice-differentiable experts: ``MLPExperts(backend="autograd")``, or
``MoE(dense_dispatch=True)`` (every expert on every token, plain autograd: cheaper for few-shot episodes);
the fast sorted CPU kernels are first-order only and say so. Evaluation adapts with gradients, so the Trainer must run with
``inference_mode: false`` (checked). Query loss/accuracy after every inner step 0..``eval_steps`` is
recorded for each evaluation task; ``eval_results`` holds mean, 95% CI and median (the lower middle value for an even
count; a NaN curve counts as +inf) per step and, for regression, the
number of tasks whose adaptation diverged (``diverged_tasks``: query MSE after the last step over ``DIVERGED_FACTOR``
times its value before adaptation, or not finite; logged as ``{stage}/diverged_tasks`` and warned about, since one
such task dominates the mean).

Shape legend: T tasks, S support points, Q query points, F input features, O outputs.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call

from ..benchmarks.specs import EpisodeSpec
from ..checkpoint import hparams_ignore, store_module_configs
from ..checks import check_positive
from ..core import MoE
from ..nets import Trunk, rename_old_keys
from ..plots import plot_adaptation_curves
from .base import OptimizerCallable, ParadigmModule

ALGORITHMS = ("maml", "fomaml", "reptile")
ADAPT_GROUPS = ("all", "router", "experts", "head", "context", "body")


class MetaNet(nn.Module):
    """``[x, context] -> dense ReLU layers -> head`` or ``-> Trunk (Linear -> ReLU -> MoEBlock, no final norm) -> head``.

    The dense variant (``moe=None``) is the dense-MAML baseline network, a plain MLP of ``depth`` x ``width`` as
    MAML's papers use, not the trunk: a user comparing against MAML picks it. Routing off in the trunk is
    ``moe`` with one expert and ``top_k: 1`` (see :class:`~moeparadigms.nets.Trunk`).

    Args:
        in_features, out_features: task sizes.
        width: hidden width of the dense layers (ignored with ``moe``: its ``d_model`` is the width).
        depth: dense hidden layers (without ``moe``).
        moe: the MoE of the trunk's residual MoE block, or None for a dense MLP.
        context_dim: size of a context vector concatenated to every input (0: none).
    """

    def __init__(self, *, in_features: int, out_features: int, width: int = 40, depth: int = 2, moe: MoE | None = None,
                 context_dim: int = 0) -> None:
        super().__init__()
        self.context = nn.Parameter(torch.zeros(context_dim)) if context_dim else None
        fin = in_features + context_dim
        self.body: nn.Sequential | None = None
        self.trunk: Trunk | None = None
        if moe is None:
            layers: list[nn.Module] = []
            for i in range(depth):
                layers += [nn.Linear(fin if i == 0 else width, width), nn.ReLU()]
            self.body = nn.Sequential(*layers)
            hidden = width
        else:
            self.trunk = Trunk(in_features=fin, moe=moe, activation="relu", final_norm=False)
            rename_old_keys(self, {"body.0.": "trunk.inp.", "block.": "trunk.blocks.0."})  # names before the trunk
            hidden = moe.d_model
        self.head = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x ``[..., F]`` -> (outputs ``[..., O]``, MoE auxiliary loss ``()``)."""
        if self.context is not None:
            x = torch.cat([x, self.context.expand(*x.shape[:-1], self.context.numel())], -1)
        if self.trunk is None:
            h = self.body(x)  # type: ignore[misc]
            return self.head(h), h.new_zeros(())
        out = self.trunk(x)
        return self.head(out.y), out.aux_loss


def _in_group(name: str, group: str) -> bool:
    if group == "all":
        return True
    if group == "router":
        return ".router." in name
    if group == "experts":
        return ".experts." in name
    if group == "head":
        return name.startswith("head.")
    if group == "context":
        return name == "context"
    return not (name.startswith("head.") or name == "context")  # body


# a task's adaptation counts as diverged when its query MSE after the last inner step exceeds this many times its
# MSE before adaptation (or is not finite); gradient steps that converge lower it
DIVERGED_FACTOR = 100.0


class MetaMoE(ParadigmModule):
    """MAML-family meta-learning of a dense or MoE network (see the module docstring).

    Args:
        moe: the MoE of the network's MoE block; None for a dense MLP of ``depth`` x ``width``.
        width, depth: the dense network's size.
        context_dim: CAVIA context vector size (adapt it with ``adapt: [context, ...]``).
        algorithm: ``maml``, ``fomaml`` or ``reptile``.
        adapt: the parameter groups the inner loop adapts (see ``ADAPT_GROUPS``).
        inner_steps: inner SGD steps during meta-training.
        inner_lr: inner learning rate; ``context_lr`` overrides it for the context (CAVIA uses a larger one).
        learn_inner_lr: Meta-SGD: learn one inner learning rate per adapted weight.
        eval_steps: inner steps at evaluation; the query metric is recorded after each of 0..eval_steps.
        outer_lr: learning rate of the meta-update (the default optimizer: ``Adam(outer_lr)``).
        grad_clip: clip the meta-gradient norm (0: off).
        in_features, out_features, task_kind: taken from the DataModule's
            :class:`~moeparadigms.benchmarks.specs.EpisodeSpec` when None.
        optimizer: a LightningCLI optimizer config replacing the default ``Adam(outer_lr)``.
    """

    checkpoint_key = "meta"
    spec_type = EpisodeSpec

    def __init__(
        self,
        *,
        moe: MoE | None = None,
        width: int = 40,
        depth: int = 2,
        context_dim: int = 0,
        algorithm: Literal["maml", "fomaml", "reptile"] = "maml",
        adapt: Sequence[str] = ("all",),
        inner_steps: int = 1,
        inner_lr: float = 0.01,
        context_lr: float | None = None,
        learn_inner_lr: bool = False,
        eval_steps: int = 10,
        outer_lr: float = 1e-3,
        grad_clip: float = 0.0,
        plots: bool = True,
        in_features: int | None = None,
        out_features: int | None = None,
        task_kind: Literal["regression", "classification"] | None = None,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer)
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm={algorithm!r} is not supported; choose one of {list(ALGORITHMS)}")
        adapt = [adapt] if isinstance(adapt, str) else list(adapt)
        bad = [a for a in adapt if a not in ADAPT_GROUPS]
        if not adapt or bad:
            raise ValueError(f"adapt={adapt!r}: give one or more of {list(ADAPT_GROUPS)}")
        if "context" in adapt and not context_dim:
            raise ValueError("adapt includes 'context' but context_dim=0: set context_dim > 0")
        if moe is None and any(a in ("router", "experts") for a in adapt):
            raise ValueError(f"adapt={adapt!r} names MoE parts but the network is dense (moe=None)")
        check_positive(width=width, depth=depth, inner_steps=inner_steps, eval_steps=eval_steps)
        for name, v in dict(inner_lr=inner_lr, outer_lr=outer_lr).items():
            if not v > 0:
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if context_lr is not None and not context_lr > 0:
            raise ValueError(f"context_lr must be > 0 or null, got {context_lr!r}")
        if learn_inner_lr and algorithm == "reptile":
            raise ValueError("learn_inner_lr (Meta-SGD) needs algorithm maml or fomaml, got reptile")
        if task_kind not in (None, "regression", "classification"):
            raise ValueError(f"task_kind must be 'regression', 'classification' or null, got {task_kind!r}")
        self.save_hyperparameters(ignore=hparams_ignore("moe", "optimizer"))
        store_module_configs(self, moe=moe)
        self.hparams["adapt"] = adapt
        self.moe = moe
        self.automatic_optimization = False
        self.net: MetaNet | None = None
        self.eval_results: dict[str, dict[str, list[float]]] = {}
        self._curves: list[Tensor] = []
        if in_features is not None and out_features is not None and task_kind is not None:
            self.build(EpisodeSpec(in_features=in_features, out_features=out_features, kind=task_kind))

    # ------------------------------------------------------------------ building
    def build(self, spec: EpisodeSpec | int, out_features: int | None = None, task_kind: str | None = None) -> None:
        """Build for an :class:`EpisodeSpec` (or, the older form, ``in_features, out_features, task_kind``)."""
        if not isinstance(spec, EpisodeSpec):
            spec = EpisodeSpec(in_features=spec, out_features=out_features, kind=task_kind)  # type: ignore[arg-type]
        super().build(spec)

    def spec_mismatch(self, spec: EpisodeSpec) -> str:
        return (f"this model was built for {self.in_features} -> {self.out_features} ({self.task_kind}); "
                f"the data has {spec.in_features} -> {spec.out_features} ({spec.kind})")

    def _build(self, spec: EpisodeSpec) -> None:
        h = self.hparams
        in_features, out_features = spec.in_features, spec.out_features
        self.in_features, self.out_features, self.task_kind = in_features, out_features, spec.kind
        self.net = MetaNet(in_features=in_features, out_features=out_features, width=h.width, depth=h.depth,
                           moe=self.moe, context_dim=h.context_dim)
        self.moe = None  # owned by the network from here on (one parameter path)
        self.adapted = [n for n, _ in self.net.named_parameters() if any(_in_group(n, g) for g in h.adapt)]
        if not self.adapted:
            raise ValueError(f"adapt={list(h.adapt)} selects no parameter of this network")
        if h.learn_inner_lr:
            self.inner_lrs = nn.ParameterDict({
                n.replace(".", "__"): nn.Parameter(torch.full_like(p, self._base_lr(n)))
                for n, p in self.net.named_parameters() if n in self.adapted
            })
            if self.net.trunk is not None:  # Meta-SGD rates of checkpoints from before the trunk
                rename_old_keys(self.inner_lrs, {"body__0__": "trunk__inp__", "block__": "trunk__blocks__0__"})

    def _base_lr(self, name: str) -> float:
        h = self.hparams
        return h.context_lr if (name == "context" and h.context_lr is not None) else h.inner_lr

    def _lr(self, name: str) -> float | Tensor:
        if self.hparams.learn_inner_lr:
            return self.inner_lrs[name.replace(".", "__")]
        return self._base_lr(name)

    # ------------------------------------------------------------------ the functional inner loop
    def _call(self, params: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
        return functional_call(self.net, params, (x,))

    def _loss(self, pred: Tensor, y: Tensor) -> Tensor:
        if self.task_kind == "regression":
            return F.mse_loss(pred.squeeze(-1), y)
        return F.cross_entropy(pred, y)

    def _metric(self, pred: Tensor, y: Tensor) -> Tensor:
        if self.task_kind == "regression":
            return F.mse_loss(pred.squeeze(-1), y)
        return (pred.argmax(-1) == y).float().mean()

    def adapt(self, x_S: Tensor, y_S: Tensor, steps: int, *, create_graph: bool,
              query: tuple[Tensor, Tensor] | None = None) -> tuple[dict[str, Tensor], list[float]]:
        """``steps`` SGD steps on the support set, from the meta-parameters.

        Returns the fast weights (every parameter; the non-adapted ones are the meta-parameters) and, when
        ``query`` is given, the query metric after each of 0..steps steps."""
        params = dict(self.net.named_parameters())
        fast = {n: params[n] for n in self.adapted}
        curve: list[float] = []
        for s in range(steps + 1):
            if query is not None:
                with torch.no_grad():
                    curve.append(float(self._metric(self._call({**params, **fast}, query[0])[0], query[1])))
            if s == steps:
                break
            loss = self._loss(self._call({**params, **fast}, x_S)[0], y_S)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=create_graph, allow_unused=True)
            fast = {n: w if g is None else w - self._lr(n) * g for (n, w), g in zip(fast.items(), grads)}
        return {**params, **fast}, curve

    # ------------------------------------------------------------------ meta-training
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], batch_idx: int) -> None:
        x_S, y_S, x_Q, y_Q = batch
        T = x_S.shape[0]
        opt = self.optimizers()
        opt.zero_grad()
        h = self.hparams
        if h.algorithm == "reptile":
            params = dict(self.net.named_parameters())
            delta = {n: torch.zeros_like(params[n]) for n in self.adapted}
            post = 0.0
            for t in range(T):
                x, y = torch.cat([x_S[t], x_Q[t]]), torch.cat([y_S[t], y_Q[t]])
                fast = {n: params[n].detach().requires_grad_() for n in self.adapted}
                for _ in range(h.inner_steps):
                    loss = self._loss(self._call({**params, **fast}, x)[0], y)
                    grads = torch.autograd.grad(loss, list(fast.values()), allow_unused=True)
                    fast = {n: (w if g is None else w - self._base_lr(n) * g).detach().requires_grad_()
                            for (n, w), g in zip(fast.items(), grads)}
                for n in self.adapted:
                    delta[n] += (params[n].detach() - fast[n].detach()) / T
                post += float(loss.detach()) / T
            for n, p in params.items():
                p.grad = delta.get(n)
            self.log("train/support_loss", post, prog_bar=True)
            self.log("train/loss", post)  # Reptile's objective: the adapted support loss
        else:
            total = torch.zeros((), device=x_S.device)
            for t in range(T):
                fast, _ = self.adapt(x_S[t], y_S[t], h.inner_steps, create_graph=h.algorithm == "maml")
                pred, aux = self._call(fast, x_Q[t])
                total = total + (self._loss(pred, y_Q[t]) + aux) / T
            self.manual_backward(total)
            self.log("train/query_loss", total.detach(), prog_bar=True)
            self.log("train/loss", total.detach())
        if h.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=h.grad_clip, gradient_clip_algorithm="norm")
        opt.step()

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=self.hparams.outer_lr)

    # ------------------------------------------------------------------ evaluation after 0..N inner steps
    def _check_grad_mode(self) -> None:
        if torch.is_inference_mode_enabled():
            raise RuntimeError("MetaMoE adapts with gradients during evaluation: set trainer.inference_mode: false")

    def evaluate_tasks(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], steps: int | None = None) -> Tensor:
        """Query metric of each task after 0..steps inner steps: a ``(T, steps + 1)`` tensor."""
        steps = self.hparams.eval_steps if steps is None else steps
        x_S, y_S, x_Q, y_Q = batch
        with torch.enable_grad():
            curves = [self.adapt(x_S[t], y_S[t], steps, create_graph=False, query=(x_Q[t], y_Q[t]))[1]
                      for t in range(x_S.shape[0])]
        return torch.tensor(curves, dtype=torch.float64)

    def on_validation_epoch_start(self) -> None:
        self._check_grad_mode()
        self._curves = []

    on_test_epoch_start = on_validation_epoch_start

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor, Tensor], batch_idx: int) -> None:
        self._curves.append(self.evaluate_tasks(batch))

    test_step = validation_step

    def _summarise(self, stage: str) -> None:
        if not self._curves:
            return
        c = torch.cat(self._curves)
        mean = c.mean(0)
        ci = 1.96 * c.std(0, unbiased=True) / math.sqrt(c.shape[0]) if c.shape[0] > 1 else torch.zeros_like(mean)
        # a NaN curve (an overflowed adaptation) counts as +inf, so that the median still stands for the other tasks;
        # torch's median of an even count is the lower of the two middle values
        c_inf = torch.nan_to_num(c, nan=float("inf"))
        median = c_inf.median(0).values
        self.eval_results[stage] = {"mean": mean.tolist(), "ci95": ci.tolist(), "tasks": int(c.shape[0]),
                                    "median": median.tolist()}
        name = "mse" if self.task_kind == "regression" else "acc"
        N = c.shape[1] - 1
        if name == "mse":  # a task whose adaptation blew up dominates the mean: count it and say so
            last = c_inf[:, N]  # NaN as +inf: counted below, and the worst task
            bad = ~torch.isfinite(last) | (last > DIVERGED_FACTOR * c[:, 0].clamp_min(1e-8))
            n_bad = int(bad.sum())
            self.eval_results[stage]["diverged_tasks"] = n_bad
            self.log(f"{stage}/diverged_tasks", float(n_bad), sync_dist=True, reduce_fx="sum")  # over ranks: a total
            if n_bad:
                t = int(last.argmax())
                rank_zero_warn(
                    f"MetaMoE ({stage}): the inner loop diverged on {n_bad} of {c.shape[0]} tasks (query MSE more than "
                    f"{DIVERGED_FACTOR:g}x its value before adaptation after {N} steps; worst: {float(c[t, 0]):.3g} -> "
                    f"{float(c[t, N]):.3g}): the mean MSE ({float(mean[N]):.3g}) is dominated by them; the median is "
                    f"{float(median[N]):.3g} (eval_results['{stage}']['median']). A smaller "
                    f"inner_lr or fewer eval_steps keeps the adaptation stable.", category=RuntimeWarning, stacklevel=2)
        for k in sorted({0, 1, N}):
            if k <= N:
                self.log(f"{stage}/{name}_step{k}", float(mean[k]), prog_bar=k == N, sync_dist=True)
        if name == "mse":  # the query loss after the full adaptation: every paradigm's {stage}/loss
            self.log(f"{stage}/loss", float(mean[N]), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._summarise("val")

    def on_test_epoch_end(self) -> None:
        self._summarise("test")

    def on_fit_end(self) -> None:
        self._plot("val")

    def on_test_end(self) -> None:
        self._plot("test")

    def _plot(self, stage: str) -> None:
        folder = self.plot_dir()
        if not self.hparams.plots or stage not in self.eval_results or folder is None:
            return
        r = self.eval_results[stage]
        label = "query MSE" if self.task_kind == "regression" else "query accuracy"
        path = plot_adaptation_curves({self.hparams.algorithm: r}, folder / f"adaptation_{stage}.png", ylabel=label)
        self.plot_paths.append(path)


__all__ = ["MetaMoE", "MetaNet", "ALGORITHMS", "ADAPT_GROUPS", "plot_adaptation_curves"]  # the plot: moeparadigms.plots
