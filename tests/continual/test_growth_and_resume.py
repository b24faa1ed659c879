"""Growth keeps frozen experts bit-identical, the optimizer sees (and updates) new experts, and a
checkpoint taken mid-stream, after growth, resumes to exactly the same result."""
import copy

import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from moeparadigms.benchmarks.continual import SplitDigits

from ..old_keys import CONTINUAL, to_old_names
from .helpers import growth_model, trainer


class Snapshots(Callback):
    """Copies of every expert's weights and the optimizer's parameter ids at each epoch's end."""

    def __init__(self):
        self.experts, self.opt_ids = [], []

    def on_train_epoch_end(self, tr, module):
        w1 = module.moe.experts.w1.full().detach().clone()
        self.experts.append(w1)
        self.opt_ids.append({id(p) for g in tr.optimizers[0].param_groups for p in g["params"]})


def test_growth_freezes_old_experts_and_optimizer_trains_new(tmp_path):
    dm = SplitDigits(n_experiences=5, epochs_per_experience=1, batch_size=64)
    snap = Snapshots()
    m = growth_model()
    trainer(dm, callbacks=[snap]).fit(m, dm)
    assert m.moe.num_experts == 5
    for e in range(1, 5):  # after experience e, experts 0..e-1 never change again
        before, after = snap.experts[e - 1], snap.experts[-1]
        assert torch.equal(before[:e], after[:e]), f"frozen experts changed after experience {e}"
    # every expert block is a parameter of the optimizer, and the newest one actually moved
    blocks = {id(b) for b in m.moe.experts.w1.blocks}
    assert blocks <= snap.opt_ids[-1]
    assert m.moe.experts.w1.frozen.tolist() == [True, True, True, True, False]


def test_new_expert_weights_move_during_its_experience():
    dm = SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=64)
    m = growth_model()
    snap = Snapshots()

    class AtStart(Callback):
        def on_train_batch_start(self, tr, module, batch, batch_idx):  # after the epoch-start growth
            if batch_idx == 0:
                self.w = module.moe.experts.w1.full().detach().clone()

    at = AtStart()
    trainer(dm, callbacks=[snap, at]).fit(m, dm)
    assert not torch.equal(at.w[1], snap.experts[-1][1]), "the grown expert was not trained"
    assert torch.equal(at.w[0], snap.experts[-1][0])


def _final_state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_checkpoint_after_growth_resumes_identically(tmp_path):
    def make():
        return SplitDigits(n_experiences=5, epochs_per_experience=2, batch_size=64, seed=3)

    dm = make()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    full = growth_model(replay_size=20, seed=3)
    trainer(dm, callbacks=[ckpt]).fit(full, dm)
    ref = _final_state(full)
    # epoch=2: mid experience 1 (after one growth); epoch=3: the end of experience 1 (growth comes next)
    for name in ("epoch=2.ckpt", "epoch=3.ckpt"):
        dm2 = make()
        resumed = growth_model(replay_size=20, seed=3)
        trainer(dm2, callbacks=[ModelCheckpoint(dirpath=tmp_path / "r", save_top_k=0)]).fit(resumed, dm2, ckpt_path=str(tmp_path / name))
        got = _final_state(resumed)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{name}: {k} differs after resuming"
        assert torch.equal(resumed.acc_matrix.correct, full.acc_matrix.correct)


def test_load_from_checkpoint_without_a_trainer(tmp_path):
    dm = SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=64)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    m = growth_model()
    trainer(dm, callbacks=[ckpt]).fit(m, dm)
    fresh = growth_model()
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    fresh.on_load_checkpoint(state)
    fresh.load_state_dict(state["state_dict"])
    x = dm.test_sets[1].tensors[0][:16]
    m.eval(), fresh.eval()
    assert torch.equal(m(x), fresh(x))
    assert copy.deepcopy(fresh).moe.num_experts == 2
    # a checkpoint written before the shared trunk (inp., block., norm.) loads the same way (Lightning's restore:
    # on_load_checkpoint, which compares it with the model, then load_state_dict)
    old = to_old_names(state["state_dict"], CONTINUAL)
    assert {"inp.weight", "block.norm.weight", "norm.weight"} <= old.keys() and not any("trunk." in k for k in old)
    legacy = growth_model()
    legacy.on_load_checkpoint({**state, "state_dict": old})
    legacy.load_state_dict(old)
    legacy.eval()
    assert torch.equal(m(x), legacy(x))
