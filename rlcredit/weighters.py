"""Token weighters: named scores ``[B, T]`` to per-token weights or masks ``[B, T]``.

A weighter is called once per rollout batch, under ``torch.no_grad()``, as
``weighter(scores, rollout, *, reducer=None)``. It returns float weights ``>= 0`` with exactly 0 on
padding. Weights are folded into the loss exactly: for ``w >= 0``,
``-min(rho A w, clip(rho) A w) = w * (-min(rho A, clip(rho) A))``.

Built-ins: ``uniform``; selection by a score: ``top_fraction`` (per sequence, group or batch),
``threshold``, ``soft`` (a smooth monotone map), ``stapo`` (STAPO's spurious-token filter); and the
combinators ``intersect`` (product), ``union`` (maximum) and ``complement`` (the valid tokens its
part leaves at 0), which nest in specs. AT-RL's ``anchor_clusters`` lives in ``rlcredit_mm``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit._outputs import per_token
from rlcredit.errors import RolloutError, SpecError
from rlcredit.functional import Reducer
from rlcredit.functional._select import COUNTS
from rlcredit.functional._finite import pow2_scale
from rlcredit.functional._stapo import spurious_token_mask
from rlcredit.registry import register
from rlcredit.requirements import Field, Requirement, Score, requirements_of
from rlcredit.rollout import Rollout
from rlcredit.validators import in_range, is_bool, one_of, optional_str, to_component, to_components, to_number

__all__ = ["TokenWeighter", "Uniform", "TopFraction", "Threshold", "SoftWeight", "Intersect", "Union",
           "Complement", "Stapo"]


@runtime_checkable
class TokenWeighter(Protocol):
    """Scores to per-token weights.

    Attributes:
        requires: a tuple of ``rlcredit.requirements`` values: ``Score(NAME)`` for each score read
            (``Score(None)``: the strategy's single score; checked by ``Strategy`` at construction),
            plus any rollout field or signal it reads (``Field("old_logprobs")``...).

    Call:
        ``(scores: Mapping[str, Tensor [B, T]], rollout, *, reducer=None) -> Tensor [B, T]``,
        float >= 0, 0 on padding.

    Examples:
        >>> import attrs, torch, rlcredit
        >>> from rlcredit.requirements import Score
        >>> @attrs.frozen
        ... class Squared:  # weight = score ** 2 on the strategy's single score
        ...     requires = (Score(None),)
        ...     def __call__(self, scores, rollout, *, reducer=None):
        ...         return Score(None).read(scores, "weighter Squared") ** 2
        >>> r = rlcredit.Rollout(torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0]), torch.tensor([0]),
        ...                      signals={"h": torch.tensor([[0.5, 2.0]])})
        >>> rlcredit.Strategy(estimators={"h": {"name": "signal", "key": "h"}}, weighter=Squared()).assign(r).token_weights
        tensor([[0.2500, 4.0000]])
    """

    requires: tuple[Requirement, ...]

    def __call__(self, scores: Mapping[str, Tensor], rollout: Rollout, *, reducer: Reducer | None = None) -> Tensor: ...


@register("weighter", "uniform")
@attrs.frozen
class Uniform:
    """Weight 1 on every valid token (GRPO): ``w_t = 1`` on valid tokens, 0 on padding.

    Returns:
        ``[B, T]`` float32.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.weighters import Uniform
        >>> r = rlcredit.Rollout(torch.tensor([[True, False]]), torch.tensor([1.0]), torch.tensor([0]))
        >>> Uniform()({}, r)
        tensor([[1., 0.]])
    """

    requires = ()

    def __call__(self, scores: Mapping[str, Tensor], rollout: Rollout, *, reducer: Reducer | None = None) -> Tensor:
        return rollout.float_mask


# --- helpers ----------------------------------------------------------------------------------


def _non_empty(instance: Any, attribute: Any, value: tuple) -> None:
    if len(value) == 0:
        raise SpecError(
            f"{type(instance).__name__}.{attribute.name} must hold at least one weighter "
            f"(a name, a {{'name': ...}} spec or an object), got an empty list."
        )



class _NAry:
    """The shared shape of ``intersect`` and ``union``: ``Op(a, b)``, ``Op([a, b])`` or ``Op(parts=[a, b])``,
    ``requires`` the union of the parts', and a left fold of ``_combine`` over the parts' weights."""

    parts: tuple

    def __init__(self, *parts: Any, **kwargs: Any) -> None:
        given = kwargs.pop("parts", None)
        if kwargs:
            raise SpecError(f"{type(self).__name__} takes only parts; got {', '.join(kwargs)}.")
        if parts and given is not None:
            raise SpecError(f"{type(self).__name__}: give the parts positionally or as parts=[...], not both.")
        if given is None:
            given = parts[0] if len(parts) == 1 and isinstance(parts[0], (list, tuple)) else parts
        self.__attrs_init__(given)

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return _requires_union(self.parts)

    def __call__(self, scores: Mapping[str, Tensor], rollout: Rollout, *, reducer: Reducer | None = None) -> Tensor:
        who = type(self).__name__.lower()
        out = _part_weights(self.parts[0], scores, rollout, reducer, who)
        for part in self.parts[1:]:
            out = self._combine(out, _part_weights(part, scores, rollout, reducer, who))
        return out

def _requires_union(parts: tuple) -> tuple[Requirement, ...]:
    """The parts' requirements, each once, in order of first appearance."""
    return tuple(dict.fromkeys(req for part in parts for req in requirements_of(part)))


