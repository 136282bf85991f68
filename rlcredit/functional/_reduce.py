"""Cross-rank plumbing for batch-scope statistics, and sync-free group indexing.

Batch-scope kernels take ``reducer=None`` (this process holds the whole batch) or any object with
the ``Reducer`` shape. They are written so that R ranks each holding a slice of the rows give
exactly what one process holding all rows gives: order statistics and group statistics gather the
few numbers they need, sums and extrema all-reduce them.
"""

from __future__ import annotations

import numbers
from typing import Protocol, runtime_checkable

import torch

from rlcredit.errors import RLCreditError

__all__ = ["Reducer"]


@runtime_checkable
class Reducer(Protocol):
    """Collective operations over the ranks that share one logical batch (the one Reducer protocol).

    Batch-scope kernels take ``reducer=None`` (this process holds the whole batch) or any object
    with these members; ``rlcredit.distributed`` ships ``LocalReducer`` and
    ``TorchDistributedReducer``. Every rank calls the same collectives in the same order (a rank
    that skips one deadlocks the others). Results carry no gradient: batch statistics decide
    credit, which is detached by design; the loss stays differentiable through the local rows.

    Attributes:
        world_size: the number of ranks R.
        rank: this process's index in ``[0, R)``; rows gathered by ``gather`` come in rank order,
            so a kernel that breaks ties by position (``top_fraction_mask(scope="group")``) needs
            to know where its own rows sit.

    Methods (all return new tensors, equal on every rank):
        sum(x): elementwise sum over ranks (``x`` of the same shape on every rank; a bool ``x``
            is counted: the result is int64).
        max(x), min(x): elementwise max / min over ranks (bool: any / all).
        gather(x): concatenation of 1-D tensors of possibly different lengths (0 included), in
            rank order.

    Examples:
        >>> from rlcredit.distributed import LocalReducer
        >>> from rlcredit.functional import Reducer
        >>> isinstance(LocalReducer(), Reducer)
        True
    """

    world_size: int
    rank: int

    def sum(self, x: torch.Tensor) -> torch.Tensor: ...

    def max(self, x: torch.Tensor) -> torch.Tensor: ...

    def min(self, x: torch.Tensor) -> torch.Tensor: ...

    def gather(self, x: torch.Tensor) -> torch.Tensor: ...


_MEMBERS = ("world_size", "sum", "max", "min", "gather")


def check_reducer(reducer: object, where: str = "reducer") -> None:
    """Raise ``RLCreditError`` unless ``reducer`` is None or has the ``Reducer`` members.

    ``rank`` is only read by the kernels that need it (``top_fraction_mask(scope="group")``),
    which say so themselves. Every collective below goes through this check, so a wrong object
    (a string, a process group) fails with one clear message before any statistic is computed.
    """
    if reducer is None:
        return
    missing = [m for m in _MEMBERS if not hasattr(reducer, m)]
    size = getattr(reducer, "world_size", None)
    bad_size = not missing and (isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1)
    if missing or bad_size:
        why = f"it lacks {', '.join(missing)}" if missing else f"its world_size is {size!r}, not an int >= 1"
        raise RLCreditError(
            f"{where} must be None (this process holds the whole batch) or a Reducer with world_size, rank, "
            f"sum, max, min and gather (rlcredit.distributed.TorchDistributedReducer()); got "
            f"{type(reducer).__name__}: {why}."
        )


def world_size(reducer: Reducer | None) -> int:
    check_reducer(reducer)
    return 1 if reducer is None else int(reducer.world_size)


def all_sum(x: torch.Tensor, reducer: Reducer | None) -> torch.Tensor:
    check_reducer(reducer)
    return x if reducer is None else reducer.sum(x)


def all_max(x: torch.Tensor, reducer: Reducer | None) -> torch.Tensor:
    check_reducer(reducer)
    return x if reducer is None else reducer.max(x)


def all_min(x: torch.Tensor, reducer: Reducer | None) -> torch.Tensor:
    check_reducer(reducer)
    return x if reducer is None else reducer.min(x)


def all_gather(x: torch.Tensor, reducer: Reducer | None) -> torch.Tensor:
    check_reducer(reducer)
    return x if reducer is None else reducer.gather(x)


def _sorted_segments(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted ids, sort order, dense segment index of each sorted id)."""
    sorted_ids, order = torch.sort(ids, stable=True)
    starts = torch.ones(ids.numel(), dtype=torch.bool, device=ids.device)
    starts[1:] = sorted_ids[1:] != sorted_ids[:-1]
    return sorted_ids, order, torch.cumsum(starts, 0) - 1


def segment_ids(ids: torch.Tensor) -> torch.Tensor:
    """Dense segment index in ``[0, len(ids))`` of arbitrary int ids, ordered by id value.

    Same as ``torch.unique(ids, return_inverse=True)[1]`` but without the host sync that
    ``unique`` needs to size its output: the number of segments is bounded by ``len(ids)``, so
    per-segment buffers of that length are used and the unused tail stays at its identity.
    """
    _, order, seg_sorted = _sorted_segments(ids)
    return torch.empty_like(seg_sorted).scatter_(0, order, seg_sorted)


class GroupIndex:
    """Where each local row's group sits in the (possibly gathered) batch.

    ``gather(x)`` returns the values the per-group statistics are computed on (``x`` itself when
    local, the rank-ordered concatenation with a reducer) and ``seg`` their dense group index;
    ``local`` indexes the per-group buffers for this process's own rows. Rows of a group may be
    spread over ranks (TRL spreads a prompt's completions over processes): statistics are then
    computed on the gathered group, identically on every rank.
    """

    def __init__(self, group_ids: torch.Tensor, reducer: Reducer | None) -> None:
        check_reducer(reducer)
        self.reducer = reducer
        ids = group_ids.long()
        all_ids = ids if reducer is None else reducer.gather(ids)
        sorted_ids, order, seg_sorted = _sorted_segments(all_ids)
        self.seg = torch.empty_like(seg_sorted).scatter_(0, order, seg_sorted)
        self.size = all_ids.numel()
        if reducer is None:
            self.local = self.seg
        else:
            # A local id's first position among the sorted gathered ids carries its dense index.
            self.local = seg_sorted[torch.searchsorted(sorted_ids, ids)] if ids.numel() else ids

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """The row values ``x`` [B] of every rank, aligned with ``seg``."""
        return x if self.reducer is None else self.reducer.gather(x)

    def reduce(self, x_all: torch.Tensor, op: str) -> torch.Tensor:
        """Per-group ``"sum"``, ``"amax"`` or ``"amin"`` of gathered values: a buffer [size].

        Entries past the number of groups hold the identity (0, -inf, +inf) and are never read.
        """
        if op == "sum":
            buf = torch.zeros(self.size, dtype=x_all.dtype, device=x_all.device)
            return buf.index_add_(0, self.seg, x_all)
        fill = float("-inf") if op == "amax" else float("inf")
        buf = torch.full((self.size,), fill, dtype=x_all.dtype, device=x_all.device)
        return buf.scatter_reduce_(0, self.seg, x_all, op)

    def broadcast(self, x: torch.Tensor, op: str) -> torch.Tensor:
        """Per-group ``op`` of the local row values ``x`` [B] (across ranks), for each local row."""
        return self.reduce(self.gather(x), op)[self.local]
