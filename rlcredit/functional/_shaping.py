"""Trajectory-level advantage shaping by a per-sequence dependency score (VPPO's TAS)."""

from __future__ import annotations

import math
import numbers

import torch

from rlcredit.errors import RLCreditError, SpecError
from rlcredit.functional._checks import (
    check_bool,
    check_device,
    check_float,
    check_int,
    check_real,
    check_shape,
)
from rlcredit.functional._reduce import GroupIndex, Reducer, all_max, all_min, all_sum

__all__ = ["dependency_scale"]

# Below this min-max range the scores carry no usable ordering (VPPO's released code: 1e-6).
_MIN_RANGE = 1e-6

_IDENTITY = {"sum": 0.0, "amin": math.inf, "amax": -math.inf}


def _check_scope(fn: str, name: str, scope: object) -> None:
    if scope in ("batch", "group"):
        return
    if isinstance(scope, numbers.Integral) and not isinstance(scope, bool) and scope >= 1:
        return
    raise RLCreditError(
        f"{fn}: unknown {name} {scope!r}; valid values: 'batch', 'group', or an int >= 1 "
        f"(a chunk of that many consecutive rows)."
    )


class _Scopes:
    """Per-row statistics over a scope: the batch (across ranks), groups, or row chunks."""

    def __init__(self, group_ids: torch.Tensor | None, reducer: Reducer | None) -> None:
        self.group_ids = group_ids
        self.reducer = reducer
        self._groups: GroupIndex | None = None

    def stat(self, x: torch.Tensor, include: torch.Tensor, scope: str | int, op: str) -> torch.Tensor:
        """``op`` ("sum", "amin", "amax") of ``x`` over the included rows of each row's scope."""
        ident = _IDENTITY[op]
        xm = torch.where(include, x, torch.full((), ident, device=x.device))
        B = x.shape[0]
        if scope == "batch":
            # The identity element keeps amin/amax defined on an empty local batch, which must
            # still take part in the collective.
            if B == 0:
                xm = torch.full((1,), ident, device=x.device)
            local = getattr(xm, op)().reshape(1)
            reduce = {"sum": all_sum, "amin": all_min, "amax": all_max}[op]
            return reduce(local, self.reducer).expand(B)
        if scope == "group":
            if self._groups is None:
                self._groups = GroupIndex(self.group_ids, self.reducer)
            return self._groups.broadcast(xm, op)
        # Consecutive chunks of this process's rows, as VPPO's released code used per-device
        # mini-batches (128 rows) and micro-batches (16 rows): no cross-rank reduction. Each chunk
        # is reduced as one contiguous vector (full chunks as rows of a view, the shorter last
        # one on its own): the summation order of torch.sum on that chunk's rows alone, which
        # the released code's per-micro-batch mean relies on.
        size = int(scope)
        full = B - B % size
        parts = [getattr(xm[:full].view(-1, size), op)(-1)] if full else []
        if full < B:
            parts.append(getattr(xm[full:], op)().reshape(1))
        seg = torch.arange(B, device=x.device) // size
        return torch.cat(parts)[seg] if parts else xm


