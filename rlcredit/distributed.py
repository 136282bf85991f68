"""Cross-rank statistics: the ``Reducer`` protocol, injected into every batch-scope statistic.

rlcredit never starts processes and never reads a global process group on its own: a reducer is
passed explicitly (``strategy.assign(..., reducer=r)``, ``strategy.loss(..., reducer=r)``). With a
reducer over R ranks, every statistic equals the one computed by a single rank holding all rows,
and per-rank losses average (as DDP averages gradients) to the single-rank loss.

``Reducer`` is the protocol (defined with the kernels that use it, ``rlcredit.functional``, and
re-exported here). Two reducers ship: ``LocalReducer`` (one process; every collective is the identity, the
same as ``reducer=None``) and ``TorchDistributedReducer`` (a ``torch.distributed`` process
group: gloo on CPU, nccl on GPU). Anything with the same five members works, e.g. a wrapper
over a verl/Ray worker group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlcredit.errors import RLCreditError, RolloutError
from rlcredit.functional._reduce import Reducer

__all__ = ["Reducer", "LocalReducer", "TorchDistributedReducer"]


class LocalReducer:
    """The single-process reducer: every collective is the identity (same as ``reducer=None``).

    ``world_size = 1`` and ``rank = 0``. ``sum`` of a bool tensor returns it counted (int64), as
    ``TorchDistributedReducer`` does, so kernels see one dtype whichever reducer they get.

    Examples:
        >>> import torch
        >>> from rlcredit.distributed import LocalReducer
        >>> LocalReducer().gather(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
        >>> LocalReducer().sum(torch.tensor([True, False]))
        tensor([1, 0])
    """

    world_size = 1
    rank = 0

    def sum(self, x: Tensor) -> Tensor:
        return x.long() if x.dtype == torch.bool else x

    def max(self, x: Tensor) -> Tensor:
        return x

    def min(self, x: Tensor) -> Tensor:
        return x

    def gather(self, x: Tensor) -> Tensor:
        return x

    def __repr__(self) -> str:
        return "LocalReducer()"


def _all_gather_single(out: Tensor, x: Tensor, group: Any) -> None:
    """``all_gather_single`` (torch >= 2.13) or its older name ``all_gather_into_tensor``."""
    import torch.distributed as dist

    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, x, group=group)


class TorchDistributedReducer:
    """A ``Reducer`` over a ``torch.distributed`` process group (gloo on CPU, nccl on GPU).

    Makes every batch statistic on R ranks equal the one a single process holding all rows
    computes (DESIGN §9): quantile thresholds and group statistics ``gather`` the few values they
    need, TAS min/max/mean and token-mean denominators ``sum``/``max``/``min`` them, and
    ``aggregate`` returns per-rank losses whose mean (what DDP's gradient averaging sees) is the
    single-process loss — the verl and TRL convention.

    Collectives (``sum``, ``max``, ``min``: one ``all_reduce`` each, on a copy; ``gather``: an
    ``all_gather`` of the R lengths, then an ``all_gather`` of the inputs padded to the longest).

    Host syncs: ``sum``, ``max`` and ``min`` never sync the host with the device (with nccl they
    are enqueued on the current stream like any kernel). ``gather`` needs exactly one: the
    lengths must reach the host to size the padded buffer and to cut the padding out (a
    variable-length result has a data-dependent shape). With gloo the collectives are blocking
    CPU calls anyway.

    Devices: tensors are reduced on their own device; with an nccl-only group a CPU tensor is
    staged through the current CUDA device and the result returned on the CPU (a copy each way;
    the copy back waits for the collective, which is the price of asking for a CPU result).
    Results are detached (collectives are not differentiable).

    Args:
        group: the process group whose ranks share the batch (None: the default group). The
            group must be initialised (``torch.distributed.init_process_group``; accelerate, TRL
            and verl do it) and this process must belong to it.

    Raises:
        RLCreditError: torch.distributed is unavailable or uninitialised, or this process is not
            in ``group``.

    Examples:
        >>> import torch, torch.distributed as dist
        >>> from rlcredit.distributed import TorchDistributedReducer
        >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
        >>> r = TorchDistributedReducer()
        >>> r.world_size, r.rank
        (1, 0)
        >>> r.gather(torch.tensor([1.0, 2.0])), r.sum(torch.tensor([True, True]))
        (tensor([1., 2.]), tensor([1, 1]))
        >>> dist.destroy_process_group()
    """

    __slots__ = ("group", "world_size", "rank", "_stage_device")

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_available():
            raise RLCreditError(
                "TorchDistributedReducer: this torch build has no torch.distributed; use "
                "reducer=None (or LocalReducer()) on a single process."
            )
        if not dist.is_initialized():
            raise RLCreditError(
                "TorchDistributedReducer: the default process group is not initialised; call "
                "torch.distributed.init_process_group(...) first (accelerate, TRL and verl do it for "
                "you), or pass reducer=None on a single process."
            )
        rank = dist.get_rank(group)
        if rank < 0:
            raise RLCreditError(
                "TorchDistributedReducer: this process is not a member of the given group; build the "
                "reducer only on the group's ranks (or pass group=None for the default group)."
            )
        self.group = group
        self.world_size: int = dist.get_world_size(group)
        self.rank: int = rank
        backend = str(dist.get_backend(group)).lower()
        # An nccl-only group cannot reduce CPU tensors: stage them through the current GPU.
        self._stage_device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available()
            else None
        )

    def _stage(self, x: Tensor) -> Tensor:
        x = x.detach()
        if self._stage_device is not None and x.device.type == "cpu":
            return x.to(self._stage_device)
        return x

    def _reduce(self, x: Tensor, op: str) -> Tensor:
        import torch.distributed as dist

        if not isinstance(x, Tensor):
            raise RolloutError(f"TorchDistributedReducer.{op}: expected a torch.Tensor, got {type(x).__name__}.")
        device = x.device
        y = self._stage(x)
        if y.dtype == torch.bool:
            # Backends disagree on bool arithmetic (gloo's sum is a logical or): count in int64,
            # take any/all through uint8.
            y = y.long() if op == "sum" else y.to(torch.uint8)
        # all_reduce works in place: always on a private (contiguous) copy, never on the caller's.
        y = y.clone(memory_format=torch.contiguous_format)
        if self.world_size > 1:
            dist.all_reduce(y, op=getattr(dist.ReduceOp, op.upper()), group=self.group)
        if x.dtype == torch.bool and op != "sum":
            y = y.bool()
        return y.to(device)

    def sum(self, x: Tensor) -> Tensor:
        """Elementwise sum over ranks (bool inputs are counted: int64)."""
        return self._reduce(x, "sum")

    def max(self, x: Tensor) -> Tensor:
        """Elementwise maximum over ranks (bool: any)."""
        return self._reduce(x, "max")

    def min(self, x: Tensor) -> Tensor:
        """Elementwise minimum over ranks (bool: all)."""
        return self._reduce(x, "min")

    def gather(self, x: Tensor) -> Tensor:
        """Concatenate 1-D tensors of any length (0 included) from every rank, in rank order.

        One ``all_gather`` of the lengths (the only host sync: the longest length sizes the
        buffer), then one ``all_gather`` of the inputs zero-padded to the longest, with the
        padding cut out. Every rank must pass the same dtype.
        """
        if not isinstance(x, Tensor) or x.dim() != 1:
            got = f"shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise RolloutError(
                f"TorchDistributedReducer.gather: expected a 1-D tensor (the valid values of this rank), "
                f"got {got}; flatten it first (e.g. scores[mask])."
            )
        device = x.device
        y = self._stage(x).contiguous()
        if self.world_size == 1:
            return y.clone().to(device)
        R = self.world_size
        n = torch.full((1,), y.numel(), dtype=torch.int64, device=y.device)
        sizes = torch.empty(R, dtype=torch.int64, device=y.device)
        _all_gather_single(sizes, n, self.group)
        counts = sizes.tolist()  # the one host sync: a variable-length result needs its length.
        longest = max(counts)
        if longest == 0:
            return y.new_empty(0).to(device)
        if y.numel() < longest:
            y = torch.cat([y, y.new_zeros(longest - y.numel())])
        out = y.new_empty(R * longest)
        _all_gather_single(out, y, self.group)
        if all(c == longest for c in counts):
            return out.to(device)
        return torch.cat([out[r * longest: r * longest + c] for r, c in enumerate(counts)]).to(device)

    def __repr__(self) -> str:
        return f"TorchDistributedReducer(group={self.group!r}, world_size={self.world_size}, rank={self.rank})"
