"""Token selection: keep the highest-scoring fraction of tokens per sequence, group or batch."""

from __future__ import annotations

import functools
import numbers
from fractions import Fraction

import torch

from rlcredit.errors import RLCreditError
from rlcredit.functional._checks import (
    check_bool,
    check_choice,
    check_device,
    check_int,
    check_real,
    check_same_shape,
    check_shape,
)
from rlcredit.functional._reduce import Reducer, all_gather, all_sum, segment_ids, world_size

__all__ = ["SCOPES", "COUNTS", "top_fraction_mask"]

#: The selection scopes of ``top_fraction_mask``.
SCOPES = ("sequence", "group", "batch")

#: How ``top_fraction_mask`` rounds ``fraction * n`` up in the sequence scope (see ``count``).
COUNTS = ("exact", "float32")

def exact_fraction(fn: str, fraction: object) -> tuple[int, int]:
    """``fraction`` in (0, 1] as ``(p, q)`` with ``p / q`` the nearest ratio with ``q <= 1e6``.

    Done once on the host so that ``ceil(p * n / q)`` is integer arithmetic on tensors: in float,
    ``0.4 * 5`` is ``2.0000000298`` in float32 and its ceil would keep 3 tokens, not 2.
    """
    check_real(fn, "fraction", fraction, low=0.0, high=1.0, low_open=True)  # the share of tokens to keep
    return _nearest_ratio(fraction if isinstance(fraction, numbers.Rational) else float(fraction))


@functools.lru_cache(maxsize=256)
def _nearest_ratio(exact: numbers.Rational | float) -> tuple[int, int]:
    ratio = Fraction(exact).limit_denominator(10**6)  # ~10 us of Python: cached per value
    return ratio.numerator, ratio.denominator


def keep_counts(n: torch.Tensor, p: int, q: int) -> torch.Tensor:
    """``ceil(p * n / q)`` in int64, at least 1 where ``n >= 1`` and 0 where ``n == 0``."""
    n = n.long()
    k = torch.div(n * p + (q - 1), q, rounding_mode="floor")
    return torch.where(n > 0, k.clamp_min(1), torch.zeros_like(k))


def float32_counts(n: torch.Tensor, fraction: float) -> torch.Tensor:
    """``ceil(float32(n) * float32(fraction))`` in int64, at least 1 where ``n >= 1``: VPPO's released rule.

    The expression of the released code (``torch.ceil(num_valid_tokens * top_p)``,
    ``verl/workers/actor/dp_actor.py`` L413 of huaixuheqing/VPPO-RL): the int64 count times the
    Python float, rounded to float32, then ceiled. It equals the exact rational ceil unless the
    float32 product lands just above an integer (never for 0.4 or 0.2; 0.6 of 25 tokens is
    ``ceil(15.000001) = 16`` in float32).
    """
    k = torch.ceil(n.long() * fraction).long()
    return torch.where(n > 0, k.clamp_min(1), torch.zeros_like(k))


