"""Checkpoints that are never lost, never run code, and say clearly when they do not fit the model.

* :class:`AtomicCheckpointIO` writes each checkpoint to a temporary file **in the target directory**,
  flushes it to disk and renames it over the target (``os.replace``, atomic on POSIX): a crash or a kill
  while writing leaves the previous checkpoint in place, never a truncated one. (Lightning's own writer
  goes through an fsspec transaction whose temporary file lives in ``/tmp``; when that is another
  filesystem the final move is a copy, which is not atomic.)
* Loading always uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain Python
  values only, so opening one cannot execute code. Every moeparadigms module keeps its checkpoint within
  that (hyperparameters are the config's plain values, never objects).
* :func:`check_compatible` compares a checkpoint's ``state_dict`` with a model's and raises one
  ``ValueError`` listing the mismatching entries (shape, missing, unexpected) and the hyperparameters that
  differ, instead of torch's ``size mismatch`` traceback from deep inside ``load_state_dict``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

__all__ = ["AtomicCheckpointIO", "atomic_torch_save", "safe_load", "check_compatible", "hparams_ignore",
           "store_module_configs"]


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a sibling temporary file, fsync, then ``os.replace`` onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a refused or unreadable file gets a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path and the reason
        if "Weights only load failed" in str(e) or "Unsupported global" in str(e):
            raise ValueError(
                f"checkpoint {str(path)!r} holds Python objects that safe loading (torch.load(weights_only=True)) "
                "refuses; moeparadigms checkpoints hold only tensors and plain values, so this file was written "
                f"by other code and will not be unpickled. torch said: {str(e).splitlines()[0]}"
            ) from None
        raise ValueError(f"checkpoint {str(path)!r} cannot be read (truncated or not a torch checkpoint): {e}") from e


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: atomic local writes, ``weights_only=True`` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path)  # remote stores: fsspec's transaction
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError("weights_only=False is refused: moeparadigms loads checkpoints with weights_only=True only")
        return safe_load(path, map_location=map_location if map_location is not None else "cpu")


def check_compatible(model: nn.Module, checkpoint: dict[str, Any], *, hparams: dict[str, Any] | None = None) -> None:
    """Raise a ``ValueError`` naming every entry where ``checkpoint['state_dict']`` does not fit ``model``.

    Call it from ``on_load_checkpoint`` after any resizing the module does itself (e.g. expert growth). Keys of
    parameters renamed since the checkpoint was written (:func:`~moeparadigms.nets.rename_old_keys`: e.g.
    ``block.`` before the shared trunk) are renamed first, in place, so the checkpoint loads.
    """
    from .nets import upgrade_old_keys

    sd = checkpoint.get("state_dict")
    if sd is None:
        raise ValueError("checkpoint has no 'state_dict': it was not written by a Lightning Trainer")
    upgrade_old_keys(model, sd)
    own = model.state_dict()
    problems = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
                for k, v in own.items() if k in sd and hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(v.shape)]
    strict = getattr(model, "strict_loading", True)
    missing = [k for k in own if k not in sd] if strict else []
    unexpected = [k for k in sd if k not in own] if strict else []
    if not (problems or missing or unexpected):
        return
    lines = [f"checkpoint does not match this {type(model).__name__}: it was written by a different architecture or config"]
    for title, items in (("shape mismatches", problems), ("missing in checkpoint", missing), ("unexpected in checkpoint", unexpected)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + "; ".join(items[:6]) + (" ..." if len(items) > 6 else ""))
    ck_h = checkpoint.get("hyper_parameters") or {}
    if hparams is not None and ck_h:
        diff = _diff(dict(ck_h), dict(hparams))
        if diff:
            lines.append("  hyperparameters that differ (checkpoint vs model): " + "; ".join(diff[:8]))
    raise ValueError("\n".join(lines))


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b), key=str):
        if str(k).startswith("_"):
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}={va!r} vs {vb!r}")
    return out


def hparams_ignore(*module_args: str) -> list[str]:
    """Which constructor arguments ``save_hyperparameters`` should ignore.

    Under LightningCLI the hyperparameters are the config's plain values (``class_path``/``init_args``
    dicts), so sub-module arguments such as ``moe`` are kept and ``Module.load_from_checkpoint(path)``
    rebuilds the whole model from the checkpoint alone. Built in Python, those arguments are ``nn.Module``
    objects, which would make the checkpoint unsafe to load; they are ignored then.
    """
    # a Lightning private: LightningCLI passes the config's plain values through this context variable while it
    # instantiates the model (``_given_hyperparameters_context``), and it is the only way a module can tell that its
    # ``moe`` argument came from a config rather than from Python; Lightning has no public accessor for it
    from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters

    return [] if _given_hyperparameters.get() is not None else list(module_args)


def store_module_configs(module: Any, **components: Any) -> None:
    """After ``save_hyperparameters(ignore=hparams_ignore(...))``: keep the ignored sub-module arguments of a
    module built in Python as their plain ``{class_path, init_args}`` (recorded by their constructors), plus
    Lightning's trusted ``instantiate_module``, so ``Module.load_from_checkpoint(path)`` rebuilds the whole
    model from the file alone, as for a model built by the CLI. A component built from something that is not
    plain data (e.g. ``ModuleExperts`` of arbitrary modules) cannot be stored; the module warns once and the
    checkpoint then needs that argument again at load time."""
    import warnings

    from ._config import plain_config

    missing = []
    for name, obj in components.items():
        if name in module.hparams or obj is None:
            continue
        cfg = plain_config(obj)
        if cfg is None:
            missing.append(name)
            continue
        module.hparams[name] = cfg
        module.hparams["_instantiator"] = "pytorch_lightning.cli.instantiate_module"
    if missing:
        warnings.warn(f"{type(module).__name__}: {', '.join(missing)} was not built from plain values, so the checkpoint "
                      f"cannot rebuild it: pass {', '.join(f'{m}=...' for m in missing)} to load_from_checkpoint",
                      UserWarning, stacklevel=3)
