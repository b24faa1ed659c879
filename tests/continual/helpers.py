"""Tiny continual runs shared by the tests (seconds each on one CPU thread)."""
from __future__ import annotations

import tempfile

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from moeparadigms.core import MLPExperts, MoE
from moeparadigms.paradigms.continual import ContinualMoE, ExperienceRouter, ExpertPerExperience


def growth_model(d_model: int = 32, hidden: int = 32, replay_size: int = 0, **kwargs) -> ContinualMoE:
    moe = MoE(router=ExperienceRouter(d_model=d_model, num_experts=1, top_k=1),
              experts=MLPExperts(d_model=d_model, hidden=hidden, num_experts=1), load_balance_coef=0.0, z_loss_coef=0.0)
    return ContinualMoE(moe=moe, growth=kwargs.pop("growth", ExpertPerExperience()), replay_size=replay_size, lr=3e-3, **kwargs)


def trainer(dm, tmp_path=None, callbacks=(), **kwargs) -> pl.Trainer:
    return pl.Trainer(max_epochs=dm.max_epochs, reload_dataloaders_every_n_epochs=1, accelerator="cpu", logger=False,
                      enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), callbacks=list(callbacks), enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=str(tmp_path) if tmp_path else tempfile.mkdtemp(prefix="continual-test-"), **kwargs)
