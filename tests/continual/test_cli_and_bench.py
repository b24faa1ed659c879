"""The documented commands: ``moeparadigms fit`` with a task + method config (and resuming it from a
mid-stream checkpoint), every continual YAML, and the benchmark script's --quick smoke run."""
import json
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch

from moeparadigms.cli import main

ROOT = Path(__file__).resolve().parents[2]
METHODS = sorted((ROOT / "configs" / "continual").glob("*.yaml"))
OFFLINE_TASKS = [p for p in sorted((ROOT / "tasks" / "continual").glob("*.yaml")) if p.name != "split_mnist.yaml"]


def _fit(task: Path, method: Path, root: Path, *extra: str) -> None:
    import os

    root.mkdir(parents=True, exist_ok=True)
    os.chdir(root)  # whatever Lightning writes relative to the working directory stays in tmp
    main(["fit", "--config", str(task), "--config", str(method), "--data.init_args.epochs_per_experience", "1",
          "--trainer.max_epochs", "5",  # 5 experiences x 1 epoch "--trainer.default_root_dir", str(root),
          "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false", *extra])


@pytest.mark.parametrize("method", METHODS, ids=[p.stem for p in METHODS])
def test_every_method_config_fits_split_digits(method, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(ROOT / "tasks" / "continual" / "split_digits.yaml", method, tmp_path)
    assert list(tmp_path.rglob("accuracy_matrix.png")) and list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("task", OFFLINE_TASKS[1:], ids=[p.stem for p in OFFLINE_TASKS[1:]])
def test_every_offline_task_config_fits(task, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit(task, ROOT / "configs" / "continual" / "expert_growth.yaml", tmp_path)
    assert list(tmp_path.rglob("expert_usage.png"))


def test_split_mnist_config_parses_without_downloading():
    from moeparadigms.cli import MoEParadigmsCLI

    cli = MoEParadigmsCLI(args=["--config", str(ROOT / "tasks" / "continual" / "split_mnist.yaml"), "--config",
                                str(ROOT / "configs" / "continual" / "expert_growth.yaml")], run=False)
    assert cli.datamodule.benchmark is None  # built lazily at setup: nothing downloaded here


def test_cli_resume_mid_stream_matches_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task, method = ROOT / "tasks" / "continual" / "split_digits.yaml", ROOT / "configs" / "continual" / "expert_growth.yaml"
    ck = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_epochs=1",
          "--trainer.callbacks.save_top_k=-1", "--trainer.callbacks.filename={epoch}"]
    _fit(task, method, tmp_path / "a", *ck)
    ckpts = {p.name: p for p in (tmp_path / "a").rglob("epoch=*.ckpt")}
    _fit(task, method, tmp_path / "b", "--ckpt_path", str(ckpts["epoch=2.ckpt"]), *ck)  # after 3 experiences, 2 growths
    a = torch.load(ckpts["epoch=4.ckpt"], weights_only=False)["state_dict"]
    b = torch.load(next((tmp_path / "b").rglob("epoch=4.ckpt")), weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _bench(args):
    sys_argv = sys.argv
    sys.argv = ["bench_continual.py", *args]
    try:
        runpy.run_path(str(ROOT / "scripts" / "bench_continual.py"), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None)
    finally:
        sys.argv = sys_argv


def test_bench_quick_writes_the_record_shape(tmp_path):
    out = tmp_path / "c.json"
    with warnings.catch_warnings(record=True) as seen:  # make demo's output: no flood of Avalanche's deprecations
        warnings.simplefilter("always")
        _bench(["--quick", "--methods", "naive,replay-50,moe-growth", "--out", str(out), "--plots", str(tmp_path / "p")])
    noisy = [str(w.message) for w in seen if "avalanche" in (w.filename or "") and issubclass(w.category, DeprecationWarning)]
    assert not noisy, noisy[:3]
    records = json.loads(out.read_text())
    assert {r["method"] for r in records} == {"naive", "replay-50", "moe-growth"}
    for r in records:
        assert set(r) == {"benchmark", "setting", "method", "seed", "avg_acc", "forgetting", "bwt", "params", "train_s"}
        assert r["benchmark"] == "split-digits" and r["setting"] == "class-incremental"
        assert 0.0 <= r["avg_acc"] <= 1.0 and r["params"] > 0
    assert (tmp_path / "p" / "split-digits-ci-moe-growth" / "expert_usage.png").exists()


@pytest.mark.slow
def test_bench_full(tmp_path):
    out = tmp_path / "continual.json"
    _bench(["--out", str(out), "--no-plots"])
    records = json.loads(out.read_text())
    assert len(records) == 3 * 3 * 9
