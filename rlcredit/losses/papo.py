"""PAPO's implicit perception loss and double-entropy regulariser, on top of any policy loss (arXiv 2507.06448)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit.errors import RolloutError
from rlcredit.functional import AGGREGATIONS, Reducer, Totals
from rlcredit.functional._loss import float32_logprobs
from rlcredit.losses._common import LOG_RATIO_BOUND, aux_names, check_aux, merge_totals, token_inputs
from rlcredit.losses.surrogate import ClippedSurrogate
from rlcredit.registry import register
from rlcredit.requirements import Aux, Requirement, Signal, requirements_of
from rlcredit.rollout import Credit, LazyMetrics, LossOutput, Rollout
from rlcredit.validators import in_range, one_of, to_component, to_number

__all__ = ["PAPO", "MASKED_SOURCES", "MASKED_LOGPROBS"]

MASKED_LOGPROBS = "masked_logprobs"
"""The ``aux`` name of the current policy's log-probs of the response with the masked image."""

MASKED_SOURCES = ("aux", "signal")
"""Where ``PAPO`` reads the masked-image log-probs: ``aux["masked_logprobs"]`` (current policy,
with gradient: the paper) or ``rollout.signals["aug_logprobs"]`` (old policy, no gradient: the
released code)."""


@register("loss", "papo")
@attrs.frozen
class PAPO:
    """PAPO: any policy loss plus the implicit perception loss and the double-entropy regulariser.

    Wang et al. 2025, *Perception-Aware Policy Optimization for Multimodal Reasoning*
    (arXiv 2507.06448). With ``m_t = log pi(y_t | I_mask)`` (the response under the same model
    with a masked image: square patches blackened with p = 0.6, one mask per prompt shared by its
    rollouts, ``rlcredit_mm.papo.papo_masked_inputs``) and ``logp_t = log pi(y_t | I)``::

        d_t   = clamp(m_t - logp_t, -20, 20)
        k3_t  = min(exp(d_t) - d_t - 1, kl_clip)             (estimates KL(pi(.|I) || pi(.|I_mask)))
        loss  = surrogate(...) - gamma * agg(k3) + eta * (agg(-logp) + agg(-m))

    Maximising the KL rewards responses that depend on the image; the double entropy term
    (``-logp`` is the sampled-token entropy estimate the released code uses) counters the loss
    hacking the paper reports when ``gamma`` is large. ``agg`` is ``aggregation`` over every valid
    token, unweighted (like ``clipped_surrogate``'s KL and entropy terms); **token weights** from
    any weighter apply to the surrogate only, as in that surrogate.

    ``masked="aux"`` (the paper): ``m`` is ``aux["masked_logprobs"]``, the current policy's
    log-probs with the masked image computed in the training step *with gradient*, passed as
    ``Strategy.loss(logprobs, rollout, credit, aux={"masked_logprobs": m})``: the gradient flows
    through both runs. ``masked="signal"`` (the released code, PAPO/EasyR1): ``m`` is
    ``rollout.signals["aug_logprobs"]``, computed once per batch by the old policy without
    gradient, so only ``logp`` is pushed and the masked entropy term is a constant.

    Shapes:
        ``logprobs [B, T]`` and ``aux["masked_logprobs"] [B, T]`` (current policy, with grad),
        ``credit.advantages [B]`` or ``[B, T]``, ``credit.token_weights [B, T]``; a scalar loss.

    Args:
        surrogate: the policy loss it adds to (any registered loss or spec; default
            ``clipped_surrogate``: PAPO-G; DAPO's clip 0.2/0.28: PAPO-D).
        gamma: ``>= 0``, weight of the perception KL (paper 0.01; 0.02 in its "high" runs).
        eta: ``>= 0``, weight of the double entropy term (released DAPO recipe 0.03; 0: off).
        kl_clip: cap of ``k3`` per token (the released code's ``low_var_kl`` clamps at 10), or None.
        masked: ``"aux"`` or ``"signal"`` (see above).
        aggregation: of the two terms, one of the four aggregations (default ``token_mean``).

    Returns:
        ``LossOutput(loss, metrics)`` with the surrogate's metrics plus ``perception_kl``,
        ``entropy`` and ``masked_entropy`` (the aggregated terms), detached.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.losses import PAPO
        >>> r = rlcredit.Rollout(torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0]), torch.tensor([0]))
        >>> credit = rlcredit.Credit({}, torch.ones(1, 2), torch.tensor([0.0]))  # A = 0: only PAPO's terms
        >>> logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
        >>> masked = torch.tensor([[-1.0, -2.0]], requires_grad=True)
        >>> out = PAPO(gamma=1.0)(logp, r, credit, aux={"masked_logprobs": masked})
        >>> round(out.loss.item(), 4)  # -(0 + (e^-1 + 1 - 1)) / 2
        -0.1839
        >>> out.loss.backward(); masked.grad  # the gradient reaches the masked run too
        tensor([[0.0000, 0.3161]])
    """

    surrogate: Any = attrs.field(factory=ClippedSurrogate, converter=to_component("loss"))
    gamma: float = attrs.field(default=0.01, converter=to_number, validator=in_range(0.0))
    eta: float = attrs.field(default=0.0, converter=to_number, validator=in_range(0.0))
    kl_clip: float | None = attrs.field(default=10.0, converter=to_number,
        validator=attrs.validators.optional(in_range(0.0, lo_open=True)))
    masked: str = attrs.field(default="aux", validator=one_of(*MASKED_SOURCES))
    aggregation: str = attrs.field(default="token_mean", validator=one_of(*AGGREGATIONS))

    @property
    def requires(self) -> tuple[Requirement, ...]:
        own = Aux(MASKED_LOGPROBS) if self.masked == "aux" else Signal("aug_logprobs")
        return tuple(dict.fromkeys((*requirements_of(self.surrogate, "PAPO.surrogate"), own)))

    def totals(self, rollout: Rollout, credit: Credit, *, reducer: Reducer | None = None) -> Totals:
        """The batch statistics of the surrogate and of the two terms (pass them as ``totals=`` to micro-batches)."""
        own = F.batch_totals(rollout.response_mask, mode=self.aggregation, reducer=reducer)
        base = getattr(self.surrogate, "totals", None)
        return own if base is None else merge_totals(base(rollout, credit, reducer=reducer), own)

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *, reducer: Reducer | None = None,
                 totals: Totals | None = None, aux: Mapping[str, Tensor] | None = None) -> LossOutput:
        own_names = (MASKED_LOGPROBS,) if self.masked == "aux" else ()
        inner_names = aux_names(self.surrogate)
        aux = check_aux(aux, tuple(dict.fromkeys((*own_names, *inner_names))), logprobs, "PAPO")
        x = token_inputs(logprobs, rollout, credit, "PAPO")
        mask, zero = x.mask, torch.zeros((), device=x.mask.device)
        if self.masked == "aux":
            masked = torch.where(mask, float32_logprobs(aux[MASKED_LOGPROBS]), zero)
        elif "aug_logprobs" in rollout.signals:
            masked = torch.where(mask, rollout.signals["aug_logprobs"].float(), zero)
        else:
            raise RolloutError("PAPO(masked='signal') needs rollout.signals['aug_logprobs'] (log-probs of the responses "
                               "under the old policy with the masked image); pass them, or use masked='aux'.")
        extra: dict[str, Any] = {} if totals is None else {"totals": totals}
        if inner_names:
            extra["aux"] = {name: aux[name] for name in inner_names}
        base = self.surrogate(logprobs, rollout, credit, reducer=reducer, **extra)
        coef = F.loss_coefficients(mask, None, mode=self.aggregation, reducer=reducer, totals=totals)
        d = (masked - x.logprobs).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
        k3 = torch.expm1(d) - d
        if self.kl_clip is not None:
            k3 = k3.clamp(max=self.kl_clip)
        kl = (coef * k3).sum()
        entropy, masked_entropy = -(coef * x.logprobs).sum(), -(coef * masked).sum()
        loss = base.loss - self.gamma * kl
        if self.eta > 0:
            loss = loss + self.eta * (entropy + masked_entropy)
        thunks: dict[str, Any] = {key: (lambda key=key: base.metrics[key]) for key in base.metrics}
        thunks.update(perception_kl=kl.detach(), entropy=entropy.detach(), masked_entropy=masked_entropy.detach())
        return LossOutput(loss=loss, metrics=LazyMetrics(thunks))
