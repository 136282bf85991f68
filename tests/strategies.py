"""Shared Hypothesis strategies for rollout-shaped tensors, and an in-process multi-rank reducer.

- :func:`rollout_tensors` draws a batch of plain tensors (right-padded ``response_mask``, rewards,
  arbitrary int64 ``group_ids`` in shuffled order, log-probs, scores) that sometimes contains rows
  with zero valid tokens, one-sample groups and all-equal-reward groups.
- :func:`run_ranks` runs a function once per simulated rank, each in its own thread with a
  :class:`ThreadReducer` whose collectives really exchange the ranks' tensors, so any kernel that
  takes a ``reducer`` can be checked against the single-process result.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from hypothesis import strategies as st

__all__ = [
    "ThreadReducer",
    "rollout_tensors",
    "right_padded_mask",
    "run_ranks",
    "shard_rows",
    "split_points",
]


def right_padded_mask(lengths: Sequence[int] | torch.Tensor, T: int) -> torch.Tensor:
    """``[B, T]`` bool mask whose row ``i`` has its first ``lengths[i]`` positions valid."""
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    return torch.arange(T)[None, :] < lengths[:, None]


@st.composite
def rollout_tensors(
    draw: st.DrawFn,
    max_B: int = 8,
    max_G: int = 4,
    max_T: int = 8,
    *,
    min_B: int = 1,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A batch of rollout tensors, as a dict of plain tensors.

    Keys: ``response_mask`` [B, T] bool (right-padded), ``lengths`` [B] int64, ``rewards`` [B],
    ``group_ids`` [B] int64 (arbitrary distinct values per group, rows in shuffled order, group
    sizes 1..max_G), ``logprobs`` and ``old_logprobs`` [B, T] (finite, <= 0; padding holds
    finite garbage), ``scores`` [B, T] >= 0 (sometimes heavily tied; 0 on padding),
    ``advantages`` [B]. Float tensors have ``dtype``. ``min_B=0`` allows an empty batch.
    """
    T = draw(st.integers(1, max_T))
    if min_B == 0 and draw(st.booleans()) and draw(st.booleans()):
        sizes: list[int] = []
    else:
        sizes = draw(st.lists(st.integers(1, max_G), min_size=1, max_size=max_B))
        total, kept = 0, []
        for s in sizes:
            if total + s > max_B:
                s = max_B - total
            if s > 0:
                kept.append(s)
                total += s
        sizes = kept
        while sum(sizes) < min_B:
            sizes.append(1)
    B = sum(sizes)
    ids = draw(st.lists(st.integers(-(2**40), 2**40), min_size=len(sizes), max_size=len(sizes), unique=True))

    rewards: list[float] = []
    for size in sizes:
        kind = draw(st.sampled_from(["equal", "binary", "float"]))
        if kind == "equal":
            rewards += [draw(st.floats(-5, 5, width=32))] * size
        elif kind == "binary":
            rewards += draw(st.lists(st.sampled_from([0.0, 1.0]), min_size=size, max_size=size))
        else:
            rewards += draw(st.lists(st.floats(-5, 5, width=32), min_size=size, max_size=size))
    group_ids = [gid for gid, size in zip(ids, sizes) for _ in range(size)]
    perm = draw(st.permutations(range(B))) if B else []
    rewards = [rewards[i] for i in perm]
    group_ids = [group_ids[i] for i in perm]

    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    mask = right_padded_mask(lengths, T) if B else torch.zeros(0, T, dtype=torch.bool)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    logprobs = -3.0 * torch.rand(B, T, generator=gen)
    old_logprobs = (logprobs + 0.3 * torch.randn(B, T, generator=gen)).clamp_max(0.0)
    if draw(st.booleans()):
        scores = torch.randint(0, 3, (B, T), generator=gen).float() * 0.5  # many ties
    else:
        scores = 5.0 * torch.rand(B, T, generator=gen)
    scores = torch.where(mask, scores, torch.zeros(()))
    return {
        "response_mask": mask,
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "rewards": torch.tensor(rewards, dtype=torch.float32).to(dtype),
        "group_ids": torch.tensor(group_ids, dtype=torch.long),
        "logprobs": logprobs.to(dtype),
        "old_logprobs": old_logprobs.to(dtype),
        "scores": scores.to(dtype),
        "advantages": torch.randn(B, generator=gen).to(dtype),
    }


