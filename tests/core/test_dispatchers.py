"""Each dispatcher against a per-assignment reference (outputs and gradients), and the layer's choice among them."""
from __future__ import annotations

import pytest
import torch

from moeparadigms.core import ExpertChoiceRouter, HashRouter, MoE, SoftMoERouter, TaskConditionedRouter, TopKRouter
from moeparadigms.core import dispatchers as dp
from moeparadigms.core.dispatch import capacity as switch_capacity

from .reference import expert_ref
from .test_layer import EXPERTS, ROUTERS, D, E

ALL = {"dense": dp.DENSE, "permutation": dp.PERMUTATION, "sorted": dp.SORTED}


def _reference(routing, bank, x_TD, cap):
    """y_t = sum of w * expert_e(x_t) over the kept assignments of token t; with ``cap``, each expert keeps its
    first ``cap`` assignments in the routing's own order (Switch's priority)."""
    seen = [0] * bank.num_experts
    rows = [torch.zeros_like(x_TD[0]) for _ in range(x_TD.shape[0])]
    kept = torch.zeros(bank.num_experts, dtype=torch.long)
    for a in sorted(range(routing.expert_A.numel()), key=lambda a: (int(routing.expert_A[a]), a)):
        t, e = int(routing.token_A[a]), int(routing.expert_A[a])
        if cap is not None and seen[e] >= cap:
            continue
        seen[e] += 1
        kept[e] += 1
        rows[t] = rows[t] + routing.weight_A[a] * expert_ref(bank, e, x_TD[t])
    return torch.stack(rows), kept


def _grads(y, g, inputs):
    # both outputs share the router's graph: keep it for the second
    return torch.autograd.grad((y * g).sum(), inputs, allow_unused=True, retain_graph=True)


CASES = [  # (dispatcher, router, experts, capacity factor)
    *[(d, r, "mlp-gelu-bias", None) for d in ("dense", "permutation", "sorted") for r in ("topk2", "hash", "task-concat")],
    ("dense", "expert-choice", "swiglu", None),  # a routing without ids_TK: the gates by index_put
    ("sorted", "expert-choice", "swiglu", None),
    ("sorted", "expert-choice", "mlp-gelu-bias", 0.5),
    ("sorted", "topk2", "modules", None),
    ("sorted", "topk1", "mlp-autograd", 0.5),
    ("permutation", "topk2", "swiglu", 0.5),
    ("permutation", "topk1", "mlp-relu", 0.5),
]


