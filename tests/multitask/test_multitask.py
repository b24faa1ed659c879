"""Multi-task paradigm: special cases of the architectures, loss balancing formulas, the synthetic generator,
learning a tiny two-task problem, clear errors, the CLI with every config, and the benchmark's smoke run."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moeparadigms.benchmarks.multitask import (
    MMoESyntheticDataModule,
    MMoESyntheticProblem,
    MultiTaskDigitsDataModule,
    digit_tasks,
    label_correlation,
)
from moeparadigms.paradigms.multitask import (
    CGC,
    PLE,
    MMoE,
    MultiTaskMoE,
    OMoE,
    SharedBottom,
    SingleTask,
    TaskMoE,
    TaskSpec,
    pcgrad,
    plot_expert_usage,
    uncertainty_weighted_loss,
)

ROOT = Path(__file__).resolve().parents[2]
F_IN = 10


def _net(arch, num_tasks=2, seed=0):
    torch.manual_seed(seed)
    return arch.build(in_features=F_IN, num_tasks=num_tasks)


# ---------------------------------------------------------------------------------------------------
# Architectures reduce to their special cases
# ---------------------------------------------------------------------------------------------------
def test_mmoe_with_one_task_equals_omoe():
    x = torch.randn(32, F_IN)
    mmoe, omoe = _net(MMoE(num_experts=4, expert_hidden=6), 1), _net(OMoE(num_experts=4, expert_hidden=6), 1)
    assert mmoe.state_dict().keys() == omoe.state_dict().keys()
    omoe.load_state_dict(mmoe.state_dict())
    torch.testing.assert_close(mmoe(x).reps[0], omoe(x).reps[0])


def test_omoe_gives_every_task_the_same_mixture_and_mmoe_does_not():
    x = torch.randn(32, F_IN)
    r = _net(OMoE(num_experts=4, expert_hidden=6), 3)(x).reps
    torch.testing.assert_close(r[0], r[1])
    torch.testing.assert_close(r[0], r[2])
    r = _net(MMoE(num_experts=4, expert_hidden=6), 3)(x).reps
    assert not torch.allclose(r[0], r[1])


def test_mmoe_matches_its_formula():
    """y_k = sum_e softmax(G_k x)_e relu(x W_e + b_e), written out by hand from the parameters."""
    net = _net(MMoE(num_experts=3, expert_hidden=5), 2)
    x = torch.randn(16, F_IN)
    lvl = net.levels[0]
    W, b = lvl.shared.weight[0], lvl.shared.bias[0]  # (E, F, H), (E, H)
    for k in range(2):
        ref = torch.zeros(16, 5)
        gate = torch.softmax(x @ lvl.gates[k].weight.T + lvl.gates[k].bias, -1)
        for e in range(3):
            ref += gate[:, e : e + 1] * torch.relu(x @ W[e] + b[e])
        torch.testing.assert_close(net(x).reps[k], ref)


@pytest.mark.parametrize("spec", [CGC(num_shared_experts=4, num_task_experts=0, expert_hidden=6),
                                  PLE(num_levels=1, num_shared_experts=4, num_task_experts=0, expert_hidden=6)])
def test_ple_without_task_experts_is_mmoe(spec):
    x = torch.randn(32, F_IN)
    mmoe, ple = _net(MMoE(num_experts=4, expert_hidden=6), 3), _net(spec, 3, seed=1)
    ple.load_state_dict(mmoe.state_dict())  # strict: exactly MMoE's parameters
    for a, b in zip(mmoe(x).reps, ple(x).reps):
        torch.testing.assert_close(a, b)


def test_multilevel_ple_without_task_experts_shares_only():
    net = _net(PLE(num_levels=2, num_shared_experts=3, num_task_experts=0, expert_hidden=6), 2)
    usage = net.expert_usage(torch.randn(8, F_IN))
    assert [u.shape for u in usage] == [(2, 3), (2, 3)]
    torch.testing.assert_close(usage[1].sum(-1), torch.ones(2))


def test_task_experts_are_private():
    """Task 0's output must not depend on task 1's private experts (nor its gate)."""
    net = _net(PLE(num_levels=2, num_shared_experts=2, num_task_experts=2, expert_hidden=6), 2)
    out = net(torch.randn(8, F_IN)).reps[0].sum()
    lvl = net.levels[-1]
    g = torch.autograd.grad(out, [lvl.specific.weight, lvl.gates[1].weight])
    assert g[0][1].abs().sum() == 0 and g[0][0].abs().sum() > 0
    assert g[1].abs().sum() == 0
    usage = net.expert_usage(torch.randn(8, F_IN))[-1]  # (T, 2 shared + 2 x 2 private)
    assert usage[0, 4:].sum() == 0 and usage[1, 2:4].sum() == 0


def test_shared_bottom_and_single_task_structure():
    x = torch.randn(4, F_IN)
    sb = _net(SharedBottom(hidden=7), 2)
    r = sb(x).reps
    torch.testing.assert_close(r[0], r[1])  # one shared bottom
    st = _net(SingleTask(hidden=7), 2)
    g = torch.autograd.grad(st(x).reps[0].sum(), list(st.bottoms[1].parameters()), allow_unused=True)
    assert all(t is None for t in g)


def test_task_moe_routes_by_task_through_the_core_at_any_depth():
    net = _net(TaskMoE(d_model=8, num_experts=4, expert_hidden=8, top_k=1, depth=3, conditioning="task_only"), 2)
    assert len(net.blocks) == 3
    usage = net.expert_usage(torch.randn(64, F_IN))
    # task_only routing: every token of a task goes to that task's single expert, in every block
    for u in usage:
        assert u.shape == (2, 4)
        assert torch.all(u.max(-1).values == 1.0)
    out = net(torch.randn(5, F_IN))
    assert len(out.reps) == 2 and out.reps[0].shape == (5, 8) and out.aux_loss.requires_grad


# ---------------------------------------------------------------------------------------------------
# Loss balancing
# ---------------------------------------------------------------------------------------------------
def test_uncertainty_weighting_matches_kendall_formula():
    losses = torch.tensor([0.7, 2.0, 0.3])
    log_var = torch.tensor([0.2, -0.5, 1.1])
    regression = torch.tensor([True, False, True])
    sigma = torch.exp(0.5 * log_var)
    ref = sum(
        (L / (2 * s**2) if r else L / s**2) + math.log(s) for L, s, r in zip(losses.tolist(), sigma.tolist(), regression.tolist())
    )
    assert float(uncertainty_weighted_loss(losses, log_var, regression)) == pytest.approx(ref, rel=1e-6)


def test_uncertainty_weighting_learns_sigma_to_the_loss():
    """The optimum of L/(2 sigma^2) + log sigma is sigma^2 = L."""
    s = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([s], lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        uncertainty_weighted_loss(torch.tensor([3.0]), s, torch.tensor([True])).backward()
        opt.step()
    assert float(torch.exp(s.detach())) == pytest.approx(3.0, rel=1e-3)


def test_pcgrad_hand_computed():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    # g1.g2 = -1 < 0: g1' = g1 + 0.5 g2 = [0.5, 0.5]; g2' = g2 + g1 = [0, 1]
    torch.testing.assert_close(pcgrad([g1, g2]), torch.tensor([0.5, 1.5]))
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0])  # no conflict: plain sum
    torch.testing.assert_close(pcgrad([a, b]), a + b)


# ---------------------------------------------------------------------------------------------------
# The synthetic generator
# ---------------------------------------------------------------------------------------------------
def test_generator_follows_its_definition():
    prob = MMoESyntheticProblem(p=0.3, c=2.0, num_features=20, m=4, noise_std=0.0, seed=5)
    w1, w2 = prob.w_TF
    assert float(w1 @ w1) == pytest.approx(4.0) and float(w2 @ w2) == pytest.approx(4.0)
    assert float(w1 @ w2) == pytest.approx(4.0 * 0.3)  # cosine = p
    x, y = prob.sample(50, seed=1)
    z = x.double() @ prob.w_TF.T
    ref = z + torch.sin(prob.alpha_M * z.unsqueeze(-1) + prob.beta_M).sum(-1)
    torch.testing.assert_close(y, ref.float(), rtol=1e-5, atol=1e-5)


def test_label_correlation_is_monotone_in_p():
    ps = [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    corr = [label_correlation(MMoESyntheticProblem(p=p, seed=0).sample(20000, seed=1)[1]) for p in ps]
    assert all(b > a for a, b in zip(corr, corr[1:])), corr
    assert corr[-1] > 0.99 and abs(corr[0]) < 0.05
    assert corr[3] < 0.5  # the sine terms make the label correlation lower than p


def test_generator_rejects_bad_settings():
    with pytest.raises(ValueError, match=r"p must be in \[-1, 1\].*1.5"):
        MMoESyntheticProblem(p=1.5)
    with pytest.raises(ValueError, match="num_features"):
        MMoESyntheticDataModule(num_features=1)
    with pytest.raises(ValueError, match="choose a non-empty list"):
        MultiTaskDigitsDataModule(labels=["digit", "colour"])


# ---------------------------------------------------------------------------------------------------
# Learning a tiny two-task problem (mixed regression + classification) in seconds
# ---------------------------------------------------------------------------------------------------
TINY_TASKS = [TaskSpec(name="reg", kind="regression"), TaskSpec(name="cls", kind="classification", num_classes=2)]


def _tiny_data(n=512):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, F_IN, generator=g)
    y = torch.stack([x[:, :3].sum(1), (x[:, 3] > 0).float()], 1)
    return x, y


@pytest.mark.parametrize(
    "arch, balancing",
    [
        (MMoE(num_experts=4, expert_hidden=16), "fixed"),
        (PLE(num_levels=2, num_shared_experts=2, num_task_experts=1, expert_hidden=16), "uncertainty"),
        (TaskMoE(d_model=16, num_experts=4, expert_hidden=16, top_k=2), "pcgrad"),
        (SharedBottom(hidden=32), "fixed"),
    ],
    ids=["mmoe-fixed", "ple-uncertainty", "taskmoe-pcgrad", "shared-bottom"],
)
def test_learns_tiny_two_task_problem(arch, balancing):
    torch.manual_seed(0)
    model = MultiTaskMoE(in_features=F_IN, tasks=TINY_TASKS, architecture=arch, tower_hidden=16, balancing=balancing, lr=1e-2)
    x, y = _tiny_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(300):
        idx = torch.arange(step * 64, step * 64 + 64) % x.shape[0]
        out, _ = model.task_losses((x[idx], y[idx]))
        opt.zero_grad()
        if balancing == "pcgrad":
            model.pcgrad_backward(out)
        else:
            out.loss.backward()
        opt.step()
    model.eval()
    xt, yt = _tiny_data(256)
    with torch.no_grad():
        reg, cls = model(xt + 0.0)
    assert F.mse_loss(reg, yt[:, 0]) < 0.3 * yt[:, 0].var()
    assert (cls.argmax(-1) == yt[:, 1].long()).float().mean() > 0.9


def test_task_id_batches_train_each_task_on_its_own_samples():
    torch.manual_seed(0)
    model = MultiTaskMoE(in_features=F_IN, tasks=TINY_TASKS, architecture=MMoE(num_experts=2, expert_hidden=4))
    x, y = _tiny_data(8)
    task_id = torch.tensor([0, 0, 0, 0, 0, 0, 0, 0])
    out, pairs = model.task_losses((x, task_id, y[:, 0]))
    assert out.present.tolist() == [True, False] and float(out.losses[1]) == 0.0
    assert pairs[0][0].shape == (8,)


# ---------------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    model = MultiTaskMoE(in_features=F_IN, tasks=TINY_TASKS, architecture=MMoE(num_experts=2, expert_hidden=4))
    x, y = _tiny_data(4)
    with pytest.raises(ValueError, match=r"task_id 2 out of range: this model has 2 tasks \(ids 0..1\)"):
        model.task_losses((x, torch.tensor([0, 1, 2, 0]), y[:, 0]))
    with pytest.raises(ValueError, match=r"task 'cls': class label 3 out of range \(num_classes=2\)"):
        model.task_losses((x, torch.stack([y[:, 0], torch.full((4,), 3.0)], 1)))
    with pytest.raises(ValueError, match=r"shape \(batch, num_tasks=2\)"):
        model.task_losses((x, y[:, :1]))
    with pytest.raises(ValueError, match=r"input must have shape \(B, 10\)"):
        model(torch.randn(4, 11))
    with pytest.raises(ValueError, match="kind='ranking' is not supported"):
        TaskSpec(name="t", kind="ranking")
    with pytest.raises(ValueError, match="classification needs num_classes >= 2"):
        TaskSpec(name="t", kind="classification")
    with pytest.raises(ValueError, match="balancing='gradnorm' is not supported"):
        MultiTaskMoE(in_features=F_IN, tasks=TINY_TASKS, architecture=MMoE(), balancing="gradnorm")
    with pytest.raises(ValueError, match="task_weights"):
        MultiTaskMoE(in_features=F_IN, tasks=TINY_TASKS, architecture=MMoE(), task_weights=[1.0])
    with pytest.raises(ValueError, match="num_experts must be an integer >= 1, got 0"):
        MMoE(num_experts=0)
    with pytest.raises(ValueError, match="top_k=5 must be <= num_experts=4"):
        TaskMoE(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="each task needs at least one expert"):
        PLE(num_shared_experts=0, num_task_experts=0)


# ---------------------------------------------------------------------------------------------------
# Plots, data, CLI, benchmark
# ---------------------------------------------------------------------------------------------------
def test_expert_usage_plot_is_written(tmp_path):
    net = _net(CGC(num_shared_experts=2, num_task_experts=1, expert_hidden=4), 2)
    path = plot_expert_usage(net.expert_usage(torch.randn(8, F_IN)), ["a", "b"], tmp_path / "u.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_digits_datamodule_labels():
    dm = MultiTaskDigitsDataModule()
    dm.setup()
    x, y = dm.train_set.tensors
    assert x.shape[1] == 64 and y.shape[1] == 4
    d = y[:, 0]
    torch.testing.assert_close(y[:, 1], d % 2)
    torch.testing.assert_close(y[:, 2], (d >= 5).float())
    torch.testing.assert_close(y[:, 3], d % 3)
    assert [t.num_classes for t in dm.tasks] == [10, 2, 2, 3] == [t.num_classes for t in digit_tasks(["digit", "parity", "ge5", "mod3"])]


METHOD_CONFIGS = sorted(p.name for p in (ROOT / "configs" / "multitask").glob("*.yaml"))


@pytest.mark.parametrize("method", METHOD_CONFIGS)
@pytest.mark.parametrize("benchmark", ["digits.yaml", "mmoe_synthetic.yaml"])
def test_cli_fit_every_config(benchmark, method, tmp_path, monkeypatch):
    from moeparadigms.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["moeparadigms"])
    main([
        "fit", "--config", f"tasks/multitask/{benchmark}", "--config", f"configs/multitask/{method}",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "3", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ])
    version = next((tmp_path / "lightning_logs").iterdir())
    assert (version / "config.yaml").exists()
    if "single_task" not in method and "shared_bottom" not in method:
        assert (version / "expert_usage.png").exists()


def test_bench_quick_writes_records(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_multitask
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = tmp_path / "mt.json"
    bench_multitask.main(["--quick", "--out", str(out), "--plots", str(tmp_path / "plots")])
    recs = json.loads(out.read_text())
    assert all(set(r) == {"benchmark", "p", "method", "seed", "task", "metric", "value", "params"} for r in recs)
    assert {r["method"] for r in recs} == set(bench_multitask.METHODS)
    assert {r["benchmark"] for r in recs} == {"mmoe-synthetic", "multitask-digits"}
    assert {r["p"] for r in recs if r["benchmark"] == "mmoe-synthetic"} == {1.0, 0.9, 0.5, 0.1}
    assert all(r["p"] is None for r in recs if r["benchmark"] == "multitask-digits")
    assert {r["metric"] for r in recs if r["benchmark"] == "mmoe-synthetic"} == {"mse"}
    assert {r["metric"] for r in recs if r["benchmark"] == "multitask-digits"} == {"accuracy"}
    meta = json.loads((tmp_path / "plots" / "meta.json").read_text())
    for r in recs:  # every model within 10% of its benchmark's budget
        assert abs(r["params"] - meta["budgets"][r["benchmark"]]) <= 0.1 * meta["budgets"][r["benchmark"]]
        assert math.isfinite(r["value"])
    assert (tmp_path / "plots" / "loss_vs_correlation.png").exists()
    assert list((tmp_path / "plots").glob("expert_usage_*.png"))


@pytest.mark.slow
def test_bench_full(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_multitask

    bench_multitask.main(["--out", str(tmp_path / "mt.json"), "--plots", str(tmp_path / "plots")])
    assert (tmp_path / "plots" / "table.md").exists()


def test_checkpoint_round_trip(tmp_path):
    """save_hyperparameters keeps the tasks and the architecture: a checkpoint reloads to the same model."""
    import pytorch_lightning as pl

    torch.manual_seed(0)
    model = MultiTaskMoE(in_features=F_IN, tasks=TINY_TASKS, architecture=PLE(num_levels=2, num_shared_experts=2,
                         num_task_experts=1, expert_hidden=4), balancing="uncertainty")
    x, y = _tiny_data(64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
                         enable_model_summary=False, logger=False)
    trainer.fit(model, loader, loader)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = MultiTaskMoE.load_from_checkpoint(tmp_path / "m.ckpt")
    model.eval(), loaded.eval()
    for a, b in zip(model(x), loaded(x)):
        torch.testing.assert_close(a, b)


def test_bench_ablation_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import bench_multitask
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = tmp_path / "abl.json"
    bench_multitask.main(["--ablation", "--quick", "--seeds", "1", "--out", str(out)])
    recs = json.loads(out.read_text())
    assert {r["method"] for r in recs} == {"task-moe", "dense-residual"}
    assert {r["benchmark"] for r in recs} == {"mmoe-synthetic", "multitask-digits"}


def test_same_seed_same_model():
    def run():
        torch.manual_seed(3)
        model = MultiTaskMoE(in_features=F_IN, tasks=TINY_TASKS, architecture=TaskMoE(d_model=8, num_experts=4, expert_hidden=8))
        opt = model.configure_optimizers()
        x, y = _tiny_data(64)
        for _ in range(10):
            out, _ = model.task_losses((x, y))
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(), run())


def test_model_tasks_must_match_the_data(tmp_path):
    import pytorch_lightning as pl

    model = MultiTaskMoE(in_features=64, tasks=TINY_TASKS, architecture=MMoE(num_experts=2, expert_hidden=4))
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", default_root_dir=tmp_path, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="differ from the data's tasks"):
        trainer.fit(model, datamodule=MultiTaskDigitsDataModule())


@pytest.mark.parametrize("conditioning", ["concat", "gate", "task_only"])
def test_task_moe_routes_each_sample_by_its_own_task_id(conditioning):
    """With per-sample task ids the Task-MoE net runs the batch once (each sample for its own task): the same
    per-task predictions and task-loss gradients as running every sample for every task and masking."""
    tasks = [TaskSpec(name=f"t{i}", kind="classification", num_classes=3) for i in range(4)]
    model = MultiTaskMoE(in_features=F_IN, tasks=tasks, architecture=TaskMoE(num_experts=4, top_k=2, depth=2,
                         conditioning=conditioning, load_balance_coef=0.0, z_loss_coef=0.0)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, F_IN, generator=g, dtype=torch.float64)
    task_id = torch.randint(0, 4, (40,), generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    fast, fast_pairs = model.task_losses((x, task_id, y))
    assert model.net(x, task_id).per_task_rows
    params = [p for p in model.parameters() if p.requires_grad]
    g_fast = torch.autograd.grad(fast.losses.sum(), params, allow_unused=True)
    reps = model.net(x).reps  # every sample for every task, then masked: the reference
    ref_preds = [tower(r)[task_id == t] for t, (tower, r) in enumerate(zip(model.towers, reps))]
    ref = torch.stack([F.cross_entropy(p, y[task_id == t]) for t, p in enumerate(ref_preds)])
    g_ref = torch.autograd.grad(ref.sum(), params, allow_unused=True)
    for t in range(4):
        torch.testing.assert_close(fast_pairs[t][0], ref_preds[t], rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.losses, ref, rtol=0, atol=1e-12)
    for a, b in zip(g_fast, g_ref):
        if a is None or b is None:
            assert a is None and b is None or float((a if a is not None else b).abs().max()) == 0.0
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_bench_task_routing_quick(tmp_path):
    import subprocess

    out = tmp_path / "tr.json"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, str(root / "scripts" / "bench_task_routing.py"), "--quick", "--out", str(out)],
                   check=True, timeout=300, capture_output=True)
    recs = json.loads(out.read_text())
    assert {r["method"] for r in recs} == {"all-tasks-masked", "per-sample"}
    assert all(r["us_per_step"] > 0 for r in recs)
