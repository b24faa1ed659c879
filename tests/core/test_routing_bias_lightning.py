"""ParadigmModule applies the aux-loss-free bias update before every optimizer step, under automatic optimization
with gradient accumulation and under manual optimization (as PPO and MAML step)."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from moeparadigms.paradigms.base import ParadigmModule

from .test_routing_bias import RATE, D, _moe

BATCH = 8


class _Tiny(ParadigmModule):
    def __init__(self, manual: bool) -> None:
        super().__init__()
        self.moe = _moe()
        self.automatic_optimization = not manual

    def setup(self, stage: str) -> None:
        pass  # built from its arguments, trained on a plain dataloader

    def default_optimizer(self, params):
        return torch.optim.SGD(params, lr=0.1)

    def training_step(self, batch, batch_idx):
        out = self.moe(batch[0])
        loss = out.y.square().mean() + out.aux_loss
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


class _Watch(pl.Callback):
    """Callbacks' on_before_optimizer_step runs before the module's: the load and bias the update starts from."""

    def __init__(self) -> None:
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.after: list[tuple[int, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        r = module.moe.router
        self.before.append((r.tokens_per_expert.clone(), r.expert_bias.clone()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        r = module.moe.router
        self.after.append((int(r.tokens_per_expert.sum()), r.expert_bias.clone()))


@pytest.mark.parametrize("manual,accumulate", [(False, 2), (True, 1)], ids=["automatic-accumulate-2", "manual"])
def test_paradigm_module_updates_the_bias_once_per_optimizer_step(manual, accumulate):
    data = DataLoader(TensorDataset(torch.randn(4 * BATCH, D, generator=torch.Generator().manual_seed(0)) + 0.3),
                      batch_size=BATCH)
    watch = _Watch()
    trainer = pl.Trainer(max_epochs=1, accumulate_grad_batches=accumulate, callbacks=[watch], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    module = _Tiny(manual)
    trainer.fit(module, data)
    steps = 4 // accumulate
    assert len(watch.before) == steps
    moved = 0
    for i, (counts, bias) in enumerate(watch.before):
        assert int(counts.sum()) == accumulate * BATCH, "every micro-batch of the step is counted"
        pending, after = watch.after[(i + 1) * accumulate - 1]
        load = counts.float()
        assert pending == 0
        torch.testing.assert_close(after, bias + RATE * torch.sign(load.mean() - load), rtol=0, atol=0)
        moved += not torch.equal(after, bias)
    assert moved, "the bias must have moved"
    if accumulate > 1:  # between the steps the load accumulates and the bias stays
        assert watch.after[0][0] == BATCH and torch.equal(watch.after[0][1], watch.before[0][1])
