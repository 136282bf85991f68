"""SAPO: a smooth, temperature-controlled gate instead of a hard clip (arXiv 2511.20347)."""

from __future__ import annotations

import attrs
import torch
from torch import Tensor

from rlcredit.functional import AGGREGATIONS, Reducer, Totals
from rlcredit.losses._common import LOG_RATIO_BOUND, coefficients, loss_totals, token_inputs
from rlcredit.registry import register
from rlcredit.rollout import Credit, LazyMetrics, LossOutput, Rollout
from rlcredit.validators import in_range, one_of, to_number

__all__ = ["SAPO"]


@register("loss", "sapo")
@attrs.frozen
class SAPO:
    """SAPO: soft-gated policy optimisation (Qwen team 2025, arXiv 2511.20347).

    *Soft Adaptive Policy Optimization* (Qwen team). With ``rho = exp(clamp(logp - logp_old, -20,
    20))`` (with gradient) and a temperature by the sign of the advantage::

        tau_t = tau_pos if A_t > 0 else tau_neg
        l_t   = -(4 / tau_t) * sigmoid(tau_t * (rho_t - 1)) * A_t
        loss  = agg(w * l)                     (w: token weights, exactly as clipped_surrogate)

    The gate ``f(rho) = (4 / tau) sigmoid(tau (rho - 1))`` equals 1 in slope at ``rho = 1`` (the
    on-policy gradient is the policy gradient) and fades smoothly as the ratio leaves 1, where
    PPO's clip cuts the gradient off; ``tau_neg > tau_pos`` damps negative updates faster. The
    default ``seq_mean_token_mean`` is what verl's ``loss_mode=sapo`` forces and TRL's
    ``loss_type="sapo"`` uses. **Token weights** ``w`` enter as ``c_t = w_t * scale`` in
    ``rlcredit.functional.loss_coefficients`` (each token's loss times its weight; denominators
    count all valid tokens). Without ``rollout.old_logprobs`` the update is on-policy.

    Shapes:
        ``logprobs [B, T]`` (current policy, with grad), ``rollout.old_logprobs [B, T]``,
        ``credit.advantages [B]`` or ``[B, T]``, ``credit.token_weights [B, T]``; a scalar loss.

    Args:
        tau_pos: temperature for tokens with ``A > 0`` (> 0; paper 1.0).
        tau_neg: temperature for tokens with ``A <= 0`` (> 0; paper 1.05).
        aggregation: one of the four aggregations (default ``seq_mean_token_mean``).

    Returns:
        ``LossOutput(loss, metrics)`` with ``pg_loss``, ``gate_mean`` (mean gate over valid
        tokens) and ``kept_fraction``, detached.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.losses import SAPO
        >>> r = rlcredit.Rollout(torch.tensor([[True, True]]), torch.tensor([1.0]), torch.tensor([0]),
        ...                      old_logprobs=torch.zeros(1, 2))
        >>> credit = rlcredit.Credit({}, torch.ones(1, 2), torch.tensor([1.0]))
        >>> logp = torch.zeros(1, 2, requires_grad=True)  # rho = 1: gate 4 sigmoid(0) = 2
        >>> out = SAPO()(logp, r, credit)
        >>> out.loss.item()
        -2.0
        >>> out.loss.backward(); logp.grad  # slope 1 at rho = 1: -A / T
        tensor([[-0.5000, -0.5000]])
    """

    tau_pos: float = attrs.field(default=1.0, converter=to_number, validator=in_range(0.0, lo_open=True))
    tau_neg: float = attrs.field(default=1.05, converter=to_number, validator=in_range(0.0, lo_open=True))
    aggregation: str = attrs.field(default="seq_mean_token_mean", validator=one_of(*AGGREGATIONS))

    requires = ()

    def totals(self, rollout: Rollout, credit: Credit, *, reducer: Reducer | None = None) -> Totals:
        """The batch statistics this loss divides by (pass them as ``totals=`` to each micro-batch's loss)."""
        return loss_totals(rollout, credit, mode=self.aggregation, reducer=reducer)

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None, totals: Totals | None = None) -> LossOutput:
        x = token_inputs(logprobs, rollout, credit, "SAPO")
        ratio = (x.logprobs - x.old).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND).exp()
        tau = torch.where(x.advantages > 0, self.tau_pos, self.tau_neg)
        gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
        coef = coefficients(rollout, credit, mode=self.aggregation, reducer=reducer, totals=totals)
        loss = (coef * (-gate * x.advantages)).sum()
        mask = x.mask
        n = mask.sum().clamp_min(1).float()
        weights = credit.token_weights
        return LossOutput(loss=loss, metrics=LazyMetrics({
            "pg_loss": loss.detach(),
            "gate_mean": lambda: torch.where(mask, gate, 0.0).sum() / n,
            "kept_fraction": lambda: ((weights > 0) & mask).sum() / n,
        }))
