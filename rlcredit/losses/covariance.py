"""KL-Cov and Clip-Cov: restrain the few tokens whose advantage and log-prob covary most (arXiv 2505.22617)."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit.errors import SpecError
from rlcredit.functional import AGGREGATIONS, Reducer, Totals
from rlcredit.functional._reduce import all_sum, world_size
from rlcredit.losses._common import (
    LOG_RATIO_BOUND,
    TokenInputs,
    batch_mean,
    batch_top_k,
    coefficients,
    loss_totals,
    token_inputs,
)
from rlcredit.registry import register
from rlcredit.rollout import Credit, LazyMetrics, LossOutput, Rollout
from rlcredit.validators import in_range, int_at_least, one_of, to_number

__all__ = ["KLCov", "ClipCov", "token_covariance"]


def token_covariance(x: TokenInputs, reducer: Reducer | None) -> Tensor:
    """``cov_t = (A_t - mean A) * (logp_t - mean logp)`` over the valid tokens of the batch (detached).

    The means run over every valid token of the rows at hand and, with a reducer, of every rank
    (a micro-batch in gradient accumulation, as verl computes it); padding gets 0.
    """
    lp = x.logprobs.detach()
    cov = (x.advantages - batch_mean(x.advantages, x.mask, reducer)) * (lp - batch_mean(lp, x.mask, reducer))
    return torch.where(x.mask, cov, torch.zeros((), device=cov.device))


def _count(ratio: float, mask: Tensor, reducer: Reducer | None) -> Tensor:
    """``max(1, floor(ratio * N))`` with ``N`` the valid tokens across ranks, as verl's ``int(ratio * N)``."""
    n = all_sum(mask.sum().reshape(1), reducer).reshape(())
    return torch.floor(n.double() * ratio).long().clamp_min(1)


def _metrics(loss: Tensor, mask: Tensor, weights: Tensor, **fractions: Any) -> LazyMetrics:
    n = mask.sum().clamp_min(1).float()
    thunks: dict[str, Any] = {"pg_loss": loss.detach(), "kept_fraction": lambda: ((weights > 0) & mask).sum() / n}
    for name, hit in fractions.items():
        thunks[name] = lambda hit=hit: (hit & mask).sum() / n
    return LazyMetrics(thunks)