@st.composite
def split_points(draw: st.DrawFn, n: int, max_ranks: int = 4) -> list[tuple[int, int]]:
    """Contiguous ``(start, stop)`` row ranges of ``range(n)`` for 1..max_ranks ranks (some empty)."""
    ranks = draw(st.integers(1, max_ranks))
    cuts = sorted(draw(st.lists(st.integers(0, n), min_size=ranks - 1, max_size=ranks - 1)))
    bounds = [0, *cuts, n]
    return [(bounds[i], bounds[i + 1]) for i in range(ranks)]


def shard_rows(tensors: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows ``start:stop`` of every tensor of a :func:`rollout_tensors` dict."""
    return {key: value[start:stop] for key, value in tensors.items()}


class ThreadReducer:
    """One rank of an in-process process group: collectives exchange tensors between threads.

    Implements the duck-typed reducer of ``rlcredit.functional`` (``world_size``, ``rank``,
    elementwise ``sum``/``max``/``min``, rank-ordered variable-length ``gather``). Every rank must
    issue the same collectives in the same order, exactly as with torch.distributed.
    """

    def __init__(self, rank: int, world_size: int, barrier: threading.Barrier, slots: list) -> None:
        self.rank = rank
        self.world_size = world_size
        self._barrier = barrier
        self._slots = slots
        self.calls: list[str] = []

    def _exchange(self, op: str, x: torch.Tensor) -> list[torch.Tensor]:
        assert isinstance(x, torch.Tensor), f"{op} got {type(x).__name__}"
        self.calls.append(op)
        self._slots[self.rank] = (op, x.detach().clone())
        self._barrier.wait()
        values = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before every rank has read them all
        ops = {o for o, _ in values}
        assert ops == {op}, f"ranks issued different collectives: {ops}"
        return [v for _, v in values]

    def _elementwise(self, op: str, x: torch.Tensor) -> list[torch.Tensor]:
        values = self._exchange(op, x)
        shapes = {tuple(v.shape) for v in values}
        assert len(shapes) == 1, f"all_reduce({op}) with different shapes across ranks: {shapes}"
        return values

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return functools.reduce(torch.add, self._elementwise("sum", x))

    def max(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._elementwise("max", x)).amax(0)

    def min(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack(self._elementwise("min", x)).amin(0)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dim() == 1, f"gather takes 1-D tensors, got shape {tuple(x.shape)}"
        return torch.cat(self._exchange("gather", x))


def run_ranks(
    fn: Callable[[ThreadReducer, int], Any], world_size: int, *, timeout: float = 60.0
) -> list[Any]:
    """Run ``fn(reducer, rank)`` on ``world_size`` threads sharing one fake process group.

    Returns the per-rank results in rank order; re-raises the first rank's exception (the other
    ranks are released from their collectives instead of deadlocking).
    """
    barrier = threading.Barrier(world_size, timeout=timeout)
    slots: list = [None] * world_size
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        try:
            results[rank] = fn(ThreadReducer(rank, world_size, barrier, slots), rank)
        except threading.BrokenBarrierError as err:
            errors.append(err)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.insert(0, err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def spawn_bounded(fn: Callable[..., Any], args: tuple, nprocs: int, timeout_s: float) -> None:
    """``torch.multiprocessing`` spawn of ``nprocs`` ranks that fails the test after ``timeout_s``.

    A plain ``mp.spawn(join=True)`` waits forever when one rank blocks in a collective whose peer
    has gone (gloo's default timeout is 30 minutes): kill every rank at the deadline instead.
    A rank that raises is re-raised here as ``ProcessRaisedException``, as ``mp.spawn`` does.
    """
    import time

    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{nprocs} spawned processes did not finish within {timeout_s:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
