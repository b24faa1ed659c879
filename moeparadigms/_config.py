"""Constructor arguments recorded as plain data, so a module built in Python can be saved and rebuilt like one
built from YAML.

LightningCLI hands a paradigm its MoE as a ``{class_path, init_args}`` dict, which the checkpoint keeps as
hyperparameters; built in Python, the paradigm gets the ``nn.Module`` itself, which a ``weights_only`` checkpoint
cannot hold. :func:`record_init` makes a class remember the plain ``{class_path, init_args}`` it was built
from (nested recorded modules as their own configs); :func:`plain_config` returns it, or None when some
argument is not plain data (then the caller says so instead of writing a checkpoint that cannot be reloaded).
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

_PLAIN = (bool, int, float, str, type(None))


def _plain(value: Any) -> Any:
    """``value`` as plain data, or raise TypeError."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _plain(v) for k, v in value.items()}
    cfg = getattr(value, "_init_config", None)
    if cfg is not None:
        return cfg
    raise TypeError(f"{type(value).__name__} is not plain data")


def record_init(cls: type) -> type:
    """Class decorator: instances get ``_init_config = {class_path, init_args}`` (None if not plain)."""
    init = cls.__init__
    sig = inspect.signature(init)

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if type(self) is not cls:  # a subclass records its own arguments (when decorated itself)
            return
        bound = sig.bind(self, *args, **kwargs)
        try:
            init_args = {k: _plain(v) for k, v in list(bound.arguments.items())[1:]}
        except TypeError:
            object.__setattr__(self, "_init_config", None)
            return
        object.__setattr__(self, "_init_config", {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args})

    cls.__init__ = __init__
    return cls


def plain_config(module: Any) -> dict | None:
    """The ``{class_path, init_args}`` that rebuilds ``module``, or None when it was not recorded as plain data."""
    return getattr(module, "_init_config", None)
