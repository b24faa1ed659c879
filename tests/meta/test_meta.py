"""MetaMoE: the functional inner loop against a hand-written SGD step, second- vs first-order meta-gradients
(and second order against finite differences), router-only adaptation, a tiny problem learned in seconds,
determinism, checkpoints and bad input."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from moeparadigms.benchmarks.meta import EpisodicDataModule, FewShotDigits, MultimodalTasks, SinusoidTasks
from moeparadigms.core import MLPExperts, MoE, TopKRouter
from moeparadigms.paradigms.meta import MetaMoE

from ..old_keys import META_MOE, to_old_names

ROOT = Path(__file__).resolve().parents[2]


def _moe(backend: str = "autograd", dense_dispatch: bool | str = "auto") -> MoE:
    return MoE(router=TopKRouter(d_model=8, num_experts=4, top_k=2),
               experts=MLPExperts(d_model=8, hidden=8, num_experts=4, backend=backend), load_balance_coef=0.0, z_loss_coef=0.0,
               dense_dispatch=dense_dispatch)


def _model(moe: bool = True, **kw) -> MetaMoE:
    torch.manual_seed(0)
    kw = {"in_features": 1, "out_features": 1, "task_kind": "regression", "inner_lr": 0.05, **kw}
    return MetaMoE(moe=_moe() if moe else None, width=8, **kw).double()


def _task(seed: int = 0, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=torch.float64) * 4 - 2
    return x, torch.sin(2 * x[:, 0]) + 0.5


@pytest.mark.parametrize("moe", [False, True])
def test_inner_loop_equals_sgd_step_on_a_copy(moe):
    m = _model(moe)
    x, y = _task()
    fast, _ = m.adapt(x, y, steps=2, create_graph=False)
    ref = copy.deepcopy(m.net)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(ref(x)[0].squeeze(-1), y).backward()
        opt.step()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(fast[name], p, msg=name)
    xq, _ = _task(1)
    torch.testing.assert_close(m._call(fast, xq)[0], ref(xq)[0])


def _meta_grad(m: MetaMoE, create_graph: bool) -> dict[str, torch.Tensor]:
    (x, y), (xq, yq) = _task(0), _task(1)
    fast, _ = m.adapt(x, y, steps=1, create_graph=create_graph)
    loss = m._loss(m._call(fast, xq)[0], yq)
    names = [n for n, _ in m.net.named_parameters()]
    return dict(zip(names, torch.autograd.grad(loss, list(m.net.parameters()), allow_unused=True)))


@pytest.mark.parametrize("moe", [False, True])
def test_second_order_differs_from_first_order_and_matches_finite_differences(moe):
    m = _model(moe)
    second, first = _meta_grad(m, True), _meta_grad(m, False)
    name = "trunk.inp.weight" if moe else "body.0.weight"
    assert not torch.allclose(second[name], first[name]), "second-order terms are missing"
    # finite differences of the post-adaptation query loss, one weight at a time
    (x, y), (xq, yq) = _task(0), _task(1)
    p = dict(m.net.named_parameters())[name]
    for idx in [(0, 0), (3, 0)]:
        vals = []
        for eps in (1e-6, -1e-6):
            with torch.no_grad():
                p[idx] += eps
            fast, _ = m.adapt(x, y, steps=1, create_graph=False)
            vals.append(float(m._loss(m._call(fast, xq)[0], yq)))
            with torch.no_grad():
                p[idx] -= eps
        fd = (vals[0] - vals[1]) / 2e-6
        assert abs(fd - float(second[name][idx])) < 1e-5 * max(1.0, abs(fd)), (idx, fd, float(second[name][idx]))


def test_router_only_adaptation_leaves_experts_untouched():
    m = _model(True, adapt=["router"])
    x, y = _task()
    params = dict(m.net.named_parameters())
    fast, _ = m.adapt(x, y, steps=3, create_graph=False)
    experts = [n for n in params if ".experts." in n]
    routers = [n for n in params if ".router." in n]
    assert experts and routers
    for n in experts + ["head.weight", "trunk.inp.weight"]:
        assert fast[n] is params[n], f"{n} changed but only the router adapts"
    assert all(not torch.equal(fast[n], params[n]) for n in routers)


def test_dense_dispatch_gives_second_order_maml_with_the_fast_backend():
    """dense_dispatch=True is plain autograd: the second-order meta-gradient equals the autograd backend's."""
    torch.manual_seed(0)
    ref = MetaMoE(moe=_moe("autograd", dense_dispatch=False), in_features=1, out_features=1, task_kind="regression").double()
    dense = MetaMoE(moe=_moe("loop", dense_dispatch=True), in_features=1, out_features=1, task_kind="regression").double()
    dense.load_state_dict(ref.state_dict())
    a, b = _meta_grad(ref, create_graph=True), _meta_grad(dense, create_graph=True)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-11, msg=lambda m, n=n: f"{n}: {m}")


