"""The one row-selection rule of ``Rollout.select`` and ``Credit.select``."""

from __future__ import annotations

import numbers
from typing import Any, Union

import torch
from torch import Tensor

from rlcredit.errors import RolloutError
from rlcredit.functional._checks import ensure, storage_problem

__all__ = ["Rows", "row_index", "describe"]

Rows = Union[Tensor, slice, "list[int]", "list[bool]", range]
"""Row selector for ``select``: integer indices in ``[0, B)`` (a tensor, NumPy array, list or range), a
bool mask of length ``B`` (a tensor, NumPy array or list), or a slice."""


def describe(x: Any) -> str:
    """A short description of what was passed, for error messages (shape, dtype, device of a tensor)."""
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    return f"{type(x).__name__}"


def _is_bool(v: Any) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_"  # NumPy's bool scalar is not a Python bool


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not _is_bool(v)


def row_index(rows: Rows, n: int, device: torch.device) -> Tensor:
    """The one row-selection rule of ``Rollout.select`` and ``Credit.select``, as an int64 index tensor.

    Accepted: integer indices in ``[0, n)`` (a 1-D integer tensor or NumPy array, a list or tuple of
    ints, a range), a bool mask of length ``n`` (a 1-D bool tensor or NumPy array, a list or tuple
    of bools), or a slice. Indices may repeat (the row is then taken twice) and come in any order.
    Rejected, with a ``RolloutError``: negative or out-of-range indices, floats, a mix of bools
    and ints, a bare int (write ``[i]``), other types, and an empty selection.
    """
    where = "select(rows)"
    if isinstance(rows, slice):
        if not all(v is None or _is_int(v) for v in (rows.start, rows.stop, rows.step)) or rows.step == 0:
            raise RolloutError(f"{where}: a slice needs int (or None) start, stop and a non-zero step, got {rows!r}.")
        idx = torch.as_tensor(range(n)[rows], dtype=torch.long)
    elif isinstance(rows, (list, tuple, range)):
        items = list(rows)
        if items and all(_is_bool(v) for v in items):
            idx = torch.tensor([bool(v) for v in items], dtype=torch.bool)
        elif all(_is_int(v) for v in items):
            try:
                idx = torch.tensor([int(v) for v in items], dtype=torch.long)
            except RuntimeError:  # an int beyond int64
                raise RolloutError(f"{where}: row indices must lie in [0, {n}), got {items[:8]!r}.") from None
        else:
            bad = next(v for v in items if not _is_int(v))
            raise RolloutError(
                f"{where}: a list of rows holds either ints (row indices) or bools (a mask of length {n}), "
                f"got {bad!r} ({type(bad).__name__}) among {items[:8]!r}."
            )
    elif isinstance(rows, Tensor):
        problem = storage_problem(rows)
        if problem is not None:
            raise RolloutError(f"{where}: the row tensor {problem}.")
        idx = rows
    elif type(rows).__module__ == "numpy" and hasattr(rows, "dtype") and hasattr(rows, "ndim"):
        if rows.dtype.kind not in "biu":
            raise RolloutError(f"{where}: expected integer row indices or a bool mask, got a NumPy array of {rows.dtype}.")
        idx = torch.as_tensor(rows.astype("int64") if rows.dtype.kind == "u" else rows)
    else:
        hint = f"; for one row write [{rows!r}]" if _is_int(rows) else ""
        raise RolloutError(
            f"{where} takes row indices (an int tensor, list or range), a bool mask of length {n} or a slice; "
            f"got {type(rows).__name__}{hint}."
        )
    if idx.dtype == torch.bool:
        if tuple(idx.shape) != (n,):
            raise RolloutError(f"{where}: a bool mask must have shape [{n}] (one entry per row), got {list(idx.shape)}.")
        idx = idx.to(device).nonzero().flatten()
    elif idx.dtype.is_floating_point or idx.dtype.is_complex or idx.ndim != 1:
        raise RolloutError(f"{where}: expected 1-D integer row indices or a bool mask, got {describe(idx)}.")
    else:
        idx = idx.to(device=device, dtype=torch.long)
        if idx.numel():
            ensure(((idx >= 0) & (idx < n)).all(), lambda: (
                f"{where}: row indices must lie in [0, {n}) (no negative indices), got min {int(idx.min())}, "
                f"max {int(idx.max())}."))
    if idx.numel() == 0:
        raise RolloutError(f"{where} selected no rows (B = 0); pass at least one row.")
    return idx
