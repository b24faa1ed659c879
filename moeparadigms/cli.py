"""The ``moeparadigms`` console script.

``moeparadigms fit|validate|test|predict --config task.yaml --config method.yaml`` is Lightning's own CLI
(LightningCLI in jsonargparse's ``omegaconf+`` mode: ``${...}`` interpolation is resolved after every
``--config`` and command-line override is merged, so ``--model.moe.router.num_experts=4`` also changes the
values interpolated from it); the model and data are given by ``class_path`` in the YAML.
``moeparadigms bench <paradigm> [args]`` runs that paradigm's benchmark script (``scripts/bench_<paradigm>.py``),
``moeparadigms evaluate`` runs a saved RL policy and ``moeparadigms recipes`` lists and copies the shipped
task and method YAMLs.

Defaults every run gets unless the config says otherwise (recorded in the run's saved ``config.yaml``):
TensorBoard and CSV loggers (one version directory), a rich progress bar, a ``ModelCheckpoint`` that keeps
``last.ckpt`` (``--ckpt_path last`` resumes the newest run, in its own version directory), atomic checkpoint
writes with ``weights_only=True`` reads (:class:`moeparadigms.checkpoint.AtomicCheckpointIO`),
:class:`~moeparadigms.callbacks.FailFast`, :class:`~moeparadigms.callbacks.FinalCheckpoint` (``last.ckpt``
holds the final weights of every completed fit), :class:`~moeparadigms.callbacks.ListPlots` and, for
``predict``, :class:`~moeparadigms.callbacks.WritePredictions`.

Anything a user can get wrong (a config value, a file, a checkpoint, an environment) ends the run with one
``moeparadigms: error: ...`` line and exit code 2; ``MOEPARADIGMS_TRACEBACK=1`` shows the traceback.
This module imports torch and Lightning only when a command needs them, so ``moeparadigms --help`` is instant.
"""
from __future__ import annotations

import os
import re
import runpy
import shutil
import sys
from pathlib import Path
from typing import Any

USAGE = """usage: moeparadigms <command> [options]

commands:
  fit        train:          moeparadigms fit --config tasks/<paradigm>/<task>.yaml --config configs/<paradigm>/<method>.yaml
  validate   evaluate on the validation split (--ckpt_path PATH)
  test       evaluate on the test split (--ckpt_path PATH)
  predict    predictions on the data's predict split, written to <log dir>/predictions.pt (--ckpt_path PATH)
  bench      a paradigm's side-by-side benchmark: moeparadigms bench {benches} [--quick] [--out PATH]
  evaluate   run a saved RL policy: moeparadigms evaluate --ckpt PATH --episodes N [--video-dir DIR]
  recipes    the shipped task and method YAMLs: moeparadigms recipes ls|cp|path

`moeparadigms <command> --help` lists each command's options; `fit ... --ckpt_path last` resumes the newest run.
"""

BENCHMARKS = {
    "core": "bench_core.py",
    "continual": "bench_continual.py",
    "multitask": "bench_multitask.py",
    "meta": "bench_meta.py",
    "rl": "bench_rl.py",
    "controls": "bench_controls.py",  # does routing help? every paradigm's MoE against its routing-free controls
}
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class UserError(Exception):
    """A mistake the user can fix; the CLI prints it as one line."""


_STRUCTURAL = ("Problem with given class_path", "Does not validate against", "Subtypes:", "Errors:", "Given value")


def _jsonargparse_reason(lines: list[str]) -> str | None:
    """jsonargparse's nested report (``Parser key "model": ... Parser key "top_k": Expected ...``) as
    ``model.moe.router.top_k: Expected ...``; None when the text is not such a report."""
    keys: list[str] = []
    class_path = None  # the class being built when the innermost key failed
    for ln in lines:
        s = ln.strip().removeprefix("- ").strip()
        m = re.match(r'Parser key "([^"]+)":\s*(.*)', s)
        cp = re.match(r"Problem with given class_path '([^']+)'", s)
        if m:
            keys.append(m[1])
            class_path = None
            if m[2]:
                return f"{'.'.join(keys)}: {m[2]}"
        elif cp:
            class_path = cp[1]
        elif s.startswith(_STRUCTURAL) or "Expected a <class 'NoneType'>" in s:
            continue
        elif keys:
            where = f" (class_path {class_path!r})" if class_path and class_path not in s else ""
            return f"{'.'.join(keys)}: {s}{where}"
    return None