def check_scale_form(who: str, beta_min: float, beta_max: float | None, mean_scope: object = None,
                     mean_eps: float | None = None) -> None:
    """The one rule for TAS's form, for ``dependency_scale`` and the ``DependencyScale`` shaper alike.

    Mean-preserving form (``beta_max=None``): ``0 <= beta_min <= 1`` (``alpha = beta_min + n (1 -
    beta_min) / mu`` would turn negative beyond 1). Bounded form: ``0 <= beta_min < beta_max``, and
    neither ``mean_scope`` nor ``mean_eps`` (it divides by no mean). Raises ``rlcredit.SpecError``.

    Examples:
        >>> from rlcredit.functional._shaping import check_scale_form
        >>> check_scale_form("DependencyScale", 0.9, 0.8)
        Traceback (most recent call last):
        ...
        rlcredit.errors.SpecError: DependencyScale: beta_max must be greater than beta_min (0.9), got 0.8; or set beta_max=None for the mean-preserving form.
    """
    check_real(who, "beta_min", beta_min, low=0.0)
    if beta_max is None:
        if beta_min > 1:
            raise SpecError(
                f"{who}: beta_min must be in [0, 1] in the mean-preserving form (beta_max=None), got {beta_min!r}: "
                f"alpha = beta_min + n (1 - beta_min) / mu would turn negative. Lower it, or set beta_max for the "
                f"bounded form."
            )
    else:
        check_real(who, "beta_max", beta_max, low=0.0)
        if not beta_max > beta_min:
            raise SpecError(
                f"{who}: beta_max must be greater than beta_min ({beta_min!r}), got {beta_max!r}; or set beta_max=None "
                f"for the mean-preserving form."
            )
        for name, value in (("mean_scope", mean_scope), ("mean_eps", mean_eps)):
            if value is not None:
                raise SpecError(
                    f"{who}: {name} only applies to the mean-preserving form (beta_max=None); the bounded form "
                    f"(beta_max={beta_max!r}) has no mean. Drop {name} or set beta_max=None."
                )
    if mean_eps is not None:
        check_real(who, "mean_eps", mean_eps, low=0.0, low_open=True)


