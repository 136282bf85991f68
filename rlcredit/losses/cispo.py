"""CISPO: REINFORCE with a clipped, stop-gradient importance weight (MiniMax-M1, arXiv 2506.13585)."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from rlcredit.functional import AGGREGATIONS, Reducer, Totals
from rlcredit.functional._aggregate import check_aggregation
from rlcredit.losses._common import coefficients, loss_totals, token_inputs
from rlcredit.registry import register
from rlcredit.rollout import Credit, LazyMetrics, LossOutput, Rollout
from rlcredit.validators import in_range, is_bool, one_of, to_number

__all__ = ["CISPO"]


@register("loss", "cispo")
@attrs.frozen
class CISPO:
    """CISPO: clip the importance-sampling weight, never the gradient (MiniMax-M1, arXiv 2506.13585).

    MiniMax 2025, *MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention*,
    Eq. 4-5. With ``rho = exp(clamp(logp - logp_old, -20, 20))`` and ``sg`` the stop-gradient::

        l_t  = -sg(clip(rho_t, 1 - clip_low, 1 + clip_high)) * A_t * logp_t
        loss = agg(w * l)                        (w: token weights, exactly as clipped_surrogate)

    Every token keeps a gradient ``-sg(clip(rho)) A`` (PPO's clip zeroes it outside the range),
    so rare "fork" tokens whose ratio jumps still learn. ``clip_low=None`` caps only above, as the
    paper and TRL's ``loss_type="cispo"`` do; a float clips both sides, as verl's
    ``loss_mode=cispo`` does (with its ``clip_ratio_low``). TRL's ``epsilon_high`` is the absolute
    cap, i.e. ``1 + clip_high``. The value is ``-sg(w) A logp`` (as verl and TRL report it), not
    a ratio. **Token weights** ``w`` from any weighter enter as ``c_t = w_t * scale`` in
    ``rlcredit.functional.loss_coefficients``, i.e. each token's loss is multiplied by its weight;
    the denominators count all valid tokens (``renormalize=True``: ``sum w``). Without
    ``rollout.old_logprobs`` the update is on-policy (``rho = 1``).

    Shapes:
        ``logprobs [B, T]`` (current policy, with grad), ``rollout.old_logprobs [B, T]``,
        ``credit.advantages [B]`` or ``[B, T]``, ``credit.token_weights [B, T]``; a scalar loss.

    Args:
        clip_low: ``eps_low`` in ``[0, 1)``, or None for no lower bound (the paper, TRL).
        clip_high: ``eps_high >= 0``: the weight is capped at ``1 + clip_high``.
        aggregation: one of ``token_mean`` (default; verl token-mean, TRL's global token count),
            ``seq_mean_token_mean``, ``seq_mean_token_sum``, ``seq_mean_token_sum_norm``.
        renormalize: divide by the kept weight instead of the valid-token count.

    Returns:
        ``LossOutput(loss, metrics)`` with ``pg_loss``, ``clip_fraction`` (share of valid tokens
        whose weight was clipped) and ``kept_fraction``, detached.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.losses import CISPO
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, False]]), torch.tensor([1.0]), torch.tensor([0]),
        ...                      old_logprobs=torch.tensor([[-1.0, -1.0, 0.0]]))
        >>> credit = rlcredit.Credit({}, torch.ones(1, 3), torch.tensor([2.0]))
        >>> logp = torch.tensor([[-1.0, -0.5, 0.0]], requires_grad=True)  # rho = 1, e^0.5 -> capped at 1.28
        >>> out = CISPO()(logp, r, credit)
        >>> round(out.loss.item(), 4)  # -(1 * 2 * -1 + 1.28 * 2 * -0.5) / 2
        1.64
        >>> out.loss.backward(); logp.grad  # -sg(clip(rho)) A / 2, padding 0
        tensor([[-1.0000, -1.2800,  0.0000]])
    """

    clip_low: float | None = attrs.field(
        default=None, converter=to_number, validator=attrs.validators.optional(in_range(0.0, 1.0, hi_open=True)))
    clip_high: float = attrs.field(default=0.28, converter=to_number, validator=in_range(0.0))
    aggregation: str = attrs.field(default="token_mean", validator=one_of(*AGGREGATIONS))
    renormalize: bool = attrs.field(default=False, validator=is_bool)

    requires = ()

    def __attrs_post_init__(self) -> None:
        check_aggregation("CISPO", self.aggregation, self.renormalize)

    def totals(self, rollout: Rollout, credit: Credit, *, reducer: Reducer | None = None) -> Totals:
        """The batch statistics this loss divides by (pass them as ``totals=`` to each micro-batch's loss)."""
        return loss_totals(rollout, credit, mode=self.aggregation, renormalize=self.renormalize, reducer=reducer)

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None, totals: Totals | None = None) -> LossOutput:
        x = token_inputs(logprobs, rollout, credit, "CISPO")
        ratio = x.log_ratio.exp()
        low = None if self.clip_low is None else 1.0 - self.clip_low
        weight = ratio.clamp(min=low, max=1.0 + self.clip_high)  # detached: log_ratio is
        coef = coefficients(rollout, credit, mode=self.aggregation, renormalize=self.renormalize,
                            reducer=reducer, totals=totals)
        loss = (coef * (-weight * x.advantages * x.logprobs)).sum()
        mask = x.mask
        n = mask.sum().clamp_min(1).float()
        weights = credit.token_weights
        return LossOutput(loss=loss, metrics=LazyMetrics({
            "pg_loss": loss.detach(),
            "clip_fraction": lambda: ((weight != ratio) & mask).sum() / n,
            "kept_fraction": lambda: ((weights > 0) & mask).sum() / n,
        }))
