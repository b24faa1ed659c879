"""Argument checks shared by the data and paradigm modules (one definition each), and the settings a
continual stream can be evaluated in. Imports nothing heavy."""
from __future__ import annotations

from typing import Any

__all__ = ["SETTINGS", "check_positive", "check_setting"]

#: the continual-learning settings a stream can be evaluated in
SETTINGS: tuple[str, ...] = ("class-incremental", "domain-incremental", "task-incremental")


def check_positive(**fields: Any) -> None:
    """Raise ``ValueError`` naming the first field that is not an integer >= 1 (``bool`` is refused)."""
    for name, v in fields.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def check_setting(setting: str) -> None:
    """Raise ``ValueError`` unless ``setting`` is one of :data:`SETTINGS`."""
    if setting not in SETTINGS:
        raise ValueError(f"setting={setting!r} is not supported; choose one of {list(SETTINGS)}")