def _one_line(e: BaseException) -> str:
    """The message of an exception as one line (the first line, plus jsonargparse's '- ' reasons)."""
    text = str(e).strip() or type(e).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    nested = _jsonargparse_reason(text.splitlines())
    if nested:
        return nested
    reasons = [ln[2:] for ln in lines[1:] if ln.startswith("- ") and "Expected a <class 'NoneType'>" not in ln]
    head = lines[0]
    if reasons:
        head = f"{head.rstrip(':')}: {'; '.join(reasons)}"
    elif len(lines) > 1:
        head = f"{head} {' '.join(lines[1:4])}" + (" ..." if len(lines) > 4 else "")
    return head


def _newest_last_checkpoint(root: Path) -> Path | None:
    found = [p for p in root.glob("lightning_logs/version_*/checkpoints/last*.ckpt") if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def _make_cli_class():
    """Build the LightningCLI subclass (here, so that importing this module stays light)."""
    import warnings

    from jsonargparse import set_parsing_settings
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO
    from pytorch_lightning import Callback, LightningDataModule, LightningModule, Trainer
    from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
    from pytorch_lightning.cli import LightningCLI
    from pytorch_lightning.loggers import TensorBoardLogger

    from .callbacks import FailFast, FinalCheckpoint, ListPlots, WritePredictions
    from .checkpoint import AtomicCheckpointIO
    from .loggers import CSVLogger

    # absolute ${model...} interpolations in the YAMLs resolve inside the subcommand's namespace
    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)

    def class_config(obj: Any, **init_args: Any) -> dict[str, Any]:
        return {"class_path": f"{type(obj).__module__}.{type(obj).__qualname__}", "init_args": init_args}

    class MoEParadigmsCLI(LightningCLI):
        """LightningCLI with any LightningModule / LightningDataModule chosen by ``class_path``."""

        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf+", "exit_on_error": False})
            kwargs.setdefault("subclass_mode_model", True)
            kwargs.setdefault("subclass_mode_data", True)
            kwargs.setdefault("save_config_kwargs", {"overwrite": True})
            self.new_log_dirs: list[Path] = []
            self._resume_version: int | None = None
            super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

        def before_instantiate_classes(self) -> None:
            sub = self.config.get("subcommand")
            if sub is None:
                return
            cfg = self.config[sub]
            # `--ckpt_path last`: Lightning looks for last.ckpt in the *new* run's version directory, finds none
            # and silently trains from scratch. Resolve it to the newest run's last.ckpt and log into that run.
            if sub == "fit" and cfg.get("ckpt_path") == "last":
                root = Path(cfg["trainer"].get("default_root_dir") or os.getcwd())
                last = _newest_last_checkpoint(root)
                if last is None:
                    print(f"moeparadigms: no last.ckpt under {root / 'lightning_logs'}: nothing to resume, "
                          "starting a new run", file=sys.stderr)
                    cfg["ckpt_path"] = None
                else:
                    print(f"moeparadigms: resuming from {last}", file=sys.stderr)
                    cfg["ckpt_path"] = str(last)
                    version = last.parent.parent.name.removeprefix("version_")
                    self._resume_version = int(version) if version.isdigit() else None

        def _parse_ckpt_path(self) -> None:
            """Lightning replaces the model config with the checkpoint's hyperparameters whenever ``ckpt_path``
            is given, silently overriding what the user's config says. Here the config wins when it names a
            model: the model is built from it and a checkpoint that does not fit gets a clear error listing the
            mismatching shapes and hyperparameters (``moeparadigms.checkpoint.check_compatible``). Without a
            model in the config, the checkpoint's hyperparameters build it, as in Lightning.
            (LightningCLI has no public hook for this step.)"""
            sub = self.config.get("subcommand")
            if sub and (self.config[sub].get("model") or {}).get("class_path"):
                return
            super()._parse_ckpt_path()

        def instantiate_classes(self) -> None:
            try:
                super().instantiate_classes()
            except (ValueError, TypeError) as e:
                raise UserError(f"invalid configuration: {_one_line(e)}") from e

        def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
            config = dict(config)
            sub = self.config.get("subcommand")
            recorded = self.config[sub]["trainer"] if sub else None  # what the saved config.yaml will hold
            if sub == "fit" and config.get("max_epochs") is None and not config.get("fast_dev_run"):
                epochs = _stream_epochs(self.datamodule)
                if epochs is not None:  # the module refuses any other value (ContinualMoE.setup), naming both
                    config["max_epochs"] = recorded["max_epochs"] = epochs
            root = config.get("default_root_dir") or os.getcwd()
            if config.get("logger") in (None, True) and not config.get("fast_dev_run"):
                # one version directory for both; CSV first, since it warns about a directory another logger filled
                csv = CSVLogger(save_dir=root, name="lightning_logs", version=self._resume_version)
                tb = TensorBoardLogger(save_dir=root, name="lightning_logs", version=csv.version)
                config["logger"] = [csv, tb]
                if not Path(csv.log_dir).exists():
                    self.new_log_dirs.append(Path(csv.log_dir))
                if recorded is not None:
                    recorded["logger"] = [class_config(csv, save_dir=str(root), name="lightning_logs", version=csv.version),
                                          class_config(tb, save_dir=str(root), name="lightning_logs", version=csv.version)]
            given = config.get("callbacks") or []
            given = list(given) if isinstance(given, list) else [given]
            extra: list[Callback] = []
            added: list[dict[str, Any]] = []
            for cls in (FailFast, FinalCheckpoint, ListPlots):
                if not any(isinstance(c, cls) for c in given):
                    extra.append(cls())
                    added.append({"class_path": f"{cls.__module__}.{cls.__qualname__}"})
            if sub == "predict" and not any(isinstance(c, WritePredictions) for c in given):
                extra.append(WritePredictions())
                added.append({"class_path": f"{WritePredictions.__module__}.WritePredictions"})
            if sub in ("validate", "test", "predict"):
                # nothing is saved outside fit: no default ModelCheckpoint. One the config declares (the RL recipes)
                # stays (Lightning warns when a checkpoint's callback state finds no callback), but its notice
                # that the checkpoint's directory differs from this run's means nothing here
                warnings.filterwarnings("ignore", message="The dirpath has changed from")
                if not any(isinstance(c, ModelCheckpoint) for c in given) and config.get("enable_checkpointing") is None:
                    config["enable_checkpointing"] = False
                    if recorded is not None:
                        recorded["enable_checkpointing"] = False
            if config.get("enable_checkpointing", True) is not False and not any(isinstance(c, ModelCheckpoint) for c in given):
                extra.append(ModelCheckpoint(save_last=True))
                added.append(class_config(extra[-1], save_last=True))
            if config.get("enable_progress_bar", True) is not False and not any(isinstance(c, ProgressBar) for c in given):
                extra.append(RichProgressBar())
                added.append(class_config(extra[-1]))
            config["callbacks"] = given
            if recorded is not None and added:
                recorded["callbacks"] = [*(recorded.get("callbacks") or []), *added]
            plugins = config.get("plugins") or []
            plugins = list(plugins) if isinstance(plugins, list) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                config["plugins"] = [*plugins, AtomicCheckpointIO()]
                if recorded is not None:
                    recorded["plugins"] = [*(recorded.get("plugins") or []),
                                           {"class_path": "moeparadigms.checkpoint.AtomicCheckpointIO"}]
            try:
                return super()._instantiate_trainer(config, [*callbacks, *extra])
            except (ValueError, TypeError) as e:
                raise UserError(f"invalid trainer configuration: {_one_line(e)}") from e

    return MoEParadigmsCLI


