"""The clipped surrogate family: ``clipped_surrogate`` (token or sequence ratio) and ``gspo``."""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit.errors import RolloutError, SpecError
from rlcredit.functional import AGGREGATIONS, Reducer, Totals
from rlcredit.functional._aggregate import check_aggregation
from rlcredit.functional._checks import storage_problem
from rlcredit.functional._finite import finite_loss
from rlcredit.functional._loss import float32_logprobs, surrogate_loss
from rlcredit.registry import register
from rlcredit.requirements import Field, Requirement
from rlcredit.rollout import Credit, LazyMetrics, LossOutput, Rollout
from rlcredit.validators import in_range, int_at_least, is_bool, one_of, to_number

__all__ = ["ClippedSurrogate", "GSPO", "RATIOS", "check_credit", "check_logprobs"]

RATIOS = ("token", "sequence")
"""The importance ratios of ``ClippedSurrogate``: per token (PPO/GRPO) or per sequence (GSPO)."""


def check_credit(rollout: Rollout, credit: Credit, who: str) -> None:
    if not isinstance(rollout, Rollout):
        raise RolloutError(f"{who}: rollout must be a rlcredit.Rollout, got {type(rollout).__name__}.")
    if not isinstance(credit, Credit):
        raise RolloutError(f"{who}: credit must be a rlcredit.Credit (from strategy.assign), got {type(credit).__name__}.")
    if tuple(credit.token_weights.shape) != tuple(rollout.response_mask.shape):
        raise RolloutError(
            f"{who}: credit is for shape {list(credit.token_weights.shape)} but the rollout is "
            f"{list(rollout.response_mask.shape)}; select the same rows from both."
        )
    if credit.token_weights.device != rollout.device:
        raise RolloutError(f"{who}: credit is on {credit.token_weights.device} but the rollout on {rollout.device}; "
                           f"move one with `.to(...)`.")


def check_logprobs(logprobs: Tensor, rollout: Rollout, who: str) -> None:
    if not isinstance(rollout, Rollout):
        raise RolloutError(f"{who}: rollout must be a rlcredit.Rollout, got {type(rollout).__name__}.")
    if isinstance(logprobs, Tensor) and storage_problem(logprobs) is not None:
        raise RolloutError(f"{who}: logprobs {storage_problem(logprobs)}.")
    if not isinstance(logprobs, Tensor) or tuple(logprobs.shape) != tuple(rollout.response_mask.shape):
        got = list(logprobs.shape) if isinstance(logprobs, Tensor) else type(logprobs).__name__
        raise RolloutError(
            f"{who}: logprobs must be [B, T] = {list(rollout.response_mask.shape)} (log-probs of the response "
            f"tokens under the current policy), got {got}. Use credit.select(rows) and rollout.select(rows) "
            f"together for micro-batches."
        )
    if not logprobs.dtype.is_floating_point:
        raise RolloutError(f"{who}: logprobs must be floating, got {logprobs.dtype}.")
    if logprobs.device != rollout.device:
        raise RolloutError(f"{who}: logprobs are on {logprobs.device} but the rollout on {rollout.device}; move them "
                           f"with `.to({str(rollout.device)!r})`.")


