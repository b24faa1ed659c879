"""MC-SMoE merging and usage pruning: alignment is exact on permuted copies, frequency weighting, router rows."""
from __future__ import annotations

import copy

import pytest
import torch

from moeparadigms.core import GLUExperts, MLPExperts, MoE, TopKRouter, remap_optimizer
from moeparadigms.lifecycle import (
    RoutingProfile,
    align_permutation,
    group_experts,
    merge_experts,
    prune_by_usage,
    routing_profile,
)
from moeparadigms.nets import MoEMLP


def make_moe(E=6, hidden=12, glu=False, bias=True, top_k=2) -> MoE:
    bank = (GLUExperts if glu else MLPExperts)(d_model=8, hidden=hidden, num_experts=E, bias=bias)
    return MoE(router=TopKRouter(d_model=8, num_experts=E, top_k=top_k), experts=bank)


def expert_out(moe: MoE, e: int, x):
    counts = torch.zeros(moe.num_experts, dtype=torch.long)
    counts[e] = x.shape[0]
    return moe.experts(x, counts)


def permute_expert_into(moe: MoE, src: int, dst: int, perm):
    """Make expert ``dst`` a copy of ``src`` with its hidden units permuted (same function)."""
    b = moe.experts
    H = b.hidden
    cols = torch.cat([perm, perm + H]) if b.glu else perm
    with torch.no_grad():
        b.w1.block0[dst] = b.w1.block0[src][:, cols]
        b.w2.block0[dst] = b.w2.block0[src][perm]
        if b.b1 is not None:
            b.b1.block0[dst] = b.b1.block0[src][cols]
            b.b2.block0[dst] = b.b2.block0[src]


@pytest.mark.parametrize("glu", [False, True])
def test_alignment_recovers_a_hidden_unit_permutation(glu):
    torch.manual_seed(0)
    moe = make_moe(glu=glu)
    perm = torch.randperm(12)
    permute_expert_into(moe, 0, 3, perm)
    x = torch.randn(5, 8)
    assert torch.allclose(expert_out(moe, 0, x), expert_out(moe, 3, x), atol=1e-5)  # same function
    found = align_permutation(moe.experts, 0, 3)
    # aligned unit i of expert 3 is its unit found[i]; expert 3's unit j is expert 0's unit perm[j]
    assert torch.equal(perm[found], torch.arange(12))


def test_merging_permuted_copies_gives_back_the_expert_only_when_aligned():
    torch.manual_seed(1)
    moe = make_moe(E=4)
    permute_expert_into(moe, 0, 1, torch.randperm(12))
    profile = RoutingProfile(torch.tensor([0.4, 0.1, 0.3, 0.2]), torch.randn(50, 4))
    # force the group {0, 1}: expert 1's router-logit column equals expert 0's
    profile.logits_TE[:, 1] = profile.logits_TE[:, 0]
    x = torch.randn(7, 8)
    ref = expert_out(moe, 0, x)
    aligned = copy.deepcopy(moe)
    _, groups = merge_experts(aligned, profile, 3)
    assert groups == {0: [0, 1], 2: [2], 3: [3]}
    assert aligned.num_experts == 3 and aligned.router.num_experts == 3
    assert torch.allclose(expert_out(aligned, 0, x), ref, atol=1e-5)
    plain = copy.deepcopy(moe)
    merge_experts(plain, profile, 3, align=False)
    assert not torch.allclose(expert_out(plain, 0, x), ref, atol=1e-3)


def test_merge_is_a_frequency_weighted_average_and_router_rows_follow():
    torch.manual_seed(2)
    moe = make_moe(E=3, bias=False)
    w = moe.experts.w1.full().detach().clone()
    w2 = moe.experts.w2.full().detach().clone()
    gate = moe.router.gate.full().detach().clone()
    logits = torch.randn(40, 3)
    logits[:, 2] = logits[:, 1] * 2  # expert 2 joins expert 1 (cosine similarity 1)
    profile = RoutingProfile(torch.tensor([0.5, 0.3, 0.2]), logits)
    m = copy.deepcopy(moe)
    _, groups = merge_experts(m, profile, 2, align=False, router="average")
    assert groups == {0: [0], 1: [1, 2]}
    assert torch.allclose(m.experts.w1.row(1), 0.6 * w[1] + 0.4 * w[2], atol=1e-6)
    assert torch.allclose(m.experts.w2.row(1), 0.6 * w2[1] + 0.4 * w2[2], atol=1e-6)
    assert torch.equal(m.experts.w1.row(0), w[0])
    assert torch.allclose(m.router.gate.row(1), 0.6 * gate[1] + 0.4 * gate[2], atol=1e-6)
    d = copy.deepcopy(moe)
    merge_experts(d, profile, 2, align=False, router="dominant")
    assert torch.equal(d.router.gate.row(1), gate[1])