def test_fast_experts_backend_refuses_second_order_clearly():
    m = MetaMoE(moe=_moe("loop", dense_dispatch=False), in_features=1, out_features=1, task_kind="regression")
    x, y = _task()
    with pytest.raises(RuntimeError, match="backend='autograd'"):
        m.adapt(x.float(), y.float(), steps=1, create_graph=True)  # the inner step would need a second derivative
    m.adapt(x.float(), y.float(), steps=1, create_graph=False)  # first order is fine


class _SlopeTasks(EpisodicDataModule):
    """y = a x with a in [-2, 2]: one gradient step from a good initialisation solves it."""

    def sample_tasks(self, n, g, split):
        a = torch.rand(n, 1, generator=g) * 4 - 2
        x = torch.rand(n, self.shots + self.query, generator=g) * 2 - 1
        y = a * x
        return x[:, : self.shots, None], y[:, : self.shots], x[:, self.shots :, None], y[:, self.shots :]


def _fit(model, dm, **kw):
    model.hparams.plots = False  # no PNGs in the working directory
    tr = pl.Trainer(max_epochs=1, accelerator="cpu", inference_mode=False, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, **kw)
    tr.fit(model, dm)
    tr.test(model, dm, verbose=False)
    return model.eval_results["test"]["mean"]


@pytest.mark.parametrize("algorithm,inner_lr", [("maml", 0.2), ("fomaml", 0.1), ("reptile", 0.2)])
def test_tiny_episodic_problem_is_learned(algorithm, inner_lr):
    pl.seed_everything(0)
    dm = _SlopeTasks(shots=5, query=10, meta_batch_size=8, meta_iterations=300, num_test_tasks=50, eval_batch_size=50)
    m = MetaMoE(width=16, depth=1, algorithm=algorithm, inner_lr=inner_lr, inner_steps=1 if algorithm != "reptile" else 3,
                eval_steps=5, outer_lr=3e-3)
    curve = _fit(m, dm)
    # predicting 0 scores E[a^2 x^2] = 4/9; an un-meta-trained network adapts to ~0.3 in 5 steps
    assert curve[5] < 0.2 and curve[5] < curve[1], f"{algorithm}: {curve}"


def test_determinism_meta_two_seeded_runs_identical():
    runs = []
    for _ in range(2):
        pl.seed_everything(1)
        dm = SinusoidTasks(shots=5, meta_batch_size=4, meta_iterations=5, num_test_tasks=10, eval_batch_size=10)
        moe = MoE(router=TopKRouter(d_model=8, num_experts=4, top_k=2), experts=MLPExperts(d_model=8, hidden=8, num_experts=4, backend="autograd"))
        runs.append(_fit(MetaMoE(moe=moe, eval_steps=3), dm, deterministic=True))
    assert runs[0] == runs[1]


def test_benchmark_datasets_are_seeded_and_disjoint():
    a = MultimodalTasks(shots=5).sample_tasks(4, torch.Generator().manual_seed(3), "train")
    b = MultimodalTasks(shots=5).sample_tasks(4, torch.Generator().manual_seed(3), "train")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    dm = FewShotDigits(n_way=3, shots=2, query=3)
    xs, ys, xq, yq = dm.sample_tasks(2, torch.Generator().manual_seed(0), "test")
    assert xs.shape == (2, 6, 64) and xq.shape == (2, 9, 64) and set(ys.flatten().tolist()) == {0, 1, 2}
    test_rows = {tuple(r.tolist()) for r in dm.x[(dm.y >= 6)]}
    assert all(tuple(r.tolist()) in test_rows for r in xs.flatten(0, 1)), "test tasks must use digits 6-9 only"


