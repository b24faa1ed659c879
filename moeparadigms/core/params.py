"""Expert-indexed parameters that can grow, shrink and be partly frozen without disturbing the rest.

An :class:`ExpertParam` is one logical tensor whose dim 0 indexes experts (a stacked weight ``(E, D, H)``,
router rows ``(E, D)``, ...). It is stored as contiguous *row blocks*, each its own ``nn.Parameter``, so that

* freezing experts is exact: a frozen block has ``requires_grad=False``, gets no gradient, and no
  optimizer (weight decay, momentum) can touch it;
* adding experts appends a block and leaves existing Parameter objects (and their optimizer state) alone;
* the state dict holds one concatenated tensor, so a checkpoint loads into a model of the same size
  whatever its block layout.

Operations that must replace Parameter objects return a :data:`Remap` that :func:`remap_optimizer`
applies to an optimizer, carrying per-row state (e.g. Adam moments) over to the new tensors.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

# new parameter -> its rows, in order: (old parameter, row indices into it) or (None, number of fresh rows)
Remap = dict[nn.Parameter, list[tuple[nn.Parameter | None, Tensor | int]]]


class ExpertParam(nn.Module):
    """A tensor of shape ``(E, ...)`` stored as row blocks with per-expert frozen flags."""

    def __init__(self, data: Tensor) -> None:
        super().__init__()
        if data.dim() < 1 or data.shape[0] < 1:
            raise ValueError(f"ExpertParam needs a tensor with at least one row, got shape {tuple(data.shape)}")
        self._num_blocks = 0
        self._set_blocks([nn.Parameter(data.detach().clone())])
        self.register_buffer("frozen", torch.zeros(data.shape[0], dtype=torch.bool), persistent=False)

    # ------------------------------------------------------------------ blocks
    # The blocks are direct parameters of this module (``block0``, ``block1``, ...), not a child
    # ParameterList: a child would save its own ``blocks.N`` keys, tying checkpoints to one block layout.
    @property
    def blocks(self) -> list[nn.Parameter]:
        return [getattr(self, f"block{i}") for i in range(self._num_blocks)]

    def _set_blocks(self, blocks: list[nn.Parameter]) -> None:
        for i in range(self._num_blocks):
            delattr(self, f"block{i}")
        for i, b in enumerate(blocks):
            self.register_parameter(f"block{i}", b)
        self._num_blocks = len(blocks)

    # ------------------------------------------------------------------ views
    @property
    def num_rows(self) -> int:
        return sum(b.shape[0] for b in self.blocks)

    @property
    def shape(self) -> torch.Size:
        first = self.blocks[0]
        return torch.Size((self.num_rows, *first.shape[1:]))

    def full(self) -> Tensor:
        """The whole tensor (a concatenation if there are several blocks; differentiable)."""
        if self._num_blocks == 1:
            return self._parameters["block0"]  # type: ignore[return-value]  # (no Module.__getattr__: called per forward)
        return torch.cat(self.blocks, dim=0)

    def layout(self) -> list[tuple[int, nn.Parameter]]:
        """(first row, block) for each block, in row order."""
        out, start = [], 0
        for b in self.blocks:
            out.append((start, b))
            start += b.shape[0]
        return out

    def row(self, e: int) -> Tensor:
        for start, b in self.layout():
            if e < start + b.shape[0]:
                return b[e - start]
        raise IndexError(f"expert index {e} out of range for {self.num_rows} experts")

    # ------------------------------------------------------------------ edits
    def _rebuild(self, sources: list[tuple[nn.Parameter | None, Tensor | int, Tensor]], frozen: Tensor) -> Remap:
        """Replace the blocks by maximal runs of equal frozen status. ``sources`` lists, per new row
        segment, (old block or None, its row indices or fresh count, the row data)."""
        rows = torch.cat([s[2] for s in sources], dim=0)
        # origin of each new row: (old block, row in it) or None
        origin: list[tuple[nn.Parameter | None, int]] = []
        for old, idx, _ in sources:
            if old is None:
                origin += [(None, -1)] * int(idx)  # type: ignore[arg-type]
            else:
                origin += [(old, int(i)) for i in idx.tolist()]  # type: ignore[union-attr]
        remap: Remap = {}
        new_blocks: list[nn.Parameter] = []
        start = 0
        while start < rows.shape[0]:
            end = start + 1
            while end < rows.shape[0] and bool(frozen[end]) == bool(frozen[start]):
                end += 1
            seg = origin[start:end]
            # keep the old Parameter object when the segment is exactly one whole old block, unchanged
            old0 = seg[0][0]
            if (
                old0 is not None
                and all(o is old0 for o, _ in seg)
                and [i for _, i in seg] == list(range(old0.shape[0]))
            ):
                p = old0
            else:
                p = nn.Parameter(rows[start:end].detach().clone())
                remap[p] = _runs(seg)
            p.requires_grad_(not bool(frozen[start]))
            new_blocks.append(p)
            start = end
        self._set_blocks(new_blocks)
        self.frozen = frozen.clone().to(self.frozen.device)
        return remap

    def _current_sources(self, keep: Tensor | None = None) -> list[tuple[nn.Parameter | None, Tensor | int, Tensor]]:
        out = []
        for start, b in self.layout():
            idx = torch.arange(b.shape[0])
            if keep is not None:
                idx = idx[keep[start : start + b.shape[0]].cpu()]
            if idx.numel():
                out.append((b, idx, b.detach()[idx.to(b.device)]))
        return out

    def grow(self, new_rows: Tensor) -> Remap:
        """Append rows (trainable) for new experts; existing blocks are untouched."""
        if new_rows.shape[1:] != self.shape[1:]:
            raise ValueError(f"new rows have shape {tuple(new_rows.shape)}, expected (n, {', '.join(map(str, self.shape[1:]))})")
        p = nn.Parameter(new_rows.detach().clone().to(self.blocks[0].device, self.blocks[0].dtype))
        self._set_blocks([*self.blocks, p])
        self.frozen = torch.cat([self.frozen, self.frozen.new_zeros(new_rows.shape[0])])
        return {p: [(None, int(new_rows.shape[0]))]}

    def grow_init(self, n: int, init: str, source: list[int], fresh: Callable[[int], Tensor]) -> Remap:
        """Append ``n`` rows initialised as copies of rows ``source`` (``init="copy"``), the mean of all
        rows (``"mean"``) or ``fresh(n)`` (``"fresh"``)."""
        full = self.full().detach()
        if init == "copy":
            rows = full[torch.tensor(source, device=full.device)]
        elif init == "mean":
            rows = full.mean(0, keepdim=True).expand(n, *full.shape[1:])
        else:
            rows = fresh(n).to(full)
        return self.grow(rows)

    def select(self, keep_E: Tensor) -> Remap:
        """Keep only the rows where ``keep_E`` (bool, shape (E,)) is true, in order (pruning)."""
        keep_E = keep_E.to(torch.bool).cpu()
        if keep_E.shape != (self.num_rows,):
            raise ValueError(f"keep mask has shape {tuple(keep_E.shape)}, expected ({self.num_rows},)")
        if not keep_E.any():
            raise ValueError("cannot prune every expert: at least one must remain")
        return self._rebuild(self._current_sources(keep_E), self.frozen.cpu()[keep_E])

    def set_frozen(self, ids: Iterable[int], frozen: bool = True) -> Remap:
        mask = self.frozen.cpu().clone()
        for e in ids:
            if not 0 <= int(e) < self.num_rows:
                raise ValueError(f"expert id {e} out of range: this layer has {self.num_rows} experts (0..{self.num_rows - 1})")
            mask[int(e)] = frozen
        if torch.equal(mask, self.frozen.cpu()):
            return {}
        return self._rebuild(self._current_sources(), mask)

    # ------------------------------------------------------------------ state dict: one tensor
    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        t = self.full()
        destination[prefix + "weight"] = t if keep_vars else t.detach()
        destination[prefix + "frozen"] = self.frozen.clone()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key]
        if value.shape != self.shape:
            error_msgs.append(
                f"size mismatch for {key}: the checkpoint has shape {tuple(value.shape)}, this model "
                f"{tuple(self.shape)} (a different number of experts or width: grow or build the model to match first)"
            )
            return
        with torch.no_grad():
            for start, b in self.layout():
                b.copy_(value[start : start + b.shape[0]])
        fkey = prefix + "frozen"
        if fkey in state_dict:
            f = state_dict[fkey].to(torch.bool)
            if not torch.equal(f.cpu(), self.frozen.cpu()):
                # re-partition so frozen experts are frozen again; create optimizers after loading
                self._rebuild(self._current_sources(), f.cpu())

    def extra_repr(self) -> str:
        return f"shape={tuple(self.shape)}, blocks={len(self.blocks)}, frozen={int(self.frozen.sum())}"


def _runs(seg: Sequence[tuple[nn.Parameter | None, int]]) -> list[tuple[nn.Parameter | None, Tensor | int]]:
    out: list[tuple[nn.Parameter | None, Tensor | int]] = []
    i = 0
    while i < len(seg):
        j = i + 1
        while j < len(seg) and seg[j][0] is seg[i][0]:
            j += 1
        old = seg[i][0]
        if old is None:
            out.append((None, j - i))
        else:
            out.append((old, torch.tensor([r for _, r in seg[i:j]], dtype=torch.long)))
        i = j
    return out


def merge_remaps(*remaps: Remap) -> Remap:
    out: Remap = {}
    for r in remaps:
        out.update(r)
    return out


def remap_optimizer(optimizer: torch.optim.Optimizer, remap: Remap) -> None:
    """Give ``optimizer`` the parameters created by a growth/prune/freeze edit.

    Each new parameter takes the place (param group) of the first old parameter it draws rows from, or
    joins the group of its sibling rows (first group if it has none); old parameters no longer
    referenced are removed. Per-parameter state tensors shaped like the parameter (Adam's moments,
    momentum buffers) are carried over row by row, zeros for fresh rows; scalar state (``step``) is kept.
    Frozen (``requires_grad=False``) new parameters are still registered: the optimizer skips them while
    their ``.grad`` is None.
    """
    if not remap:
        return
    replaced = {id(old) for sources in remap.values() for old, _ in sources if old is not None}
    group_of: dict[int, dict[str, Any]] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            group_of[id(p)] = g
    old_state = {id(p): optimizer.state.get(p, {}) for g in optimizer.param_groups for p in g["params"]}
    for new, sources in remap.items():
        group = next((group_of[id(o)] for o, _ in sources if o is not None and id(o) in group_of), None)
        if group is None:
            group = optimizer.param_groups[0]
        group["params"].append(new)
        state = _carry_state(new, sources, old_state)
        if state:
            optimizer.state[new] = state
    for g in optimizer.param_groups:
        g["params"] = [p for p in g["params"] if id(p) not in replaced or p in remap]
    for p in list(optimizer.state.keys()):
        if id(p) in replaced and p not in remap:
            del optimizer.state[p]


def _carry_state(
    new: nn.Parameter, sources: list[tuple[nn.Parameter | None, Tensor | int]], old_state: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    states = [old_state.get(id(o), {}) if o is not None else {} for o, _ in sources]
    keys = {k for s in states for k in s}
    out: dict[str, Any] = {}
    for k in keys:
        vals = [s.get(k) for s in states]
        row_like = [
            isinstance(v, Tensor) and old is not None and v.shape == old.shape
            for v, (old, _) in zip(vals, sources, strict=True)
        ]
        if any(row_like):
            pieces = []
            for v, (old, idx), rl in zip(vals, sources, row_like, strict=True):
                if rl:
                    pieces.append(v[idx.to(v.device)])  # type: ignore[index,union-attr]
                else:
                    n = int(idx) if old is None else int(idx.numel())  # type: ignore[union-attr,arg-type]
                    pieces.append(torch.zeros((n, *new.shape[1:]), dtype=new.dtype, device=new.device))
            out[k] = torch.cat(pieces, 0)
        else:
            v = next(v for v in vals if v is not None)
            out[k] = v.clone() if isinstance(v, Tensor) else v
    return out
