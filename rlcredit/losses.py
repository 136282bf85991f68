"""Policy losses: the only part of rlcredit that builds a graph (through ``logprobs``).

A loss is called per (mini/micro-)batch as ``loss(logprobs [B, T], rollout, credit, *, reducer=None)``
and returns a ``rlcredit.LossOutput``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit._components import in_range, one_of
from rlcredit.distributed import Reducer
from rlcredit.errors import RolloutError, SpecError
from rlcredit.functional._gspo import sequence_log_ratio
from rlcredit.functional._loss import fused_surrogate, loss_scale
from rlcredit.registry import register
from rlcredit.rollout import Credit, LazyMetrics, LossOutput, Rollout

__all__ = ["PolicyLoss", "ClippedSurrogate", "GSPO", "AGGREGATIONS"]

AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")


@runtime_checkable
class PolicyLoss(Protocol):
    """Per-token log-probs, the rollout and its credit to a scalar loss.

    Attributes:
        requires: requirement strings (e.g. ``"ref_logprobs"`` when a KL term is on).

    Call:
        ``(logprobs [B, T], rollout, credit, *, reducer=None) -> LossOutput``.

    Examples:
        >>> import attrs, torch, rlcredit
        >>> @attrs.frozen
        ... class Reinforce:  # -mean(w * A * logp) over valid tokens
        ...     requires = ()
        ...     def __call__(self, logprobs, rollout, credit, *, reducer=None):
        ...         m = rollout.response_mask
        ...         x = credit.token_weights * credit.advantages[:, None] * logprobs
        ...         return rlcredit.LossOutput(-(x * m).sum() / m.sum())
        >>> r = rlcredit.Rollout(torch.ones(2, 1, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
        >>> s = rlcredit.Strategy(policy_loss=Reinforce())
        >>> round(s.loss(torch.tensor([[-1.0], [-2.0]]), r, s.assign(r)).loss.item(), 4)
        -0.3536
    """

    requires: tuple[str, ...]

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None) -> LossOutput: ...


def _check_aggregation_options(loss_fn: ClippedSurrogate | GSPO) -> None:
    """Build-time check of option combinations that ``rlcredit.functional.aggregate`` rejects."""
    name = type(loss_fn).__name__
    if loss_fn.renormalize and loss_fn.aggregation in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
        raise SpecError(
            f"{name}: renormalize=True needs a token-count denominator, i.e. aggregation 'token_mean' or "
            f"'seq_mean_token_mean'; got aggregation {loss_fn.aggregation!r}."
        )
    if loss_fn.max_length is not None and loss_fn.aggregation != "seq_mean_token_sum_norm":
        raise SpecError(
            f"{name}: max_length is only used by aggregation 'seq_mean_token_sum_norm', got aggregation "
            f"{loss_fn.aggregation!r}; drop max_length or change the aggregation."
        )


def check_credit(rollout: Rollout, credit: Credit, who: str) -> None:
    if tuple(credit.token_weights.shape) != tuple(rollout.response_mask.shape):
        raise RolloutError(
            f"{who}: credit is for shape {list(credit.token_weights.shape)} but the rollout is "
            f"{list(rollout.response_mask.shape)}; select the same rows from both."
        )


def check_logprobs(logprobs: Tensor, rollout: Rollout, who: str) -> None:
    if not isinstance(logprobs, Tensor) or tuple(logprobs.shape) != tuple(rollout.response_mask.shape):
        got = list(logprobs.shape) if isinstance(logprobs, Tensor) else type(logprobs).__name__
        raise RolloutError(
            f"{who}: logprobs must be [B, T] = {list(rollout.response_mask.shape)} (log-probs of the response "
            f"tokens under the current policy), got {got}. Use credit.select(rows) and rollout.select(rows) "
            f"together for micro-batches."
        )
    if not logprobs.dtype.is_floating_point:
        raise RolloutError(f"{who}: logprobs must be floating, got {logprobs.dtype}.")


@register("loss", "clipped_surrogate")
@attrs.frozen
class ClippedSurrogate:
    """PPO/GRPO clipped surrogate with clip-higher, dual clip, KL and entropy terms, four aggregations.

    Per token (Schulman et al. 2017; DAPO arXiv 2503.14476 for clip-higher; dual clip from
    Ye et al. 2020), with ``rho = exp(logp - logp_old)`` and token weight ``w``::

        l_t = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)
        l_t = min(l_t, -dual_clip * A)                       where A < 0 (if dual_clip)
        l_t = w_t * l_t                                      (exact folding of weights w >= 0)
        loss = agg(l) + kl_coef * agg(k3(ref, logp)) + entropy_penalty * agg(-logp)

    ``k3 = exp(ref - logp) - (ref - logp) - 1``. The KL and the entropy term (VPPO's "entropy
    penalty") are unweighted and count every valid token. Aggregations (verl / TRL names):
    ``token_mean`` ``sum w l / sum mask`` (verl token-mean; TRL dapo/bnpo), ``seq_mean_token_mean``
    ``mean_i sum_t w l / T_i`` (TRL grpo), ``seq_mean_token_sum`` ``mean_i sum_t w l``,
    ``seq_mean_token_sum_norm`` ``sum w l / (B * L)`` (Dr. GRPO; ``L = max_length`` or the padded
    T, the largest across ranks). The denominators count **all valid tokens**; ``renormalize=True``
    divides by ``sum w`` instead (STAPO). Without ``rollout.old_logprobs`` the update is on-policy:
    ``logp_old = logp.detach()``.

    The surrogate and entropy terms run as one fused autograd function
    (``rlcredit.functional._loss.fused_surrogate``): the same value and gradient as
    ``F.aggregate(F.clipped_surrogate(...), ...)`` plus the entropy term through autograd (tested
    to 1e-5), with the gradient ``-c_t A_t rho_t`` (``c_t`` from ``rlcredit.functional.loss_coefficients``)
    formed in the forward pass: about a third of the elementwise passes, a padding log-prob that is
    NaN or inf gets exactly 0 gradient, and a NaN on a valid token gives a NaN loss. It is
    differentiable once (``create_graph=True`` raises).

    Args:
        clip_low: ``eps_low`` (>= 0). clip_high: ``eps_high`` (>= 0; DAPO 0.28).
        dual_clip: ``c > 1`` or None (off). aggregation: one of the four names above.
        renormalize: divide by the kept weight instead of the valid-token count.
        kl_coef: ``beta >= 0`` of the k3 KL to ``rollout.ref_logprobs`` (required when > 0).
        entropy_penalty: ``c >= 0`` of ``mean(-logp)`` (VPPO uses 0.06).
        max_length: Dr. GRPO's ``L`` (None: padded T, largest across ranks).

    Returns:
        ``LossOutput(loss, metrics)`` with metrics ``pg_loss``, ``clip_fraction``,
        ``kept_fraction``, ``kl``, ``neg_logprob`` (detached).

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
    """

    clip_low: float = attrs.field(default=0.2, validator=in_range(0.0, 1.0, hi_open=True))
    clip_high: float = attrs.field(default=0.2, validator=in_range(0.0))
    dual_clip: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(in_range(1.0, lo_open=True))
    )
    aggregation: str = attrs.field(default="token_mean", validator=one_of(*AGGREGATIONS))
    renormalize: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    kl_coef: float = attrs.field(default=0.0, validator=in_range(0.0))
    entropy_penalty: float = attrs.field(default=0.0, validator=in_range(0.0))
    max_length: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.and_(
            attrs.validators.instance_of(int), in_range(1)))
    )

    def __attrs_post_init__(self) -> None:
        _check_aggregation_options(self)

    @property
    def requires(self) -> tuple[str, ...]:
        return ("ref_logprobs",) if self.kl_coef > 0 else ()

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None) -> LossOutput:
        check_logprobs(logprobs, rollout, "clipped_surrogate")
        check_credit(rollout, credit, "clipped_surrogate")
        mask = rollout.response_mask
        old = rollout.old_logprobs
        # On-policy: logp_old = logp.detach(), with padding zeroed (the fused sums need it finite).
        old = torch.where(mask, logprobs.detach().float(), 0.0) if old is None else old.float()
        adv = credit.advantages.float()
        if adv.device != mask.device or logprobs.device != mask.device:
            raise RolloutError(
                f"clipped_surrogate: logprobs ({logprobs.device}), advantages ({adv.device}) and the rollout "
                f"({mask.device}) must be on one device; move them with `.to({str(mask.device)!r})`."
            )
        agg = {"mode": self.aggregation, "max_length": self.max_length, "reducer": reducer,
               "counts": rollout.token_counts}
        m = rollout.float_mask
        # Weights from Strategy.assign are 0 on padding; the product with the mask makes it so
        # for a hand-made Credit.
        weights = credit.token_weights.float()
        if not credit._zero_padding:
            weights = m * weights
        scale = loss_scale(mask, weights, renormalize=self.renormalize, **agg)
        entropy_scale = None
        if self.entropy_penalty > 0:  # counts every valid token, whatever the weights
            entropy_scale = loss_scale(mask, None, renormalize=False, **agg) if self.renormalize else scale
        loss, pg_loss, neg_logp, active = fused_surrogate(
            logprobs, old, adv, weights, scale, mask, m, clip_low=self.clip_low, clip_high=self.clip_high,
            dual_clip=self.dual_clip, entropy_penalty=self.entropy_penalty, entropy_scale=entropy_scale,
        )

        def clip_fraction() -> Tensor:  # the valid tokens without gradient (padding has active = 1)
            n = rollout.token_counts.sum()
            return (n - torch.dot(active.reshape(-1), m.reshape(-1))) / n.clamp_min(1).float()

        return _surrogate_output(self, "clipped_surrogate", loss, pg_loss, neg_logp, clip_fraction, logprobs,
                                 rollout, credit, reducer)


def _surrogate_output(loss_fn: ClippedSurrogate | GSPO, who: str, loss: Tensor, pg_loss: Tensor,
                      neg_logp: Tensor | None, clip_fraction: Any, logprobs: Tensor, rollout: Rollout,
                      credit: Credit, reducer: Reducer | None) -> LossOutput:
    """The part every surrogate loss shares: the KL term and the metrics.

    ``loss`` is the surrogate plus, when ``entropy_penalty > 0``, ``entropy_penalty * neg_logp``
    (the aggregated ``-logp``); ``pg_loss`` the surrogate part; ``clip_fraction`` a thunk.
    """
    mask = rollout.response_mask
    metrics: dict[str, Any] = {}
    if loss_fn.kl_coef > 0:
        if rollout.ref_logprobs is None:
            raise RolloutError(f"{who}: kl_coef > 0 needs rollout.ref_logprobs; pass them or set kl_coef=0.")
        kl = F.aggregate(F.k3_kl(logprobs, rollout.ref_logprobs), mask, mode=loss_fn.aggregation,
                         max_length=loss_fn.max_length, reducer=reducer)
        loss = loss + loss_fn.kl_coef * kl
        metrics["kl"] = kl.detach()
    if neg_logp is not None:
        metrics["neg_logprob"] = neg_logp.detach()
    metrics["pg_loss"] = pg_loss.detach()
    # Computed on first access only: a step that logs nothing pays nothing. Weights are 0 on padding.
    weights = credit.token_weights
    metrics["clip_fraction"] = clip_fraction
    metrics["kept_fraction"] = lambda: (weights > 0).sum() / mask.sum().clamp_min(1).float()
    return LossOutput(loss=loss, metrics=LazyMetrics(metrics))


@register("loss", "gspo")
@attrs.frozen
class GSPO:
    """GSPO: one clipped, length-normalised importance ratio per response (arXiv 2507.18071).

    Zheng et al. 2025, *Group Sequence Policy Optimization*. With ``T_i`` valid tokens::

        s_i = exp( (1/T_i) sum_t (logp_{i,t} - logp_old_{i,t}) )       (log-ratios clamped to +-20)
        l_i = -min(s_i A_i, clip(s_i, 1 - clip_low, 1 + clip_high) A_i)
        loss = mean_i (1/T_i) sum_t w_{i,t} l_{i,t}  (+ kl_coef * agg(k3) + entropy_penalty * agg(-logp))

    computed in GSPO-token form (the paper's Eq. 13): every token carries
    ``s_{i,t} = sg[s_i] * pi(y_t) / sg[pi(y_t)]``, equal to ``s_i`` in value, so with ``[B]``
    advantages and uniform weights the loss and its gradient are exactly GSPO's sequence
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

    clip_low: float = attrs.field(default=3e-4, validator=in_range(0.0, 1.0, hi_open=True))
    clip_high: float = attrs.field(default=4e-4, validator=in_range(0.0))
    aggregation: str = attrs.field(default="seq_mean_token_mean", validator=one_of(*AGGREGATIONS))
    renormalize: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    kl_coef: float = attrs.field(default=0.0, validator=in_range(0.0))
    entropy_penalty: float = attrs.field(default=0.0, validator=in_range(0.0))
    max_length: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.and_(
            attrs.validators.instance_of(int), in_range(1)))
    )

    def __attrs_post_init__(self) -> None:
        _check_aggregation_options(self)

    @property
    def requires(self) -> tuple[str, ...]:
        return ("ref_logprobs",) if self.kl_coef > 0 else ()

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None) -> LossOutput:
        check_logprobs(logprobs, rollout, "gspo")
        check_credit(rollout, credit, "gspo")
        mask = rollout.response_mask
        old = rollout.old_logprobs if rollout.old_logprobs is not None else logprobs.detach()
        log_ratio = sequence_log_ratio(logprobs, old, mask)
        # The ratio is already relative to pi_old, so the surrogate's own "old" is 0.
        per_token, clipped = F.clipped_surrogate(
            log_ratio, torch.zeros_like(log_ratio), credit.advantages,
            clip_low=self.clip_low, clip_high=self.clip_high, mask=mask,
        )
        agg = {"mode": self.aggregation, "max_length": self.max_length, "reducer": reducer}
        pg_loss = F.aggregate(per_token, mask, credit.token_weights, renormalize=self.renormalize, **agg)
        loss, neg_logp = pg_loss, None
        if self.entropy_penalty > 0:
            neg_logp = F.aggregate(-logprobs.float(), mask, **agg)
            loss = loss + self.entropy_penalty * neg_logp
        clip_fraction = lambda: (clipped & mask).sum() / mask.sum().clamp_min(1).float()  # noqa: E731
        return _surrogate_output(self, "gspo", loss, pg_loss, neg_logp, clip_fraction, logprobs, rollout, credit,
                                 reducer)