@pytest.mark.parametrize("kwargs,match", [
    (dict(adapt=["routers"]), "adapt="),
    (dict(adapt=["router"]), "network is dense"),
    (dict(algorithm="anil"), "algorithm='anil'"),
    (dict(adapt=["context"]), "context_dim=0"),
    (dict(algorithm="reptile", learn_inner_lr=True), "Meta-SGD"),
    (dict(inner_lr=0.0), "inner_lr must be > 0"),
])
def test_bad_input_meta_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaMoE(**kwargs)


def test_bad_input_meta_data_settings():
    with pytest.raises(ValueError, match="n_way must be an integer in"):
        FewShotDigits(n_way=5)
    with pytest.raises(ValueError, match="shots must be an integer >= 1"):
        SinusoidTasks(shots=0)


def test_bad_input_meta_needs_grad_at_evaluation():
    dm = SinusoidTasks(shots=5, meta_batch_size=2, meta_iterations=2, num_test_tasks=4, eval_batch_size=4)
    tr = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(RuntimeError, match="inference_mode: false"):
        tr.test(MetaMoE(), dm)


def test_cli_checkpoint_loads_weights_only_and_rebuilds(tmp_path):
    from moeparadigms.cli import main

    main(["fit", "--config", str(ROOT / "tasks/meta/sinusoid.yaml"), "--config", str(ROOT / "configs/meta/moe_maml.yaml"),
          "--trainer.max_steps=2", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path}"])
    ckpt = sorted(tmp_path.rglob("last.ckpt"))[-1]
    c = torch.load(ckpt, weights_only=True)
    assert c["meta"] == {"in_features": 1, "out_features": 1, "task_kind": "regression"}
    m = MetaMoE.load_from_checkpoint(ckpt, weights_only=True)
    assert m.net.trunk is not None and torch.equal(m.net.head.weight, c["state_dict"]["net.head.weight"])
    # written before the shared trunk (net.body.0., net.block.): the same weights load
    c["state_dict"] = to_old_names(c["state_dict"], META_MOE, "net.")
    assert "net.body.0.weight" in c["state_dict"] and "net.block.norm.weight" in c["state_dict"]
    torch.save(c, tmp_path / "old_names.ckpt")
    legacy = MetaMoE.load_from_checkpoint(tmp_path / "old_names.ckpt", weights_only=True)
    assert all(torch.equal(v, legacy.state_dict()[k]) for k, v in m.state_dict().items())


def test_bench_meta_quick_smoke(tmp_path):
    out = tmp_path / "meta.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_meta.py"), "--quick", "--jobs", "1", "--benchmarks", "sinusoid",
                    "--out", str(out), "--plots", str(tmp_path / "plots")], check=True, cwd=ROOT, timeout=300,
                   capture_output=True)
    import json

    recs = json.loads(out.read_text())["records"]
    keys = {"benchmark", "method", "K", "steps", "seed", "metric", "mean", "ci95"}
    assert recs and all(keys <= r.keys() for r in recs)
    assert {r["method"] for r in recs} == {"dense-maml", "moe-maml"} and {r["steps"] for r in recs} == {0, 1, 10}
    assert (tmp_path / "plots" / "sinusoid_K5.png").exists()


def test_bench_meta_timing_quick_smoke(tmp_path):
    """``--timing``: wall per meta-iteration of MoE and dense MAML at matched sizes, side by side."""
    import json

    out = tmp_path / "timing.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_meta.py"), "--timing", "--quick", "--benchmarks", "sinusoid",
                    "--out", str(out)], check=True, cwd=ROOT, timeout=300, capture_output=True)
    recs = {r["method"]: r for r in json.loads(out.read_text())}
    assert set(recs) == {"dense-maml", "moe-maml"}
    assert recs["dense-maml"]["ratio_to_dense"] == 1.0 and recs["moe-maml"]["us_per_iter"] > 0
    assert abs(recs["moe-maml"]["params"] - recs["dense-maml"]["params"]) / recs["moe-maml"]["params"] < 0.05


