"""GMPO: the geometric mean of clipped token ratios per response (arXiv 2507.20673; verl ``geo_mean``)."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from rlcredit.functional import Reducer, Totals
from rlcredit.losses._common import LOG_RATIO_BOUND, coefficients, loss_totals, token_inputs
from rlcredit.registry import register
from rlcredit.rollout import Credit, LazyMetrics, LossOutput, Rollout
from rlcredit.validators import in_range, to_number

__all__ = ["GMPO"]

_MODE = "seq_mean_token_mean"


@register("loss", "gmpo")
@attrs.frozen
class GMPO:
    """GMPO: maximise the geometric mean of token-level rewards (Zhao et al. 2025, arXiv 2507.20673).

    *Geometric-Mean Policy Optimization*; verl's ``loss_mode=geo_mean``. Per response ``i`` with
    ``T_i`` valid tokens, ``s_t = sign(A_t)`` and ``l_t = clamp(logp_t - logp_old_t, -20, 20)``::

        l~_t     = s_t * min(s_t * l_t, s_t * clamp(l_t, -clip_low, clip_high))   (pessimistic, log space)
        rho_i    = exp((1 / T_i) * sum_t l~_t)                                     (geometric mean)
        loss     = (1 / B) * sum_i -A_i * rho_i

    The clip acts on each token's log-ratio before the mean, so one extreme token cannot swing
    the whole sequence's weight the way it does an arithmetic mean. It runs in the
    sequence-token form of GSPO: every token carries ``-A_t * sg(rho_i) * exp(l~_t - sg(l~_t))``
    (value ``-A_t rho_i``), aggregated with ``seq_mean_token_mean``; with ``[B]`` advantages and
    uniform weights this is exactly the sequence objective above in value and gradient
    (``d loss / d logp_t = -A_i rho_i / (B T_i)`` where ``l_t`` is unclipped). ``[B, T]``
    advantages weight each token's share by its own ``A_t`` (verl first averages them per row).
    **Token weights** ``w`` enter as ``c_t = w_t / (B T_i)`` from
    ``rlcredit.functional.loss_coefficients``: each token's share of its response's loss is
    multiplied by ``w_t``; ``rho_i`` itself always averages over all valid tokens. ``B`` counts
    every row (empty rows add 0). Without ``rollout.old_logprobs`` the update is on-policy.

    Shapes:
        ``logprobs [B, T]`` (current policy, with grad), ``rollout.old_logprobs [B, T]``,
        ``credit.advantages [B]`` or ``[B, T]``, ``credit.token_weights [B, T]``; a scalar loss.

    Args:
        clip_low: ``eps_low >= 0``, the log-ratio floor ``-clip_low`` for ``A < 0`` (paper 0.4:
            ratios in ``(e^-0.4, e^0.4)``).
        clip_high: ``eps_high >= 0``, the log-ratio ceiling for ``A > 0`` (paper 0.4).

    Returns:
        ``LossOutput(loss, metrics)`` with ``pg_loss``, ``clip_fraction`` (valid tokens whose
        log-ratio was clipped) and ``kept_fraction``, detached.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.losses import GMPO
        >>> r = rlcredit.Rollout(torch.tensor([[True, True]]), torch.tensor([1.0]), torch.tensor([0]),
        ...                      old_logprobs=torch.zeros(1, 2))
        >>> credit = rlcredit.Credit({}, torch.ones(1, 2), torch.tensor([1.0]))
        >>> logp = torch.tensor([[0.2, 1.0]], requires_grad=True)  # l~ = (0.2, 0.4): rho = e^0.3
        >>> out = GMPO()(logp, r, credit)
        >>> round(out.loss.item(), 4)
        -1.3499
        >>> out.loss.backward(); logp.grad  # -A rho / T on the unclipped token, 0 on the clipped one
        tensor([[-0.6749,  0.0000]])
    """

    clip_low: float = attrs.field(default=0.4, converter=to_number, validator=in_range(0.0))
    clip_high: float = attrs.field(default=0.4, converter=to_number, validator=in_range(0.0))

    requires = ()

    def totals(self, rollout: Rollout, credit: Credit, *, reducer: Reducer | None = None) -> Totals:
        """The batch statistics this loss divides by (pass them as ``totals=`` to each micro-batch's loss)."""
        return loss_totals(rollout, credit, mode=_MODE, reducer=reducer)

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None, totals: Totals | None = None) -> LossOutput:
        x = token_inputs(logprobs, rollout, credit, "GMPO")
        mask = x.mask
        log_ratio = (x.logprobs - x.old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        sign = torch.sign(x.advantages)
        clipped = log_ratio.clamp(-self.clip_low, self.clip_high)
        kept = sign * torch.minimum(sign * log_ratio, sign * clipped)
        with torch.no_grad():
            seq = kept.sum(-1) / mask.sum(-1).clamp_min(1)  # padding holds 0
        token_ratio = torch.exp(seq[:, None] + kept - kept.detach())  # value rho_i, gradient rho_i d l~_t
        coef = coefficients(rollout, credit, mode=_MODE, reducer=reducer, totals=totals)
        loss = (coef * (-x.advantages * token_ratio)).sum()
        n = mask.sum().clamp_min(1).float()
        weights = credit.token_weights
        return LossOutput(loss=loss, metrics=LazyMetrics({
            "pg_loss": loss.detach(),
            "clip_fraction": lambda: ((kept != log_ratio) & (sign != 0) & mask).sum() / n,
            "kept_fraction": lambda: ((weights > 0) & mask).sum() / n,
        }))
