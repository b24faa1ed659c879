"""The ``moeparadigms`` console script.

``moeparadigms fit|validate|test|predict --config task.yaml --config method.yaml`` is Lightning's own CLI
(LightningCLI in OmegaConf mode: ``${...}`` interpolation works in configs); the model and data are
given by ``class_path`` in the YAML. ``moeparadigms bench <paradigm> [args]`` runs that paradigm's
benchmark script (``scripts/bench_<paradigm>.py``) with the given arguments; ``moeparadigms evaluate``
runs a saved RL policy.

Defaults every run gets unless the config says otherwise: TensorBoard and CSV loggers (one version
directory), a rich progress bar, a ``ModelCheckpoint`` that also keeps ``last.ckpt`` (so
``--ckpt_path last`` resumes), atomic checkpoint writes with ``weights_only=True`` reads
(:class:`moeparadigms.checkpoint.AtomicCheckpointIO`), :class:`moeparadigms.callbacks.FailFast` and
:class:`moeparadigms.callbacks.ListPlots`.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
from pytorch_lightning import Callback, LightningDataModule, LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

from .callbacks import FailFast, ListPlots
from .checkpoint import AtomicCheckpointIO

USAGE = """usage: moeparadigms <command> [options]

commands:
  fit        train:          moeparadigms fit --config tasks/<paradigm>/<task>.yaml --config configs/<paradigm>/<method>.yaml
  validate   evaluate on the validation split (--ckpt_path PATH)
  test       evaluate on the test split (--ckpt_path PATH)
  predict    run prediction
  bench      a paradigm's side-by-side benchmark: moeparadigms bench {benches} [--quick] [--out PATH]
  evaluate   run a saved RL policy: moeparadigms evaluate --ckpt PATH --episodes N [--video-dir DIR]

`moeparadigms <command> --help` lists each command's options.
"""

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

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the model config with the checkpoint's hyperparameters whenever ``ckpt_path`` is
        given, silently overriding what the user's config says. Here the config wins when it names a model:
        the model is built from it and a checkpoint that does not fit gets a clear error listing the
        mismatching shapes and hyperparameters (``moeparadigms.checkpoint.check_compatible``). Without a
        model in the config, the checkpoint's hyperparameters build it, as in Lightning."""
        sub = self.config.get("subcommand")
        if sub and (self.config[sub].get("model") or {}).get("class_path"):
            return
        super()._parse_ckpt_path()

    def instantiate_classes(self) -> None:
        """Constructor errors (a bad value in the config) end the run with one line naming the field, the
        value and what is allowed, not a traceback; ``MOEPARADIGMS_TRACEBACK=1`` shows the traceback."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as e:
            if os.environ.get("MOEPARADIGMS_TRACEBACK"):
                raise
            reasons = [ln.strip()[2:] for ln in str(e).splitlines()
                       if ln.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in ln]
            print(f"moeparadigms: error: invalid configuration: {'; '.join(reasons) or e}\n"
                  "(set MOEPARADIGMS_TRACEBACK=1 for the traceback)", file=sys.stderr)
            raise SystemExit(2) from None

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        config = dict(config)
        root = config.get("default_root_dir") or os.getcwd()
        if config.get("logger") in (None, True):
            # one version directory for both; CSV first, since it warns about a directory another logger filled
            csv = CSVLogger(save_dir=root, name="lightning_logs")
            config["logger"] = [csv, TensorBoardLogger(save_dir=root, name="lightning_logs", version=csv.version)]
        given = config.get("callbacks") or []
        given = list(given) if isinstance(given, list) else [given]
        extra: list[Callback] = [FailFast(), ListPlots()]
        if config.get("enable_checkpointing", True) is not False and not any(isinstance(c, ModelCheckpoint) for c in given):
            extra.append(ModelCheckpoint(save_last=True))
        if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
            extra.append(RichProgressBar())
        config["callbacks"] = given
        callbacks = [*callbacks, *extra]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)


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
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(benches="{" + ",".join(BENCHMARKS) + "}"))
        return
    torch.set_float32_matmul_precision("high")
    MoEParadigmsCLI(args=argv)


if __name__ == "__main__":
    main()
