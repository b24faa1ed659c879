"""The continual metrics equal hand-computed values and Avalanche's own metric classes on one matrix."""
import math

import pytest
import torch
from avalanche.evaluation.metrics.forgetting_bwt import BWT, Forgetting
from avalanche.evaluation.metrics.forward_transfer import ForwardTransfer

from moeparadigms.paradigms.continual_metrics import (
    AccuracyMatrix,
    continual_summary,
    plot_accuracy_matrix,
    plot_expert_usage,
)

R = torch.tensor([[0.9, 0.2, 0.1], [0.7, 0.8, 0.3], [0.6, 0.5, 0.95]])
B = torch.tensor([0.1, 0.15, 0.05])


def test_hand_computed():
    s = continual_summary(R, B)
    assert s["avg_acc"] == pytest.approx((0.6 + 0.5 + 0.95) / 3)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.6) + (0.8 - 0.5)) / 2)
    assert s["bwt"] == pytest.approx(-0.3)
    assert s["fwt"] == pytest.approx(((0.2 - 0.15) + (0.3 - 0.05)) / 2)
    mid = continual_summary(R, B, trained=2)  # after two experiences
    assert mid["avg_acc"] == pytest.approx(0.75) and mid["forgetting"] == pytest.approx(0.2)
    assert math.isnan(continual_summary(R, B, trained=1)["forgetting"])


def test_matches_avalanche_definitions():
    """Feed Avalanche's standalone metrics exactly as its plugins do after each training experience
    (evaluation on the whole test stream), then average as StreamForgetting / StreamBWT / StreamForwardTransfer."""
    T = R.shape[0]
    fwt = ForwardTransfer()
    for j in range(T):
        fwt.update(j, float(B[j]), initial=True)  # the eval before training
    for i in range(T):  # train on experience i, then evaluate every experience
        forg, bwt = Forgetting(), BWT()
        for k in range(i + 1):  # first value recorded when k was just trained
            forg.update(k, float(R[k, k]), initial=True)
            bwt.update(k, float(R[k, k]), initial=True)
        for j in range(T):
            if j != i:
                forg.update(j, float(R[i, j]))
                bwt.update(j, float(R[i, j]))
            if i == j - 1:
                fwt.update(j, float(R[i, j]))
    f = [v for v in forg.result().values()]
    b = list(bwt.result().values())
    s = continual_summary(R, B)
    assert s["forgetting"] == pytest.approx(sum(f) / len(f))
    assert s["bwt"] == pytest.approx(sum(b) / len(b))
    ft = list(fwt.result().values())
    assert s["fwt"] == pytest.approx(sum(ft) / len(ft))


def test_accuracy_matrix_metric_accumulates_batches():
    m = AccuracyMatrix(num_experiences=2)
    m.update(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]), row=1, experience=0)  # 2/3 in two batches
    m.update(torch.tensor([0]), torch.tensor([1]), row=1, experience=0)  # -> 2/4
    m.update(torch.tensor([1, 1]), torch.tensor([1, 1]), row=2, experience=0)
    m.update(torch.tensor([0, 1]), torch.tensor([0, 0]), row=2, experience=1)
    out = m.compute()
    assert out["matrix"][0, 0].item() == pytest.approx(0.5)
    assert math.isnan(out["matrix"][0, 1].item())  # never evaluated
    assert out["avg_acc"].item() == pytest.approx((1.0 + 0.5) / 2)
    assert out["forgetting"].item() == pytest.approx(0.5 - 1.0)
    assert "correct" in m.state_dict()  # persistent: checkpoints carry the matrix


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="row must be in"):
        AccuracyMatrix(num_experiences=2).update(torch.zeros(1), torch.zeros(1), row=3, experience=0)
    with pytest.raises(ValueError, match="num_experiences"):
        AccuracyMatrix(num_experiences=0)
    with pytest.raises(ValueError, match="trained must be"):
        continual_summary(R, trained=4)


def test_plots_are_pngs(tmp_path):
    p = plot_accuracy_matrix(R, tmp_path / "m.png")
    q = plot_expert_usage(torch.eye(3), tmp_path / "u.png")
    assert p.read_bytes()[:4] == b"\x89PNG" and q.read_bytes()[:4] == b"\x89PNG"
