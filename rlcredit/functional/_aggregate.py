"""Aggregation of per-token losses to a scalar: the four modes, their denominators, in one place.

Every aggregation is linear in the per-token loss, ``sum(c * x)``; ``loss_coefficients`` derives
``c`` and is the only place the four modes' denominators are written. Those denominators are
batch statistics (``Totals``): computed here from the local rows and a reducer (``batch_totals``),
or given by the caller when the batch is larger than the rows at hand (gradient accumulation over
micro-batches, verl's global batch info).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlcredit.errors import RLCreditError, SpecError
from rlcredit.functional._checks import (
    FLOAT32_MAX,
    check_bool,
    check_device,
    check_float,
    check_positive_int,
    check_real,
    check_same_shape,
    check_shape,
    check_weights,
    ensure,
)
from rlcredit.functional._finite import finite_loss, length_scale, pow2_scale
from rlcredit.functional._reduce import Reducer, all_max, all_sum, world_size

__all__ = ["AGGREGATIONS", "Totals", "aggregate", "batch_totals", "loss_coefficients", "masked_mean"]

#: The loss aggregation modes of ``aggregate`` (verl's names with ``_`` for ``-``).
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


class Totals(NamedTuple):
    """The batch statistics an aggregation divides by, for the whole (possibly sharded) batch.

    Fields a mode does not use may be None. ``batch_totals`` computes them from the rows at hand
    (and a reducer); pass your own when a loss sees only part of the batch it must average over:
    with each micro-batch's loss aggregated under the totals of the whole batch, the micro-batch
    losses add up to the whole batch's loss (verl's ``global_batch_info`` is exactly this).

    Attributes:
        tokens: valid tokens of the batch (``token_mean``'s denominator; the entropy and KL terms').
        weight: sum of the token weights over valid tokens (``token_mean`` with ``renormalize``).
        rows: sequences of the batch (the ``seq_mean_*`` modes' ``B``).
        length: ``L`` of ``seq_mean_token_sum_norm`` (``max_length``, or the padded ``T``).
        world: ``R``, the number of ranks whose losses are averaged (DDP): each rank's loss is
            multiplied by ``R`` so that their mean is the batch loss.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import Totals, aggregate
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
        >>> mask = torch.tensor([[True, True], [True, False]])
        >>> aggregate(x, mask), aggregate(x, mask, totals=Totals(tokens=6))  # 6 / 3, 6 / 6
        (tensor(2.), tensor(1.))
    """

    tokens: torch.Tensor | float | None = None
    weight: torch.Tensor | float | None = None
    rows: torch.Tensor | float | None = None
    length: torch.Tensor | float | None = None
    world: int = 1


def check_aggregation(who: str, mode: str, renormalize: bool, max_length: int | None = None) -> None:
    """The one rule for an aggregation's options, for the kernels and every loss class alike.

    ``mode`` one of ``AGGREGATIONS``; ``renormalize=True`` needs a token-count denominator
    (``token_mean`` or ``seq_mean_token_mean``); ``max_length`` (an int >= 1) only with
    ``seq_mean_token_sum_norm``. Raises ``rlcredit.SpecError`` naming ``who``.

    Examples:
        >>> from rlcredit.functional._aggregate import check_aggregation
        >>> check_aggregation("my_loss", "seq_mean_token_sum", renormalize=True)
        Traceback (most recent call last):
        ...
        rlcredit.errors.SpecError: my_loss: renormalize=True needs a token-count denominator, i.e. aggregation 'token_mean' or 'seq_mean_token_mean'; got aggregation 'seq_mean_token_sum'.
    """
    if mode not in AGGREGATIONS:
        raise SpecError(f"{who}: unknown aggregation mode {mode!r}; valid values: {', '.join(map(repr, AGGREGATIONS))}.")
    if renormalize and mode in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
        raise SpecError(
            f"{who}: renormalize=True needs a token-count denominator, i.e. aggregation 'token_mean' or "
            f"'seq_mean_token_mean'; got aggregation {mode!r}."
        )
    if max_length is not None:
        check_positive_int(who, "max_length", max_length)
        if mode != "seq_mean_token_sum_norm":
            raise SpecError(
                f"{who}: max_length is only used by aggregation 'seq_mean_token_sum_norm', got aggregation "
                f"{mode!r}; drop max_length or change the aggregation."
            )


def batch_totals(
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    mode: str = "token_mean",
    renormalize: bool = False,
    max_length: int | None = None,
    reducer: Reducer | None = None,
) -> Totals:
    """The ``Totals`` of the batch held by these rows (on every rank, with a reducer): what ``mode`` needs.

    ``tokens = sum mask``, ``weight = sum w`` over valid tokens (``renormalize`` with
    ``token_mean`` only), ``rows = B``, ``length = max_length or T`` (the largest ``T`` across
    ranks), each summed (or maxed) over ranks; ``world = R``. Only the statistics ``mode`` reads
    are computed, so every rank runs the same collectives.

    Args:
        mask: ``[B, T]`` bool, True on valid tokens.
        weights: optional ``[B, T]`` float token weights (only read with ``renormalize``).
        mode, renormalize, max_length, reducer: as in ``aggregate``.

    Returns:
        ``Totals`` (tensors on ``mask``'s device).

    Examples:
        >>> import torch
        >>> from rlcredit.functional import batch_totals
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> batch_totals(mask).tokens, batch_totals(mask, mode="seq_mean_token_sum_norm").length
        (tensor(3), tensor(3.))
    """
    fn = "batch_totals"
    mask = check_shape(fn, "mask", mask, "BT", [None, None])
    check_bool(fn, "mask", mask)
    check_aggregation(fn, mode, renormalize, max_length)
    B, T = mask.shape
    device = mask.device
    tokens = weight = rows = length = None
    if mode == "token_mean":
        tokens = all_sum(mask.sum().reshape(1), reducer).reshape(())
        if renormalize:
            if weights is None:
                raise RLCreditError(f"{fn}: `renormalize=True` divides by the kept weight; pass `weights`.")
            w = torch.where(mask, weights.float(), torch.zeros((), device=device))
            weight = all_sum(w.sum().reshape(1), reducer).reshape(())
    if mode != "token_mean":
        rows = all_sum(torch.tensor([B], device=device), reducer).reshape(())
    if mode == "seq_mean_token_sum_norm":
        if max_length is None:
            length = all_max(torch.tensor([T], device=device), reducer).float().reshape(())
        else:
            length = torch.tensor(float(max_length), device=device)
    return Totals(tokens=tokens, weight=weight, rows=rows, length=length, world=world_size(reducer))


def _positive(x: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A denominator as a float32 scalar tensor, 1 where it is 0 (an empty batch aggregates to 0)."""
    x = torch.as_tensor(x, device=device).float().reshape(())
    return torch.where(x > 0, x, torch.ones_like(x))


def loss_coefficients(
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    mode: str = "token_mean",
    renormalize: bool = False,
    max_length: int | None = None,
    reducer: Reducer | None = None,
    totals: Totals | None = None,
) -> torch.Tensor:
    """The ``[B, T]`` float32 ``c`` with ``aggregate(x, mask, weights, ...) == sum(c * x)``.

    Every aggregation is linear in the per-token loss, so it is a weighted sum whose weight of
    token ``(i, t)`` is ``c_{i,t} = R * w_{i,t} / den_i``, ``den`` being the mode's denominator
    (see ``aggregate``; ``R`` ranks). This is the only place the denominators are derived: the
    losses, ``aggregate``, the verl policy loss and the TRL fold all go through it. It is also
    the gradient of the aggregated loss w.r.t. each token's loss.

    Args:
        mask: ``[B, T]`` bool, True on valid tokens.
        weights: optional ``[B, T]`` float token weights ``>= 0`` (padding values are ignored);
            None for all 1.
        mode, renormalize, max_length, reducer: as in ``aggregate``.
        totals: the batch statistics to divide by (None: ``batch_totals`` of these rows).

    Returns:
        ``[B, T]`` float32 coefficients, 0 on padding.

    ``weights`` are taken as checked (``0 <= w <= 1e20`` on valid tokens: a ``Credit``'s, or
    ``aggregate``'s after its check): this is the losses' hot path.

    Raises:
        RLCreditError: ``totals`` that are not a ``Totals`` of finite, non-negative statistics.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import aggregate, loss_coefficients
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> loss_coefficients(mask, mode="seq_mean_token_mean")  # 1 / (B * T_i)
        tensor([[0.1667, 0.1667, 0.1667],
                [0.5000, 0.0000, 0.0000]])
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
        >>> (loss_coefficients(mask, mode="seq_mean_token_mean") * x).sum(), aggregate(x, mask, mode="seq_mean_token_mean")
        (tensor(3.), tensor(3.))
    """
    fn = "loss_coefficients"
    mask = check_shape(fn, "mask", mask, "BT", [None, None])
    check_bool(fn, "mask", mask)
    if weights is not None:
        weights = check_same_shape(fn, "weights", weights, "mask", mask)
        check_float(fn, "weights", weights)
    check_device(fn, [("mask", mask), ("weights", weights)])
    check_aggregation(fn, mode, renormalize, max_length)
    if totals is not None:
        _check_totals(fn, totals)
    # A select, not a product: weights on padding may be anything, NaN included.
    w = mask.float() if weights is None else torch.where(mask, weights.float(), torch.zeros((), device=mask.device))
    return w * coefficient_scale(mask, w, mode=mode, renormalize=renormalize, max_length=max_length,
                                 reducer=reducer, totals=totals)


def _check_totals(fn: str, totals: object) -> None:
    """``Totals`` whose statistics are finite and >= 0 (numbers or tensors) and whose ``world`` is an int >= 1."""
    if not isinstance(totals, Totals):
        raise RLCreditError(
            f"{fn}: `totals` must be a rlcredit.functional.Totals (e.g. from batch_totals or a loss's "
            f".totals(rollout, credit)), got {type(totals).__name__}."
        )
    check_positive_int(fn, "totals.world", totals.world)
    for name in ("tokens", "weight", "rows", "length"):
        value = getattr(totals, name)
        if value is None:
            continue
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
                raise RLCreditError(f"{fn}: `totals.{name}` must be a real scalar, got a {value.dtype} tensor of "
                                    f"shape {list(value.shape)}.")
            v = value.detach().float()
            ensure(((v >= 0) & (v <= FLOAT32_MAX)).all(), lambda: (
                f"{fn}: `totals.{name}` must be finite and >= 0 (a count or a sum of weights), got {v.item()}."),
                RLCreditError)
        else:
            check_real(fn, f"totals.{name}", value, low=0.0)


def coefficient_scale(
    mask: torch.Tensor,
    weights: torch.Tensor,
    *,
    mode: str,
    renormalize: bool,
    max_length: int | None,
    reducer: Reducer | None,
    totals: Totals | None = None,
) -> torch.Tensor:
    """The factor of ``loss_coefficients``: ``c = w * scale``, ``scale`` 0-d or ``[B, 1]`` (unchecked).

    ``weights`` are float32 and 0 on padding (only read with ``renormalize``).
    """
    if totals is None:
        totals = batch_totals(mask, weights, mode=mode, renormalize=renormalize, max_length=max_length,
                              reducer=reducer)
    device = mask.device
    R = float(totals.world)
    if mode == "token_mean":
        den = totals.weight if renormalize else totals.tokens
        if den is None:
            raise RLCreditError(f"token_mean needs Totals.{'weight' if renormalize else 'tokens'}; it is None.")
        return R / _positive(den, device)
    if totals.rows is None:
        raise RLCreditError(f"{mode} needs Totals.rows (the number of sequences of the batch); it is None.")
    rows = _positive(totals.rows, device)
    if mode == "seq_mean_token_mean":
        row_den = weights.sum(-1) if renormalize else mask.sum(-1).float()
        row_den = torch.where(row_den > 0, row_den, torch.ones_like(row_den))
        return (R / (row_den * rows))[:, None]
    if mode == "seq_mean_token_sum":
        return R / rows
    if totals.length is None:
        raise RLCreditError("seq_mean_token_sum_norm needs Totals.length (L); it is None.")
    return R / (rows * _positive(totals.length, device))


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    mode: str = "token_mean",
    renormalize: bool = False,
    max_length: int | None = None,
    reducer: Reducer | None = None,
    totals: Totals | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to the scalar to back-propagate, in one of verl's four modes.

    With ``x_{i,t} = w_{i,t} * l_{i,t}`` on valid tokens and 0 on padding (token weights fold in
    exactly for ``w >= 0``), ``T_i`` the valid tokens of row ``i`` and ``B`` the number of rows:

    mode                        formula                          verl name / TRL loss_type
    ``token_mean``              ``sum x / sum mask``             token-mean / dapo, bnpo
    ``seq_mean_token_mean``     ``mean_i (sum_t x_{i,t} / T_i)`` seq-mean-token-mean / grpo
    ``seq_mean_token_sum``      ``mean_i sum_t x_{i,t}``         seq-mean-token-sum / --
    ``seq_mean_token_sum_norm`` ``sum x / (B * L_max)``          seq-mean-token-sum-norm / dr_grpo

    The denominators count **all valid tokens** (as VPPO, TRL and the 80/20 paper do), so a
    weight of 0 removes a token's loss without raising the others'. ``renormalize=True`` counts
    ``sum w`` instead (STAPO): ``sum x / sum w`` for ``token_mean`` and ``sum_t x / sum_t w`` per
    row for ``seq_mean_token_mean``; the token-sum modes have no token count and reject it.
    ``L_max`` is ``max_length`` (Dr. GRPO's fixed generation budget) or the padded ``T``.

    Degenerate inputs: a row without valid tokens adds 0 but still counts in ``B`` for the
    ``seq_mean_*`` modes (like TRL, and verl when given its global batch size); an all-padding
    batch gives 0 with an all-zero (not None) gradient. Padding never gets gradient, even when its
    loss is NaN or inf.

    Across ranks (``reducer`` over ``R`` ranks) each rank returns ``R * local_sum / global_den``
    where the denominator (valid tokens, ``sum w``, the number of rows ``B``, and the padded
    ``T`` via ``reducer.max``) is global: the mean of the ranks' losses, which is what DDP's
    gradient averaging sees, equals the loss of one process holding every row. ``totals``
    replaces the denominators altogether (see ``Totals``).

    Args:
        per_token: ``[B, T]`` per-token losses (any float dtype; maths in float32).
        mask: ``[B, T]`` bool, True on valid tokens.
        weights: optional ``[B, T]`` token weights in ``[0, 1e20]`` on valid tokens (None: all 1;
            padding values are ignored).
        mode: one of ``AGGREGATIONS``.
        renormalize: divide by ``sum w`` instead of the valid-token count.
        max_length: ``L_max`` of ``seq_mean_token_sum_norm`` (an int >= 1; None: padded ``T``).
        reducer: cross-rank reducer, or None when this process holds the whole batch.
        totals: the batch statistics to divide by (None: those of these rows, with the reducer).

    Returns:
        A float32 scalar tensor (0-d), differentiable w.r.t. ``per_token``; finite for finite
        inputs (a sum beyond float32's range saturates at +-3.4e38, its gradient unchanged).

    Raises:
        RLCreditError: a negative, NaN or larger-than-1e20 weight on a valid token (a weight
            folds into a clipped loss exactly only when ``>= 0``).

    Examples:
        >>> import torch
        >>> from rlcredit.functional import aggregate
        >>> loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> aggregate(loss, mask)  # (1 + 2 + 3 + 4) / 4
        tensor(2.5000)
        >>> aggregate(loss, mask, mode="seq_mean_token_mean")  # (6 / 3 + 4 / 1) / 2
        tensor(3.)
        >>> aggregate(loss, mask, mode="seq_mean_token_sum")  # (6 + 4) / 2
        tensor(5.)
        >>> aggregate(loss, mask, mode="seq_mean_token_sum_norm")  # 10 / (2 * 3)
        tensor(1.6667)
        >>> w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
        >>> aggregate(loss, mask, w), aggregate(loss, mask, w, renormalize=True)  # 4 / 4, 4 / 2
        (tensor(1.), tensor(2.))
    """
    fn = "aggregate"
    per_token = check_shape(fn, "per_token", per_token, "BT", [None, None])
    check_float(fn, "per_token", per_token)
    mask = check_same_shape(fn, "mask", mask, "per_token", per_token)
    check_device(fn, [("per_token", per_token), ("mask", mask)])
    zero = torch.zeros((), device=per_token.device)
    if isinstance(weights, torch.Tensor) and weights.shape == mask.shape and weights.is_floating_point():
        # w * l folds a weight in exactly only for w >= 0: a negative (or NaN) weight would
        # silently flip a clipped loss's pessimism. Padding weights are ignored.
        check_weights(f"{fn}: `weights` on valid tokens", torch.where(mask, weights.float(), zero), RLCreditError)
    coef = loss_coefficients(mask, weights, mode=mode, renormalize=renormalize, max_length=max_length,
                             reducer=reducer, totals=totals)
    # where(), not a product with the mask: 0 * inf and 0 * nan on padding would poison the sum
    # and, through the product's backward, the gradient of every padding position. The values are
    # divided by a power of two near their largest (exact, detached: the gradient is unchanged), so
    # per-token losses anywhere in float32's range cannot overflow the sum on the way.
    x = torch.where(mask, per_token.float(), zero)
    scale = pow2_scale(torch.linalg.vector_norm(x.detach(), float("inf"))) if x.numel() else torch.ones((), device=x.device)
    return finite_loss(((x / scale) * coef).sum() * scale)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each row over its valid tokens; 0 for a row with none.

    ``mean_i = sum_t x_{i,t} * m_{i,t} / sum_t m_{i,t}`` (VPPO's trajectory score
    ``S_bar_i = sum_t S_t / T_i``). Padding values never enter, even when they are NaN or inf.

    Args:
        x: ``[B, T]`` values (any float dtype; maths in float32).
        mask: ``[B, T]`` bool, True on valid tokens.

    Returns:
        ``[B]`` float32 row means.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import masked_mean
        >>> x = torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[True, True, False], [False, False, False]])
        >>> masked_mean(x, mask)
        tensor([1.5000, 0.0000])
    """
    fn = "masked_mean"
    x = check_shape(fn, "x", x, "BT", [None, None])
    check_float(fn, "x", x)
    mask = check_same_shape(fn, "mask", mask, "x", x)
    check_bool(fn, "mask", mask)
    check_device(fn, [("x", x), ("mask", mask)])
    # Pre-divided by a power of two >= T (exact): the row sum of values near float32's range cannot overflow.
    P = length_scale(x.shape[-1])
    total = torch.where(mask, x.float() / P, torch.zeros((), device=x.device)).sum(-1)
    return total / mask.sum(-1).clamp_min(1) * P