def _part_weights(part: Any, scores: Mapping[str, Tensor], rollout: Rollout, reducer: Reducer | None,
                  who: str) -> Tensor:
    """A nested weighter's ``[B, T]`` output as float32 with exact zeros on padding (shape-checked)."""
    return per_token(part(scores, rollout, reducer=reducer), rollout.response_mask, f"{who} part {type(part).__name__}")


# --- selection by score -----------------------------------------------------------------------


@register("weighter", "top_fraction")
@attrs.frozen
class TopFraction:
    """Keep the highest-scoring ``fraction`` of the valid tokens of each sequence, group or batch.

    A thin class over ``rlcredit.functional.top_fraction_mask``; weights are 0/1.

    - ``scope="sequence"``: VPPO's Token-level Gradient Filtering (arXiv 2510.09285) keeps exactly
      ``k_i = ceil(fraction * T_i)`` tokens of each response (exact rational ceil; at least one when
      ``T_i >= 1``), ties to the earlier token. ``count="float32"`` rounds as VPPO's released code
      does, ``k_i = ceil(float32(T_i) * float32(fraction))``: the same for 0.4, one more token
      for some other fractions (0.6 of 25 tokens: 16).
    - ``scope="group"``: the same over all valid tokens of each prompt's group
      (``ceil(fraction * n_g)``), ties to the earlier row, then the earlier token.
    - ``scope="batch"``: the 80/20 rule ("Beyond the 80/20 rule", arXiv 2506.01939) exactly as
      TRL's ``top_entropy_quantile``: ``tau = torch.quantile(valid scores, 1 - fraction)``
      (linear interpolation, over all ranks with a reducer), keep ``score >= tau``.

    ``w_{i,t} = 1[token (i, t) is kept]``; 0 on padding.

    Args:
        fraction: share of tokens to keep, in ``(0, 1]`` (``1.0`` keeps every valid token).
        scope: ``"sequence"``, ``"group"`` or ``"batch"``.
        score: name of the score to rank by (None: the strategy's single score).
        count: ``"exact"`` (rational ceil) or ``"float32"`` (VPPO's released rounding); only with
            ``scope="sequence"``.

    Returns:
        ``[B, T]`` float32 weights in ``{0, 1}``.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.weighters import TopFraction
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, True, False]]), torch.tensor([1.0]), torch.tensor([0]))
        >>> TopFraction(0.4)({"visual": torch.tensor([[0.5, 2.0, 1.0, 0.0]])}, r)  # ceil(0.4 * 3) = 2
        tensor([[0., 1., 1., 0.]])
        >>> TopFraction(0.4, count="float32")({"visual": torch.tensor([[0.5, 2.0, 1.0, 0.0]])}, r)
        tensor([[0., 1., 1., 0.]])
    """

    fraction: float = attrs.field(converter=to_number, validator=in_range(0.0, 1.0, lo_open=True))
    scope: str = attrs.field(default="sequence", validator=one_of(*F.SCOPES))
    score: str | None = attrs.field(default=None, validator=optional_str)
    count: str = attrs.field(default="exact", validator=one_of(*COUNTS))

    def __attrs_post_init__(self) -> None:
        if self.count != "exact" and self.scope != "sequence":
            raise SpecError(
                f"TopFraction.count={self.count!r} is the sequence scope's rounding rule (VPPO's released code); "
                f"scope {self.scope!r} has its own. Use count='exact', or scope='sequence'."
            )

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return (Score(self.score),)

    def __call__(self, scores: Mapping[str, Tensor], rollout: Rollout, *, reducer: Reducer | None = None) -> Tensor:
        s = Score(self.score).read(scores, "weighter top_fraction")
        keep = F.top_fraction_mask(s, rollout.response_mask, self.fraction, self.scope,
                                   group_ids=rollout.group_ids, reducer=reducer, count=self.count)
        return keep.float()


