"""Typed descriptions a DataModule gives of its data, which the paradigm modules build from.

They live with the data (``benchmarks/``), not with the models: the data side states what it serves and
the paradigms import it, never the other way round.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["TaskSpec"]


@dataclass
class TaskSpec:
    """One task: its name, ``kind`` and, for classification, the number of classes."""

    name: str
    kind: Literal["regression", "classification"] = "regression"
    num_classes: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("regression", "classification"):
            raise ValueError(f"task {self.name!r}: kind={self.kind!r} is not supported; choose 'regression' or 'classification'")
        if self.kind == "classification" and (not isinstance(self.num_classes, int) or self.num_classes < 2):
            raise ValueError(f"task {self.name!r}: classification needs num_classes >= 2, got {self.num_classes!r}")

    @property
    def out_features(self) -> int:
        return 1 if self.kind == "regression" else self.num_classes