@register("loss", "clipped_surrogate")
@attrs.frozen
class ClippedSurrogate:
    """PPO/GRPO clipped surrogate with clip-higher, dual clip, KL and entropy terms, four aggregations.

    Per token (Schulman et al. 2017; DAPO arXiv 2503.14476 for clip-higher; dual clip from
    Ye et al. 2020), with the importance ratio ``rho`` and token weight ``w``::

        l_t = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)
        l_t = min(l_t, -dual_clip * A)                       where A < 0 (if dual_clip)
        l_t = w_t * l_t                                      (exact folding of weights w >= 0)
        loss = agg(l) + kl_coef * agg(k3(ref, logp) [* r_t]) + entropy_penalty * agg(-logp)

    ``ratio="token"``: ``rho_t = exp(logp_t - logp_old_t)`` (PPO, GRPO, DAPO). ``ratio="sequence"``:
    GSPO's length-normalised sequence ratio ``s_i = exp(mean_t (logp - logp_old))`` on every token
    of response ``i`` (GSPO-token form, arXiv 2507.18071 Eq. 13: the gradient w.r.t. each token's
    log-prob is ``s_i``), so one clip decision covers a whole response; the ``gspo`` loss is this
    with GSPO's defaults. Log-ratios are clamped to ``+-20``.

    ``k3 = exp(ref - logp) - (ref - logp) - 1``. With ``kl_bias_correction=True`` the k3 term is
    multiplied by the token ratio ``r_t = exp(logp_t - logp_old_t)``, gradient through both (TRL's
    ``use_bias_correction_kl``, DeepSeek-V3.2 arXiv 2512.02556: the unbiased reverse-KL gradient
    off-policy; it changes the gradient on-policy too, where ``r_t = 1``). The KL and the entropy
    term (VPPO's "entropy penalty") are unweighted and count every valid token. Aggregations
    (verl / TRL names):
    ``token_mean`` ``sum w l / sum mask`` (verl token-mean; TRL dapo/bnpo), ``seq_mean_token_mean``
    ``mean_i sum_t w l / T_i`` (TRL grpo), ``seq_mean_token_sum`` ``mean_i sum_t w l``,
    ``seq_mean_token_sum_norm`` ``sum w l / (B * L)`` (Dr. GRPO; ``L = max_length`` or the padded
    T, the largest across ranks). The denominators count **all valid tokens**; ``renormalize=True``
    divides by ``sum w`` instead (STAPO); ``rlcredit.functional.loss_coefficients`` derives them
    (from ``totals`` when given). Without ``rollout.old_logprobs`` the update is on-policy:
    ``logp_old = logp.detach()``.

    The surrogate and entropy terms run as one autograd function
    (``rlcredit.functional._loss.surrogate_loss``): the same value and gradient as
    ``F.aggregate(F.clipped_surrogate(...), ...)`` plus the entropy term through autograd, with
    the gradient ``-c_t A_t rho_t`` formed in the forward pass; a padding log-prob that is NaN or
    inf gets exactly 0 gradient, and a NaN on a valid token gives a NaN loss. It is
    differentiable once (``create_graph=True`` raises). Log-probs of any float dtype are read as
    float32 and the gradient is cast back to their dtype; where an exact value does not fit (the
    gradient ``e^12`` of one token in float16, a loss of advantages near float32's maximum times a
    ratio of ``e^20``) it saturates at the dtype's largest finite value instead of becoming inf
    (``rlcredit.functional._loss.saturate``).

    Args:
        clip_low: ``eps_low`` in ``[0, 1)``. clip_high: ``eps_high >= 0`` (DAPO 0.28).
        dual_clip: ``c > 1`` or None (off). aggregation: one of the four names above.
        renormalize: divide by the kept weight instead of the valid-token count.
        kl_coef: ``beta >= 0`` of the k3 KL to ``rollout.ref_logprobs`` (required when > 0).
        entropy_penalty: ``c >= 0`` of ``mean(-logp)`` (VPPO uses 0.06).
        max_length: Dr. GRPO's ``L`` (None: padded T, largest across ranks).
        ratio: ``"token"`` or ``"sequence"`` (GSPO).
        kl_bias_correction: multiply the k3 term by the token ratio (needs ``kl_coef > 0``).

    Returns:
        ``LossOutput(loss, metrics)`` with metrics ``pg_loss``, ``clip_fraction``,
        ``kept_fraction`` (and ``kl``, ``neg_logprob`` when on), detached.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.losses import ClippedSurrogate
        >>> r = rlcredit.Rollout(torch.tensor([[True, True]]), torch.tensor([1.0]), torch.tensor([0]),
        ...                      old_logprobs=torch.tensor([[-1.0, -1.0]]))
        >>> credit = rlcredit.Credit({}, torch.ones(1, 2), torch.tensor([2.0]))
        >>> logp = torch.tensor([[-1.0, -0.5]], requires_grad=True)
        >>> out = ClippedSurrogate()(logp, r, credit)
        >>> round(out.loss.item(), 4)  # mean of -1*2 and -min(e^0.5, 1.2)*2
        -2.2
        >>> round(ClippedSurrogate(ratio="sequence")(logp, r, credit).loss.item(), 4)  # -min(e^0.25, 1.2)*2
        -2.4
    """

    clip_low: float = attrs.field(default=0.2, converter=to_number, validator=in_range(0.0, 1.0, hi_open=True))
    clip_high: float = attrs.field(default=0.2, converter=to_number, validator=in_range(0.0))
    dual_clip: float | None = attrs.field(default=None, converter=to_number,
        validator=attrs.validators.optional(in_range(1.0, lo_open=True)))
    aggregation: str = attrs.field(default="token_mean", validator=one_of(*AGGREGATIONS))
    renormalize: bool = attrs.field(default=False, validator=is_bool)
    kl_coef: float = attrs.field(default=0.0, converter=to_number, validator=in_range(0.0))
    entropy_penalty: float = attrs.field(default=0.0, converter=to_number, validator=in_range(0.0))
    max_length: int | None = attrs.field(default=None, converter=to_number,
        validator=attrs.validators.optional(int_at_least(1)))
    ratio: str = attrs.field(default="token", validator=one_of(*RATIOS))
    kl_bias_correction: bool = attrs.field(default=False, validator=is_bool)

    def __attrs_post_init__(self) -> None:
        name = type(self).__name__
        if self.kl_bias_correction and not self.kl_coef > 0:
            raise SpecError(
                f"{name}: kl_bias_correction=True corrects the KL term, which is off (kl_coef=0); set kl_coef > 0 "
                f"or drop kl_bias_correction."
            )
        check_aggregation(name, self.aggregation, self.renormalize, self.max_length)

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return (Field("ref_logprobs"),) if self.kl_coef > 0 else ()

    def totals(self, rollout: Rollout, credit: Credit, *, reducer: Reducer | None = None) -> Totals:
        """The batch statistics this loss divides by, for ``rollout`` (e.g. a whole mini-batch).

        Pass them as ``totals=`` to the loss of each micro-batch: the micro-batch losses then add
        up to the mini-batch loss (gradient accumulation), as verl and TRL aggregate.

        Examples:
            >>> import torch, rlcredit
            >>> s = rlcredit.build("grpo")
            >>> r = rlcredit.Rollout(torch.tensor([[True, True], [True, False]]), torch.tensor([1.0, 0.0]),
            ...                      torch.tensor([0, 0]), old_logprobs=torch.zeros(2, 2))
            >>> credit, logp = s.assign(r), torch.zeros(2, 2)
            >>> totals = s.policy_loss.totals(r, credit)
            >>> parts = [s.loss(logp[i:i + 1], r.select([i]), credit.select([i]), totals=totals).loss for i in (0, 1)]
            >>> torch.allclose(sum(parts), s.loss(logp, r, credit).loss)
            True
        """
        return F.batch_totals(rollout.response_mask, credit.token_weights, mode=self.aggregation,
                              renormalize=self.renormalize, max_length=self.max_length, reducer=reducer)

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None, totals: Totals | None = None) -> LossOutput:
        who = type(self).__name__
        check_logprobs(logprobs, rollout, who)
        check_credit(rollout, credit, who)
        # float32 maths for any input dtype; gradients come back saturated to that dtype's range.
        logprobs = float32_logprobs(logprobs)
        mask = rollout.response_mask
        zero = torch.zeros((), device=mask.device)
        # On-policy without old log-probs: logp_old = logp.detach().
        old = logprobs.detach() if rollout.old_logprobs is None else rollout.old_logprobs.float()
        with torch.no_grad():
            if self.ratio == "sequence":
                log_ratio = F.sequence_log_ratio(logprobs.detach(), old, mask)
            else:
                log_ratio = torch.where(mask, logprobs.detach() - old, zero)
        agg = {"mode": self.aggregation, "max_length": self.max_length, "reducer": reducer}
        if totals is None:
            totals = self.totals(rollout, credit, reducer=reducer)
        # The loss always masks the weights: a hand-made Credit may carry weight on padding.
        coef = F.loss_coefficients(mask, credit.token_weights, renormalize=self.renormalize, totals=totals, **agg)
        entropy_coef = None
        if self.entropy_penalty > 0:  # counts every valid token, whatever the weights
            entropy_coef = F.loss_coefficients(mask, None, renormalize=False, totals=totals, **agg)
        loss, pg_loss, neg_logp, active = surrogate_loss(
            logprobs, log_ratio, credit.advantages.float(), coef, mask, clip_low=self.clip_low,
            clip_high=self.clip_high, dual_clip=self.dual_clip, entropy_penalty=self.entropy_penalty,
            entropy_coefficients=entropy_coef,
        )
        metrics: dict[str, Any] = {"pg_loss": pg_loss.detach()}
        if self.kl_coef > 0:
            if rollout.ref_logprobs is None:
                raise RolloutError(f"{who}: kl_coef > 0 needs rollout.ref_logprobs; pass them or set kl_coef=0.")
            k3 = F.k3_kl(logprobs, rollout.ref_logprobs, mask)
            if self.kl_bias_correction:  # times the token ratio, differentiable (also where it is 1)
                k3 = k3 * torch.exp(torch.where(mask, logprobs.float() - old, zero).clamp(-20.0, 20.0))
            kl = F.aggregate(k3, mask, mode=self.aggregation, max_length=self.max_length, reducer=reducer,
                             totals=totals)
            loss = finite_loss(loss + self.kl_coef * kl)
            metrics["kl"] = kl.detach()
        if neg_logp is not None:
            metrics["neg_logprob"] = neg_logp.detach()
        n = mask.sum().clamp_min(1).float()
        weights = credit.token_weights
        # Computed on first access only: a step that logs nothing pays nothing.
        metrics["clip_fraction"] = lambda: (~active & mask).sum() / n
        metrics["kept_fraction"] = lambda: ((weights > 0) & mask).sum() / n
        return LossOutput(loss=loss, metrics=LazyMetrics(metrics))