@register("weighter", "threshold")
@attrs.frozen
class Threshold:
    """Keep the tokens whose score reaches a fixed value: ``w_{i,t} = 1[S_{i,t} >= value]``.

    A fixed cut, for scores with a meaningful scale (a KL in nats, an entropy, a probability);
    use ``TopFraction`` for a cut relative to the batch. 0 on padding.

    Args:
        value: the threshold, a finite number (tokens with ``score >= value`` are kept).
        score: name of the score to read (None: the strategy's single score).

    Returns:
        ``[B, T]`` float32 weights in ``{0, 1}``.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.weighters import Threshold
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, False]]), torch.tensor([1.0]), torch.tensor([0]))
        >>> Threshold(0.5)({"entropy": torch.tensor([[0.5, 0.2, 0.9]])}, r)
        tensor([[1., 0., 0.]])
    """

    value: float = attrs.field(converter=to_number, validator=in_range())
    score: str | None = attrs.field(default=None, validator=optional_str)

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return (Score(self.score),)

    def __call__(self, scores: Mapping[str, Tensor], rollout: Rollout, *, reducer: Reducer | None = None) -> Tensor:
        s = Score(self.score).read(scores, "weighter threshold")
        return (rollout.response_mask & (s.float() >= self.value)).float()


@register("weighter", "soft")
@attrs.frozen
class SoftWeight:
    """Soft credit: a smooth, monotone map from scores to weights, so every token keeps some credit.

    Scores are standardised within each response, then squashed (our design; a soft alternative
    to VPPO's hard Token-level Gradient Filtering, arXiv 2510.09285)::

        z_{i,t} = (S_{i,t} - mean_i S) / (std_i S + 1e-6)    (mean, population std over valid tokens)
        w_{i,t} = sigmoid(z_{i,t} / temperature)              in (0, 1)
        w_{i,t} <- w_{i,t} * T_i / sum_t w_{i,t}              (normalize=True: mean one per response)

    Within a response a higher score never gets a lower weight; the map is invariant to a positive
    rescaling and a shift of the score, so it needs no knowledge of the score's units. A response
    whose valid tokens all score the same gets ``0.5`` everywhere (1 with ``normalize``). With
    ``normalize=True`` the weights of each response sum to its number of valid tokens ``T_i``, so
    the loss scale matches GRPO's while credit moves toward the high-scoring tokens. Lower
    ``temperature`` sharpens toward a hard cut at the response's mean score. 0 on padding.

    Args:
        temperature: ``> 0``; the sigmoid's width in standard deviations.
        normalize: rescale each response's weights to mean one over its valid tokens.
        score: name of the score to read (None: the strategy's single score).

    Returns:
        ``[B, T]`` float32 weights ``> 0`` on valid tokens.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.weighters import SoftWeight
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, False]]), torch.tensor([1.0]), torch.tensor([0]))
        >>> s = {"visual": torch.tensor([[3.0, 1.0, 0.0]])}
        >>> SoftWeight()(s, r)  # z = (+1, -1)
        tensor([[0.7311, 0.2689, 0.0000]])
        >>> SoftWeight(normalize=True)(s, r)  # each response's weights sum to T_i = 2
        tensor([[1.4621, 0.5379, 0.0000]])
    """

    temperature: float = attrs.field(default=1.0, converter=to_number, validator=in_range(0.0, lo_open=True))
    normalize: bool = attrs.field(default=False, validator=is_bool)
    score: str | None = attrs.field(default=None, validator=optional_str)

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return (Score(self.score),)

    def __call__(self, scores: Mapping[str, Tensor], rollout: Rollout, *, reducer: Reducer | None = None) -> Tensor:
        mask = rollout.response_mask
        zero = torch.zeros((), device=mask.device)
        s = torch.where(mask, Score(self.score).read(scores, "weighter soft").float(), zero)
        # Each row divided by a power of two near its largest |score| (exact, so z is unchanged to
        # the last bit): neither the row sum nor the squares can overflow for scores up to 3.4e38.
        scale = pow2_scale(s.abs().amax(-1, keepdim=True)) if s.numel() else torch.ones_like(s[:, :1])
        s = s / scale
        n = mask.sum(-1, keepdim=True).clamp_min(1).float()
        mean = s.sum(-1, keepdim=True) / n
        dev = torch.where(mask, s - mean, zero)
        std = (dev.square().sum(-1, keepdim=True) / n).sqrt()
        w = torch.where(mask, torch.sigmoid(dev / (std + 1e-6 / scale) / self.temperature), zero)
        if self.normalize:
            total = w.sum(-1, keepdim=True)
            # sigmoid > 0, so a response with a valid token has total > 0; the guard is for T_i = 0.
            w = w * n / torch.where(total > 0, total, torch.ones_like(total))
        return w


