"""The ``moeparadigms`` console script.

``moeparadigms fit|validate|test|predict --config task.yaml --config method.yaml`` is Lightning's own CLI
(LightningCLI in OmegaConf mode: ``${...}`` interpolation works in configs); the model and data are
given by ``class_path`` in the YAML. ``moeparadigms bench <paradigm> [args]`` runs that paradigm's
benchmark script (``scripts/bench_<paradigm>.py``) with the given arguments.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import torch
from pytorch_lightning import LightningDataModule, LightningModule
from pytorch_lightning.cli import LightningCLI

BENCHMARKS = {
    "core": "bench_core.py",
    "continual": "bench_continual.py",
    "multitask": "bench_multitask.py",
    "meta": "bench_meta.py",
    "rl": "bench_rl.py",
}


class MoEParadigmsCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule chosen by ``class_path``."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)


def _scripts_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "scripts"


def bench(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: moeparadigms bench {{{','.join(sorted(BENCHMARKS))}}} [benchmark args, e.g. --quick --out PATH]")
        return
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise SystemExit(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    script = _scripts_dir() / BENCHMARKS[name]
    if not script.exists():
        raise SystemExit(f"benchmark script {script} not found (run from a source checkout: pip install -e .)")
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        bench(argv[1:])
        return
    if argv and argv[0] == "evaluate":
        from .paradigms.rl_eval import main as evaluate_main  # the RL stack loads only when asked for

        evaluate_main(argv[1:])
        return
    if argv and argv[0] in ("-h", "--help"):
        print("moeparadigms bench {core,continual,multitask} [--quick] [--out PATH]    run a paradigm's side-by-side benchmark\n")
    torch.set_float32_matmul_precision("high")
    MoEParadigmsCLI(args=argv)


if __name__ == "__main__":
    main()
