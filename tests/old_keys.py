"""Parameter names from before the shared trunk (``moeparadigms.nets.Trunk``), written out by hand: tests build a
state dict with these old names from a new one and check that it still loads."""
from __future__ import annotations

from typing import Any

# old prefix -> new prefix, relative to the module that owns them
CONTINUAL = {"inp.": "trunk.inp.", "block.": "trunk.blocks.0.", "norm.": "trunk.norm."}
META_MOE = {"body.0.": "trunk.inp.", "block.": "trunk.blocks.0."}
META_SGD_RATES = {"body__0__": "trunk__inp__", "block__": "trunk__blocks__0__"}  # under inner_lrs.
POLICY_MOE = {"inp.": "trunk.inp.", "block.": "trunk.blocks.0."}


def to_old_names(state: dict[str, Any], renames: dict[str, str], prefix: str = "") -> dict[str, Any]:
    """``state`` with every key ``prefix + new...`` written ``prefix + old...`` (insertion order kept)."""
    out = {}
    for k, v in state.items():
        for old, new in renames.items():
            if k.startswith(prefix + new):
                k = prefix + old + k[len(prefix + new):]
                break
        out[k] = v
    return out