@register("loss", "kl_cov")
@attrs.frozen
class KLCov:
    """KL-Cov: a KL penalty on the tokens of largest advantage-log-prob covariance (Cui et al. 2025).

    *The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models*
    (arXiv 2505.22617, Eq. 11); verl's ``loss_mode=kl_cov``. With ``rho = exp(clamp(logp -
    logp_old, -20, 20))`` and ``cov_t = (A_t - mean A)(logp_t - mean sg(logp))`` over the ``N``
    valid tokens of the batch (across ranks with a reducer)::

        K    = the max(1, floor(kl_cov_ratio * N)) valid tokens with the largest cov
        l_t  = -A_t rho_t + ppo_kl_coef * |logp_t - logp_old_t|     for t in K
        l_t  = -A_t rho_t                                           otherwise (no clipping)
        loss = agg(w * l)                    (w: token weights, exactly as clipped_surrogate)

    Ties in ``cov`` go to the earlier token (rank-major across ranks, then row, then token).
    The covariance and ``N`` are those of the rows this loss is called on: with micro-batches
    (``totals=``) each micro-batch selects its own tokens, as verl does. **Token weights** ``w``
    enter as ``c_t = w_t * scale`` (``rlcredit.functional.loss_coefficients``): each token's
    loss times its weight; the covariance and the selection use every valid token, whatever its
    weight. (verl's ``kl_cov`` with rlcredit's folded ``w * A`` advantages computes the
    covariance from ``w * A`` instead: equal for uniform weights.) ``ppo_kl_coef = 1.0`` is the
    paper's and verl's function default (verl's config default is 0.1).

    Shapes:
        ``logprobs [B, T]`` (current policy, with grad), ``rollout.old_logprobs [B, T]``,
        ``credit.advantages [B]`` or ``[B, T]``, ``credit.token_weights [B, T]``; a scalar loss.

    Args:
        kl_cov_ratio: share of valid tokens penalised, in ``(0, 1]`` (paper 2e-4).
        ppo_kl_coef: coefficient ``>= 0`` of ``|logp - logp_old|`` on them.
        aggregation: one of the four aggregations (default ``token_mean``).

    Returns:
        ``LossOutput(loss, metrics)`` with ``pg_loss``, ``kl_cov_fraction`` (share of valid
        tokens penalised) and ``kept_fraction``, detached.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.losses import KLCov
        >>> r = rlcredit.Rollout(torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]),
        ...                      old_logprobs=torch.full((2, 2), -1.0))
        >>> credit = rlcredit.Credit({}, torch.ones(2, 2), torch.tensor([1.0, -1.0]))
        >>> logp = torch.tensor([[-0.5, -1.0], [-1.0, -2.0]], requires_grad=True)
        >>> out = KLCov(kl_cov_ratio=0.25)(logp, r, credit)  # cov = (.625, .125, -.125, .875): (1, 1) pays |-1|
        >>> round(out.loss.item(), 4)  # (-e^0.5 - 1 + 1 + e^-1 + 1) / 4
        -0.0702
    """

    kl_cov_ratio: float = attrs.field(default=2e-4, converter=to_number, validator=in_range(0.0, 1.0, lo_open=True))
    ppo_kl_coef: float = attrs.field(default=1.0, converter=to_number, validator=in_range(0.0))
    aggregation: str = attrs.field(default="token_mean", validator=one_of(*AGGREGATIONS))

    requires = ()

    def totals(self, rollout: Rollout, credit: Credit, *, reducer: Reducer | None = None) -> Totals:
        """The batch statistics this loss divides by (pass them as ``totals=`` to each micro-batch's loss)."""
        return loss_totals(rollout, credit, mode=self.aggregation, reducer=reducer)

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None, totals: Totals | None = None) -> LossOutput:
        x = token_inputs(logprobs, rollout, credit, "KLCov")
        with torch.no_grad():
            cov = token_covariance(x, reducer)
            top = batch_top_k(cov, x.mask, _count(self.kl_cov_ratio, x.mask, reducer), reducer)
        ratio = (x.logprobs - x.old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
        per_token = -x.advantages * ratio + torch.where(top, self.ppo_kl_coef * (x.logprobs - x.old).abs(), 0.0)
        coef = coefficients(rollout, credit, mode=self.aggregation, reducer=reducer, totals=totals)
        loss = (coef * per_token).sum()
        return LossOutput(loss=loss, metrics=_metrics(loss, x.mask, credit.token_weights, kl_cov_fraction=top))


def _seed(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None:
        int_at_least(0)(instance, attribute, value)


@register("loss", "clip_cov")
@attrs.frozen
class ClipCov:
    """Clip-Cov: PPO's clipped loss with the gradient of a few high-covariance tokens cut (Cui et al. 2025).

    *The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models*
    (arXiv 2505.22617, Eq. 10); verl's ``loss_mode=clip_cov``. With ``rho = exp(clamp(logp -
    logp_old, -20, 20))``, ``l_t = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)`` (PPO,
    no dual clip) and ``cov_t = (A_t - mean A)(logp_t - mean sg(logp))`` over the ``N`` valid
    tokens of the batch (across ranks)::

        C    = valid tokens not clipped by PPO with clip_cov_lb < cov_t < clip_cov_ub
        D    = min(max(1, floor(clip_cov_ratio * N)), |C|) tokens drawn uniformly from C
        l_t  = 0 for t in D (no gradient), PPO's l_t otherwise
        loss = agg(w * l)                    (w: token weights, exactly as clipped_surrogate)

    The draw gives each candidate a uniform key and keeps the ``|D|`` smallest, across ranks:
    ``seed=None`` draws the keys from torch's global generator (fresh every call, reproducible
    under ``torch.manual_seed``, like verl's ``torch.randperm``); an int seeds a fresh
    ``torch.Generator`` (offset by the rank) at every call, so the draw is a pure function of the
    seed and the batch's shape. The covariance and ``N`` are those of the rows this loss is
    called on (a micro-batch under ``totals=``, as in verl). **Token weights** ``w`` enter as
    ``c_t = w_t * scale`` (``rlcredit.functional.loss_coefficients``): each token's loss times
    its weight; candidates and the covariance use every valid token, whatever its weight.

    Shapes:
        ``logprobs [B, T]`` (current policy, with grad), ``rollout.old_logprobs [B, T]``,
        ``credit.advantages [B]`` or ``[B, T]``, ``credit.token_weights [B, T]``; a scalar loss.

    Args:
        clip_cov_ratio: share of valid tokens to cut, in ``(0, 1]`` (paper 2e-4).
        clip_cov_lb, clip_cov_ub: the covariance window ``(lb, ub)``, ``lb < ub`` (1, 5).
        clip_low, clip_high: PPO's clip range ``[1 - clip_low, 1 + clip_high]`` (0.2, 0.2).
        aggregation: one of the four aggregations (default ``token_mean``).
        seed: None (torch's global generator) or an int >= 0.

    Returns:
        ``LossOutput(loss, metrics)`` with ``pg_loss``, ``clip_fraction`` (PPO-clipped share),
        ``cov_clip_fraction`` (share of valid tokens cut) and ``kept_fraction``, detached.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.losses import ClipCov
        >>> r = rlcredit.Rollout(torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]),
        ...                      old_logprobs=torch.zeros(2, 2))
        >>> credit = rlcredit.Credit({}, torch.ones(2, 2), torch.tensor([2.0, -2.0]))
        >>> logp = torch.tensor([[0.0, -3.0], [-3.0, 0.0]], requires_grad=True)  # cov = (3, -3, 3, -3)
        >>> out = ClipCov(clip_cov_ratio=0.5, clip_low=0.99, seed=0)(logp, r, credit)
        >>> out.metrics["cov_clip_fraction"].item()  # both candidates cut: floor(0.5 * 4) = 2
        0.5
        >>> out.loss.backward(); logp.grad  # the cut tokens (0, 0) and (1, 0) get no gradient; -A rho / 4 elsewhere
        tensor([[-0.0000, -0.0249],
                [ 0.0000,  0.5000]])
    """

    clip_cov_ratio: float = attrs.field(default=2e-4, converter=to_number, validator=in_range(0.0, 1.0, lo_open=True))
    clip_cov_lb: float = attrs.field(default=1.0, converter=to_number, validator=in_range())
    clip_cov_ub: float = attrs.field(default=5.0, converter=to_number, validator=in_range())
    clip_low: float = attrs.field(default=0.2, converter=to_number, validator=in_range(0.0, 1.0, hi_open=True))
    clip_high: float = attrs.field(default=0.2, converter=to_number, validator=in_range(0.0))
    aggregation: str = attrs.field(default="token_mean", validator=one_of(*AGGREGATIONS))
    seed: int | None = attrs.field(default=None, converter=to_number, validator=_seed)

    requires = ()

    def __attrs_post_init__(self) -> None:
        if not self.clip_cov_lb < self.clip_cov_ub:
            raise SpecError(f"ClipCov: the covariance window needs clip_cov_lb < clip_cov_ub, got "
                            f"({self.clip_cov_lb!r}, {self.clip_cov_ub!r}).")

    def totals(self, rollout: Rollout, credit: Credit, *, reducer: Reducer | None = None) -> Totals:
        """The batch statistics this loss divides by (pass them as ``totals=`` to each micro-batch's loss)."""
        return loss_totals(rollout, credit, mode=self.aggregation, reducer=reducer)

    def _keys(self, like: Tensor, reducer: Reducer | None) -> Tensor:
        if self.seed is None:
            return torch.rand(like.shape, device=like.device)
        rank = int(getattr(reducer, "rank", 0) or 0) if world_size(reducer) > 1 else 0
        generator = torch.Generator(device=like.device)
        generator.manual_seed((self.seed * 1_000_003 + rank) % 2**63)
        return torch.rand(like.shape, generator=generator, device=like.device)

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None, totals: Totals | None = None) -> LossOutput:
        x = token_inputs(logprobs, rollout, credit, "ClipCov")
        ratio = (x.logprobs - x.old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
        unclipped = -x.advantages * ratio
        clipped = -x.advantages * ratio.clamp(1.0 - self.clip_low, 1.0 + self.clip_high)
        is_clipped = (clipped > unclipped) & x.mask
        with torch.no_grad():
            cov = token_covariance(x, reducer)
            candidates = x.mask & ~is_clipped & (cov > self.clip_cov_lb) & (cov < self.clip_cov_ub)
            cut = batch_top_k(-self._keys(cov, reducer), candidates, _count(self.clip_cov_ratio, x.mask, reducer),
                              reducer)
        # Pick the branch explicitly: a clipped token's gradient is exactly 0, a cut token's too.
        per_token = torch.where(cut, 0.0, torch.where(is_clipped, clipped, unclipped))
        coef = coefficients(rollout, credit, mode=self.aggregation, reducer=reducer, totals=totals)
        loss = (coef * per_token).sum()
        return LossOutput(loss=loss, metrics=_metrics(loss, x.mask, credit.token_weights, clip_fraction=is_clipped,
                                                      cov_clip_fraction=cut))
