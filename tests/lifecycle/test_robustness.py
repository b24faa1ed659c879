"""Attacks and corruptions: FGSM against a hand-derived linear case, PGD stays in the ball and is at least as
strong as FGSM, corruptions at their stated strength, shortcut features at their stated agreement."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from moeparadigms.core import MLPExperts, MoE, TopKRouter
from moeparadigms.lifecycle import (
    CORRUPTIONS,
    accuracy,
    corrupt,
    expert_dropout,
    fgsm,
    mean_ci95,
    pgd,
    shortcut_features,
)


def test_fgsm_on_a_linear_model_moves_along_the_sign_of_the_weight_difference():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 1.0, -1.0, 3.0]]))
    x = torch.full((1, 4), 0.5)
    y = torch.tensor([0])
    adv = fgsm(lin, x, y, 0.1)
    # d CE / dx = (p - onehot(y)) @ W, whose sign is sign(w1 - w0) for class 0
    expected = x + 0.1 * torch.sign(lin.weight[1] - lin.weight[0])
    assert torch.allclose(adv, expected)


def test_pgd_stays_in_the_ball_and_valid_range_and_is_at_least_as_strong_as_fgsm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.rand(64, 16), torch.randint(0, 3, (64,))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(100):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    eps = 0.1
    xa = pgd(net, x, y, eps, steps=20, generator=torch.Generator().manual_seed(0))
    assert (xa - x).abs().max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
    ce = lambda z: nn.functional.cross_entropy(net(z), y).item()  # noqa: E731
    assert ce(xa) >= ce(fgsm(net, x, y, eps)) - 1e-4 > ce(x)
    assert accuracy(net, xa, y) < accuracy(net, x, y)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_change_the_input_more_with_severity_and_stay_in_range(name):
    torch.manual_seed(1)
    x = torch.rand(200, 64)
    dist = [float((corrupt(x, name, s, generator=torch.Generator().manual_seed(0)) - x).abs().mean()) for s in (1, 2, 3)]
    assert 0 < dist[0] < dist[1] < dist[2]
    out = corrupt(x, name, 3)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_corruption_strengths():
    x = torch.rand(2000, 64)
    g = torch.Generator().manual_seed(0)
    assert abs(float((corrupt(x, "pixel_dropout", 2, generator=g) == 0).float().mean()) - 0.2) < 0.02
    noise = corrupt(torch.full((2000, 64), 0.5), "gaussian_noise", 3, generator=g) - 0.5
    assert abs(float(noise.std()) - 0.2) < 0.01
    img = torch.arange(64.0).reshape(1, 64)
    assert torch.equal(corrupt(img, "translate", 1, clip=(None, None)).reshape(8, 8)[:, 1:], img.reshape(8, 8)[:, :7])
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "blur", 9)
    with pytest.raises(ValueError, match="corruption"):
        corrupt(x, "fog", 1)


def test_shortcut_features_agree_at_the_stated_rate_and_the_flipped_set_never_agrees():
    y = torch.randint(0, 10, (20000,))
    g = torch.Generator().manual_seed(0)
    s = shortcut_features(y, 10, 0.95, generator=g).argmax(1)
    assert abs(float((s == y).float().mean()) - 0.95) < 0.01
    flipped = shortcut_features(y, 10, 0.0, generator=g).argmax(1)
    assert not (flipped == y).any()
    assert len(torch.unique(flipped[y == 3])) == 9  # the wrong class is any other class


def test_expert_dropout_routes_only_to_kept_experts_in_training_and_is_off_in_eval():
    torch.manual_seed(2)
    moe = MoE(router=TopKRouter(d_model=8, num_experts=6, top_k=2), experts=MLPExperts(d_model=8, hidden=8, num_experts=6))
    x = torch.randn(100, 8)
    moe.eval()
    ref = moe(x).y
    h = expert_dropout(moe, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(moe(x).y, ref)  # eval: untouched
    moe.train()
    used = [int((moe(x).stats.tokens_per_expert > 0).sum()) for _ in range(20)]
    assert min(used) >= 2 and max(used) <= 6 and min(used) < 6
    h.remove()
    assert all(int((moe(x).stats.tokens_per_expert > 0).sum()) == 6 for _ in range(3))


def test_mean_ci95():
    assert mean_ci95([1.0]) == (1.0, 0.0)
    m, h = mean_ci95([1.0, 2.0, 3.0])
    assert m == 2.0 and abs(h - 4.302653 * 1.0 / 3 ** 0.5) < 1e-5
