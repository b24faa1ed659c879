"""Bad configuration and bad input fail fast with an error naming the field, the value and what is allowed."""
from __future__ import annotations

import pytest
import torch

from moeparadigms.core import (
    FFN,
    ExpertChoiceRouter,
    GLUExperts,
    MLPExperts,
    MoE,
    SoftMoERouter,
    TaskConditionedRouter,
    TopKRouter,
)


def _moe(**kw):
    return MoE(router=TopKRouter(d_model=8, num_experts=4, top_k=2), experts=MLPExperts(d_model=8, hidden=4, num_experts=4), **kw)


def test_bad_input_top_k_larger_than_experts():
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, num_experts=4\], got 5"):
        TopKRouter(d_model=8, num_experts=4, top_k=5)


@pytest.mark.parametrize("cf", [0, -1.0])
def test_bad_input_capacity_not_positive(cf):
    with pytest.raises(ValueError, match=rf"capacity_factor must be > 0.*got {cf}"):
        _moe(capacity_factor=cf)
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        ExpertChoiceRouter(d_model=8, num_experts=4, capacity_factor=cf)


def test_bad_input_last_dim_mismatch():
    with pytest.raises(ValueError, match=r"input last dim must equal d_model=8, got input shape \(3, 7\)"):
        _moe()(torch.randn(3, 7))


def test_bad_input_unknown_activation():
    with pytest.raises(ValueError, match=r"activation='swish' is not supported; choose one of"):
        MLPExperts(d_model=8, hidden=4, num_experts=2, activation="swish")
    with pytest.raises(ValueError, match="activation='tanhh'"):
        FFN(d_model=8, hidden=4, activation="tanhh")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_bad_input_nan_in_router_logits(bad):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    with pytest.raises(FloatingPointError, match="router logits contain .* non-finite"):
        _moe()(x)
    soft = MoE(router=SoftMoERouter(d_model=8, num_experts=2), experts=GLUExperts(d_model=8, hidden=4, num_experts=2))
    with pytest.raises(FloatingPointError, match="non-finite"):
        soft(x)


def test_bad_input_mismatched_router_and_experts():
    with pytest.raises(ValueError, match=r"router.num_experts=4 but experts.num_experts=3"):
        MoE(router=TopKRouter(d_model=8, num_experts=4), experts=MLPExperts(d_model=8, hidden=4, num_experts=3))
    with pytest.raises(ValueError, match=r"router.d_model=8 but experts.d_model=6"):
        MoE(router=TopKRouter(d_model=8, num_experts=4), experts=MLPExperts(d_model=6, hidden=4, num_experts=4))
    with pytest.raises(TypeError, match="router must be a moeparadigms Router, got Linear"):
        MoE(router=torch.nn.Linear(2, 2), experts=MLPExperts(d_model=6, hidden=4, num_experts=4))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: MLPExperts(d_model=0, hidden=4, num_experts=2), "d_model must be an integer >= 1, got 0"),
        (lambda: MLPExperts(d_model=8, hidden=4, num_experts=2, backend="cuda"), "backend='cuda'"),
        (lambda: TopKRouter(d_model=8, num_experts=4, temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
        (lambda: TaskConditionedRouter(d_model=8, num_experts=4, num_tasks=2, conditioning="film"), "conditioning='film'"),
        (lambda: _moe(load_balance_coef=-0.1), "load_balance_coef must be >= 0, got -0.1"),
    ],
)
def test_bad_input_constructor_fields(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_input_task_id():
    moe = MoE(router=TaskConditionedRouter(d_model=8, num_experts=4, num_tasks=3), experts=MLPExperts(d_model=8, hidden=4, num_experts=4))
    x = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"task_id 3 out of range: this router has num_tasks=3 \(ids 0..2\)"):
        moe(x, task_id=3)
    with pytest.raises(ValueError, match="task_id -1 out of range"):
        moe(x, task_id=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match=r"task_id has shape \(3,\)"):
        moe(x, task_id=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="needs task_id"):
        moe(x)
    with pytest.raises(ValueError, match="task_id must be an integer"):
        moe(x, task_id=torch.tensor(0.5))


def test_check_finite_can_be_disabled():
    x = torch.randn(4, 8)
    x[0, 0] = float("nan")
    out = _moe(check_finite=False)(x)  # no host sync, no error: the NaN propagates
    assert torch.isnan(out.y).any()
