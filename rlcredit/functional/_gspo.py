"""GSPO's sequence-level importance ratio (private: used by ``rlcredit.losses.GSPO``)."""

from __future__ import annotations

import torch

from rlcredit.functional._checks import check_bool, check_device, check_float, check_same_shape, check_shape
from rlcredit.functional._loss import _LOG_RATIO_BOUND

__all__ = ["sequence_log_ratio"]


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO-token's per-token log-ratio: the value of ``log s_i``, the gradient of ``log pi_theta(y_t)``.

    Zheng et al. 2025, *Group Sequence Policy Optimization* (arXiv 2507.18071), Eq. 7 and 13:

        log s_i       = (1 / T_i) sum_t clamp(logpi_t - logpi_old_t, -20, 20)   over valid tokens
        log s_{i,t}   = sg[log s_i] + logpi_t - sg[logpi_t]

    so ``exp(log s_{i,t}) = s_i`` on every token of response ``i`` while
    ``d s_{i,t} / d logpi_t = s_i``: fed to ``clipped_surrogate`` with zero old log-probs and
    aggregated with ``seq_mean_token_mean`` it is GSPO's sequence objective (value and gradient),
    and it accepts per-token advantages. The clamp matches ``clipped_surrogate``'s. Padding
    gets ``log s_i`` with no gradient; rows without valid tokens get 0 (``s = 1``).

    Args:
        logprobs: ``[B, T]`` current log-probs (with grad).
        old_logprobs: ``[B, T]`` behaviour log-probs.
        mask: ``[B, T]`` bool, valid tokens.

    Returns:
        ``[B, T]`` float32 log-ratios.

    Examples:
        >>> import torch
        >>> from rlcredit.functional._gspo import sequence_log_ratio
        >>> lp = torch.tensor([[-1.0, -2.0, -9.0]], requires_grad=True)
        >>> x = sequence_log_ratio(lp, torch.tensor([[-1.5, -2.0, 0.0]]), torch.tensor([[True, True, False]]))
        >>> x  # (0.5 + 0) / 2 on every token
        tensor([[0.2500, 0.2500, 0.2500]], grad_fn=<AddBackward0>)
        >>> x.sum().backward(); lp.grad  # each valid token's own log-prob, once
        tensor([[1., 1., 0.]])
    """
    fn = "sequence_log_ratio"
    logprobs = check_shape(fn, "logprobs", logprobs, "BT", [None, None])
    check_float(fn, "logprobs", logprobs)
    old_logprobs = check_same_shape(fn, "old_logprobs", old_logprobs, "logprobs", logprobs)
    check_float(fn, "old_logprobs", old_logprobs)
    mask = check_same_shape(fn, "mask", mask, "logprobs", logprobs)
    check_bool(fn, "mask", mask)
    check_device(fn, [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("mask", mask)])
    zero = torch.zeros((), device=logprobs.device)
    lp = logprobs.float()
    with torch.no_grad():
        # where(), not a product: a -inf or NaN log-prob on padding must not reach the row sum.
        token = torch.where(mask, (lp - old_logprobs.float()).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND), zero)
        seq = token.sum(-1) / mask.sum(-1).clamp_min(1)
    return torch.where(mask, lp - lp.detach(), zero) + seq[:, None]
