"""The output check every component's per-token result goes through, built-in or third-party alike."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlcredit.errors import RolloutError
from rlcredit.functional._checks import storage_problem

__all__ = ["per_token"]


def per_token(x: Any, mask: Tensor, who: str) -> Tensor:
    """A component's ``[B, T]`` output as float32, exactly 0 on padding.

    Checks what is free (a tensor, the ``[B, T]`` shape of ``mask``, a real dtype, the device);
    values (finite, weights >= 0) are checked once, by ``rlcredit.Credit``, where every output
    ends up. Padding is set with a select, not a product, so whatever a component leaves on
    padding (NaN included) never reaches a sum.
    """
    if not isinstance(x, Tensor) or tuple(x.shape) != tuple(mask.shape):
        got = f"shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise RolloutError(f"{who} must return a [B, T] = {list(mask.shape)} tensor, got {got}.")
    problem = storage_problem(x)
    if problem is not None:
        raise RolloutError(f"{who} returned a tensor that {problem}.")
    if x.is_complex():
        raise RolloutError(f"{who} must return real values, got dtype {x.dtype}.")
    if x.device != mask.device:
        raise RolloutError(f"{who} returned a tensor on {x.device}, but the rollout is on {mask.device}.")
    return torch.where(mask, x.float(), torch.zeros((), device=mask.device))