# --- combinators ------------------------------------------------------------------------------


@register("weighter", "intersect")
@attrs.frozen(init=False)
class Intersect(_NAry):
    """Tokens kept by every part: the product of the parts' weights, ``w = prod_p w^p``.

    On 0/1 masks this is the set intersection; on soft weights each part scales the others (for
    weights in ``[0, 1]``, ``intersect <= every part``). Parts are weighters, given as objects,
    registered names or spec dicts, and nest: ``{"name": "intersect", "parts": [...]}``.

    Args:
        parts: one or more weighters.

    Returns:
        ``[B, T]`` float32 weights, 0 on padding.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.weighters import Intersect
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, True, True]]), torch.tensor([1.0]), torch.tensor([0]))
        >>> s = {"visual": torch.tensor([[4.0, 3.0, 2.0, 1.0]]), "entropy": torch.tensor([[0.0, 1.0, 1.0, 0.0]])}
        >>> w = Intersect([{"name": "top_fraction", "fraction": 0.5, "score": "visual"},
        ...                {"name": "threshold", "value": 0.5, "score": "entropy"}])
        >>> w(s, r)
        tensor([[0., 1., 0., 0.]])
    """

    parts: tuple = attrs.field(converter=to_components("weighter"), validator=_non_empty)

    def _combine(self, a: Tensor, b: Tensor) -> Tensor:
        return a * b


