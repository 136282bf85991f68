"""Advantage shapers: trajectory-level (or token-level) advantages, applied as a chain.

The chain's first input is ``rollout.rewards`` ``[B]``; each shaper is called as
``shaper(advantages, scores, rollout, *, reducer=None)`` under ``torch.no_grad()`` and returns
advantages ``[B]`` or ``[B, T]``. GRPO's group normalisation is itself a shaper.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit.errors import RolloutError, SpecError
from rlcredit.functional import Reducer
from rlcredit.functional._shaping import check_scale_form
from rlcredit.functional._finite import length_scale
from rlcredit.registry import register
from rlcredit.requirements import Requirement, Score
from rlcredit.rollout import Rollout
from rlcredit.validators import in_range, is_bool, optional_str, to_number

__all__ = ["AdvantageShaper", "GroupNormalize", "GroupCenter", "LeaveOneOut", "DependencyScale", "BatchNormalize"]


@runtime_checkable
class AdvantageShaper(Protocol):
    """One link of the advantage chain.

    Attributes:
        requires: a tuple of ``rlcredit.requirements`` values (``Score(NAME)`` for scores read).

    Call:
        ``(advantages [B] | [B, T], scores, rollout, *, reducer=None) -> [B] | [B, T]``, with
        ``scores`` the strategy's named ``[B, T]`` scores, 0 on padding (``Strategy`` sets it).

    Examples:
        >>> import attrs, torch, rlcredit
        >>> @attrs.frozen
        ... class Clip:  # bound the advantages
        ...     requires = ()
        ...     def __call__(self, advantages, scores, rollout, *, reducer=None):
        ...         return advantages.clamp(-0.5, 0.5)
        >>> r = rlcredit.Rollout(torch.ones(2, 1, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
        >>> rlcredit.Strategy(shapers=["group_normalize", Clip()]).assign(r).advantages
        tensor([ 0.5000, -0.5000])
    """

    requires: tuple[Requirement, ...]

    def __call__(self, advantages: Tensor, scores: Mapping[str, Tensor], rollout: Rollout, *,
                 reducer: Reducer | None = None) -> Tensor: ...


def _trajectory(advantages: Tensor, who: str) -> Tensor:
    if advantages.ndim != 1:
        raise RolloutError(
            f"{who} works on trajectory advantages [B], got shape {list(advantages.shape)}; "
            f"put it before any token-level shaper in the chain."
        )
    return advantages


@register("shaper", "group_normalize")
@attrs.frozen
class GroupNormalize:
    """GRPO's group-normalised advantage (DeepSeekMath, arXiv 2402.03300).

    ``A_i = (r_i - mean_g r) / (std_g r + eps)`` over the rollouts of the same prompt (same
    ``group_id``). All-equal groups and one-sample groups give ``A_i = 0`` (verl returns ``r_i`` for
    one-sample groups instead).

    Args:
        eps: added to the std (1e-6 as verl; TRL uses 1e-4).
        unbiased: Bessel-corrected std (verl and TRL both use it).

    Returns:
        ``[B]`` float32.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.shapers import GroupNormalize
        >>> r = rlcredit.Rollout(torch.ones(3, 2, dtype=torch.bool), torch.tensor([1.0, 0.0, 0.5]),
        ...                      torch.tensor([0, 0, 1]))
        >>> GroupNormalize()(r.rewards, {}, r)
        tensor([ 0.7071, -0.7071,  0.0000])
    """

    eps: float = attrs.field(default=1e-6, converter=to_number, validator=in_range(0.0))
    unbiased: bool = attrs.field(default=True, validator=is_bool)

    requires = ()

    def __call__(self, advantages: Tensor, scores: Mapping[str, Tensor], rollout: Rollout, *,
                 reducer: Reducer | None = None) -> Tensor:
        adv = _trajectory(advantages, "group_normalize")
        return F.group_normalize(adv, rollout.group_ids, eps=self.eps, unbiased=self.unbiased, reducer=reducer)


@register("shaper", "group_center")
@attrs.frozen
class GroupCenter:
    """Dr. GRPO's centred advantage (arXiv 2503.20783): ``A_i = r_i - mean_g r`` (no std).

    One-sample groups give 0.

    Returns:
        ``[B]`` float32.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.shapers import GroupCenter
        >>> r = rlcredit.Rollout(torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
        >>> GroupCenter()(r.rewards, {}, r)
        tensor([ 0.5000, -0.5000])
    """

    requires = ()

    def __call__(self, advantages: Tensor, scores: Mapping[str, Tensor], rollout: Rollout, *,
                 reducer: Reducer | None = None) -> Tensor:
        return F.group_center(_trajectory(advantages, "group_center"), rollout.group_ids, reducer=reducer)


@register("shaper", "leave_one_out")
@attrs.frozen
class LeaveOneOut:
    """RLOO's leave-one-out baseline (arXiv 2402.14740): ``A_i = r_i - mean_{j != i, g(j) = g(i)} r_j``.

    Equals ``G/(G-1) * (r_i - mean_g r)``; one-sample groups give 0.

    Returns:
        ``[B]`` float32.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.shapers import LeaveOneOut
        >>> r = rlcredit.Rollout(torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
        >>> LeaveOneOut()(r.rewards, {}, r)
        tensor([ 1., -1.])
    """

    requires = ()

    def __call__(self, advantages: Tensor, scores: Mapping[str, Tensor], rollout: Rollout, *,
                 reducer: Reducer | None = None) -> Tensor:
        return F.leave_one_out(_trajectory(advantages, "leave_one_out"), rollout.group_ids, reducer=reducer)


def _shaping_scope(instance: Any, attribute: Any, value: Any) -> None:
    """attrs validator: ``"batch"``, ``"group"`` or an int chunk size >= 1 (None allowed for mean_scope)."""
    if value is None and attribute.name == "mean_scope":
        return
    if value in ("batch", "group"):
        return
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    extra = " or None (the same as scope)" if attribute.name == "mean_scope" else ""
    raise SpecError(
        f"{type(instance).__name__}.{attribute.name} must be 'batch', 'group' or an int >= 1 (a chunk of "
        f"that many consecutive rows){extra}, got {value!r}."
    )


@register("shaper", "dependency_scale")
@attrs.frozen
class DependencyScale:
    """VPPO's Trajectory-level Advantage Shaping (arXiv 2510.09285): ``A_i <- alpha_i * A_i``.

    ``S_bar_i = sum_t S_{i,t} / T_i`` is the mean score of response ``i`` over its valid tokens
    (``S`` is 0 on padding, as every estimator returns it);
    with ``n_i = clamp((S_bar_i - min S_bar) / (max S_bar - min S_bar), 0, 1)`` over ``scope``,
    ``rlcredit.functional.dependency_scale`` gives

    - ``beta_max=None`` (the released code, the ``vppo`` preset), mean-preserving:
      ``alpha_i = beta_min + n_i (1 - beta_min) / mu``, ``mu`` the mean of ``n`` over
      ``mean_scope``; ``alpha >= beta_min``, mean 1 over each mean scope, unbounded above.
    - ``beta_max`` a float (the paper's bounded form, ``vppo_paper``):
      ``alpha_i = beta_min + n_i (beta_max - beta_min)`` in ``[beta_min, beta_max]``.
    - ``mean_eps`` a float (code form only; ``vppo_released``: 1e-8): divide by ``mu + mean_eps``
      in the released code's order of operations, so ``mu = 0`` gives ``alpha = beta_min``
      instead of 1 (see ``rlcredit.functional.dependency_scale``).

    ``alpha = 1`` for responses without valid tokens (left out of the statistics) and for every
    row of a scope with at most one valid response or ``max - min <= 1e-6``. ``alpha >= 0``
    multiplies the already-normalised advantage, so it never changes a sign; put it after
    ``group_normalize``. ``[B, T]`` token advantages are scaled row-wise.

    Args:
        score: name of the dependency score (None: the strategy's single score).
        beta_min: ``alpha`` of the least dependent response; ``[0, 1]`` without ``beta_max``,
            ``>= 0`` with it (VPPO: 0.9).
        beta_max: None (code form) or the ``alpha`` of the most dependent response (``> beta_min``).
        scope: min/max scope: ``"batch"`` (across ranks), ``"group"`` or an int chunk of rows
            (the released code: 128).
        mean_scope: scope of ``mu`` (code form only; None: ``scope``; the released code: 16).
        mean_eps: None (exact division; ``alpha = 1`` where ``mu = 0``) or ``> 0`` (the released
            code: 1e-8); code form only.

    Returns:
        Advantages of the input's shape (``[B]`` or ``[B, T]``), float32.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.shapers import DependencyScale
        >>> r = rlcredit.Rollout(torch.tensor([[True, True], [True, False], [True, True]]),
        ...                      torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 0]))
        >>> s = {"visual": torch.tensor([[0.0, 2.0], [3.0, 0.0], [2.0, 2.0]])}  # S_bar = 1, 3, 2
        >>> DependencyScale()(torch.tensor([1.0, -2.0, 0.5]), s, r)  # alpha = 0.9, 1.1, 1.0
        tensor([ 0.9000, -2.2000,  0.5000])
    """

    score: str | None = attrs.field(default=None, validator=optional_str)
    beta_min: float = attrs.field(default=0.9, converter=to_number, validator=in_range(0.0))
    beta_max: float | None = attrs.field(default=None, converter=to_number,
        validator=attrs.validators.optional(in_range(0.0)))
    scope: str | int = attrs.field(default="batch", converter=to_number, validator=_shaping_scope)
    mean_scope: str | int | None = attrs.field(default=None, converter=to_number, validator=_shaping_scope)
    mean_eps: float | None = attrs.field(default=None, converter=to_number,
                                         validator=attrs.validators.optional(in_range(0.0, lo_open=True)))

    def __attrs_post_init__(self) -> None:
        check_scale_form("DependencyScale", self.beta_min, self.beta_max, self.mean_scope, self.mean_eps)

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return (Score(self.score),)

    def __call__(self, advantages: Tensor, scores: Mapping[str, Tensor], rollout: Rollout, *,
                 reducer: Reducer | None = None) -> Tensor:
        s = Score(self.score).read(scores, "shaper dependency_scale").float()
        # Scores are 0 on padding (every estimator's contract; Strategy zeroes a third-party
        # estimator's padding), so the row sum is the sum over valid tokens: one read of [B, T].
        n = rollout.token_counts
        # Pre-divided by a power of two >= T (exact): row sums of huge scores cannot overflow.
        P = length_scale(s.shape[-1])
        mean = (s / P).sum(-1) / n.clamp_min(1) * P
        alpha = F.dependency_scale(
            mean, n > 0,
            beta_min=self.beta_min, beta_max=self.beta_max, scope=self.scope, mean_scope=self.mean_scope,
            group_ids=rollout.group_ids, reducer=reducer, mean_eps=self.mean_eps,
        )
        if advantages.ndim == 2:
            alpha = alpha[:, None]
        return advantages.float() * alpha


# ------------------------------------------------------------------------------------------------
# Entropy-shaped token advantages (GTPO, arXiv 2508.04349; entropy advantage, arXiv 2506.14758).
# Both read a per-token entropy score and return [B, T] token advantages, 0 on padding.

__all__ += ["GTPO", "EntropyAdvantage"]


def _token_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    adv = advantages.float()
    return torch.where(mask, adv[:, None] if adv.ndim == 1 else adv, torch.zeros((), device=mask.device))


@register("shaper", "gtpo")
@attrs.frozen
class GTPO:
    """GTPO's entropy weighting: tokens above their response's mean entropy get more of its advantage.

    Tan et al. 2025, *GTPO and GRPO-S: Token and Sequence-Level Reward Shaping with Policy
    Entropy* (arXiv 2508.04349), in the multiplicative, mean-preserving form of METHODS.md, with
    ``H_t`` the ``score`` (entropy of the sampling policy, 0 on padding) and ``mean H`` the mean
    over the response's valid tokens::

        A_t = A * (1 + beta * (H_t / mean H - 1))

    The factor averages to 1 over each response, so a response's total credit is unchanged and
    only moves towards its uncertain "decision" tokens. ``beta <= 1`` keeps the factor
    ``1 - beta + beta H_t / mean H >= 0``: a sign never flips. A response whose mean entropy is 0
    (a degenerate, fully confident one) keeps ``A_t = A``. ``[B, T]`` input advantages are
    weighted token by token. Put it after ``group_normalize``.

    Args:
        beta: weighting strength in ``[0, 1]`` (0: plain ``A``). Default 0.1 (our choice, from the
            public ports of this simplified form; the paper's own parameters weight a different,
            additive entropy-ratio reward).
        score: the entropy score's name (default ``"entropy"``).

    Returns:
        ``[B, T]`` float32 token advantages, 0 on padding.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.shapers import GTPO
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, False]]), torch.tensor([1.0]), torch.tensor([0]))
        >>> H = {"entropy": torch.tensor([[0.5, 1.5, 0.0]])}  # mean H = 1
        >>> GTPO(beta=0.5)(torch.tensor([2.0]), H, r)  # 2 * (1 + 0.5 * (0.5 - 1)), 2 * (1 + 0.5 * 0.5)
        tensor([[1.5000, 2.5000, 0.0000]])
    """

    beta: float = attrs.field(default=0.1, converter=to_number, validator=in_range(0.0, 1.0))
    score: str | None = attrs.field(default="entropy", validator=optional_str)

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return (Score(self.score),)

    def __call__(self, advantages: Tensor, scores: Mapping[str, Tensor], rollout: Rollout, *,
                 reducer: Reducer | None = None) -> Tensor:
        mask = rollout.response_mask
        h = torch.where(mask, Score(self.score).read(scores, "shaper gtpo").float(), torch.zeros((), device=mask.device))
        mean = h.sum(-1, keepdim=True) / rollout.token_counts[:, None].clamp_min(1)
        ratio = torch.where(mean > 0, h / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.ones_like(h))
        return _token_advantages(advantages, mask) * (1.0 + self.beta * (ratio - 1.0))


@register("shaper", "entropy_advantage")
@attrs.frozen
class EntropyAdvantage:
    """The entropy-based advantage: a bounded bonus for uncertain tokens (Cheng et al. 2025, arXiv 2506.14758).

    *Reasoning with Exploration: An Entropy Perspective*, Eq. 4-5. With ``H_t`` the ``score``
    (detached entropy of the sampling policy)::

        A_t = A + min(alpha * H_t, |A| / kappa)

    The bonus rewards exploratory (high-entropy) tokens without ever dominating: it is at most
    ``|A| / kappa``, so with ``kappa >= 1`` a negative advantage never turns positive, and a zero
    advantage stays 0. ``[B, T]`` input advantages use their own ``|A_t|``. Put it after
    ``group_normalize``.

    Args:
        alpha: ``>= 0``, scale of the entropy bonus (paper 0.4).
        kappa: ``>= 1``, the bonus is at most ``|A| / kappa`` (paper 2).
        score: the entropy score's name (default ``"entropy"``).

    Returns:
        ``[B, T]`` float32 token advantages, 0 on padding.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.shapers import EntropyAdvantage
        >>> r = rlcredit.Rollout(torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
        >>> H = {"entropy": torch.tensor([[0.5, 5.0], [0.5, 5.0]])}
        >>> EntropyAdvantage()(torch.tensor([1.0, -1.0]), H, r)  # + min(0.4 H, |A| / 2)
        tensor([[ 1.2000,  1.5000],
                [-0.8000, -0.5000]])
    """

    alpha: float = attrs.field(default=0.4, converter=to_number, validator=in_range(0.0))
    kappa: float = attrs.field(default=2.0, converter=to_number, validator=in_range(1.0))
    score: str | None = attrs.field(default="entropy", validator=optional_str)

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return (Score(self.score),)

    def __call__(self, advantages: Tensor, scores: Mapping[str, Tensor], rollout: Rollout, *,
                 reducer: Reducer | None = None) -> Tensor:
        mask = rollout.response_mask
        h = Score(self.score).read(scores, "shaper entropy_advantage").detach().float()
        adv = _token_advantages(advantages, mask)
        bonus = torch.minimum(self.alpha * h, adv.abs() / self.kappa)
        return torch.where(mask, adv + bonus, torch.zeros((), device=mask.device))


@register("shaper", "batch_normalize")
@attrs.frozen
class BatchNormalize:
    """Batch standardisation: ``A_i = (A_i - mean_b A) / (std_b A + eps)``, over every rank's rows.

    ``rlcredit.functional.batch_normalize`` on the chain's trajectory advantages ``[B]``, with the
    batch statistics spanning all ranks through the ``reducer``. ``center=False`` only divides by
    the batch std. Two uses (TRL 1.16):

    - ``[batch_normalize(center=False, eps=1e-4), group_center]`` is TRL's
      ``scale_rewards="batch"``: ``(r_i - mean_g r) / (std_b r + 1e-4)`` (arXiv 2508.08221).
    - ``[leave_one_out, batch_normalize(eps=1e-4)]`` is ``RLOOTrainer`` with
      ``normalize_advantages=True``.

    Args:
        center: subtract the batch mean (True) or only divide by the batch std (False).
        eps: ``>= 0`` added to the std (TRL: 1e-4).
        unbiased: Bessel-corrected std (TRL uses it).

    Returns:
        ``[B]`` float32.

    Examples:
        >>> import torch, rlcredit
        >>> r = rlcredit.Rollout(torch.ones(4, 1, dtype=torch.bool), torch.tensor([1.0, 0.0, 1.0, 1.0]),
        ...                      torch.tensor([0, 0, 1, 1]))
        >>> s = rlcredit.Strategy(shapers=[{"name": "batch_normalize", "center": False, "eps": 1e-4}, "group_center"])
        >>> s.assign(r).advantages  # (r - group mean) / (batch std 0.5 + 1e-4): TRL's scale_rewards="batch"
        tensor([ 0.9998, -0.9998,  0.0000,  0.0000])
    """

    center: bool = attrs.field(default=True, validator=is_bool)
    eps: float = attrs.field(default=1e-6, converter=to_number, validator=in_range(0.0))
    unbiased: bool = attrs.field(default=True, validator=is_bool)

    requires = ()

    def __call__(self, advantages: Tensor, scores: Mapping[str, Tensor], rollout: Rollout, *,
                 reducer: Reducer | None = None) -> Tensor:
        adv = _trajectory(advantages, "batch_normalize")
        return F.batch_normalize(adv, center=self.center, eps=self.eps, unbiased=self.unbiased, reducer=reducer)
