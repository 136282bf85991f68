"""Per-token policy-gradient losses and their aggregation to a scalar."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rlcredit.errors import RLCreditError, RolloutError
from rlcredit.functional._checks import (
    check_bool,
    check_choice,
    check_device,
    check_float,
    check_positive_int,
    check_real,
    check_same_shape,
    check_shape,
    count,
    fill_outside_,
    float_mask,
)
from rlcredit.functional._reduce import Reducer, all_max, all_sum, world_size

__all__ = [
    "AGGREGATIONS", "aggregate", "clipped_surrogate", "k3_kl", "loss_coefficients", "masked_mean",
]

#: The loss aggregation modes of ``aggregate`` (verl's names with ``_`` for ``-``).
AGGREGATIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm")

# exp(20) ~ 4.9e8 is far beyond any clip range, and exp(+-20) is finite in bf16/fp16/fp32, so
# clamping the log-ratio loses nothing that matters while a stale or -inf log-prob can no longer
# turn the ratio into inf (whose loss is inf and whose clipped branch multiplies 0 by inf).
_LOG_RATIO_BOUND = 20.0


def _opt_mask(fn: str, mask: object, ref_name: str, ref: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = check_same_shape(fn, "mask", mask, ref_name, ref)
    check_bool(fn, "mask", mask)
    return mask


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate loss per token, with asymmetric (clip-higher) and dual clipping.

    Schulman et al. 2017, *Proximal Policy Optimization Algorithms* (arXiv 1707.06347); clip-higher
    ``clip_high > clip_low`` from DAPO (arXiv 2503.14476); dual clip from Ye et al. 2020,
    *Mastering Complex Control in MOBA Games with Deep RL* (arXiv 1912.09729):

        rho = exp(clamp(logpi - logpi_old, -20, 20))
        l   = -min(rho * A, clip(rho, 1 - clip_low, 1 + clip_high) * A)
        l   = min(l, -c * A)        where A < 0, when dual_clip = c is set

    The dual clip caps the loss of negative-advantage tokens whose ratio has grown very large.
    Token weights fold in exactly afterwards (``w * l`` for ``w >= 0``; see ``aggregate``).
    The gradient flows through ``logprobs`` only (``old_logprobs`` and ``advantages`` are
    constants of the surrogate and are detached); a token whose clipped branch is taken has
    exactly zero gradient.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the current policy (any float
            dtype, may require grad; maths in float32).
        old_logprobs: ``[B, T]`` log-probs under the behaviour policy.
        advantages: ``[B]`` (one per sequence) or ``[B, T]`` (per token).
        clip_low: ``0 <= clip_low < 1``, the lower clip ``1 - clip_low``.
        clip_high: ``>= 0``, the upper clip ``1 + clip_high`` (0.28 in DAPO).
        dual_clip: ``c > 1`` or None (off); VPPO and verl use 3.0.
        mask: optional ``[B, T]`` bool; padding then gets loss 0 and ``is_clipped`` False.
            Without it, padding values are whatever the inputs give there (aggregate with a mask).

    Returns:
        ``(per_token_loss, is_clipped)``: ``[B, T]`` float32 losses and a ``[B, T]`` bool that is
        True where a clip (ratio clip or dual clip) set the loss, i.e. where the gradient is zero.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import clipped_surrogate
        >>> ratio = torch.tensor([[0.5, 1.1, 1.5]])
        >>> old = torch.zeros(1, 3)
        >>> loss, clipped = clipped_surrogate(ratio.log(), old, torch.tensor([1.0]))
        >>> loss  # A > 0: -rho*A inside the range, -(1 + 0.2)*A above it
        tensor([[-0.5000, -1.1000, -1.2000]])
        >>> clipped
        tensor([[False, False,  True]])
        >>> loss, clipped = clipped_surrogate(ratio.log(), old, torch.tensor([-1.0]), dual_clip=3.0)
        >>> loss  # A < 0: -(1 - 0.2)*A below the range; rho = 1.5 < 3 so the dual clip is idle
        tensor([[0.8000, 1.1000, 1.5000]])
        >>> clipped
        tensor([[ True, False, False]])
    """
    fn = "clipped_surrogate"
    logprobs = check_shape(fn, "logprobs", logprobs, "BT", [None, None])
    check_float(fn, "logprobs", logprobs)
    old_logprobs = check_same_shape(fn, "old_logprobs", old_logprobs, "logprobs", logprobs)
    check_float(fn, "old_logprobs", old_logprobs)
    B, T = logprobs.shape
    if not isinstance(advantages, torch.Tensor) or advantages.shape not in (
        torch.Size([B]),
        torch.Size([B, T]),
    ):
        got = (
            "shape [" + ", ".join(map(str, advantages.shape)) + "]"
            if isinstance(advantages, torch.Tensor)
            else type(advantages).__name__
        )
        raise RolloutError(
            f"{fn}: `advantages` must have shape [B={B}] or [B={B}, T={T}], got {got}; "
            f"pass one advantage per sequence or per token of `logprobs`."
        )
    check_float(fn, "advantages", advantages)
    mask = _opt_mask(fn, mask, "logprobs", logprobs)
    check_device(
        fn, [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages),
             ("mask", mask)]
    )
    check_real(fn, "clip_low", clip_low, low=0.0, high=1.0, high_open=True)
    check_real(fn, "clip_high", clip_high, low=0.0)
    if dual_clip is not None:
        check_real(fn, "dual_clip", dual_clip, low=1.0, low_open=True)

    adv = advantages.detach().float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    log_ratio = (logprobs.float() - old_logprobs.detach().float()).clamp(
        -_LOG_RATIO_BOUND, _LOG_RATIO_BOUND
    )
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    # Pick the branch explicitly (rather than torch.maximum) so that a clipped token's gradient
    # is exactly zero and `is_clipped` says precisely which tokens had it.
    is_clipped = clipped > unclipped
    loss = torch.where(is_clipped, clipped, unclipped)
    if dual_clip is not None:
        cap = -dual_clip * adv
        capped = (adv < 0) & (cap < loss)
        loss = torch.where(capped, cap.expand_as(loss), loss)
        is_clipped = is_clipped | capped
    if mask is not None:
        loss = torch.where(mask, loss, torch.zeros((), device=loss.device))
        is_clipped = is_clipped & mask
    return loss, is_clipped