@register("weighter", "union")
@attrs.frozen(init=False)
class Union(_NAry):
    """Tokens kept by any part: the elementwise maximum of the parts' weights, ``w = max_p w^p``.

    On 0/1 masks this is the set union; on soft weights each token gets its largest weight, so
    ``union >= every part``. Parts nest like ``Intersect``'s.

    Args:
        parts: one or more weighters.

    Returns:
        ``[B, T]`` float32 weights, 0 on padding.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.weighters import Union
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, True, True]]), torch.tensor([1.0]), torch.tensor([0]))
        >>> s = {"visual": torch.tensor([[4.0, 3.0, 2.0, 1.0]]), "entropy": torch.tensor([[0.0, 1.0, 1.0, 0.0]])}
        >>> w = Union([{"name": "top_fraction", "fraction": 0.25, "score": "visual"},
        ...            {"name": "threshold", "value": 0.5, "score": "entropy"}])
        >>> w(s, r)
        tensor([[1., 1., 1., 0.]])
    """

    parts: tuple = attrs.field(converter=to_components("weighter"), validator=_non_empty)

    def _combine(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.maximum(a, b)


@register("weighter", "complement")
@attrs.frozen
class Complement:
    """The valid tokens its part leaves out: ``w_{i,t} = 1[valid and w^part_{i,t} == 0]`` (binary).

    ``complement(part)`` and the support of ``part`` partition the valid tokens, whatever the
    part's weight values; e.g. the AT-RL ablation "train only the non-anchor tokens", or "every
    token except the top 20 % by entropy".

    Args:
        part: a weighter (object, registered name or spec dict).

    Returns:
        ``[B, T]`` float32 weights in ``{0, 1}``.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.weighters import Complement
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, True, False]]), torch.tensor([1.0]), torch.tensor([0]))
        >>> w = Complement({"name": "threshold", "value": 0.5})
        >>> w({"entropy": torch.tensor([[0.9, 0.1, 0.7, 0.0]])}, r)
        tensor([[0., 1., 0., 0.]])
    """

    part: Any = attrs.field(converter=to_component("weighter"))

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return _requires_union((self.part,))

    def __call__(self, scores: Mapping[str, Tensor], rollout: Rollout, *, reducer: Reducer | None = None) -> Tensor:
        w = _part_weights(self.part, scores, rollout, reducer, "complement")
        return (rollout.response_mask & (w == 0)).float()


# --- STAPO ------------------------------------------------------------------------------------


@register("weighter", "stapo")
@attrs.frozen
class Stapo:
    """STAPO's spurious-token filter (Liu et al. 2026, arXiv 2602.15620): weight 0 on spurious tokens.

    A token is spurious when all three hold::

        A_i > 0  and  pi_old(y_{i,t}) < prob_threshold  and  H_{i,t} < tau
        tau = torch.quantile({H_{j,s} : pi_old(y_{j,s}) < prob_threshold, A_j > 0}, entropy_quantile)

    every other valid token gets weight 1. Inputs and our reading of the rule:

    - ``pi_old(y_t) = exp(rollout.old_logprobs)``, the probability under the policy that sampled
      (required: ``old_logprobs``).
    - ``H_t`` is the score named ``score`` (an ``entropy`` estimator: ``signals["entropy"]`` or the
      policy).
    - ``A_i > 0`` is read from the rewards, ``r_i > mean of r over the group`` — the sign of every
      built-in group advantage (``group_normalize``, ``group_center``, ``leave_one_out``); weighters
      run before the shaper chain, so the chain's output is not available. All-equal and one-sample
      groups have ``A_i = 0`` and are never masked.
    - "Correct responses", whose low-probability tokens define ``tau``, are the same ``A_i > 0``
      rows: with 0/1 rewards these are the correct responses of the groups that have both
      outcomes (correct responses of all-correct groups carry no advantage and are left out).
    - ``tau`` is the linear-interpolation quantile over the whole batch (across ranks with a
      reducer). Without any candidate token nothing is masked.

    Use it with ``clipped_surrogate(renormalize=True)`` (the ``stapo`` preset) to divide by the
    kept tokens, as the paper does.

    Args:
        prob_threshold: probability below which a token is "low-probability", in ``(0, 1]``
            (paper: 0.002).
        entropy_quantile: quantile of the candidates' entropy below which a token is
            "low-entropy", in ``[0, 1]`` (paper: 0.75).
        score: name of the entropy score (None: the strategy's single score).

    Returns:
        ``[B, T]`` float32 weights in ``{0, 1}``.

    Examples:
        >>> import math, torch, rlcredit
        >>> from rlcredit.weighters import Stapo
        >>> r = rlcredit.Rollout(torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]),
        ...                      old_logprobs=torch.tensor([[math.log(1e-3), math.log(1e-4), -0.1]] * 2))
        >>> H = torch.tensor([[0.1, 2.0, 0.5]] * 2)  # tau = quantile([0.1, 2.0], 0.75) = 1.525
        >>> Stapo(score="entropy")({"entropy": H}, r)  # only row 0 has A > 0
        tensor([[0., 1., 1.],
                [1., 1., 1.]])
    """

    prob_threshold: float = attrs.field(default=0.002, converter=to_number, validator=in_range(0.0, 1.0, lo_open=True))
    entropy_quantile: float = attrs.field(default=0.75, converter=to_number, validator=in_range(0.0, 1.0))
    score: str | None = attrs.field(default=None, validator=optional_str)

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return (Field("old_logprobs"), Score(self.score))

    def __call__(self, scores: Mapping[str, Tensor], rollout: Rollout, *, reducer: Reducer | None = None) -> Tensor:
        if rollout.old_logprobs is None:
            raise RolloutError(
                "weighter stapo needs rollout.old_logprobs (pi_old(y_t) = exp(old_logprobs)); pass them."
            )
        entropy = Score(self.score).read(scores, "weighter stapo")
        positive = F.group_center(rollout.rewards, rollout.group_ids, reducer=reducer) > 0
        spurious = spurious_token_mask(
            entropy, rollout.old_logprobs, positive, rollout.response_mask,
            prob_threshold=self.prob_threshold, entropy_quantile=self.entropy_quantile, reducer=reducer,
        )
        return (rollout.response_mask & ~spurious).float()