def rank_key(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """float32 sort key: valid scores finite (NaN lowest), padding strictly below all of them."""
    fin = torch.finfo(torch.float32)
    key = torch.nan_to_num(scores.float(), nan=fin.min, posinf=fin.max, neginf=fin.min)
    return torch.where(mask, key, float("-inf"))


def masked_quantile(x: torch.Tensor, valid: torch.Tensor, q: float, reducer: Reducer | None = None) -> torch.Tensor:
    """``torch.quantile(x[valid], q)`` (linear interpolation) over the valid values of every rank.

    The same formula as ATen's, on the sorted values: ``r = float32(q) * (n - 1)`` in float32,
    ``lerp(x_(trunc r), x_(ceil r), r - trunc r)`` — bit-equal to ``torch.quantile`` — but with
    the invalid entries sorted last as ``+inf`` and ``n`` kept on the device, so one process needs
    no host sync (boolean indexing would need one to size ``x[valid]``) and there is no size limit
    (``torch.quantile`` refuses more than ``2**24`` elements). Across ranks the values are gathered
    (``reducer.gather``: one sync, for its variable length). No valid value: ``+inf``.

    Args:
        x: float32 values of any shape (finite where valid).
        valid: bool, the shape of ``x``.
        q: the quantile, in ``[0, 1]``.
        reducer: cross-rank reducer, or None.

    Returns:
        A float32 0-d tensor.

    Examples:
        >>> import torch
        >>> from rlcredit.functional._select import masked_quantile
        >>> x = torch.tensor([[1.0, 5.0, 9.0], [2.0, 0.0, 7.0]])
        >>> valid = torch.tensor([[True, True, False], [True, False, True]])
        >>> masked_quantile(x, valid, 0.5), torch.quantile(x[valid], 0.5)
        (tensor(3.5000), tensor(3.5000))
    """
    flat = torch.where(valid, x.float(), float("inf")).reshape(-1)
    values = torch.sort(all_gather(flat, reducer)).values
    n = all_sum(valid.sum().reshape(1), reducer).reshape(())
    if values.numel() == 0:
        return torch.full((), float("inf"), device=x.device)
    rank = torch.tensor(q, dtype=torch.float32, device=x.device) * (n - 1).float()
    last = values.numel() - 1
    below = rank.long().clamp(0, last)
    above = rank.ceil().long().clamp(0, last)
    tau = torch.lerp(values[below], values[above], rank - below.float())
    return torch.where(n > 0, tau, torch.full_like(tau, float("inf")))


def top_fraction_mask(
    scores: torch.Tensor,
    mask: torch.Tensor,
    fraction: float,
    scope: str = "sequence",
    *,
    group_ids: torch.Tensor | None = None,
    reducer: Reducer | None = None,
    count: str = "exact",
) -> torch.Tensor:
    """Keep the highest-scoring ``fraction`` of the valid tokens of each sequence, group or batch.

    Scopes:

    - ``"sequence"``: VPPO's Token-level Gradient Filtering (arXiv 2510.09285) keeps exactly
      ``k_i = ceil(fraction * T_i)`` tokens of row ``i`` (``T_i`` its valid tokens; at least one
      when ``T_i >= 1``) with the highest scores. The ceil is exact rational arithmetic (``fraction``
      is read as the nearest ratio with denominator ``<= 1e6``, so 0.4 of 5 tokens is 2, not the
      3 that a float64 ``ceil(5 * 0.4000000059604645)`` would give). Ties go to the earlier token (a
      stable sort). ``count="float32"`` takes ``k_i = ceil(float32(T_i) * float32(fraction))``
      instead, VPPO's released expression (``float32_counts``), which can exceed the exact ceil by
      one (0.6 of 25 tokens: 16, not 15; never for 0.4).
    - ``"group"``: the same over all valid tokens of each group (``group_ids`` required); ties go
      to the earlier row, then the earlier token. Across ranks, rows are ordered by rank, and the
      reducer must expose ``rank``.
    - ``"batch"``: the 80/20 rule (Wang et al. 2025, arXiv 2506.01939) as TRL's
      ``top_entropy_quantile`` computes it, over the valid tokens of the whole batch (gathered
      across ranks):

          tau = torch.quantile(valid scores, 1 - fraction)   (linear interpolation)
          keep = valid & (score >= tau)

      so ties at ``tau`` are all kept and the count can exceed ``fraction * n``. Inputs beyond
      ``torch.quantile``'s 2**24-element limit use an exact replay of its formula.

    ``fraction=1.0`` returns ``mask`` itself (a copy). Padding is never kept. Scores should be
    finite; NaN is ranked lowest and +-inf as the largest/smallest finite float32.

    Args:
        scores: ``[B, T]`` float scores (any float dtype).
        mask: ``[B, T]`` bool, True on valid tokens.
        fraction: share of tokens to keep, in ``(0, 1]``.
        scope: ``"sequence"``, ``"group"`` or ``"batch"``.
        group_ids: ``[B]`` integer group ids (``"group"`` scope only).
        reducer: cross-rank reducer (``"group"`` and ``"batch"`` scopes), or None for local.
        count: ``"exact"`` (rational ceil) or ``"float32"`` (the released VPPO rule); sequence
            scope only.

    Returns:
        ``[B, T]`` bool mask of kept tokens (a subset of ``mask``).

    Examples:
        >>> import torch
        >>> from rlcredit.functional import top_fraction_mask
        >>> scores = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.0], [3.0, 1.0, 2.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
        >>> top_fraction_mask(scores, mask, 0.4)  # ceil(0.4 * 5) = 2 and ceil(0.4 * 3) = 2
        tensor([[False,  True, False,  True, False],
                [ True, False,  True, False, False]])
        >>> top_fraction_mask(scores, mask, 0.2)  # 1 each: the tie at 0.9 goes to the earlier
        tensor([[False,  True, False, False, False],
                [ True, False, False, False, False]])
        >>> top_fraction_mask(scores, mask, 0.25, "batch")  # the 0.75-quantile of 8 scores is 1.5
        tensor([[False, False, False, False, False],
                [ True, False,  True, False, False]])
        >>> row = torch.arange(25.0)[None]
        >>> [int(top_fraction_mask(row, row >= 0, 0.6, count=c).sum()) for c in ("exact", "float32")]
        [15, 16]
    """
    fn = "top_fraction_mask"
    scores = check_shape(fn, "scores", scores, "BT", [None, None])
    if not scores.is_floating_point():
        scores = scores.float()  # integer scores rank the same; maths in float32 anyway
    mask = check_same_shape(fn, "mask", mask, "scores", scores)
    check_bool(fn, "mask", mask)
    p, q = exact_fraction(fn, fraction)
    check_choice(fn, "scope", scope, SCOPES)
    check_choice(fn, "count", count, COUNTS)
    if count != "exact" and scope != "sequence":
        raise RLCreditError(
            f"{fn}: count={count!r} is the sequence scope's rounding rule (VPPO's released code); scope "
            f"{scope!r} rounds its own way. Use count='exact' or scope='sequence'."
        )
    B, T = scores.shape
    if scope == "group":
        if group_ids is None:
            raise RLCreditError(
                f"{fn}: scope 'group' needs `group_ids` ([B] integer group id of each row); "
                f"pass them or use scope 'sequence' or 'batch'."
            )
        group_ids = check_shape(fn, "group_ids", group_ids, "B", [B])
        check_int(fn, "group_ids", group_ids)
    check_device(fn, [("scores", scores), ("mask", mask), ("group_ids", group_ids)])
    if p == q:
        return mask.clone()
    key = rank_key(scores, mask)

    if scope == "sequence":
        if count == "float32":
            # The largest k_i: float32 products are monotone in T_i, so the row of T tokens has it.
            K = int(float32_counts(torch.tensor([T]), fraction))
            return _sequence_top(key, mask, float32_counts(mask.sum(-1), fraction), max(1, K))
        return _sequence_top(key, mask, keep_counts(mask.sum(-1), p, q), max(1, (T * p + q - 1) // q))

    if scope == "batch":
        return mask & (key >= masked_quantile(key, mask, 1.0 - fraction, reducer))

    return _group_top(key, mask, group_ids, p, q, reducer)


def _sequence_top(key: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, K: int) -> torch.Tensor:
    """Per row, the ``k_i`` largest keys, ties to the earlier token: a selection, not a sort.

    The ``k_i``-th largest key ``thr_i`` comes from one batched ``kthvalue`` (O(T) per row, no
    sort, no host sync): each row is padded with ``K - k_i`` entries of ``+inf`` and ``k_i`` of
    ``-inf``, where ``K >= k_i`` (``k_i`` of a row of ``T`` tokens) is known on the host, so that ``thr_i`` is
    the ``K``-th largest of every padded row. Keys above ``thr_i`` are kept, and of the keys equal
    to it the earliest ``k_i - #above`` (a cumsum), which is exactly a stable sort's choice.
    """
    B, T = key.shape
    if T == 0:
        return mask.clone()
    extra = torch.arange(K, device=key.device)[None, :] < (K - k)[:, None]
    padded = torch.cat([key, torch.where(extra, float("inf"), float("-inf"))], dim=1)
    # The K-th largest of T + K values is the (T + 1)-th smallest. Padding keys are -inf and valid
    # ones finite, so a row without valid tokens gets thr = +inf and keeps nothing.
    thr = torch.kthvalue(padded, T + 1, dim=1).values[:, None]
    above = key > thr
    tie = key == thr
    need = (k - above.sum(1))[:, None]
    return above | (tie & (torch.cumsum(tie, dim=1) <= need))


def _group_top(
    key: torch.Tensor,
    mask: torch.Tensor,
    group_ids: torch.Tensor,
    p: int,
    q: int,
    reducer: Reducer | None,
) -> torch.Tensor:
    """Group scope: rank every token slot (padding included, ranked last) inside its group."""
    B, T = key.shape
    flat_key = key.reshape(-1)
    flat_gid = group_ids.long()[:, None].expand(B, T).reshape(-1)
    distributed = reducer is not None and world_size(reducer) > 1
    if distributed and getattr(reducer, "rank", None) is None:
        raise RLCreditError(
            "top_fraction_mask: scope 'group' across ranks needs the reducer's `rank` attribute "
            "(to find this process's rows in the gathered order); give the reducer a `rank`."
        )
    all_key = all_gather(flat_key, reducer) if distributed else flat_key
    all_gid = all_gather(flat_gid, reducer) if distributed else flat_gid
    n = all_key.numel()
    device = key.device
    seg = segment_ids(all_gid)
    # Two stable sorts give the order (group, score descending, position): ties in a group go to
    # the earlier position, i.e. the earlier row (rank-major across ranks), then earlier token.
    by_score = torch.sort(all_key, descending=True, stable=True).indices
    perm = by_score[torch.sort(seg[by_score], stable=True).indices]
    slots = torch.zeros(n, dtype=torch.long, device=device).index_add_(
        0, seg, torch.ones_like(seg)
    )
    valid = torch.zeros(n, dtype=torch.long, device=device).index_add_(
        0, seg, (all_key > float("-inf")).long()
    )
    start = torch.cumsum(slots, 0) - slots
    k = keep_counts(valid, p, q)
    seg_sorted = seg[perm]
    rank_in_group = torch.arange(n, device=device) - start[seg_sorted]
    keep_all = torch.empty(n, dtype=torch.bool, device=device).scatter_(
        0, perm, rank_in_group < k[seg_sorted]
    )
    if distributed:
        sizes = reducer.gather(torch.tensor([B * T], device=device))
        offset = sizes[: int(reducer.rank)].sum()
        keep_all = keep_all[offset + torch.arange(B * T, device=device)]
    return keep_all.reshape(B, T) & mask
