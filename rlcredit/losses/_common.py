"""What the losses beyond the clipped surrogate share: inputs, coefficients, totals, aux, batch selection.

Every loss here has the same shape: per-token losses ``l [B, T]`` from the current log-probs, the
behaviour log-probs and the advantages, then ``loss = sum(c * l)`` with ``c`` from
``rlcredit.functional.loss_coefficients`` (the one place the aggregation denominators are derived).
Token weights ``w`` from any weighter enter through ``c = w * scale``: exactly ``w * l`` per token,
as in ``clipped_surrogate``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit.errors import RLCreditError, RolloutError
from rlcredit.functional import Reducer, Totals
from rlcredit.functional._loss import float32_logprobs
from rlcredit.functional._reduce import all_gather, all_sum, world_size
from rlcredit.functional._select import rank_key
from rlcredit.losses.surrogate import check_credit, check_logprobs
from rlcredit.requirements import Aux, leaves, requirements_of
from rlcredit.rollout import Credit, Rollout

__all__ = ["LOG_RATIO_BOUND", "TokenInputs", "token_inputs", "coefficients", "loss_totals", "merge_totals",
           "aux_names", "check_aux", "batch_mean", "batch_top_k"]

LOG_RATIO_BOUND = 20.0
"""Log-ratios are clamped to ``+-20`` before ``exp`` (as verl and ``clipped_surrogate`` do)."""


class TokenInputs(NamedTuple):
    """The per-token inputs of a loss, float32 ``[B, T]``, every one 0 on padding.

    ``logprobs`` carries the gradient (padding replaced by 0 with a select, so a NaN or inf there
    never reaches a gradient); ``old`` and ``advantages`` are detached; ``log_ratio`` is the
    detached ``clamp(logp - logp_old, -20, 20)``.
    """

    mask: Tensor
    logprobs: Tensor
    old: Tensor
    log_ratio: Tensor
    advantages: Tensor


def token_inputs(logprobs: Tensor, rollout: Rollout, credit: Credit, who: str) -> TokenInputs:
    """Check the loss inputs and return them per token (``[B]`` advantages broadcast over ``T``).

    Without ``rollout.old_logprobs`` the update is on-policy: ``logp_old = logp.detach()``.
    """
    check_logprobs(logprobs, rollout, who)
    check_credit(rollout, credit, who)
    mask = rollout.response_mask
    zero = torch.zeros((), device=mask.device)
    # float32 maths; the gradient comes back in the log-probs' dtype, saturated (never inf in float16).
    lp = torch.where(mask, float32_logprobs(logprobs), zero)
    old = lp.detach() if rollout.old_logprobs is None else torch.where(mask, rollout.old_logprobs.float(), zero)
    adv = credit.advantages.float()
    adv = torch.where(mask, adv[:, None] if adv.ndim == 1 else adv, zero)
    log_ratio = (lp.detach() - old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    return TokenInputs(mask, lp, old, log_ratio, adv)


def coefficients(rollout: Rollout, credit: Credit, *, mode: str, renormalize: bool = False,
                 reducer: Reducer | None = None, totals: Totals | None = None) -> Tensor:
    """``c [B, T]`` with ``aggregate(l, mask, w, mode) == sum(c * l)`` (``w`` the credit's token weights)."""
    return F.loss_coefficients(rollout.response_mask, credit.token_weights, mode=mode, renormalize=renormalize,
                               reducer=reducer, totals=totals)


def loss_totals(rollout: Rollout, credit: Credit, *, mode: str, renormalize: bool = False,
                reducer: Reducer | None = None) -> Totals:
    """The ``Totals`` a loss aggregating with ``mode`` divides by, for these rows (and ranks)."""
    return F.batch_totals(rollout.response_mask, credit.token_weights, mode=mode, renormalize=renormalize,
                          reducer=reducer)


def merge_totals(first: Totals, second: Totals) -> Totals:
    """``first`` with its None fields taken from ``second`` (two losses' statistics of one batch).

    Examples:
        >>> from rlcredit.functional import Totals
        >>> from rlcredit.losses._common import merge_totals
        >>> merge_totals(Totals(rows=4), Totals(tokens=10, rows=4))
        Totals(tokens=10, weight=None, rows=4, length=None, world=1)
    """
    return Totals(*(a if a is not None else b for a, b in zip(first[:4], second[:4])), world=first.world)


def aux_names(component: Any) -> tuple[str, ...]:
    """The names of the ``Aux`` requirements of a loss (``()`` for one that reads none)."""
    names = [leaf.name for req in requirements_of(component) for leaf in leaves(req) if isinstance(leaf, Aux)]
    return tuple(dict.fromkeys(names))


def check_aux(aux: Mapping[str, Any] | None, names: tuple[str, ...], logprobs: Tensor, who: str) -> dict[str, Tensor]:
    """``aux`` restricted to ``names``, each checked to be a floating tensor shaped and placed like ``logprobs``.

    Raises ``RolloutError`` when a declared name is missing, a tensor is malformed, or ``aux``
    holds a name nobody reads (a silent no-op otherwise).
    """
    aux = {} if aux is None else aux
    if not isinstance(aux, Mapping):
        raise RolloutError(f"{who}: aux must be a mapping name -> [B, T] tensor, got {type(aux).__name__}.")
    unread = sorted(set(aux) - set(names), key=str)
    if unread:
        reads = f"reads {', '.join(map(repr, names))}" if names else "reads no aux tensor"
        raise RolloutError(f"{who}: aux {', '.join(map(repr, unread))} is not read by the policy loss (it {reads}); "
                           f"drop it, or use a loss that declares rlcredit.requirements.Aux({unread[0]!r}).")
    out = {}
    for name in names:
        if name not in aux:
            raise RolloutError(
                f"{who}: the policy loss needs aux[{name!r}], a differentiable [B, T] = {list(logprobs.shape)} tensor "
                f"computed in the training step; pass Strategy.loss(..., aux={{{name!r}: tensor}})."
            )
        x = aux[name]
        if not isinstance(x, Tensor) or tuple(x.shape) != tuple(logprobs.shape) or not x.dtype.is_floating_point:
            got = f"{x.dtype} tensor of shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise RolloutError(f"{who}: aux[{name!r}] must be a floating [B, T] = {list(logprobs.shape)} tensor (like "
                               f"logprobs; select the same rows for micro-batches), got {got}.")
        if x.device != logprobs.device:
            raise RolloutError(f"{who}: aux[{name!r}] is on {x.device} but logprobs on {logprobs.device}.")
        out[name] = x
    return out


def batch_mean(x: Tensor, mask: Tensor, reducer: Reducer | None) -> Tensor:
    """Mean of ``x`` over the valid tokens of the batch (across ranks); 0 for an all-padding batch."""
    zero = torch.zeros((), device=x.device)
    stats = torch.stack([torch.where(mask, x.float(), zero).sum(), mask.sum().float()])
    stats = all_sum(stats, reducer)
    return stats[0] / stats[1].clamp_min(1.0)


def batch_top_k(values: Tensor, eligible: Tensor, k: Tensor, reducer: Reducer | None) -> Tensor:
    """``[B, T]`` bool: the ``k`` eligible entries of the batch with the largest ``values``, across ranks.

    Ties go to the earlier position (rank-major across ranks, then row, then token); NaN ranks
    lowest. Fewer than ``k`` eligible entries selects them all. With a reducer over several ranks
    the result on each rank is its slice of what one process holding every row selects (the
    reducer must expose ``rank``).
    """
    B, T = values.shape
    key = rank_key(values, eligible).reshape(-1)
    distributed = reducer is not None and world_size(reducer) > 1
    if distributed and getattr(reducer, "rank", None) is None:
        raise RLCreditError("batch top-k across ranks needs the reducer's `rank` attribute (to find this process's "
                            "rows in the gathered order); give the reducer a `rank`.")
    all_key = all_gather(key, reducer) if distributed else key
    order = torch.sort(all_key, descending=True, stable=True).indices
    position = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    if distributed:
        sizes = reducer.gather(torch.tensor([B * T], device=values.device))
        position = position[sizes[: int(reducer.rank)].sum() + torch.arange(B * T, device=values.device)]
    return (position.reshape(B, T) < k) & eligible
