"""Continual learning with a growing Mixture of Experts, in one ``trainer.fit``.

The DataModule (``moeparadigms.benchmarks.continual``) serves experience ``epoch // epochs_per_experience``;
at the first epoch of each experience a :class:`GrowthPolicy` decides whether the MoE grows experts,
freezes old ones or re-uses them; after every experience the model is evaluated on every experience of
the stream, which fills the accuracy matrix (``continual_metrics.AccuracyMatrix``). Because all state
(experts, router masks, statistics, the matrix) lives in the module, Lightning's checkpoints resume the
stream mid-way, also across a growth boundary.

Network, one *path* per experience ``t``::

    x -> trunk (inp Linear -> h + MoE(LayerNorm(h), task_id=t) -> LayerNorm) -> heads[t] (classes of t only)

The MoE's :class:`ExperienceRouter` lets experience ``t`` route only to the experts the growth policy
gave it, so once those experts, their router rows and the head are frozen, path ``t`` computes exactly
what it computed when ``t`` was learned.

Router drift guard (why this one): a learned router trained only on the newest experience drifts to the
newest experts for every input, including old classes, and a router trained on it cannot be corrected
without old data. We therefore (1) freeze old experts *and* their router rows, (2) mask routing by
experience, and (3) at test time without a task id (class- and domain-incremental) infer the experience
from per-class Gaussian statistics of the inputs, as in SEED / FeCAM: ``p(t | x)`` from class means and
shrunk covariances stored per experience (no exemplars), then ``p(y | x) = sum_t p(t | x) p(y | x, t)``.
The statistics are computed on the raw inputs, which never drift. With a replay buffer (Avalanche's
``ClassBalancedBuffer``), a per-experience bias on ``log p(t | x)`` is fitted on the buffer after each
experience (bias correction as in BiC).

``task_inference="router"``, the control without the inference (issue 14): growth and freezing as above, routing
never masked (a learned router over every grown expert, old rows frozen), and ``p(t | x)`` = the router's summed
probabilities of the experts experience ``t`` added (an expert's experience names its head), no statistics.

Shape legend: B batch, F input features, D model width, C classes, T experiences, E experts.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..benchmarks.continual import materialise
from ..benchmarks.specs import StreamSpec
from ..checkpoint import hparams_ignore, store_module_configs
from ..checks import SETTINGS  # noqa: F401  (re-exported: its old home)
from ..core import MoE, TopKRouter, remap_optimizer
from ..nets import Trunk, rename_old_keys
from ..plots import plot_accuracy_matrix, plot_expert_usage
from .base import OptimizerCallable, ParadigmModule
from .continual_growth import (  # re-exported: the YAMLs' class_path
    MASKED,
    TASK_INFERENCE,
    Decision,
    ExperienceRouter,
    ExpertPerExperience,
    FixedExperts,
    GaussianTaskInference,
    GrowOnDemand,
    GrowthPolicy,
    expert_owners,
    fit_task_bias,
    grow_experts,
    rewrap_ddp,
    router_log_posterior,
)
from .continual_metrics import AccuracyMatrix


# ---------------------------------------------------------------------------------------------- the module
class ContinualMoE(ParadigmModule):
    """An MoE classifier that walks a continual stream inside one ``trainer.fit``.

    The stream's shape (experiences, classes, input width, setting) comes from the DataModule's
    :class:`~moeparadigms.benchmarks.specs.StreamSpec` (:class:`~moeparadigms.benchmarks.continual.AvalancheStream`
    and its subclasses) at ``setup``.

    Args:
        moe: the MoE layer (``d_model`` sets the width). Growth policies need an :class:`ExperienceRouter`.
        growth: a :class:`GrowthPolicy` (default :class:`ExpertPerExperience`).
        lr, weight_decay: AdamW settings, the default optimizer (the optimizer gets grown parameters via
            ``remap_optimizer``). ``weight_decay`` is decoupled (AdamW), as in every paradigm; before the paradigm
            contract it was Adam's coupled L2 here (identical at the default 0, which every config uses).
        optimizer: a LightningCLI optimizer config replacing the default ``AdamW(lr, weight_decay)``.
        replay_size: exemplars kept by Avalanche's ``ClassBalancedBuffer`` (0: exemplar-free); they fit the
            per-experience bias of the task inference after each experience.
        shrinkage: covariance shrinkage of the Gaussian task inference.
        task_inference: ``"gaussian"`` (per-class input statistics infer a test sample's experience; routing masked
            per experience) or ``"router"`` (the control: a learned router over every grown expert, never masked,
            picks it; needs ``ExpertPerExperience``). See the module docstring.
        seed: seeds growth initialisation and buffer sampling, so a resumed run grows identically.
        plots: write the PNG plots at the end of ``fit``.
        plot_dir: where the accuracy-matrix and expert-usage PNGs go at the end of ``fit``
            (default: the logger's directory, else ``trainer.default_root_dir``).
    """

    def __init__(
        self,
        *,
        moe: MoE,
        growth: GrowthPolicy | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        replay_size: int = 0,
        shrinkage: float = 0.05,
        calibration_steps: int = 100,
        task_inference: str = "gaussian",
        seed: int = 0,
        plots: bool = True,
        plot_dir: str | None = None,
        optimizer: OptimizerCallable | None = None,
    ) -> None:
        super().__init__(optimizer=optimizer)
        if not isinstance(moe, MoE):
            raise TypeError(f"moe must be a moeparadigms.core.MoE, got {type(moe).__name__}")
        growth = ExpertPerExperience() if growth is None else growth
        if not isinstance(growth, GrowthPolicy):
            raise TypeError(f"growth must be a GrowthPolicy (ExpertPerExperience, GrowOnDemand, FixedExperts), got {type(growth).__name__}")
        if task_inference not in TASK_INFERENCE:
            raise ValueError(f"task_inference={task_inference!r} is not supported; choose one of {list(TASK_INFERENCE)}")
        if task_inference == "router" and not (isinstance(growth, ExpertPerExperience) and isinstance(moe.router, TopKRouter)):
            raise ValueError(f"task_inference='router' needs growth=ExpertPerExperience (an expert's experience names a head) "
                             f"and a learned TopKRouter/ExperienceRouter (its probabilities pick the experience), got "
                             f"growth={type(growth).__name__}, moe.router={type(moe.router).__name__}")
        if growth.freezes and task_inference == "gaussian" and not isinstance(moe.router, ExperienceRouter):
            raise ValueError(f"growth={type(growth).__name__} needs moe.router to be an ExperienceRouter (it masks "
                             f"routing per experience), got {type(moe.router).__name__}; or use growth=FixedExperts()")
        if isinstance(growth, ExpertPerExperience | GrowOnDemand) and moe.router.top_k > growth.experts:  # type: ignore[attr-defined]
            raise ValueError(f"moe.router.top_k={moe.router.top_k} exceeds the experts an experience gets "  # type: ignore[attr-defined]
                             f"(growth.experts={growth.experts}); use top_k <= {growth.experts}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not isinstance(replay_size, int) or replay_size < 0:
            raise ValueError(f"replay_size must be an integer >= 0 (0 = exemplar-free), got {replay_size!r}")
        if not 0 < shrinkage <= 1:
            raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage!r}")
        self.save_hyperparameters(ignore=hparams_ignore("moe", "growth", "optimizer"))
        store_module_configs(self, moe=moe, growth=growth)
        self.moe, self.growth = moe, growth
        rename_old_keys(self, {"inp.": "trunk.inp.", "block.": "trunk.blocks.0.", "norm.": "trunk.norm."})  # pre-trunk names
        self._initial_experts = moe.num_experts  # experience 0's experts (task_inference="router")
        self._usage: dict[int, Tensor] = {}
        self._buffer: Any = None
        self._buffer_upto = -1

    # ------------------------------------------------------------------ building from the stream
    checkpoint_key = "continual"
    spec_type = StreamSpec

    def setup(self, stage: str) -> None:
        spec = self.data_spec(self.trainer.datamodule)
        if stage == "fit":
            tr = self.trainer
            if tr.reload_dataloaders_every_n_epochs != 1:
                raise ValueError(f"trainer.reload_dataloaders_every_n_epochs must be 1 to walk the stream, got "
                                 f"{tr.reload_dataloaders_every_n_epochs}")
            if tr.max_epochs != spec.max_epochs and not tr.fast_dev_run:
                raise ValueError(f"trainer.max_epochs={tr.max_epochs} but the stream needs {spec.max_epochs} "
                                 f"({spec.num_experiences} experiences x {spec.epochs_per_experience} epochs)")
        self.build(spec)

    def spec_mismatch(self, spec: StreamSpec) -> str:
        return (f"this model was built for a stream with {self.num_experiences} experiences, {self.num_classes} "
                f"classes, {self.in_features} inputs ({self.setting}); the DataModule has {spec.num_experiences}, "
                f"{spec.num_classes}, {spec.in_features} ({spec.setting})")

    def _build(self, spec: StreamSpec) -> None:
        T, in_features, num_classes = spec.num_experiences, spec.in_features, spec.num_classes
        max_t = getattr(self.moe.router, "max_experiences", T)
        if T > max_t:
            raise ValueError(f"the stream has {T} experiences but moe.router.max_experiences={max_t}; raise it")
        self.in_features, self.num_classes, self.setting, self.num_experiences = in_features, num_classes, spec.setting, T
        self.classes_per_experience = [list(c) for c in spec.classes_per_experience]
        # built in setup(), where DDP has just re-seeded every rank: draw from our own seed so one process
        # and N ranks start from the same weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hparams.seed * 15_485_863 + 1)
            self.trunk = Trunk(in_features=in_features, moe=self.moe)  # draws inp's weights, as before the trunk
            self.heads = nn.ModuleList([nn.Linear(self.moe.d_model, num_classes) for _ in range(T)])
        mask = torch.zeros(T, num_classes, dtype=torch.bool)
        for t, cs in enumerate(self.classes_per_experience):
            mask[t, cs] = True
        self.register_buffer("class_mask", mask)
        self.task_inference = GaussianTaskInference(num_experiences=T, num_classes=num_classes, in_features=in_features,
                                                    shrinkage=self.hparams.shrinkage)
        self.register_buffer("task_bias", torch.zeros(T))  # fitted on the replay buffer (bias correction)
        self.register_buffer("experiences_started", torch.zeros((), dtype=torch.long))
        self.acc_matrix = AccuracyMatrix(num_experiences=T)
        if self._unmasked and isinstance(self.moe.router, ExperienceRouter):
            self.moe.router.allowed.fill_(True)  # the fixed baseline and the router control share every expert

    @property
    def _unmasked(self) -> bool:  # every experience routes over every expert
        return not self.growth.freezes or self.hparams.task_inference == "router"

    def experience_log_posterior(self, x: Tensor) -> Tensor:
        """``(B, T)`` log p(t | x) of the configured ``task_inference`` (before the replay bias)."""
        if self.hparams.task_inference == "gaussian":
            return self.task_inference.log_posterior(x).to(x.device)
        z = self.trunk.router_input(x.flatten(1))
        probs = self.moe.router(z, task_id_T=torch.zeros(z.shape[0], dtype=torch.long, device=z.device)).probs_TE
        owners = expert_owners(self.moe.num_experts, self._initial_experts, self.growth.experts)
        return router_log_posterior(probs.float(), owners, self.num_experiences)

    # ------------------------------------------------------------------ forward: one path per experience
    def path_logits(self, x: Tensor, experience: int, shared: Any = None) -> tuple[Tensor, Tensor, Any]:
        """Logits ``(B, C)`` of experience ``experience``'s path (classes outside it masked), the MoE's
        auxiliary loss and its routing statistics. ``shared``: the trunk's output when no path masks routing."""
        out = self.trunk(x.flatten(1), task_id=experience) if shared is None else shared
        logits = self.heads[experience](out.y).masked_fill(~self.class_mask[experience], MASKED)
        return logits, out.aux_loss, out.stats[0]

    def forward(self, x: Tensor, task_id: int | None = None) -> Tensor:
        """Log-probabilities ``(B, C)``: path ``task_id`` when given (task-incremental), else the mixture
        ``log sum_t p(t | x) p(y | x, t)`` over the experiences seen so far."""
        return self._predict(x, task_id)[0]

    def _predict(self, x: Tensor, task_id: int | None) -> tuple[Tensor, Tensor]:
        if task_id is not None:
            logits, _, stats = self.path_logits(x, task_id)
            return logits.log_softmax(-1), stats.tokens_per_expert.float() / max(x.shape[0], 1)
        return self._mixture(x)[:2]

    def _mixture(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``log sum_t p(t | x) p(y | x, t)`` ``(B, C)``, the expert usage ``(E,)`` and the MoE's auxiliary loss."""
        log_pt = self.experience_log_posterior(x) + self.task_bias
        log_pt = log_pt.log_softmax(-1)
        out = torch.full((x.shape[0], self.num_classes), -math.inf, device=x.device)
        usage = torch.zeros(self.moe.num_experts, device=x.device)
        # the router control's paths share one (unmasked) trunk output
        shared = self.trunk(x.flatten(1), task_id=0) if self.hparams.task_inference == "router" else None
        aux = x.new_zeros(())
        for t in range(self.num_experiences):
            if torch.isinf(log_pt[:, t]).all():
                continue  # no statistics (or experts) yet: this experience cannot be inferred
            logits, aux, stats = self.path_logits(x, t, shared)
            out = torch.logaddexp(out, log_pt[:, t : t + 1] + logits.log_softmax(-1))
            usage += log_pt[:, t].exp().mean() * stats.tokens_per_expert.float() / max(x.shape[0], 1)
        return out, usage, aux

    # ------------------------------------------------------------------ experience boundaries
    def _current_experience(self) -> int:
        return self.spec.experience_at(self.current_epoch)

    def _is_experience_end(self) -> bool:
        epe = self.spec.epochs_per_experience
        return (self.current_epoch + 1) % epe == 0 or self.current_epoch + 1 == self.trainer.max_epochs

    def on_train_epoch_start(self) -> None:
        i = self._current_experience()
        if i == int(self.experiences_started):
            self._start_experience(i)

    def _start_experience(self, i: int) -> None:
        """Grow/freeze per the policy, give the optimizer the new parameters, record the statistics."""
        dm = self.trainer.datamodule
        x, y = dm.train_experience(i).tensors[:2]
        x, y = x.to(self.device, self.dtype), y.to(self.device)
        decision = self.growth.decide(self, i, x, y)
        router = self.moe.router
        src = None
        if decision.grow and self.growth.init == "copy" and hasattr(router, "allowed"):
            src = [int(router.allowed[i - 1].nonzero().max())]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.hparams.seed * 7919 + i)  # growth draws do not depend on what ran before
            remap = grow_experts(self.moe, decision.grow, freeze_old=self.growth.freezes and i > 0,
                                 init=self.growth.init, source=src)
        if self._unmasked:
            if isinstance(router, ExperienceRouter):
                router.allowed.fill_(True)  # growth added columns of False
        else:
            if decision.grow:
                new = torch.zeros(self.moe.num_experts, dtype=torch.bool, device=router.allowed.device)
                new[-decision.grow :] = True
                router.allowed[i] = new
            elif decision.reuse is not None:
                router.allowed[i] = router.allowed[decision.reuse]
                self.heads[i].load_state_dict(self.heads[decision.reuse].state_dict())
            else:
                router.allowed[i] = True  # the first experience takes the initial experts
        self._apply_module_freezing(i + 1)
        opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if opt is not None:
            remap_optimizer(opt, remap)
            # one group in model order, as configure_optimizers builds it: a resumed run loads the
            # optimizer state by position, so both runs must list the same parameters in the same order
            opt.param_groups[0]["params"] = list(self.parameters())
        rewrap_ddp(self.trainer)
        if self.hparams.task_inference == "gaussian":
            self.task_inference.update(i, x, y)
        if self.hparams.replay_size:
            self._update_buffer(i)
        self.experiences_started.fill_(i + 1)
        self.log("cl/num_experts", float(self.moe.num_experts), sync_dist=True)

    def _apply_module_freezing(self, started: int) -> None:
        """Freeze old heads (and the shared input layer and norms after the first experience). Plain
        modules' ``requires_grad`` is not in the state dict, so a restored model calls this again."""
        if not self.growth.freezes:
            return
        for t, head in enumerate(self.heads):
            head.requires_grad_(t >= started - 1)
        if self.growth.freeze_shared and started > 1:
            for m in (self.trunk.inp, self.trunk.blocks[0].norm, self.trunk.norm):
                m.requires_grad_(False)

    # ------------------------------------------------------------------ replay buffer and bias correction
    def _update_buffer(self, upto: int) -> None:
        """Avalanche's ClassBalancedBuffer, fed the experiences 0..upto; rebuilt deterministically
        (seeded per experience) so a resumed run holds the same exemplars without storing them."""
        from avalanche.training.storage_policy import ClassBalancedBuffer

        stream = self.trainer.datamodule.benchmark.train_stream
        start = 0 if self._buffer is None else self._buffer_upto + 1
        if self._buffer is None:
            self._buffer = ClassBalancedBuffer(max_size=self.hparams.replay_size, adaptive_size=True)
        for k in range(start, upto + 1):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.hparams.seed * 104729 + k)
                self._buffer.update_from_dataset(stream[k].dataset)
        self._buffer_upto = upto

    def _fit_task_bias(self, upto: int) -> None:
        """Bias correction: a per-experience offset on log p(t | x), fitted on the class-balanced buffer
        (cross-entropy of the final class prediction), pulled towards 0 so 50 samples cannot overfit it."""
        data = materialise(self._buffer.buffer)
        x, y = data.tensors[0].to(self.device, self.dtype), data.tensors[1].to(self.device)
        with torch.no_grad():
            log_pt = self.experience_log_posterior(x)
            log_py_t = torch.stack([self.path_logits(x, t)[0].log_softmax(-1) for t in range(upto + 1)], 1)  # (B, t, C)
        self.task_bias[: upto + 1] = fit_task_bias(log_pt[:, : upto + 1], log_py_t, y, steps=self.hparams.calibration_steps)

    # ------------------------------------------------------------------ train / validate / test
    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y, _ = batch
        i = self._current_experience()
        if self.hparams.task_inference == "router":  # the router is trained through the mixture it predicts with
            logp, _, aux = self._mixture(x)
            ce = F.nll_loss(logp, y)
        else:
            logits, aux, _ = self.path_logits(x, i)
            ce = F.cross_entropy(logits, y)
        self.log("train/loss", ce + aux)
        self.log("train/ce", ce, prog_bar=True)
        self.log("train/aux_loss", aux)
        self.log("train/experience", float(i), prog_bar=True)
        return ce + aux

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        last = batch_idx + 1 == self.trainer.num_training_batches
        if self.hparams.replay_size and last and self._is_experience_end():
            i = self._current_experience()
            if self._buffer is None:  # resumed mid-experience: rebuild the exemplars first
                self._update_buffer(i)
            self._fit_task_bias(i)

    def _eval_step(self, batch: tuple[Tensor, Tensor, Tensor], j: int, stage: str) -> Tensor:
        x, y, t = batch
        task = j if self.setting == "task-incremental" else None
        logp, usage = self._predict(x, task)
        preds = logp.argmax(-1)
        self.log(f"{stage}/acc_exp{j}", (preds == y).float().mean(), add_dataloader_idx=False, batch_size=y.numel(),
                 sync_dist=True)
        self._usage[j] = self._usage.get(j, torch.zeros_like(usage))
        if self._usage[j].numel() < usage.numel():
            self._usage[j] = F.pad(self._usage[j], (0, usage.numel() - self._usage[j].numel()))
        self._usage[j] += usage * y.numel()
        return preds

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.trainer.sanity_checking:
            return
        preds = self._eval_step(batch, dataloader_idx, "val")
        if self._is_experience_end():
            self.acc_matrix.update(preds, batch[1], row=self._current_experience() + 1, experience=dataloader_idx)

    def test_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """The predicted class and the predicting experience's index per sample; under task-incremental
        evaluation the loader's experience gives the task id, as in ``test``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        task = dataloader_idx if self.setting == "task-incremental" else None
        logp, _ = self._predict(x, task)
        return {"pred": logp.argmax(-1), "experience": torch.full_like(logp[:, 0], dataloader_idx, dtype=torch.long)}

    def on_validation_epoch_start(self) -> None:
        self._usage = {}

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._is_experience_end():
            return
        out = self.acc_matrix.compute()
        for k in ("avg_acc", "forgetting", "bwt", "fwt"):
            if k in out and not torch.isnan(out[k]):
                self.log(f"cl/{k}", out[k].float(), prog_bar=k == "avg_acc", sync_dist=True)

    @torch.no_grad()
    def on_train_start(self) -> None:
        # the untrained model's accuracy on every experience: FWT's reference (Avalanche's "initial" value)
        if int(self.acc_matrix.total[0].sum()) > 0:
            return
        was_training = self.training
        self.eval()
        for j, loader in enumerate(self.trainer.datamodule.val_dataloader()):
            for x, y, _ in loader:
                x, y = x.to(self.device, self.dtype), y.to(self.device)  # the trainer's precision, as batches get
                preds = self._predict(x, j if self.setting == "task-incremental" else None)[0].argmax(-1)
                self.acc_matrix.update(preds, y, row=0, experience=j)
        self.train(was_training)

    def on_fit_end(self) -> None:
        if not self.hparams.plots:
            return
        # every rank joins the sync (each evaluated its shard of the test sets); rank 0 draws
        with self.acc_matrix.sync_context(should_sync=self.trainer.world_size > 1):
            R = self.acc_matrix.matrix()[0]
            avg_acc = float(self.acc_matrix.compute()["avg_acc"]) if int(self.acc_matrix.total[1:].sum()) else None
        if not self.trainer.is_global_zero or avg_acc is None:
            return
        root = self.hparams.plot_dir or (self.trainer.logger.log_dir if self.trainer.logger else None) or self.trainer.default_root_dir
        title = f"{self.setting}: avg acc {100 * avg_acc:.1f}%"
        self.plot_paths.append(plot_accuracy_matrix(R, Path(root) / "accuracy_matrix.png", title=title))
        if self._usage:
            E = max(u.numel() for u in self._usage.values())
            usage = torch.stack([F.pad(self._usage[j], (0, E - self._usage[j].numel())) for j in sorted(self._usage)])
            usage = usage / usage.sum(-1, keepdim=True).clamp_min(1e-12)
            self.plot_paths.append(plot_expert_usage(usage, Path(root) / "expert_usage.png", row_title="test data of experience",
                                                     title="expert usage per experience"))

    def default_optimizer(self, params: Any) -> torch.optim.Optimizer:
        # AdamW (decoupled weight decay, as every paradigm); bit-identical to the Adam this module used before
        # at weight_decay 0. Not fused: the committed continual numbers were measured with the default kernel.
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    # ------------------------------------------------------------------ checkpoints across growth
    def checkpoint_state(self) -> dict[str, Any]:
        return {"num_experts": self.moe.num_experts, "experiences_started": int(self.experiences_started)}

    def restore_checkpoint_state(self, entry: dict[str, Any]) -> None:
        """Grow this freshly built model to the checkpoint's size before Lightning loads the weights."""
        if entry["num_experts"] > self.moe.num_experts:
            with torch.random.fork_rng(devices=[]):  # values are overwritten by the checkpoint
                self.moe.add_experts(entry["num_experts"] - self.moe.num_experts, init="fresh")
        self._apply_module_freezing(entry["experiences_started"])

__all__ = ["ContinualMoE", "ExperienceRouter", "GaussianTaskInference", "GrowthPolicy", "ExpertPerExperience",
           "GrowOnDemand", "FixedExperts", "Decision", "grow_experts"]
