"""ContinualMoE(task_inference="router"): growth and freezing without the Gaussian experience inference, a learned
router over every grown expert picking the head (issue 14's control). It trains and evaluates on split digits, its
mixture matches a plain per-experience reference (outputs and gradients), bad values fail clearly, and a checkpoint
restores it."""
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint

from moeparadigms.benchmarks.continual import SplitDigits
from moeparadigms.core import HashRouter, MLPExperts, MoE, TopKRouter
from moeparadigms.paradigms.continual import ContinualMoE, FixedExperts, GrowOnDemand
from moeparadigms.paradigms.continual_growth import expert_owners, router_log_posterior

from .helpers import growth_model, trainer


def _fitted(epochs: int = 1, n: int = 5, **kw) -> tuple[ContinualMoE, SplitDigits]:
    torch.manual_seed(0)
    dm = SplitDigits(n_experiences=n, epochs_per_experience=epochs, batch_size=64, seed=1)
    m = growth_model(task_inference="router", seed=1, **kw)
    trainer(dm).fit(m, dm)
    return m, dm


def test_trains_and_evaluates_split_digits_without_statistics():
    m, dm = _fitted()
    R = m.acc_matrix.matrix()[0]
    assert m.moe.num_experts == 5 and R.shape == (5, 5)
    assert bool(m.moe.router.allowed.all())  # routing never masked by experience
    assert m.moe.experts.w1.frozen.tolist() == [True, True, True, True, False]
    assert float(m.task_inference.count.sum()) == 0  # no Gaussian statistics were collected
    assert R[0, 0] > 0.9  # the first experience is learned (one expert, one head: the router has no choice yet)
    assert torch.isfinite(m.acc_matrix.compute()["avg_acc"])


def test_owners_and_router_posterior_match_a_plain_reference():
    assert expert_owners(7, initial=1, per_experience=2).tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert expert_owners(4, initial=2, per_experience=1).tolist() == [0, 0, 1, 2]
    probs = torch.softmax(torch.randn(6, 5), -1)
    owners = torch.tensor([0, 1, 1, 2, 2])
    got = router_log_posterior(probs, owners, num_experiences=4)
    ref = torch.stack([probs[:, 0], probs[:, 1] + probs[:, 2], probs[:, 3] + probs[:, 4]], 1).log()
    torch.testing.assert_close(got[:, :3], ref)
    assert torch.isinf(got[:, 3]).all() and (got[:, 3] < 0).all()  # experience 3 has no expert yet
    # an underflowed probability stays finite, with a finite gradient
    p = torch.tensor([[1.0, 0.0]], requires_grad=True)
    router_log_posterior(p, torch.tensor([0, 1]), 2).sum().backward()
    assert torch.isfinite(p.grad).all()


def test_mixture_matches_the_per_experience_reference_outputs_and_gradients():
    """The router control's mixture (one shared block output) against a plain loop: the router's probabilities by
    hand, summed per owning experience, each path computed on its own, ``log sum_t p(t|x) softmax(head_t)``."""
    m, dm = _fitted(n=5)
    m.double()
    x = torch.cat([dm.test_sets[t].tensors[0][:8] for t in range(5)]).double()
    y = torch.cat([dm.test_sets[t].tensors[1][:8] for t in range(5)])
    logp, _, _ = m._mixture(x)
    F.nll_loss(logp, y).backward()
    got_grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    z = m.trunk.router_input(x.flatten(1))
    probs = torch.softmax(z @ m.moe.router.gate.full().T, -1)  # top-1: the router's softmax over every expert
    p_t = probs  # one expert per experience, in order
    ref = torch.full_like(logp, -math.inf)
    for t in range(5):
        logits = m.path_logits(x, t)[0].log_softmax(-1)
        ref = torch.logaddexp(ref, p_t[:, t : t + 1].log() + logits)
    torch.testing.assert_close(logp, ref)
    F.nll_loss(ref, y).backward()
    ref_grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    assert got_grads.keys() == ref_grads.keys() and any("gate" in k for k in got_grads)
    for k in ref_grads:
        torch.testing.assert_close(got_grads[k], ref_grads[k], msg=k)
    assert torch.equal(m(x), logp)  # forward without a task id is the mixture


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match=r"task_inference='oracle' is not supported; choose one of \['gaussian', 'router'\]"):
        growth_model(task_inference="oracle")
    with pytest.raises(ValueError, match="task_inference='router' needs growth=ExpertPerExperience.*growth=GrowOnDemand"):
        growth_model(task_inference="router", growth=GrowOnDemand())
    moe = MoE(router=TopKRouter(d_model=8, num_experts=2, top_k=1), experts=MLPExperts(d_model=8, hidden=8, num_experts=2))
    with pytest.raises(ValueError, match="growth=FixedExperts"):
        ContinualMoE(moe=moe, growth=FixedExperts(), task_inference="router")
    hashed = MoE(router=HashRouter(d_model=8, num_experts=1), experts=MLPExperts(d_model=8, hidden=8, num_experts=1))
    with pytest.raises(ValueError, match="moe.router=HashRouter"):
        ContinualMoE(moe=hashed, task_inference="router")
    # a plain TopKRouter is enough for the router control (nothing is masked)
    plain = MoE(router=TopKRouter(d_model=8, num_experts=1, top_k=1), experts=MLPExperts(d_model=8, hidden=8, num_experts=1))
    assert ContinualMoE(moe=plain, task_inference="router").hparams.task_inference == "router"


def test_checkpoint_round_trip(tmp_path):
    dm = SplitDigits(n_experiences=2, epochs_per_experience=1, batch_size=64)
    m = growth_model(task_inference="router")
    trainer(dm, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)]).fit(m, dm)
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert state["hyper_parameters"]["task_inference"] == "router"
    fresh = growth_model(task_inference="router")
    fresh.on_load_checkpoint(state)
    fresh.load_state_dict(state["state_dict"])
    x = dm.test_sets[1].tensors[0][:16]
    m.eval(), fresh.eval()
    assert fresh.moe.num_experts == 2 and torch.equal(m(x), fresh(x))
    assert not torch.equal(m(x), m(x, task_id=0))  # the mixture, not one path
