"""Supervised classification with an MoE network: the smallest paradigm, and the CLI's smoke test."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

from ..benchmarks.specs import SupervisedSpec
from ..checkpoint import hparams_ignore, store_module_configs
from ..core import MoE
from ..nets import MoEMLP
from ..plots import plot_expert_load
from .base import OptimizerCallable, ParadigmModule
from .logging import RoutingLog


class MoEClassifier(ParadigmModule):
    """``MoEMLP`` classifier trained with cross-entropy plus the MoE auxiliary losses.

    Args:
        in_features: input width (inputs are flattened); with ``num_classes``, None takes both from the
            DataModule's :class:`~moeparadigms.benchmarks.specs.SupervisedSpec` at ``setup``.
        num_classes: number of classes.
        moe: the MoE layer of the first block (``d_model`` sets the network width).
        depth: number of residual MoE blocks.
        lr, weight_decay: AdamW settings (decoupled weight decay), the default optimizer.
        optimizer: a LightningCLI optimizer config replacing the default ``AdamW(lr, weight_decay)``.
    """

    checkpoint_key = "supervised"
    spec_type = SupervisedSpec

    def __init__(self, *, in_features: int | None = None, num_classes: int | None = None, moe: MoE, depth: int = 1,
                 lr: float = 3e-3, weight_decay: float = 0.0, optimizer: OptimizerCallable | None = None) -> None:
        super().__init__(optimizer=optimizer)
        if num_classes is not None and num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if (in_features is None) != (num_classes is None):
            raise ValueError("give both in_features and num_classes, or neither (then they come from the data's spec)")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.save_hyperparameters(ignore=hparams_ignore("moe", "optimizer"))
        store_module_configs(self, moe=moe)
        self.moe = moe
        if in_features is not None and num_classes is not None:
            self.build(SupervisedSpec(in_features=in_features, num_classes=num_classes))

    def _build(self, spec: SupervisedSpec) -> None:
        self.net = MoEMLP(in_features=spec.in_features, out_features=spec.num_classes, moe=self.moe, depth=self.hparams.depth)
        self.moe = None  # owned by the network from here on (one parameter path)
        C = spec.num_classes
        self.acc = nn.ModuleDict({s: torchmetrics.Accuracy(task="multiclass", num_classes=C) for s in ("train_", "val", "test")})
        experts = [m.num_experts for m in self.net.moe_layers()]
        self.routing = nn.ModuleDict({s: RoutingLog(experts) for s in ("train_", "val", "test")})

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).y

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{stage} batch contains NaN/inf inputs (global step {self.global_step})")
        out = self.net(x)
        ce = F.cross_entropy(out.y, y)
        key = "train_" if stage == "train" else stage
        self.acc[key](out.y, y)
        self.routing[key].update(out.stats)
        loss = ce + out.aux_loss
        bs = y.shape[0]
        sync = stage != "train"  # epoch means over every rank's shard (training logs per-rank steps)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "train", batch_size=bs, sync_dist=sync)
        self.log(f"{stage}/ce", ce, batch_size=bs, sync_dist=sync)
        if stage == "train":  # evaluation runs with autograd off, where the MoE layers skip their aux losses:
            # val/loss and test/loss are the cross-entropy
            self.log(f"{stage}/aux_loss", out.aux_loss, batch_size=bs, sync_dist=sync)
        self.log(f"{stage}/acc", self.acc[key], prog_bar=True, on_step=False, on_epoch=True, batch_size=bs)
        self.routing[key].log(self, stage)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Class probabilities and the predicted class of each sample (``moeparadigms predict``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(x).softmax(-1)
        return {"pred": probs.argmax(-1), "probs": probs}

    def on_validation_end(self) -> None:
        # after Lightning computed (and synchronised) the epoch's metrics: no collective of our own here
        if not self.trainer.sanity_checking:
            self.val_expert_load = self.routing["val"].shares()

    def on_fit_end(self) -> None:
        """Write the last validation epoch's expert load (one row per MoE layer) beside the logs."""
        loads = getattr(self, "val_expert_load", None)
        folder = self.plot_dir()
        if not loads or folder is None:
            return
        title = f"validation expert load after {self.current_epoch} epochs"
        self.plot_paths.append(plot_expert_load(loads, folder / "expert_load.png", title=title))

    def default_optimizer(self, params):
        # fused: one kernel for every parameter instead of a Python loop over them (torch's CPU default is the
        # loop, ~3 ms a step for these small networks, more than their forward)
        return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True)
