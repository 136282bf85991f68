"""Per-token policy-gradient losses: the clipped surrogate (token or sequence ratio) and k3."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from rlcredit.errors import RolloutError
from rlcredit.functional._finite import finite_loss, pow2_scale, saturate
from rlcredit.functional._checks import check_bool, check_device, check_float, check_real, check_same_shape, check_shape

__all__ = ["clipped_surrogate", "k3_kl", "sequence_log_ratio", "surrogate_loss", "float32_logprobs"]

# exp(20) ~ 4.9e8 is far beyond any clip range, and exp(+-20) is finite in bf16/fp16/fp32, so
# clamping the log-ratio loses nothing that matters while a stale or -inf log-prob can no longer
# turn the ratio into inf (whose loss is inf and whose clipped branch multiplies 0 by inf).
_LOG_RATIO_BOUND = 20.0


class _Float32(torch.autograd.Function):
    """``x.float()`` whose backward casts the gradient back to ``x``'s dtype with ``saturate``."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.in_dtype = x.dtype
        return x.view_as(x) if x.dtype == torch.float32 else x.float()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return saturate(grad, ctx.in_dtype)


def float32_logprobs(logprobs: torch.Tensor) -> torch.Tensor:
    """The log-probs a loss computes with: float32, with gradients that fit the input's dtype.

    Every loss computes in float32 whatever the log-probs' dtype, so the gradient it forms is a
    float32 tensor; cast back to a float16 (or bfloat16) input it could exceed that dtype's range
    (one token with old log-prob -12, new log-prob 0 and ``A < 0``: a gradient of 1.6e5 > 65504).
    The gradient that flows back through this function is cast with ``saturate``: values beyond
    the input dtype's largest finite number become that number, never ``inf``; a float32
    gradient beyond 3.4e38 likewise. Idempotent: an input that already went through it is
    returned as it is.

    Args:
        logprobs: ``[B, T]`` log-probs of any float dtype (may require grad).

    Returns:
        ``[B, T]`` float32, differentiable w.r.t. ``logprobs``.

    Examples:
        >>> import torch
        >>> from rlcredit.functional._loss import float32_logprobs
        >>> lp = torch.zeros(1, 2, dtype=torch.float16, requires_grad=True)
        >>> (float32_logprobs(lp) * torch.tensor([1e5, -2.0])).sum().backward()
        >>> lp.grad.tolist()  # 1e5 does not fit float16: it saturates at 65504
        [[65504.0, -2.0]]
    """
    if isinstance(logprobs.grad_fn, _Float32._backward_cls):
        return logprobs
    return _Float32.apply(logprobs)


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
    d = (ref_logprobs.float() - logprobs.float()).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    kl = torch.expm1(d) - d
    return kl if mask is None else torch.where(mask, kl, torch.zeros((), device=d.device))


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO-token's per-token log-ratio: the value of ``log s_i``, the gradient of ``log pi_theta(y_t)``.

    Zheng et al. 2025, *Group Sequence Policy Optimization* (arXiv 2507.18071), Eq. 7 and 13:

        log s_i       = (1 / T_i) sum_t clamp(logpi_t - logpi_old_t, -20, 20)   over valid tokens
        log s_{i,t}   = sg[log s_i] + logpi_t - sg[logpi_t]

    so ``exp(log s_{i,t}) = s_i`` on every token of response ``i`` while
    ``d s_{i,t} / d logpi_t = s_i``: fed to the clipped surrogate with zero old log-probs and
    aggregated with ``seq_mean_token_mean`` it is GSPO's sequence objective (value and gradient),
    and it accepts per-token advantages. Padding gets ``log s_i`` with no gradient; rows without
    valid tokens get 0 (``s = 1``).

    Args:
        logprobs: ``[B, T]`` current log-probs (with grad).
        old_logprobs: ``[B, T]`` behaviour log-probs.
        mask: ``[B, T]`` bool, valid tokens.

    Returns:
        ``[B, T]`` float32 log-ratios.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import sequence_log_ratio
        >>> lp = torch.tensor([[-1.0, -2.0, -9.0]], requires_grad=True)
        >>> x = sequence_log_ratio(lp, torch.tensor([[-1.5, -2.0, 0.0]]), torch.tensor([[True, True, False]]))
        >>> x  # (0.5 + 0) / 2 on every token
        tensor([[0.2500, 0.2500, 0.2500]], grad_fn=<AddBackward0>)
        >>> x.sum().backward(); lp.grad  # each valid token's own log-prob, once
        tensor([[1., 1., 0.]])
    """
    fn = "sequence_log_ratio"
    logprobs = check_shape(fn, "logprobs", logprobs, "BT", [None, None])
    check_float(fn, "logprobs", logprobs)
    old_logprobs = check_same_shape(fn, "old_logprobs", old_logprobs, "logprobs", logprobs)
    check_float(fn, "old_logprobs", old_logprobs)
    mask = check_same_shape(fn, "mask", mask, "logprobs", logprobs)
    check_bool(fn, "mask", mask)
    check_device(fn, [("logprobs", logprobs), ("old_logprobs", old_logprobs), ("mask", mask)])
    zero = torch.zeros((), device=logprobs.device)
    lp = logprobs.float()
    with torch.no_grad():
        # where(), not a product: a -inf or NaN log-prob on padding must not reach the row sum.
        token = torch.where(mask, (lp - old_logprobs.float()).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND), zero)
        seq = token.sum(-1) / mask.sum(-1).clamp_min(1)
    return torch.where(mask, lp - lp.detach(), zero) + seq[:, None]


class _Surrogate(torch.autograd.Function):
    """The loss of ``surrogate_loss`` with its gradient formed in the forward pass.

    Autograd through ``clipped_surrogate`` and ``aggregate`` records about twenty elementwise
    ops and replays as many in the backward: on a GPU, where this loss is launch-bound, that is
    the cost. Here the gradient ``c_t (-A_t) rho_t`` on tokens inside their clip bounds (0
    elsewhere), minus the entropy term's constant ``penalty * e_t``, comes out of the passes that
    give the value, and the backward is one multiply. Both are formed from ``c (-A) / scale``
    (``scale`` a power of two >= 1 near the largest ``|A|``: exact), so advantages anywhere in
    float32's range times ratios of ``e^20`` overflow nothing on the way; a value or gradient
    whose exact result is beyond float32 saturates (``saturate``).
    """

    @staticmethod
    def forward(ctx, logprobs, log_ratio, scaled, scale, lo, hi, mask, penalty, entropy_coef):  # type: ignore[override]
        zero = torch.zeros((), device=log_ratio.device)
        neg_logp = None
        if penalty:
            # A select, not a product: padding log-probs may be NaN or inf. Log-probs are <= 0, so
            # the terms share a sign and an overflow can only saturate (never inf - inf).
            logp = torch.where(mask, logprobs.float(), zero)
            neg_logp = saturate(-torch.dot(entropy_coef.reshape(-1), logp.reshape(-1)), torch.float32)
        ratio = torch.where(mask, log_ratio, zero).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND).exp()
        kept = torch.minimum(torch.maximum(ratio, lo), hi)  # the ratio the pessimistic (and dual) clip keeps
        pg = saturate(torch.dot(scaled.reshape(-1), kept.reshape(-1)) * scale, torch.float32)
        active = kept == ratio  # where the gradient flows (padding included: ratio 1 is inside every range)
        # A distinct tensor even without the entropy term: pg is returned as a non-differentiable metric.
        loss = pg.clone() if neg_logp is None else saturate(pg + penalty * neg_logp, torch.float32)
        if ctx.needs_input_grad[0]:
            grad = torch.where(active & mask, scaled * ratio, zero)  # the gradient / scale
            if penalty:
                grad = grad - (penalty / scale) * entropy_coef
            ctx.save_for_backward(grad, scale)
            ctx.in_dtype = logprobs.dtype
        outputs = (pg, active) if neg_logp is None else (pg, neg_logp, active)
        ctx.mark_non_differentiable(*outputs)
        return loss, pg, neg_logp, active

    @staticmethod
    @once_differentiable  # a second derivative would silently be 0: raise instead
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        grad, scale = ctx.saved_tensors
        grad = grad * (grad_loss * scale)
        # float32 log-probs (ClippedSurrogate passes float32_logprobs, whose backward saturates)
        # need no cast; another dtype is cast here with the same saturation.
        return (grad if ctx.in_dtype == torch.float32 else saturate(grad, ctx.in_dtype)), *([None] * 8)


def surrogate_loss(
    logprobs: torch.Tensor,
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    coefficients: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None = None,
    entropy_penalty: float = 0.0,
    entropy_coefficients: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``sum(c * l) + entropy_penalty * sum(e * -logprobs)``, ``l`` the clipped surrogate of ``log_ratio``.

    The one surrogate path of ``rlcredit.losses.ClippedSurrogate``, for a token ratio
    (``log_ratio = logprobs - old_logprobs``) and a sequence ratio (GSPO:
    ``sequence_log_ratio``'s value) alike: ``log_ratio`` is the detached value of ``log rho``
    and its gradient w.r.t. ``logprobs`` is 1 per token in both cases. The per-token loss is
    ``l_t = -A_t * clamp(rho_t, lo_t, hi_t)``, the pessimistic clip: ``[0, 1 + clip_high]`` for
    ``A > 0``, ``[1 - clip_low, dual_clip or inf]`` for ``A < 0``, no bound for ``A = 0``; the
    gradient ``-c_t A_t rho_t`` flows where the clamp keeps ``rho``. ``c`` and ``e`` come from
    ``loss_coefficients`` (``e`` unweighted). Equal in value and gradient to
    ``aggregate(clipped_surrogate(...), ...)`` plus ``entropy_penalty * aggregate(-logprobs, ...)``
    through autograd, in a third of the elementwise passes.

    Internal, unchecked: ``log_ratio`` float32 ``[B, T]`` detached (padding ignored),
    ``advantages`` float32 ``[B]`` or ``[B, T]`` and finite, ``coefficients`` and
    ``entropy_coefficients`` float32 ``[B, T]``, finite and 0 on padding; ``logprobs`` any float
    dtype, padding may be non-finite.

    Returns:
        ``(loss, pg, neg_logp, active)``: the loss (differentiable w.r.t. ``logprobs``); its
        surrogate part and its ``sum(e * -logprobs)`` part (None without an entropy penalty),
        detached; and a ``[B, T]`` bool that is True where the surrogate's gradient flows (False
        where a clip set the loss; True on padding).

    Examples:
        >>> import torch
        >>> from rlcredit.functional import aggregate, clipped_surrogate, loss_coefficients
        >>> from rlcredit.functional._loss import surrogate_loss
        >>> mask = torch.tensor([[True, True, True], [True, True, False]])
        >>> logp = torch.tensor([[-0.5, -1.0, -2.0], [-1.0, -0.2, float("nan")]], requires_grad=True)
        >>> old, adv = torch.full((2, 3), -1.0), torch.tensor([1.0, -1.0])
        >>> c = loss_coefficients(mask)  # token_mean over 5 valid tokens
        >>> loss, pg, _, active = surrogate_loss(logp, logp.detach() - old, adv, c, mask, clip_low=0.2, clip_high=0.2)
        >>> per_token, clipped = clipped_surrogate(logp, old, adv, mask=mask)
        >>> torch.allclose(loss, aggregate(per_token, mask)), active  # rho = e^0.5 > 1.2 is clipped
        (True, tensor([[False,  True,  True],
                [ True,  True,  True]]))
        >>> loss.backward(); logp.grad  # -c A rho where the clip keeps rho; NaN padding gets 0
        tensor([[ 0.0000, -0.2000, -0.0736],
                [ 0.2000,  0.4451,  0.0000]])
    """
    neg = advantages < 0
    inf = torch.full((), float("inf"), device=advantages.device)
    lo = torch.where(neg, 1.0 - clip_low, 0.0)
    hi = torch.where(advantages > 0, 1.0 + clip_high, inf if dual_clip is None else torch.where(neg, dual_clip, inf))
    neg_adv = -advantages
    if advantages.dim() == 1:
        lo, hi, neg_adv = lo[:, None], hi[:, None], neg_adv[:, None]
    # Advantages may reach float32's range (huge rewards under Dr. GRPO) and ratios e^20: c (-A)
    # is carried divided by a power of two >= 1 near max |A| (computed on the [B] or [B, T]
    # advantages, not on [B, T] products), which is exact and leaves |c (-A) / scale| <= 2 c.
    scale = pow2_scale(torch.linalg.vector_norm(advantages, float("inf")).clamp_min(1.0)) if advantages.numel() \
        else torch.ones((), device=advantages.device)
    return _Surrogate.apply(logprobs, log_ratio, coefficients * (neg_adv / scale), scale, lo, hi, mask,
                            float(entropy_penalty), entropy_coefficients)
