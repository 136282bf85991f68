"""STAPO's spurious-token rule as a pure function (private: used by ``rlcredit.weighters.Stapo``)."""

from __future__ import annotations

import math

import torch

from rlcredit.functional._checks import (
    check_bool,
    check_device,
    check_float,
    check_real,
    check_same_shape,
    check_shape,
)
from rlcredit.functional._reduce import Reducer
from rlcredit.functional._select import masked_quantile

__all__ = ["spurious_token_mask"]


def spurious_token_mask(
    entropy: torch.Tensor,
    old_logprobs: torch.Tensor,
    positive: torch.Tensor,
    mask: torch.Tensor,
    *,
    prob_threshold: float = 0.002,
    entropy_quantile: float = 0.75,
    reducer: Reducer | None = None,
) -> torch.Tensor:
    """STAPO's spurious tokens (Liu et al. 2026, arXiv 2602.15620).

        candidate_{i,t} = valid_{i,t} and positive_i and exp(old_logprobs_{i,t}) < prob_threshold
        tau             = torch.quantile(entropy[candidate], entropy_quantile)   (over all ranks)
        spurious_{i,t}  = candidate_{i,t} and entropy_{i,t} < tau

    The probability test is done in log space (``old_logprobs < log(prob_threshold)``). No
    candidate anywhere: nothing is spurious. Boolean indexing syncs once to size the candidates,
    as the batch scope of ``top_fraction_mask`` does.

    Args:
        entropy: ``[B, T]`` float per-token entropy of the sampling policy.
        old_logprobs: ``[B, T]`` float log-probs of the sampled tokens under that policy.
        positive: ``[B]`` bool, rows with a positive advantage.
        mask: ``[B, T]`` bool, valid tokens.
        prob_threshold: in ``(0, 1]``.
        entropy_quantile: in ``[0, 1]``.
        reducer: cross-rank reducer, or None.

    Returns:
        ``[B, T]`` bool, True on spurious tokens (a subset of ``mask``).

    Examples:
        >>> import math, torch
        >>> from rlcredit.functional._stapo import spurious_token_mask
        >>> lp = torch.tensor([[math.log(1e-3), math.log(1e-4), -0.1]])
        >>> spurious_token_mask(torch.tensor([[0.1, 2.0, 0.5]]), lp, torch.tensor([True]), torch.ones(1, 3, dtype=torch.bool))
        tensor([[ True, False, False]])
    """
    fn = "spurious_token_mask"
    entropy = check_shape(fn, "entropy", entropy, "BT", [None, None])
    check_float(fn, "entropy", entropy)
    old_logprobs = check_same_shape(fn, "old_logprobs", old_logprobs, "entropy", entropy)
    check_float(fn, "old_logprobs", old_logprobs)
    mask = check_same_shape(fn, "mask", mask, "entropy", entropy)
    check_bool(fn, "mask", mask)
    positive = check_shape(fn, "positive", positive, "B", [entropy.shape[0]])
    check_bool(fn, "positive", positive)
    check_device(fn, [("entropy", entropy), ("old_logprobs", old_logprobs), ("positive", positive), ("mask", mask)])
    check_real(fn, "prob_threshold", prob_threshold, low=0.0, high=1.0, low_open=True)
    check_real(fn, "entropy_quantile", entropy_quantile, low=0.0, high=1.0)

    h = entropy.float()
    candidate = mask & positive[:, None] & (old_logprobs.float() < math.log(prob_threshold))
    # No candidate: tau = +inf, and there is nothing to mark anyway.
    return candidate & (h < masked_quantile(h, candidate, entropy_quantile, reducer))
