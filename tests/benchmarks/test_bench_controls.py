"""Smoke run of scripts/bench_controls.py (seconds): records in issue 14's shape, controls paired by seed, verdicts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_bench_controls_quick(tmp_path):
    out = tmp_path / "controls.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_controls.py"), "--quick", "--out", str(out),
                        "--methods", "ppo-moe", "ppo-moe-dense-trunk", "ppo-moe-hash"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    keys = {"paradigm", "benchmark", "method", "control", "seed", "metric", "higher_is_better", "value"}
    assert all(keys <= rec.keys() for rec in data["records"])
    assert {(rec["method"], rec["control"], rec["seed"]) for rec in data["records"]} == {
        (m, c, s) for m, c in [("ppo-moe", None), ("ppo-moe-dense-trunk", "dense-same-trunk"),
                               ("ppo-moe-hash", "moe-fixed-routing")] for s in (0, 1)}
    # the control has the MoE's active parameters in its one expert (the routers' few weights aside)
    active = {rec["method"]: rec["active_params"] for rec in data["records"]}
    assert abs(active["ppo-moe"] - active["ppo-moe-dense-trunk"]) <= 4 * 64 + 4
    # total parameters are reported too: the MoE holds two more experts (of 64 -> 64 -> 64) than it uses per sample
    total = {rec["method"]: rec["total_params"] for rec in data["records"]}
    assert total["ppo-moe"] - active["ppo-moe"] == 2 * (64 * 64 * 2) and total["ppo-moe-dense-trunk"] == active["ppo-moe-dense-trunk"]
    # records written before the totals were recorded get them from the rebuilt network, the same numbers
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_controls as bc

    old = [{k: v for k, v in rec.items() if k != "total_params"} for rec in data["records"]]
    bc.fill_rl_total_params(old)
    assert [rec["total_params"] for rec in old] == [rec["total_params"] for rec in data["records"]]
    # a budget other than the zoo's (1k steps here) is its own benchmark, with the final return and the steps to
    # bench_rl's threshold (censored at the budget: never reached in 1k steps)
    assert {(rec["benchmark"], rec["metric"]) for rec in data["records"]} == {("CartPole-v1@1k", "final_return"),
                                                                              ("CartPole-v1@1k", "steps_to_475")}
    steps = [rec for rec in data["records"] if rec["metric"] == "steps_to_475"]
    assert all(rec["value"] == 1_000 and rec["reached"] is False and rec["higher_is_better"] is False for rec in steps)
    assert {e["metric"] for e in data["effects"]} == {"final_return", "steps_to_475"}
    for effect in data["effects"]:
        assert effect["method"] == "ppo-moe" and effect["control"] in ("ppo-moe-dense-trunk", "ppo-moe-hash")
        assert effect["ci_low"] <= effect["diff"] <= effect["ci_high"] and effect["verdict"] in ("helps", "hurts", "no evidence")
        # the paradigm's rows are one family (here 2: the final return and the steps): Bonferroni intervals, wider
        assert effect["family_size"] == 2 and effect["ci_low_adjusted"] <= effect["ci_low"] <= effect["ci_high"] <= effect["ci_high_adjusted"]
    assert "| rl | CartPole-v1@1k |" in data["markdown"] and "IQM" in r.stdout
    # --resume runs nothing new when every run is there
    r2 = subprocess.run([sys.executable, str(ROOT / "scripts/bench_controls.py"), "--quick", "--resume", "--out", str(out),
                         "--methods", "ppo-moe", "ppo-moe-dense-trunk", "ppo-moe-hash"],
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and len(json.loads(out.read_text())["records"]) == 12


NEW = {"multitask": {"task-moe": None, "task-moe-dense-trunk": "dense-same-trunk", "task-moe-hash": "moe-fixed-routing",
                     "task-moe-task-only": "moe-task-only"},
       "meta": {"moe-maml": None, "moe-maml-dense-trunk": "dense-same-trunk", "moe-maml-hash": "moe-fixed-routing"},
       "continual": {"moe-growth": None, "moe-growth-one-expert": "dense-same-trunk",
                     "moe-growth-learned-router": "moe-learned-routing"}}
# each compared method and its controls (the continual learned-router control is also compared with the one expert)
COMPARED = {"task-moe": {"task-moe-dense-trunk", "task-moe-hash", "task-moe-task-only"},
            "moe-maml": {"moe-maml-dense-trunk", "moe-maml-hash"},
            "moe-growth": {"moe-growth-one-expert", "moe-growth-learned-router"},
            "moe-growth-learned-router": {"moe-growth-one-expert"}}
BENCHES = {"multitask": {"mmoe-synthetic-p0.5", "mmoe-synthetic-p0.1"}, "meta": {"sinusoid"}, "continual": {"split-digits-ci"}}


@pytest.mark.timeout(1800)  # ~25 s on a quiet 2-core machine; minutes when other jobs load it
def test_bench_controls_quick_other_paradigms(tmp_path):
    """Every non-RL paradigm's path: each MoE method and its controls on 2 seeds, paired, summarised; resumable."""
    out = tmp_path / "controls.json"
    cmd = [sys.executable, str(ROOT / "scripts/bench_controls.py"), "--quick", "--out", str(out),
           "--paradigms", "multitask", "meta", "continual"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    keys = {"paradigm", "benchmark", "method", "control", "seed", "metric", "higher_is_better", "value", "wall_s",
            "active_params", "total_params", "budget"}
    assert all(keys <= rec.keys() for rec in data["records"])
    got = {(rec["paradigm"], rec["benchmark"], rec["method"], rec["control"], rec["seed"]) for rec in data["records"]}
    assert got == {(p, b, m, c, s) for p, methods in NEW.items() for b in BENCHES[p] for m, c in methods.items()
                   for s in (0, 1)}
    assert len(data["records"]) == len(got)
    by = {(rec["benchmark"], rec["method"]): rec for rec in data["records"] if rec["seed"] == 0}
    for bench, moe, dense, fixed in [("mmoe-synthetic-p0.5", "task-moe", "task-moe-dense-trunk", "task-moe-hash"),
                                     ("sinusoid", "moe-maml", "moe-maml-dense-trunk", "moe-maml-hash")]:
        m, d, h = by[(bench, moe)], by[(bench, dense)], by[(bench, fixed)]
        # the dense trunk: one expert of the MoE's active size (the routers' weights and one bias apart), all of it active
        assert 0 < m["active_params"] - d["active_params"] <= 400 and d["active_params"] == d["total_params"]
        assert m["total_params"] > 2 * m["active_params"] - d["active_params"]  # the MoE holds more than it uses
        # the fixed router learns nothing: the MoE's parameters less its router's
        assert h["total_params"] < m["total_params"] and m["total_params"] - h["total_params"] <= 400
    # meta records keep the median and the count of test tasks whose adaptation diverged (the mean hides them)
    assert all(isinstance(by[("sinusoid", m)]["diverged_tasks"], int) and by[("sinusoid", m)]["median_after_10_steps"] > 0
               for m in ("moe-maml", "moe-maml-dense-trunk", "moe-maml-hash"))
    g, one = by[("split-digits-ci", "moe-growth")], by[("split-digits-ci", "moe-growth-one-expert")]
    assert g["num_experts"] == 5 and one["num_experts"] == 1 and abs(g["active_params"] - one["active_params"]) <= 64 * 4
    learned = by[("split-digits-ci", "moe-growth-learned-router")]  # the same grown network, another inference
    assert learned["num_experts"] == 5 and (learned["active_params"], learned["total_params"]) == (g["active_params"], g["total_params"])
    assert all(rec["higher_is_better"] is (rec["paradigm"] == "continual") for rec in data["records"])
    effects = {(e["benchmark"], e["method"]): e for e in data["effects"]}
    assert set(effects) == {(b, m) for p, methods in NEW.items() for b in BENCHES[p] for m in methods if m in COMPARED}
    for (bench, method), e in effects.items():
        assert e["control"] in COMPARED[method]
        assert e["ci_low"] <= e["diff"] <= e["ci_high"] and e["seeds"] == [0, 1]
        assert f"| {e['paradigm']} | {bench} |" in data["markdown"]
    # and against each control alone, where there are several
    per = {(e["benchmark"], e["method"], e["control"]) for e in data["effects_per_control"]}
    assert per == {(b, m, c) for p, methods in NEW.items() for b in BENCHES[p] for m in methods
                   if len(COMPARED.get(m, ())) > 1 for c in COMPARED[m]}
    # --resume runs nothing new when every run is there; another budget (full) would be new runs
    r2 = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert len(json.loads(out.read_text())["records"]) == len(got)
    assert len(json.loads(out.read_text())["runs"]) == 2
    # --report prints BENCHMARKS.md's tables from the JSON, running nothing
    r3 = subprocess.run([sys.executable, str(ROOT / "scripts/bench_controls.py"), "--report", "--out", str(out)],
                        capture_output=True, text=True, timeout=120)
    assert r3.returncode == 0, r3.stderr[-3000:]
    assert data["markdown"] in r3.stdout and "| split-digits-ci | final_avg_acc | moe-growth | moe-growth-learned-router |" in r3.stdout
    assert "| continual | split-digits-ci | final_avg_acc | moe-growth-learned-router | moe-learned-routing |" in r3.stdout


@pytest.mark.timeout(900)  # ~30 s on a quiet 2-core machine
def test_bench_controls_quick_supervised_and_extra_attempts(tmp_path):
    """The supervised paradigm (MoEClassifier against its dense trunk and hash router), meta's multimodal10 (10
    function families) and the continual control matched in total parameters: records, pairing, verdicts."""
    out = tmp_path / "controls.json"
    cmd = [sys.executable, str(ROOT / "scripts/bench_controls.py"), "--quick", "--out", str(out),
           "--paradigms", "supervised", "meta", "continual", "--meta-benchmarks", "multimodal10",
           "--methods", "moe-mlp", "moe-mlp-dense-trunk", "moe-mlp-hash", "moe-maml", "moe-maml-dense-trunk",
           "moe-maml-hash", "moe-growth", "moe-growth-one-expert-640"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    got = {(rec["benchmark"], rec["method"], rec["control"], rec["seed"]) for rec in data["records"]}
    want = {("digits", "moe-mlp", None), ("digits", "moe-mlp-dense-trunk", "dense-same-trunk"),
            ("digits", "moe-mlp-hash", "moe-fixed-routing"), ("multimodal10", "moe-maml", None),
            ("multimodal10", "moe-maml-dense-trunk", "dense-same-trunk"), ("multimodal10", "moe-maml-hash", "moe-fixed-routing"),
            ("split-digits-ci", "moe-growth", None), ("split-digits-ci", "moe-growth-one-expert-640", "dense-same-total-params")}
    assert got == {(*w, s) for w in want for s in (0, 1)}
    by = {rec["method"]: rec for rec in data["records"] if rec["seed"] == 0}
    m, d, h = by["moe-mlp"], by["moe-mlp-dense-trunk"], by["moe-mlp-hash"]
    assert 0 < m["active_params"] - d["active_params"] <= 8 * 64 + 8 and d["active_params"] == d["total_params"]
    assert 0 < m["total_params"] - h["total_params"] <= 8 * 64 + 8 and m["higher_is_better"] and 0 <= m["value"] <= 1
    # the total-parameter control holds what the grown network holds (five experts of hidden 128 vs one of 640)
    g, big = by["moe-growth"], by["moe-growth-one-expert-640"]
    assert big["num_experts"] == 1 and abs(g["total_params"] - big["total_params"]) <= 0.01 * g["total_params"]
    effects = {(e["benchmark"], e["method"], e["control"]) for e in data["effects"]}
    assert effects >= {("split-digits-ci", "moe-growth", "moe-growth-one-expert-640")}
    assert {(b, mth) for b, mth, _ in effects} == {("digits", "moe-mlp"), ("multimodal10", "moe-maml"),
                                                  ("split-digits-ci", "moe-growth")}
    assert "| supervised | digits |" in data["markdown"]


def test_multimodal_families_default_unchanged():
    """MultimodalTasks(families=10) draws from ten families; the default (5) draws what it drew before the option."""
    import torch

    from moeparadigms.benchmarks import meta as M

    g = torch.Generator().manual_seed(0)
    mode, p = M.multimodal_params(g, 2000, families=10)
    assert set(mode.tolist()) == set(range(10)) and len(M.ALL_MODES) == 10
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    mode5 = torch.randint(0, 5, (500,), generator=g1)
    assert torch.equal(M.multimodal_params(g2, 500)[0], mode5)  # the default's draws: randint over 5 first
    x = torch.linspace(-5, 5, 7).expand(2000, 7)
    y = M.multimodal(x, mode, p)
    assert y.shape == (2000, 7) and torch.isfinite(y).all() and y.abs().max() < 30
    with pytest.raises(ValueError, match="families"):
        M.MultimodalTasks(families=11)


TASK_RL = {"ppo-moe-task-learned": None, "ppo-moe-task": "moe-task-only", "ppo-moe-task-hash": "moe-fixed-routing",
           "ppo-moe-task-dense-trunk": "dense-same-trunk"}


def test_rl_task_methods_run_only_on_the_suite():
    """The task-routed methods (learned, task-only, hash, dense trunk) pair with the multi-task suite; the others
    with the single envs: the default RL jobs never put a task head network on CartPole-v1 or ppo-moe on the suite."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_controls as bc

    jobs = bc.make_jobs("rl", False, 2, list(bc.DEFAULT_METHODS), ["CartPole-v1", "cartpole-mt"], [])
    on = {e: {j["method"] for j in jobs if j["env"] == e} for e in ("CartPole-v1", "cartpole-mt")}
    assert on["cartpole-mt"] == set(TASK_RL)
    assert on["CartPole-v1"] == {"ppo-moe", "ppo-moe-dense-trunk", "ppo-moe-hash", "ppo-soft-moe", "ppo-soft-moe-one-expert"}
    assert bc.CONTROLS["rl"]["ppo-moe-task-learned"] == ("ppo-moe-task", "ppo-moe-task-hash", "ppo-moe-task-dense-trunk")


@pytest.mark.timeout(900)  # ~30 s on a quiet 2-core machine
def test_bench_controls_quick_multitask_rl(tmp_path):
    """Multi-task RL (cartpole-mt): learned task-conditioned routing against routing by the task id alone, the hash
    router and the dense trunk; metric: the mean over tasks of each task's final return."""
    out = tmp_path / "controls.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_controls.py"), "--quick", "--out", str(out),
                        "--paradigms", "rl", "--methods", *TASK_RL], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    recs = [rec for rec in data["records"] if rec["metric"] == "final_return_task_mean"]
    assert {(rec["benchmark"], rec["method"], rec["control"], rec["seed"]) for rec in recs} == {
        ("cartpole-mt@1k", m, c, s) for m, c in TASK_RL.items() for s in (0, 1)}
    assert all(rec["higher_is_better"] and rec["value"] > 0 for rec in recs)
    active = {rec["method"]: rec["active_params"] for rec in recs}
    # top-1 of 4 experts of hidden 32 against one expert of hidden 32: equal up to the routers' weights
    for m in ("ppo-moe-task", "ppo-moe-task-hash", "ppo-moe-task-learned"):
        assert abs(active[m] - active["ppo-moe-task-dense-trunk"]) <= 64 * 4 + 4 * 16 + 16 * 4  # the learned gate's
    effects = {(e["method"], e["control"]) for e in data["effects"] if e["metric"] == "final_return_task_mean"}
    assert {m for m, _ in effects} == {"ppo-moe-task-learned", "ppo-moe-task"}
    per = {(e["method"], e["control"]) for e in data["effects_per_control"] if e["metric"] == "final_return_task_mean"}
    assert per == {("ppo-moe-task-learned", c) for c in ("ppo-moe-task", "ppo-moe-task-hash", "ppo-moe-task-dense-trunk")} | {
        ("ppo-moe-task", c) for c in ("ppo-moe-task-hash", "ppo-moe-task-dense-trunk")}


