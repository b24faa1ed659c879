"""moeparadigms: one fast Mixture-of-Experts core under four learning paradigms.

``moeparadigms.MoE`` / ``MoEOutput`` are the core's (``moeparadigms.core``), imported on first use: importing
the package (and so ``moeparadigms --help``) does not import torch.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["MoE", "MoEOutput", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("MoE", "MoEOutput"):
        from . import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