def dependency_scale(
    mean_scores: torch.Tensor,
    valid: torch.Tensor,
    *,
    beta_min: float = 0.9,
    beta_max: float | None = None,
    scope: str | int = "batch",
    mean_scope: str | int | None = None,
    group_ids: torch.Tensor | None = None,
    reducer: Reducer | None = None,
    mean_eps: float | None = None,
) -> torch.Tensor:
    """VPPO's Trajectory-level Advantage Shaping: a per-sequence factor alpha for the advantage.

    Huang et al. 2025, *Spotlight on Token Perception for Multimodal Reinforcement Learning*
    (VPPO, arXiv 2510.09285). With ``S_bar_i`` the mean dependency score of sequence ``i`` (see
    ``masked_mean``), min and max over the valid rows of its ``scope``:

        n_i = clamp((S_bar_i - min) / (max - min), 0, 1)

    Code form (``beta_max=None``, the released code and the ``vppo`` preset), mean-preserving:

        mu      = mean of n_j over the valid rows of the ``mean_scope``
        alpha_i = beta_min + n_i * (1 - beta_min) / mu

    so ``alpha >= beta_min``, the mean of alpha over the mean scope is 1, and alpha is unbounded
    above by design (up to ``beta_min + (1 - beta_min) * rows``). Paper form (``beta_max`` a
    float), bounded: ``alpha_i = beta_min + n_i * (beta_max - beta_min)``.

    ``mean_eps`` (code form only; the released code: ``1e-8``) divides by ``mu + mean_eps``
    instead, evaluated as the released code does (``verl/workers/actor/dp_actor.py`` L509-521 of
    huaixuheqing/VPPO-RL), so that every float32 rounding matches:

        alpha_i = beta_min + n_i * ((beta_min + (1 - beta_min) / (mu + mean_eps)) - beta_min)

    then ``mu = 0`` gives ``alpha = beta_min`` on every row of the mean scope (the mean of alpha is
    ``beta_min``, not 1), and alpha differs from the exact form by a relative ``~mean_eps / mu``.

    ``alpha = 1`` (no shaping) for rows with ``valid=False`` (they never enter the statistics),
    for every row of a scope with at most one valid row or with ``max - min <= 1e-6``, and, in
    the code form without ``mean_eps``, for every row of a mean scope where ``mu == 0`` (all its
    rows sit at the minimum; the released code, with ``mu + 1e-8``, gives ``beta_min`` there,
    breaking the mean of 1). The released code used ``scope=128`` (rows of a per-device mini-batch) and
    ``mean_scope=16`` (micro-batch); integer scopes are chunks of this process's consecutive rows
    and take no cross-rank reduction, while ``"batch"`` (via ``reducer``) and ``"group"`` (via
    ``group_ids``, gathered across ranks) give the single-process result on any number of ranks.

    Args:
        mean_scores: ``[B]`` float per-sequence dependency ``S_bar_i``.
        valid: ``[B]`` bool, False for rows to leave unshaped (e.g. no valid token).
        beta_min: ``alpha`` of the least dependent row; ``0 <= beta_min <= 1`` in the code form,
            ``>= 0`` in the paper form.
        beta_max: None (code form) or the ``alpha`` of the most dependent row (``> beta_min``).
        scope: min-max scope: ``"batch"``, ``"group"`` or an int chunk of rows.
        mean_scope: scope of ``mu`` (code form only); None means ``scope``.
        group_ids: ``[B]`` integer group ids, needed when a scope is ``"group"``.
        reducer: cross-rank reducer, or None when this process holds the whole batch.
        mean_eps: None (exact: ``alpha = 1`` where ``mu = 0``) or ``> 0``, added to ``mu`` as the
            released code does (code form only).

    Returns:
        ``[B]`` float32 factors alpha, to multiply the (already normalised) advantages by.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import dependency_scale
        >>> s = torch.tensor([0.0, 2.0, 1.0, 0.5, 9.0])
        >>> valid = torch.tensor([True, True, True, True, False])
        >>> dependency_scale(s, valid)  # n = (0, 1, .5, .25), mu = .4375; the last row is invalid
        tensor([0.9000, 1.1286, 1.0143, 0.9571, 1.0000])
        >>> dependency_scale(s, valid, beta_max=1.1)  # paper form: 0.9 + 0.2 n
        tensor([0.9000, 1.1000, 1.0000, 0.9500, 1.0000])
        >>> dependency_scale(s, valid, scope=4, mean_scope=2, mean_eps=1e-8)  # rows 0-1: mu = .5; 2-3: .375
        tensor([0.9000, 1.1000, 1.0333, 0.9667, 1.0000])
    """
    fn = "dependency_scale"
    mean_scores = check_shape(fn, "mean_scores", mean_scores, "B", [None])
    check_float(fn, "mean_scores", mean_scores)
    B = mean_scores.shape[0]
    valid = check_shape(fn, "valid", valid, "B", [B])
    check_bool(fn, "valid", valid)
    check_scale_form(fn, beta_min, beta_max, mean_scope, mean_eps)
    _check_scope(fn, "scope", scope)
    mean_scope = scope if mean_scope is None else mean_scope
    _check_scope(fn, "mean_scope", mean_scope)
    if "group" in (scope, mean_scope):
        if group_ids is None:
            raise RLCreditError(
                f"{fn}: scope 'group' needs `group_ids` ([B] integer group id of each row); "
                f"pass them or use scope 'batch' or an int chunk size."
            )
        group_ids = check_shape(fn, "group_ids", group_ids, "B", [B])
        check_int(fn, "group_ids", group_ids)
    check_device(fn, [("mean_scores", mean_scores), ("valid", valid), ("group_ids", group_ids)])

    scopes = _Scopes(group_ids, reducer)
    s = torch.where(valid, mean_scores.float(), torch.zeros((), device=mean_scores.device))
    ones = torch.ones_like(s)
    count = scopes.stat(ones, valid, scope, "sum")
    low = scopes.stat(s, valid, scope, "amin")
    span = scopes.stat(s, valid, scope, "amax") - low
    shaped = valid & (count >= 2) & (span > _MIN_RANGE)
    safe_span = torch.where(shaped, span, ones)
    n = torch.where(shaped, ((s - low) / safe_span).clamp(0.0, 1.0), torch.zeros_like(s))
    if beta_max is not None:
        return torch.where(shaped, beta_min + n * (beta_max - beta_min), ones)
    peers = scopes.stat(ones, shaped, mean_scope, "sum")
    mu = scopes.stat(n, shaped, mean_scope, "sum") / peers.clamp_min(1.0)
    if mean_eps is not None:
        # The released expression, op for op (Python scalars meet float32 tensors as there;
        # `scalar / tensor` is `tensor.reciprocal() * scalar` in torch).
        top = (mu + mean_eps).reciprocal() * (1.0 - beta_min) + beta_min
        return torch.where(shaped, n * (top - beta_min) + beta_min, ones)
    shaped = shaped & (mu > 0)
    alpha = beta_min + n * (1.0 - beta_min) / torch.where(shaped, mu, ones)
    return torch.where(shaped, alpha, ones)