def test_grouping_keeps_the_most_used_experts_as_leaders():
    logits = torch.randn(30, 5)
    logits[:, 4] = logits[:, 0] + 0.01 * torch.randn(30)
    groups = group_experts(RoutingProfile(torch.tensor([0.3, 0.1, 0.25, 0.2, 0.15]), logits), 3)
    assert set(groups) == {0, 2, 3}
    assert 4 in groups[0]
    assert sorted(e for g in groups.values() for e in g) == list(range(5))


def test_prune_by_usage_keeps_the_most_used_and_the_layer_still_runs():
    torch.manual_seed(3)
    moe = make_moe(E=5)
    before = moe.experts.w1.full().detach().clone()
    _, keep = prune_by_usage(moe, RoutingProfile(torch.tensor([0.1, 0.4, 0.05, 0.25, 0.2]), torch.randn(3, 5)), 3)
    assert keep == [1, 3, 4]
    assert torch.equal(moe.experts.w1.full(), before[[1, 3, 4]])
    assert moe(torch.randn(9, 8)).y.shape == (9, 8)


def test_routing_profile_counts_assignments_and_merge_works_with_an_optimizer():
    torch.manual_seed(4)
    net = MoEMLP(in_features=6, out_features=3, moe=make_moe(E=6, top_k=2))
    x = torch.randn(40, 6)
    prof = routing_profile(net, net.blocks[0].moe, [x[:20], x[20:]])
    assert prof.logits_TE.shape == (40, 6)
    assert torch.allclose(prof.frequency_E.sum(), torch.tensor(1.0))
    direct = net.blocks[0].moe.router(net.blocks[0].norm(net.inp(x))).expert_A.bincount(minlength=6).float()
    assert torch.allclose(prof.frequency_E, direct / direct.sum())
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(x).y.sum().backward()
    opt.step()
    remap, _ = merge_experts(net.blocks[0].moe, prof, 3)
    remap_optimizer(opt, remap)
    opt.zero_grad()
    out = net(x)
    (out.y.sum() + out.aux_loss).backward()
    opt.step()  # the optimizer holds the pruned layer's parameters
    assert net.blocks[0].moe.num_experts == 3


@pytest.mark.parametrize("target", [0, 1, 7])
def test_bad_target_is_refused(target):
    moe = make_moe(E=6, top_k=2)
    with pytest.raises(ValueError, match="target"):
        merge_experts(moe, RoutingProfile(torch.full((6,), 1 / 6), torch.randn(4, 6)), target)


def test_group_router_merge_of_equivalent_experts_keeps_the_layer_function_exactly():
    torch.manual_seed(5)
    moe = make_moe(E=6, top_k=2)
    # experts 1 and 4 are permuted copies of 0 and 3: merging {0, 1, 4}... by logit similarity needs a profile
    permute_expert_into(moe, 0, 1, torch.randperm(12))
    permute_expert_into(moe, 3, 4, torch.randperm(12))
    logits = torch.randn(60, 6)
    logits[:, 1], logits[:, 4] = logits[:, 0], logits[:, 3]
    profile = RoutingProfile(torch.tensor([0.3, 0.05, 0.2, 0.2, 0.1, 0.15]), logits)
    x = torch.randn(50, 8)
    ref = moe(x).y
    grouped = copy.deepcopy(moe)
    _, groups = merge_experts(grouped, profile, 4, router="group")
    assert groups == {0: [0, 1], 2: [2], 3: [3, 4], 5: [5]}
    assert grouped.num_experts == 4 and grouped.router.num_experts == 4
    out = grouped(x)
    assert torch.allclose(out.y, ref, atol=1e-5)  # same choices, same functions
    assert out.stats.tokens_per_expert.sum() == 100 and torch.isfinite(out.aux_loss)
    dominant = copy.deepcopy(moe)
    merge_experts(dominant, profile, 4, router="dominant")
    assert not torch.allclose(dominant(x).y, ref, atol=1e-3)  # re-routed tokens change the output
    out.y.sum().backward()  # the kept router rows still learn
    assert grouped.router.base.gate.block0.grad is not None


def test_dominant_weighting_keeps_the_dominant_experts_weights():
    torch.manual_seed(6)
    moe = make_moe(E=4, bias=False)
    w = moe.experts.w1.full().detach().clone()
    logits = torch.randn(30, 4)
    logits[:, 3] = logits[:, 0]
    _, groups = merge_experts(moe, RoutingProfile(torch.tensor([0.4, 0.3, 0.2, 0.1]), logits), 3, router="group",
                              weighting="dominant")
    assert groups[0] == [0, 3]
    assert torch.equal(moe.experts.w1.full(), w[[0, 1, 2]])
    with pytest.raises(ValueError, match="weighting"):
        merge_experts(make_moe(E=4), RoutingProfile(torch.full((4,), 0.25), logits), 3, weighting="mean")