def __getattr__(name: str) -> Any:
    """``moeparadigms.cli.MoEParadigmsCLI``: the LightningCLI subclass, built (importing Lightning) on first use."""
    if name == "MoEParadigmsCLI":
        cls = globals()["MoEParadigmsCLI"] = _make_cli_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _stream_epochs(dm: Any) -> int | None:
    """The epochs a continual stream needs (experiences x epochs per experience), or None for other data."""
    mod = sys.modules.get("moeparadigms.benchmarks.continual")
    return dm.max_epochs if mod is not None and isinstance(dm, mod.AvalancheStream) else None


def _scripts_dir() -> Path:
    try:
        from .recipes import scripts_dir
    except ImportError:
        return Path(__file__).resolve().parent.parent / "scripts"
    return scripts_dir()


def bench(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: moeparadigms bench {{{','.join(sorted(BENCHMARKS))}}} [benchmark args, e.g. --quick --out PATH]")
        return
    name, rest = argv[0], argv[1:]
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    script = _scripts_dir() / BENCHMARKS[name]
    if not script.exists():
        raise UserError(f"benchmark script {script} not found (reinstall moeparadigms, or run from a source checkout)")
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a user's input causes: printed as one line. Internal errors keep their traceback."""
    import yaml
    from jsonargparse import ArgumentError
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    errs: list[type[BaseException]] = [UserError, ArgumentError, MisconfigurationException, ValueError, TypeError,
                                       FileNotFoundError, IsADirectoryError, PermissionError, FloatingPointError,
                                       yaml.YAMLError]
    gym = sys.modules.get("gymnasium.error")
    if gym is not None:
        errs.append(gym.Error)
    return tuple(errs)


def _check_config_files(argv: list[str]) -> None:
    """An empty or missing ``--config`` file is named in one line (jsonargparse would report a confusing type error)."""
    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--config" and i + 1 < len(argv) else a.removeprefix("--config=") if a.startswith("--config=") else None
        if path is None or path.startswith("{") or "\n" in path:
            continue
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {path!r} does not exist")
        if not p.read_text().strip():
            raise UserError(f"config file {path!r} is empty")


def run_lightning(argv: list[str]) -> None:
    import warnings

    import torch

    # upstream noise on every run, nothing a user can act on: Lightning 2.6 calls a pytree API torch deprecated
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=Warning)

    torch.set_float32_matmul_precision("high")
    _check_config_files(argv)
    cli_cls = __getattr__("MoEParadigmsCLI")
    holder: dict[str, Any] = {}

    class Tracked(cli_cls):
        def _instantiate_trainer(self, config, callbacks):
            holder["cli"] = self
            return super()._instantiate_trainer(config, callbacks)

    # From the console script LightningCLI reads sys.argv itself (DDP's launcher re-runs sys.argv on the other
    # ranks, so it must stay as it is); called from Python with other arguments, they come in `args`, which is
    # what LightningCLI's "args and command line arguments" warning is about: deliberate here.
    console = argv == sys.argv[1:]
    if not console:
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    try:
        Tracked(args=None if console else argv)
    except BaseException:
        cli = holder.get("cli")
        for d in getattr(cli, "new_log_dirs", []) if cli is not None else []:
            if d.is_dir() and not any(d.rglob("*.ckpt")):
                shutil.rmtree(d, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(benches="{" + ",".join(BENCHMARKS) + "}"))
        return
    try:
        if argv[0] == "bench":
            bench(argv[1:])
        elif argv[0] == "evaluate":
            from .paradigms.rl_eval import main as evaluate_main  # the RL stack loads only when asked for

            evaluate_main(argv[1:])
        elif argv[0] == "recipes":
            from .recipes import main as recipes_main

            recipes_main(argv[1:])
        elif argv[0] in SUBCOMMANDS or argv[0].startswith("-"):
            run_lightning(argv)
        else:
            raise UserError(f"unknown command {argv[0]!r}; choose one of {[*SUBCOMMANDS, 'bench', 'evaluate', 'recipes']} "
                            "(moeparadigms --help)")
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - filtered below: only the user's mistakes become one line
        if os.environ.get("MOEPARADIGMS_TRACEBACK") or not isinstance(e, _user_errors()):
            raise
        print(f"moeparadigms: error: {_one_line(e)}", file=sys.stderr)
        print("(set MOEPARADIGMS_TRACEBACK=1 for the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