@pytest.mark.parametrize("name,router,experts,cf", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_dispatcher_matches_per_assignment_reference(name, router, experts, cf):
    torch.manual_seed(0)
    r, bank = ROUTERS[router]().double(), EXPERTS[experts]().double()
    x = torch.randn(11, D, dtype=torch.float64, requires_grad=True)
    task = torch.randint(0, 3, (11,)) if isinstance(r, TaskConditionedRouter) else None
    routing = r(x, task_id_T=task)
    cap = None if cf is None else switch_capacity(routing.expert_A.numel(), E, cf)
    out = ALL[name](x, routing, bank, cap)
    y_ref, kept = _reference(routing, bank, x, cap)
    assert out.total == routing.expert_A.numel()
    torch.testing.assert_close(out.y_TD, y_ref, rtol=1e-10, atol=1e-10)
    assert torch.equal(out.counts_E, kept)
    dropped = 0 if out.dropped is None else int(out.dropped)
    assert dropped == out.total - int(kept.sum()) and (cap is None or dropped > 0)
    params = [x, *(p for p in [*r.parameters(), *bank.parameters()] if p.requires_grad)]
    g = torch.randn_like(y_ref)
    for a, b in zip(_grads(out.y_TD, g, params), _grads(y_ref, g, params)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_dense_dispatcher_refuses_a_capacity():
    r, bank = ROUTERS["topk2"](), EXPERTS["mlp-relu"]()
    x = torch.randn(4, D)
    with pytest.raises(ValueError, match="DenseDispatcher is dropless: got capacity=3"):
        dp.DENSE(x, r(x), bank, 3)
    with pytest.raises(ValueError, match="PermutationDispatcher needs a token-choice routing"):
        dp.PERMUTATION(x, ExpertChoiceRouter(d_model=D, num_experts=E)(x), bank)


# the choice each setting got before dispatch became a component (MoE._sparse's if/elif/else), stated as data
POLICY = [  # (router, experts, dense_dispatch, capacity_factor, tokens, expected)
    ("topk2", "mlp-gelu-bias", "auto", None, 8, "dense"),
    ("topk2", "mlp-gelu-bias", "auto", None, 100_000, "permutation"),
    ("topk2", "mlp-gelu-bias", True, None, 100_000, "dense"),
    ("topk2", "mlp-gelu-bias", False, None, 8, "permutation"),
    ("topk2", "mlp-gelu-bias", True, 1.0, 8, "permutation"),  # capacity never takes the dense path
    ("topk2", "swiglu", "auto", 2.0, 8, "permutation"),
    ("hash", "mlp-relu", "auto", None, 8, "dense"),
    ("hash", "mlp-relu", False, None, 8, "permutation"),
    ("task-concat", "swiglu", False, None, 8, "permutation"),
    ("expert-choice", "mlp-relu", "auto", None, 8, "dense"),
    ("expert-choice", "mlp-relu", False, None, 8, "sorted"),
    ("expert-choice", "mlp-relu", True, 1.0, 8, "sorted"),
    ("topk2", "modules", True, None, 8, "sorted"),  # no forward_dense
    ("topk2", "modules", False, None, 8, "sorted"),
    ("topk2", "mlp-autograd", False, None, 8, "sorted"),  # plain autograd: no permutation kernel
    ("topk2", "mlp-autograd", "auto", None, 8, "dense"),
    ("topk2", "mlp-autograd", False, 1.0, 8, "sorted"),
]


@pytest.mark.parametrize("router,experts,dense,cf,T,expected", POLICY, ids=["-".join(map(str, c)) for c in POLICY])
def test_choice_policy_is_unchanged(router, experts, dense, cf, T, expected):
    r = ROUTERS[router]()
    moe = MoE(router=r, experts=EXPERTS[experts](), dense_dispatch=dense, capacity_factor=cf).eval()
    x = torch.randn(T, D)
    routing = r(x, task_id_T=torch.zeros(T, dtype=torch.long) if isinstance(r, TaskConditionedRouter) else None)
    assert moe.select_dispatcher(T, routing) is ALL[expected]


class _Spy(dp.Dispatcher):
    def __init__(self):
        self.calls = []

    def __call__(self, x_TD, routing, experts, capacity=None, count=True):
        self.calls.append((x_TD.shape[0], capacity, count))
        return dp.SORTED(x_TD, routing, experts, capacity, count)


def test_an_installed_dispatcher_serves_every_forward_and_the_layer_is_unchanged_otherwise():
    torch.manual_seed(0)
    moe = MoE(router=TopKRouter(d_model=D, num_experts=E, top_k=2), experts=EXPERTS["mlp-gelu-bias"](), capacity_factor=0.5)
    x = torch.randn(2, 6, D)
    before = moe(x)
    moe.dispatcher = spy = _Spy()
    after = moe(x)
    assert spy.calls == [(12, switch_capacity(24, E, 0.5), True)]
    assert torch.equal(before.y, after.y) and before.losses.keys() == after.losses.keys()
    for a, b in zip(before.stats, after.stats):
        assert torch.equal(a, b)
    with torch.no_grad():
        moe.stats_in_inference = False
        assert moe(x).stats is None and spy.calls[-1][2] is False  # nothing reads the counts
    moe.dispatcher = None
    assert torch.equal(moe(x).y, before.y)


def test_soft_moe_and_hash_keep_their_paths():
    """Soft MoE has its own slot path (no dispatcher); a hash router is token choice like top-k."""
    soft = MoE(router=SoftMoERouter(d_model=D, num_experts=E), experts=EXPERTS["mlp-relu"](), dense_dispatch=False)
    soft.dispatcher = _Spy()
    soft(torch.randn(3, D))
    assert soft.dispatcher.calls == []
    h = HashRouter(d_model=D, num_experts=E)
    moe = MoE(router=h, experts=EXPERTS["mlp-relu"](), dense_dispatch=False)
    assert moe.select_dispatcher(3, h(torch.randn(3, D))) is dp.PERMUTATION