def test_functional_call_reaches_the_substituted_expert_weights():
    """Expert weights are ExpertParam row blocks: the substituted ones, not the module's, must be used."""
    m = _model(True)
    x, _ = _task()
    params = dict(m.net.named_parameters())
    experts = [n for n in params if ".experts." in n]
    assert experts, list(params)
    base = m._call(params, x)[0]
    g = torch.Generator().manual_seed(0)
    for n in experts:
        # a random perturbation: a constant shift is invisible after the block's LayerNorm (zero-mean input)
        perturbed = {**params, n: params[n] + 0.1 * torch.randn(params[n].shape, generator=g, dtype=params[n].dtype)}
        assert not torch.allclose(m._call(perturbed, x)[0], base), f"substituting {n} did not change the output"
    torch.testing.assert_close(m._call(params, x)[0], base)  # the module's own weights were not modified


@pytest.mark.slow
def test_bench_meta_full(tmp_path):
    out = tmp_path / "meta.json"
    subprocess.run([sys.executable, str(ROOT / "scripts/bench_meta.py"), "--out", str(out), "--plots", str(tmp_path / "plots")],
                   check=True, cwd=ROOT)
    assert len(json.loads(out.read_text())["records"]) > 0


@pytest.mark.parametrize("num_test_tasks, eval_batch_size, sizes", [(4, 100, [4]), (250, 100, [100, 100, 50]), (600, 100, [100] * 6)])
def test_evaluation_serves_exactly_num_test_tasks(num_test_tasks, eval_batch_size, sizes):
    """The evaluation set is num_test_tasks tasks, not whole batches of eval_batch_size (4 tasks asked: 4 served)."""
    dm = SinusoidTasks(shots=5, meta_batch_size=2, meta_iterations=2, num_test_tasks=num_test_tasks,
                       eval_batch_size=eval_batch_size)
    for loader in (dm.val_dataloader(), dm.test_dataloader()):
        assert [b[0].shape[0] for b in loader] == sizes


def test_a_diverged_adaptation_is_counted_and_warned_about():
    """One test task of 300 whose inner loop blew up (MSE 7 -> 2.5e24 in 10 steps, issue 14's sinusoid seed) made the
    benchmark's mean MSE 8.5e21 without a word. The evaluation now counts such tasks, warns with the median, and keeps
    the median beside the mean; a stable run has none and no warning."""
    pl.seed_everything(0)
    dm = _SlopeTasks(shots=5, query=10, meta_batch_size=4, meta_iterations=2, num_test_tasks=20, eval_batch_size=20)
    m = MetaMoE(width=16, depth=1, inner_lr=0.01, eval_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a stable run warns nothing
        _fit(m, dm)
    r = m.eval_results["test"]
    assert r["diverged_tasks"] == 0 and len(r["median"]) == 4
    m.hparams.inner_lr = 50.0  # now every gradient step overshoots
    tr = pl.Trainer(accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.warns(RuntimeWarning, match=r"inner loop diverged on \d+ of 20 tasks.*the median is"):
        tr.test(m, dm, verbose=False)
    r = m.eval_results["test"]
    assert r["diverged_tasks"] > 0 and r["median"][3] <= r["mean"][3]


def test_median_and_divergence_count_survive_nan_curves():
    """An adaptation that overflowed to NaN counts as diverged, and the median (NaN as +inf) still describes the
    other tasks; torch's median of an even count is the lower middle value."""
    import math

    m = MetaMoE(width=8, depth=1, eval_steps=2, in_features=1, out_features=1, task_kind="regression")
    m._curves = [torch.tensor([[1.0, 0.5, 0.4], [1.0, float("nan"), float("nan")], [2.0, 1.0, 0.9], [1.0, 0.6, 0.5]],
                              dtype=torch.float64)]
    with pytest.warns(RuntimeWarning, match=r"diverged on 1 of 4 tasks.*the median is 0.5"):
        m._summarise("test")
    r = m.eval_results["test"]
    assert r["diverged_tasks"] == 1 and r["median"][2] == 0.5 and math.isnan(r["mean"][2])