def test_rl_attempts_are_sized_to_their_controls(tmp_path):
    """The RL attempts (8 experts top-2; 4 experts top-1) and their dense trunks run, with equal active parameters
    up to the routers' weights; they are not in the default run."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_controls as bc

    assert not set(bc.DEFAULT_METHODS) & {"ppo-moe-8e", "ppo-moe-8e-hash", "ppo-moe-top1", "ppo-moe-top1-dense-trunk"}
    out = tmp_path / "rl.json"
    methods = ["ppo-moe", "ppo-moe-8e", "ppo-moe-8e-hash", "ppo-moe-top1", "ppo-moe-top1-dense-trunk", "ppo-moe-top1-hash"]
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_rl.py"), "--envs", "CartPole-v1", "--steps", "256",
                        "--seeds", "1", "--methods", *methods, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    active = {rec["method"]: rec["active_params"] for rec in json.loads(out.read_text())["records"]}
    assert set(active) == set(methods)
    assert active["ppo-moe-8e"] - active["ppo-moe"] == 4 * 64  # 4 more router rows, the same two experts active
    assert abs(active["ppo-moe-top1"] - active["ppo-moe-top1-dense-trunk"]) <= 4 * 64
    assert active["ppo-moe-top1"] < active["ppo-moe"] and active["ppo-moe-top1-hash"] <= active["ppo-moe-top1"]


def test_meta_iters_is_its_own_benchmark():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_controls as bc

    jobs = bc.make_jobs("meta", False, 2, ["moe-maml-16e", "moe-maml-16e-hash"], [], ["multimodal"], meta_iters=2000)
    assert {j["benchmark"] for j in jobs} == {"multimodal@2000it"} and all(j["budget"]["iters"] == 2000 for j in jobs)
    assert {j["benchmark"] for j in bc.make_jobs("meta", False, 2, ["moe-maml"], [], ["sinusoid"])} == {"sinusoid"}
    # the default count named explicitly is the default benchmark, not a new one
    assert {j["benchmark"] for j in bc.make_jobs("meta", False, 2, ["moe-maml"], [], ["sinusoid"], meta_iters=500)} == {"sinusoid"}


def test_bench_rl_suite_table_lists_the_task_controls():
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_rl

    recs = [{"env": "cartpole-mt", "method": m, "seed": s, "final_return_task_mean": 400.0 + s}
            for m in bench_rl.TASK_METHODS for s in (0, 1)]
    table = bench_rl.suite_table(recs)
    assert all(f"| cartpole-mt | {m} |" in table for m in bench_rl.TASK_METHODS)