@register("loss", "gspo")
@attrs.frozen
class GSPO:
    """GSPO: one clipped, length-normalised importance ratio per response (arXiv 2507.18071).

    Zheng et al. 2025, *Group Sequence Policy Optimization*. With ``T_i`` valid tokens::

        s_i = exp( (1/T_i) sum_t (logp_{i,t} - logp_old_{i,t}) )       (log-ratios clamped to +-20)
        l_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)
        loss = mean_i (1/T_i) sum_t w_{i,t} l_{i,t}  (+ kl_coef * agg(k3) + entropy_penalty * agg(-logp))

    This is ``clipped_surrogate(ratio="sequence")`` with GSPO's defaults (the same loss path:
    ``__call__`` runs ``as_clipped()``), in GSPO-token form (the paper's Eq. 13): every token
    carries ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``, equal to ``s_i`` in value, so with
    ``[B]`` advantages and uniform weights the loss and its gradient are exactly GSPO's sequence
    objective, and ``[B, T]`` token advantages are accepted too. **Token weights** ``w`` scale
    each token's share of its response's loss (its gradient is ``w_t s_i A_i / T_i`` inside the
    clip range); the ratio ``s_i`` itself always averages over **all** valid tokens, so a mask
    decides which log-probs are pushed, not whether the response is clipped. The default
    ``seq_mean_token_mean`` divides by all valid tokens (verl's ``loss_mode=gspo`` with
    ``seq-mean-token-mean``); ``renormalize=True`` divides by ``sum_t w`` instead. The clip
    decision is shared by the whole response: ``clip_fraction`` counts tokens of clipped
    responses. Without ``rollout.old_logprobs`` the update is on-policy (``s_i = 1``).

    Args:
        clip_low: ``eps_low`` in ``[0, 1)`` (paper: 3e-4). clip_high: ``eps_high >= 0`` (4e-4).
        aggregation: one of the four names of ``ClippedSurrogate`` (default
            ``seq_mean_token_mean``, the paper's ``1/G sum_i``).
        renormalize: divide by the kept weight instead of the valid-token count.
        kl_coef: ``beta >= 0`` of the k3 KL to ``rollout.ref_logprobs``.
        entropy_penalty: ``c >= 0`` of ``mean(-logp)``.
        max_length: Dr. GRPO's ``L`` for ``seq_mean_token_sum_norm`` (None: padded T).

    Returns:
        ``LossOutput(loss, metrics)`` with ``pg_loss``, ``clip_fraction``, ``kept_fraction``
        (and ``kl``, ``neg_logprob`` when on), detached.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.losses import GSPO
        >>> r = rlcredit.Rollout(torch.tensor([[True, True], [True, False]]), torch.tensor([1.0, 0.0]),
        ...                      torch.tensor([0, 0]), old_logprobs=torch.zeros(2, 2))
        >>> credit = rlcredit.Credit({}, torch.ones(2, 2), torch.tensor([1.0, 1.0]))
        >>> logp = torch.tensor([[1e-4, -1e-4], [1e-3, 0.0]], requires_grad=True)
        >>> out = GSPO()(logp, r, credit)  # s = (1, e^0.001 > 1 + 4e-4): mean of -1 and -1.0004
        >>> round(out.loss.item(), 4)
        -1.0002
        >>> out.loss.backward(); logp.grad  # row 0: -A s / (B T_0); row 1 is clipped
        tensor([[-0.2500, -0.2500],
                [ 0.0000,  0.0000]])
    """

    clip_low: float = attrs.field(default=3e-4, converter=to_number, validator=in_range(0.0, 1.0, hi_open=True))
    clip_high: float = attrs.field(default=4e-4, converter=to_number, validator=in_range(0.0))
    aggregation: str = attrs.field(default="seq_mean_token_mean", validator=one_of(*AGGREGATIONS))
    renormalize: bool = attrs.field(default=False, validator=is_bool)
    kl_coef: float = attrs.field(default=0.0, converter=to_number, validator=in_range(0.0))
    entropy_penalty: float = attrs.field(default=0.0, converter=to_number, validator=in_range(0.0))
    max_length: int | None = attrs.field(default=None, converter=to_number,
        validator=attrs.validators.optional(int_at_least(1)))

    def __attrs_post_init__(self) -> None:
        self.as_clipped()  # the option checks of the clipped surrogate, at construction

    def as_clipped(self) -> ClippedSurrogate:
        """The ``clipped_surrogate(ratio="sequence")`` this loss is.

        Examples:
            >>> from rlcredit.losses import GSPO
            >>> GSPO().as_clipped().ratio
            'sequence'
        """
        return ClippedSurrogate(**attrs.asdict(self, recurse=False), ratio="sequence")

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return self.as_clipped().requires

    def totals(self, rollout: Rollout, credit: Credit, *, reducer: Reducer | None = None) -> Totals:
        """As ``ClippedSurrogate.totals``."""
        return self.as_clipped().totals(rollout, credit, reducer=reducer)

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None, totals: Totals | None = None) -> LossOutput:
        return self.as_clipped()(logprobs, rollout, credit, reducer=reducer, totals=totals)