def k3_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per sampled token.

    Schulman 2020, *Approximating KL Divergence* (http://joschu.net/blog/kl-approx.html); the
    GRPO reference penalty (arXiv 2402.03300, Eq. 4) and VPPO's sampled visual dependency:

        d  = clamp(logpi_ref - logpi_theta, -20, 20)
        k3 = exp(d) - d - 1  >= 0

    computed as ``expm1(d) - d``, which keeps the small-``d`` values accurate and non-negative.
    The clamp keeps ``exp`` finite when a log-prob is ``-inf`` or wildly stale. Differentiable
    w.r.t. ``logprobs``.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy (any float dtype).
        ref_logprobs: ``[B, T]`` log-probs of the same tokens under the reference.
        mask: optional ``[B, T]`` bool; padding then gets 0.

    Returns:
        ``[B, T]`` float32 per-token KL estimates.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import k3_kl
        >>> k3_kl(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]]))  # e - 1 - 1 = 0.7183
        tensor([[0.0000, 0.7183]])
    """
    fn = "k3_kl"
    logprobs = check_shape(fn, "logprobs", logprobs, "BT", [None, None])
    check_float(fn, "logprobs", logprobs)
    ref_logprobs = check_same_shape(fn, "ref_logprobs", ref_logprobs, "logprobs", logprobs)
    check_float(fn, "ref_logprobs", ref_logprobs)
    mask = _opt_mask(fn, mask, "logprobs", logprobs)
    check_device(fn, [("logprobs", logprobs), ("ref_logprobs", ref_logprobs), ("mask", mask)])
    d = (ref_logprobs.float() - logprobs.float()).clamp_(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    zero = torch.zeros((), device=d.device)
    if d.requires_grad:
        kl = torch.expm1(d) - d
        return kl if mask is None else torch.where(mask, kl, zero)
    # No graph records it: in place (on CPU a fresh [B, T] buffer costs page faults).
    kl = torch.expm1(d).sub_(d)
    return kl if mask is None else torch.where(mask, kl, zero, out=kl)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each row over its valid tokens; 0 for a row with none.

    ``mean_i = sum_t x_{i,t} * m_{i,t} / sum_t m_{i,t}`` (VPPO's trajectory score
    ``S_bar_i = sum_t S_t / T_i``). Padding values never enter, even when they are NaN or inf.

    Args:
        x: ``[B, T]`` values (any float dtype; maths in float32).
        mask: ``[B, T]`` bool, True on valid tokens.

    Returns:
        ``[B]`` float32 row means.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import masked_mean
        >>> x = torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[True, True, False], [False, False, False]])
        >>> masked_mean(x, mask)
        tensor([1.5000, 0.0000])
    """
    fn = "masked_mean"
    x = check_shape(fn, "x", x, "BT", [None, None])
    check_float(fn, "x", x)
    mask = check_same_shape(fn, "mask", mask, "x", x)
    check_bool(fn, "mask", mask)
    check_device(fn, [("x", x), ("mask", mask)])
    total = torch.where(mask, x.float(), torch.zeros((), device=x.device)).sum(-1)
    return total / mask.sum(-1).clamp_min(1)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    mode: str = "token_mean",
    renormalize: bool = False,
    max_length: int | None = None,
    reducer: Reducer | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to the scalar to back-propagate, in one of verl's four modes.

    With ``x_{i,t} = w_{i,t} * l_{i,t}`` on valid tokens and 0 on padding (token weights fold in
    exactly for ``w >= 0``), ``T_i`` the valid tokens of row ``i`` and ``B`` the number of rows:

    mode                        formula                          verl name / TRL loss_type
    ``token_mean``              ``sum x / sum mask``             token-mean / dapo, bnpo
    ``seq_mean_token_mean``     ``mean_i (sum_t x_{i,t} / T_i)`` seq-mean-token-mean / grpo
    ``seq_mean_token_sum``      ``mean_i sum_t x_{i,t}``         seq-mean-token-sum / --
    ``seq_mean_token_sum_norm`` ``sum x / (B * L_max)``          seq-mean-token-sum-norm / dr_grpo

    The denominators count **all valid tokens** (as VPPO, TRL and the 80/20 paper do), so a
    weight of 0 removes a token's loss without raising the others'. ``renormalize=True`` counts
    ``sum w`` instead (STAPO): ``sum x / sum w`` for ``token_mean`` and ``sum_t x / sum_t w`` per
    row for ``seq_mean_token_mean``; the token-sum modes have no token count and reject it.
    ``L_max`` is ``max_length`` (Dr. GRPO's fixed generation budget) or the padded ``T``.

    Degenerate inputs: a row without valid tokens adds 0 but still counts in ``B`` for the
    ``seq_mean_*`` modes (like TRL, and verl when given its global batch size); an all-padding
    batch gives 0 with an all-zero (not None) gradient. Padding never gets gradient, even when its loss is NaN or inf.

    Across ranks (``reducer`` over ``R`` ranks) each rank returns ``R * local_sum / global_den``
    where the denominator (valid tokens, ``sum w``, the number of rows ``B``, and the padded
    ``T`` via ``reducer.max``) is global: the mean of the ranks' losses, which is what DDP's
    gradient averaging sees, equals the loss of one process holding every row.

    Args:
        per_token: ``[B, T]`` per-token losses (any float dtype; maths in float32).
        mask: ``[B, T]`` bool, True on valid tokens.
        weights: optional ``[B, T]`` token weights ``>= 0`` (None: all 1).
        mode: one of ``AGGREGATIONS``.
        renormalize: divide by ``sum w`` instead of the valid-token count.
        max_length: ``L_max`` of ``seq_mean_token_sum_norm`` (an int >= 1; None: padded ``T``).
        reducer: cross-rank reducer, or None when this process holds the whole batch.

    Returns:
        A float32 scalar tensor (0-d), differentiable w.r.t. ``per_token``.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import aggregate
        >>> loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> aggregate(loss, mask)  # (1 + 2 + 3 + 4) / 4
        tensor(2.5000)
        >>> aggregate(loss, mask, mode="seq_mean_token_mean")  # (6 / 3 + 4 / 1) / 2
        tensor(3.)
        >>> aggregate(loss, mask, mode="seq_mean_token_sum")  # (6 + 4) / 2
        tensor(5.)
        >>> aggregate(loss, mask, mode="seq_mean_token_sum_norm")  # 10 / (2 * 3)
        tensor(1.6667)
        >>> w = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
        >>> aggregate(loss, mask, w), aggregate(loss, mask, w, renormalize=True)  # 4 / 4, 4 / 2
        (tensor(1.), tensor(2.))
    """
    fn = "aggregate"
    per_token = check_shape(fn, "per_token", per_token, "BT", [None, None])
    check_float(fn, "per_token", per_token)
    mask = check_same_shape(fn, "mask", mask, "per_token", per_token)
    check_device(fn, [("per_token", per_token), ("mask", mask)])
    coef = _coefficients(fn, mask, weights, mode, renormalize, max_length, reducer)
    # where(), not a product with the mask: 0 * inf and 0 * nan on padding would poison the sum
    # and, through the product's backward, the gradient of every padding position.
    zero = torch.zeros((), device=per_token.device)
    return (torch.where(mask, per_token.float(), zero) * coef).sum()


def loss_coefficients(
    mask: torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    mode: str = "token_mean",
    renormalize: bool = False,
    max_length: int | None = None,
    reducer: Reducer | None = None,
) -> torch.Tensor:
    """The ``[B, T]`` float32 ``c`` with ``aggregate(x, mask, weights, ...) == sum(c * x)``.

    Every aggregation is linear in the per-token loss, so it is a weighted sum whose weight of
    token ``(i, t)`` is ``c_{i,t} = R * w_{i,t} / den_{i}``, ``den`` being the mode's denominator
    (see ``aggregate``; ``R`` ranks). This is also the gradient of the aggregated loss
    w.r.t. each token's loss: ``aggregate`` is ``sum(where(mask, x, 0) * c)``.

    Args:
        mask: ``[B, T]`` bool, True on valid tokens.
        weights: optional ``[B, T]`` float token weights ``>= 0`` (padding values are ignored);
            None for all 1.
        mode, renormalize, max_length, reducer: as in ``aggregate``.

    Returns:
        ``[B, T]`` float32 coefficients, 0 on padding.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import aggregate, loss_coefficients
        >>> mask = torch.tensor([[True, True, True], [True, False, False]])
        >>> loss_coefficients(mask, mode="seq_mean_token_mean")  # 1 / (B * T_i)
        tensor([[0.1667, 0.1667, 0.1667],
                [0.5000, 0.0000, 0.0000]])
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
        >>> (loss_coefficients(mask, mode="seq_mean_token_mean") * x).sum(), aggregate(x, mask, mode="seq_mean_token_mean")
        (tensor(3.), tensor(3.))
    """
    return _coefficients("loss_coefficients", mask, weights, mode, renormalize, max_length, reducer)


def _coefficients(fn: str, mask: torch.Tensor, weights: torch.Tensor | None, mode: str, renormalize: bool,
                  max_length: int | None, reducer: Reducer | None) -> torch.Tensor:
    """``loss_coefficients`` with its argument checks, errors named after ``fn``."""
    mask = check_shape(fn, "mask", mask, "BT", [None, None])
    check_bool(fn, "mask", mask)
    if weights is not None:
        weights = check_same_shape(fn, "weights", weights, "mask", mask)
        check_float(fn, "weights", weights)
    check_device(fn, [("mask", mask), ("weights", weights)])
    check_choice(fn, "aggregation mode", mode, AGGREGATIONS)
    if renormalize and mode in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
        raise RLCreditError(
            f"{fn}: `renormalize=True` has no effect with mode {mode!r} (it has no token-count "
            f"denominator); use it with 'token_mean' or 'seq_mean_token_mean', or drop it."
        )
    if max_length is not None:
        check_positive_int(fn, "max_length", max_length)
        if mode != "seq_mean_token_sum_norm":
            raise RLCreditError(
                f"{fn}: `max_length` is only used by mode 'seq_mean_token_sum_norm', got mode "
                f"{mode!r}; drop `max_length` or change the mode."
            )
    # A select, not a product: weights on padding may be anything, NaN included.
    w = float_mask(mask) if weights is None else torch.where(mask, weights.float(), torch.zeros((), device=mask.device))
    scale = loss_scale(mask, w if weights is not None else None, mode=mode, renormalize=renormalize,
                       max_length=max_length, reducer=reducer)
    return w.mul_(scale)


def loss_scale(
    mask: torch.Tensor,
    weights: torch.Tensor | None,
    *,
    mode: str,
    renormalize: bool,
    max_length: int | None,
    reducer: Reducer | None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The factor of ``loss_coefficients``: ``c = w * scale``, ``scale`` 0-d or ``[B, 1]``.

    ``counts``: the ``[B]`` valid tokens per row when the caller has them (else counted here).
    """
    device = mask.device
    R = world_size(reducer)
    B, T = mask.shape
    if counts is None and mode in ("token_mean", "seq_mean_token_mean") and not (weights is not None and renormalize):
        counts = count(mask, -1)
    if mode == "token_mean":
        den = (weights.sum() if weights is not None and renormalize else counts.sum()).reshape(1)
        den = all_sum(den, reducer).float().reshape(())
        return R / torch.where(den > 0, den, torch.ones_like(den))
    rows = all_sum(torch.tensor([B], device=device), reducer).float().reshape(())
    rows = torch.where(rows > 0, rows, torch.ones_like(rows))
    if mode == "seq_mean_token_mean":
        row_den = weights.sum(-1) if weights is not None and renormalize else counts.float()
        row_den = torch.where(row_den > 0, row_den, torch.ones_like(row_den))
        return (R / (row_den * rows))[:, None]
    if mode == "seq_mean_token_sum":
        return R / rows
    if max_length is None:
        length = all_max(torch.tensor([T], device=device), reducer).float().reshape(()).clamp_min(1.0)
    else:
        length = torch.tensor(float(max_length), device=device)
    return R / (rows * length)


class _FusedSurrogate(torch.autograd.Function):
    """The loss of ``fused_surrogate`` with its gradient computed in the forward pass.

    Autograd through ``clipped_surrogate`` and ``aggregate`` records about twenty
    elementwise ops and replays as many in the backward; here the gradient
    ``-c_t A_t rho_t`` on tokens inside their clip bounds (0 elsewhere), minus the entropy
    term's constant ``penalty * e_t``, comes out of the same few passes that give the value, and
    the backward is one multiply.
    """

    @staticmethod
    def forward(ctx, logprobs, old, weights, factor, lo, hi, mask, m, penalty, ent_scale):  # type: ignore[override]
        # A select, not a product: padding log-probs may be NaN or inf. In place from here on:
        # on CPU every fresh [B, T] buffer costs page faults comparable to the arithmetic.
        d = fill_outside_(logprobs.float() - old, mask)
        neg_logp = None
        if penalty:
            # sum_t e_t logp_t, e = ent_scale * m: d is 0 on padding, old finite everywhere.
            if ent_scale.dim() == 0:
                lin = ent_scale * (d.sum() + torch.dot(m.reshape(-1), old.reshape(-1)))
            else:
                lin = torch.dot(ent_scale.reshape(-1), d.sum(-1) + (m * old).sum(-1))
            neg_logp = -lin
        ratio = d.clamp_(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND).exp_()
        # The ratio the pessimistic (and dual) clip keeps (max/min: faster than clamp with tensor bounds).
        kept = torch.maximum(ratio, lo)
        torch.minimum(kept, hi, out=kept)
        weighted = weights * factor  # c_t * (-A_t); l_t = -A_t * kept_t
        pg = torch.dot(weighted.reshape(-1), kept.reshape(-1))
        active = torch.eq(kept, ratio, out=kept)  # 1.0 where the gradient flows
        # A distinct tensor even without the entropy term: pg is returned as a non-differentiable metric.
        loss = pg.clone() if neg_logp is None else pg + penalty * neg_logp
        if ctx.needs_input_grad[0]:
            grad = weighted.mul_(ratio).mul_(active)
            if penalty:
                grad.addcmul_(m, ent_scale, value=-penalty)
            ctx.save_for_backward(grad)
            ctx.in_dtype = logprobs.dtype
        outputs = (pg, active) if neg_logp is None else (pg, neg_logp, active)
        ctx.mark_non_differentiable(*outputs)
        return loss, pg, neg_logp, active

    @staticmethod
    @once_differentiable  # a second derivative would silently be 0: raise instead
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if grad.dtype == ctx.in_dtype and grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
            # The usual `loss.backward()` on CPU (where the check is free): hand the saved gradient
            # over instead of writing a copy. Autograd never modifies a gradient it did not create.
            return grad, *([None] * 9)
        return (grad * grad_loss).to(ctx.in_dtype), *([None] * 9)


def fused_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    weights: torch.Tensor,
    scale: torch.Tensor,
    mask: torch.Tensor,
    float_mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    entropy_penalty: float = 0.0,
    entropy_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``sum(c * clipped_surrogate(...)) + entropy_penalty * sum(e * -logprobs)`` over valid tokens.

    With ``c = weights * scale`` and ``e = float_mask * entropy_scale`` (see ``loss_scale``),
    equal in value and gradient to ``aggregate(clipped_surrogate(...), ...)`` plus
    ``entropy_penalty * aggregate(-logprobs, ...)`` through autograd, in a third of the passes.
    The per-token loss is ``l_t = -A_t * clamp(rho_t, lo_t, hi_t)``, which is the pessimistic
    clip: ``[0, 1 + clip_high]`` for ``A > 0``, ``[1 - clip_low, dual_clip or inf]`` for
    ``A < 0``, no bound for ``A = 0``; the gradient flows where the clamp keeps ``rho``.

    Internal to ``ClippedSurrogate``, unchecked: ``old_logprobs`` float32 and finite,
    ``advantages`` float32 ``[B]`` or ``[B, T]`` and finite, ``weights`` float32 ``[B, T]``,
    finite and 0 on padding, ``scale`` and ``entropy_scale`` 0-d or ``[B, 1]``; ``logprobs`` any
    float dtype, padding may be non-finite.

    Returns:
        ``(loss, pg, neg_logp, active)``: the loss (differentiable); its surrogate part and its
        ``aggregate(-logprobs)`` part (None without an entropy penalty), detached; and a
        ``[B, T]`` float32 that is 1 where the surrogate's gradient flows (0 where a clip set the
        loss; 1 on padding).

    Examples:
        >>> import torch
        >>> from rlcredit.functional import aggregate, clipped_surrogate
        >>> from rlcredit.functional._loss import fused_surrogate
        >>> mask = torch.tensor([[True, True, True], [True, True, False]])
        >>> m = mask.float()
        >>> logp = torch.tensor([[-0.5, -1.0, -2.0], [-1.0, -0.2, float("nan")]], requires_grad=True)
        >>> old, adv = torch.full((2, 3), -1.0), torch.tensor([1.0, -1.0])
        >>> scale = torch.tensor(1 / 5)  # token_mean over 5 valid tokens
        >>> loss, pg, _, active = fused_surrogate(logp, old, adv, m, scale, mask, m,
        ...                                       clip_low=0.2, clip_high=0.2)
        >>> per_token, clipped = clipped_surrogate(logp, old, adv, mask=mask)
        >>> torch.allclose(loss, aggregate(per_token, mask)), active  # rho = e^0.5 > 1.2 is clipped
        (True, tensor([[0., 1., 1.],
                [1., 1., 1.]]))
        >>> loss.backward(); logp.grad  # -c A rho where the clip keeps rho; NaN padding gets 0
        tensor([[-0.0000, -0.2000, -0.0736],
                [ 0.2000,  0.4451,  0.0000]])
    """
    neg = advantages < 0
    inf = torch.full((), float("inf"), device=advantages.device)
    lo = torch.where(neg, 1.0 - clip_low, 0.0)
    hi = torch.where(advantages > 0, 1.0 + clip_high, inf if dual_clip is None else torch.where(neg, dual_clip, inf))
    neg_adv = -advantages
    if advantages.dim() == 1:
        lo, hi, neg_adv = lo[:, None], hi[:, None], neg_adv[:, None]
    return _FusedSurrogate.apply(logprobs, old_logprobs, weights, scale * neg_adv, lo, hi, mask, float_mask,
                                 float(entropy_penalty), entropy_scale)
