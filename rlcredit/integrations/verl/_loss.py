"""The verl policy loss ``"rlcredit"`` and verl-style aggregation with verl's global batch statistics."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit.errors import SpecError
from rlcredit.functional import Totals
from rlcredit.integrations.verl._actor import verl_policy_loss
from rlcredit.integrations.verl._strategy import AGG_MODES, _get, resolve_strategy
from rlcredit.losses import GMPO, GSPO, ClippedSurrogate, ClipCov, KLCov
from rlcredit.rollout import Credit, Rollout

__all__ = ["aggregate", "compute_policy_loss", "verl_totals"]


def verl_totals(aggregation: str | None, mask: Tensor, *, dp_size: Any = 1, batch_num_tokens: Any = None,
                global_batch_size: Any = None, loss_scale_factor: Any = None, max_length: int | None = None) -> Totals:
    """verl's global batch info as the ``rlcredit.functional.Totals`` an aggregation divides by.

    verl's ``agg_loss`` divides each micro-batch's sum by the global mini-batch's statistics and
    multiplies by ``dp_size``, so that the gradients summed over micro-batches and averaged over
    ranks equal the loss of one process holding the whole mini-batch: ``tokens =
    batch_num_tokens``, ``rows = global_batch_size``, ``world = dp_size``. Without them (one
    rank) verl counts this micro-batch's valid tokens, and for the ``seq-*`` modes only its rows
    that have a valid token. ``length``: the loss's own ``max_length``, else verl's
    ``loss_scale_factor``, else the padded ``T``. ``aggregation=None`` fills every statistic (a
    loss that aggregates in more than one mode, or whose mode is fixed, like ``gmpo``); this is
    what the policy loss ``"rlcredit"`` passes (verl's ``ppo_loss`` always sets them all).

    Raises:
        SpecError: ``dp_size > 1`` without a global statistic the mode(s) need.

    Examples:
        >>> import torch
        >>> from rlcredit.integrations.verl import verl_totals
        >>> mask = torch.tensor([[True, True], [False, False]])
        >>> verl_totals("seq_mean_token_mean", mask).rows  # the row without a valid token is not counted
        tensor(1)
        >>> verl_totals("token_mean", mask, dp_size=4, batch_num_tokens=64)
        Totals(tokens=64, weight=None, rows=None, length=None, world=4)
        >>> verl_totals(None, mask, dp_size=2, batch_num_tokens=6, global_batch_size=4)
        Totals(tokens=6, weight=None, rows=4, length=2, world=2)
    """
    dp = int(dp_size or 1)
    tokens = rows = length = None
    if aggregation in (None, "token_mean"):
        tokens = batch_num_tokens
        if tokens is None:
            if dp > 1:
                raise SpecError("verl passes dp_size > 1 without batch_num_tokens; token-mean needs the global count.")
            tokens = mask.sum()
    if aggregation != "token_mean":
        rows = global_batch_size
        if rows is None:
            if dp > 1:
                raise SpecError("verl passes dp_size > 1 without global_batch_size; seq-mean modes need it.")
            rows = mask.any(dim=-1).sum()
    if aggregation in (None, "seq_mean_token_sum_norm"):
        length = max_length or loss_scale_factor or mask.shape[1]
    return Totals(tokens=tokens, rows=rows, length=length, world=dp)


def aggregate(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, *, dp_size: int = 1,
              batch_num_tokens: int | None = None, global_batch_size: int | None = None,
              loss_scale_factor: int | None = None) -> Tensor:
    """rlcredit's aggregation with verl's names and global batch statistics (verl's ``agg_loss`` contract).

    ``rlcredit.functional.aggregate`` on this micro-batch with verl's global denominators
    (``verl_totals``: ``token_mean``: ``sum x / batch_num_tokens * dp_size``; ``seq_*``:
    ``sum_i s_i / global_batch_size * dp_size``; ``seq-mean-token-sum-norm`` further divides by
    ``loss_scale_factor``, or the padded ``T``). The policy loss ``"rlcredit"`` divides the same way.

    Args:
        loss_mat: ``[B, T]`` per-token losses.
        loss_mask: ``[B, T]`` bool or 0/1 mask of valid tokens.
        loss_agg_mode: ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum"`` or
            ``"seq-mean-token-sum-norm"``.
        dp_size: data-parallel ranks.
        batch_num_tokens: valid tokens of the global mini-batch (required when ``dp_size > 1``).
        global_batch_size: rows of the global mini-batch (required when ``dp_size > 1``).
        loss_scale_factor: Dr. GRPO's ``L`` (None: padded ``T``).

    Returns:
        A float32 scalar.

    Raises:
        SpecError: unknown mode (verl's ``token-sum`` included) or missing global statistics.

    Examples:
        >>> import torch
        >>> from rlcredit.integrations.verl import aggregate
        >>> x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
        >>> m = torch.tensor([[1, 1, 1], [1, 0, 0]])
        >>> aggregate(x, m, "token-mean"), aggregate(x, m, "token-mean", dp_size=2, batch_num_tokens=8)
        (tensor(2.5000), tensor(2.5000))
    """
    if loss_agg_mode not in AGG_MODES:
        raise SpecError(
            f"unsupported loss_agg_mode {loss_agg_mode!r}; rlcredit aggregates with "
            f"{', '.join(map(repr, AGG_MODES))}."
        )
    mode = AGG_MODES[loss_agg_mode]
    mask = loss_mask.bool()
    totals = verl_totals(mode, mask, dp_size=dp_size, batch_num_tokens=batch_num_tokens,
                         global_batch_size=global_batch_size, loss_scale_factor=loss_scale_factor)
    return F.aggregate(loss_mat, mask, mode=mode, totals=totals)


# --- the policy loss -----------------------------------------------------------------------------


def _global_info(config: Any) -> dict[str, Any]:
    info = _get(config, "global_batch_info")
    return dict(info) if isinstance(info, Mapping) else {}


def _verl_metrics(loss: Any, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor,
                  own: Any) -> dict[str, Tensor]:
    """verl 0.9.1's pg metrics with the formulas of the verl loss mode each loss equals.

    ``clipped_surrogate``: ``vanilla``'s (``gspo``'s for a sequence ratio); ``gmpo``: ``geo_mean``'s
    (log-ratios outside ``[-clip_low, clip_high]`` with ``A > 0`` / ``A < 0``); ``kl_cov``: its
    ``ppo_kl = mean |log rho|``; ``clip_cov``: the cut share as ``pg_clipfrac``; ``cispo``,
    ``sapo`` and other losses: ``vanilla``'s ``ppo_kl`` and their own ``clip_fraction`` (0
    without one). Every loss reports the same three keys (0 where verl's mode has none).
    """
    with torch.no_grad():
        m = mask.float()
        zero = torch.zeros((), device=m.device)

        def masked_mean(x: Tensor) -> Tensor:  # verl_F.masked_mean: sum / (count + 1e-8)
            return torch.where(mask, x.float(), zero).sum() / (m.sum() + 1e-8)

        raw = torch.where(mask, log_prob.detach().float() - old_log_prob.float(), zero)  # log rho, unclamped
        log_ratio = raw.clamp(-20.0, 20.0)
        adv = torch.where(mask, advantages.float(), zero)
        if isinstance(loss, GMPO):
            clipped = raw != raw.clamp(-loss.clip_low, loss.clip_high)
            return {"actor/pg_clipfrac": masked_mean(clipped & (adv > 0)), "actor/ppo_kl": masked_mean(-raw),
                    "actor/pg_clipfrac_lower": masked_mean(clipped & (adv < 0))}
        if isinstance(loss, KLCov):
            return {"actor/pg_clipfrac": zero, "actor/ppo_kl": masked_mean(raw.abs()), "actor/pg_clipfrac_lower": zero}
        if isinstance(loss, ClipCov):
            return {"actor/pg_clipfrac": own["cov_clip_fraction"].detach().float(), "actor/ppo_kl": masked_mean(-raw),
                    "actor/pg_clipfrac_lower": zero}
        if not isinstance(loss, (ClippedSurrogate, GSPO)):
            clipfrac = own["clip_fraction"].detach().float() if "clip_fraction" in own else zero
            return {"actor/pg_clipfrac": clipfrac, "actor/ppo_kl": masked_mean(-log_ratio),
                    "actor/pg_clipfrac_lower": zero}
        if getattr(loss, "ratio", "sequence" if isinstance(loss, GSPO) else "token") == "sequence":
            ppo_kl = masked_mean(-raw)  # verl's gspo: no clamp
            seq = raw.sum(-1) / m.sum(-1).clamp(min=1)
            ratio = torch.exp(seq.clamp(max=10.0)).unsqueeze(-1)
        else:
            ppo_kl = masked_mean(-log_ratio)
            ratio = torch.exp(log_ratio)
        pg1 = -adv * ratio
        pg2 = -adv * ratio.clamp(1 - loss.clip_low, 1 + loss.clip_high)
        dual = getattr(loss, "dual_clip", None)
        lower = zero if dual is None else masked_mean((torch.maximum(pg1, pg2) > -adv * dual) & (adv < 0))
        return {"actor/pg_clipfrac": masked_mean(pg2 > pg1), "actor/ppo_kl": ppo_kl, "actor/pg_clipfrac_lower": lower}


def compute_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """verl policy loss ``"rlcredit"``: the strategy's ``policy_loss`` with verl's config and denominators.

    The loss that runs is ``verl_policy_loss(strategy, config, loss_agg_mode)``: for a clipped
    surrogate (Schulman et al. 2017; clip-higher, dual clip, VPPO's entropy penalty) **verl's
    actor config** (``clip_ratio_low``/``clip_ratio_high``, ``clip_ratio_c``, ``loss_agg_mode``)
    for every value the strategy leaves at its default, the strategy's explicit values otherwise
    (a disagreement warns once); ``cispo``, ``sapo``, ``gmpo``, ``kl_cov`` and ``clip_cov`` with the
    strategy's own values. With token weights ``w`` = verl's rollout-correction weights (1 without
    them)::

        loss = aggregate(w * l(logp, old_logp, A), mask, mode, totals=verl_totals(...))

    where ``A`` is verl's ``[B, T]`` advantages (credit already folded by the ``"rlcredit"``
    estimator or ``apply_credit``) and the denominators are verl's global batch statistics
    (``verl_totals(None, ...)``: every statistic, whatever the loss aggregates with). At verl's
    default actor config, ``grpo`` is verl's ``vanilla`` loss; ``cispo``... equal verl's
    ``loss_mode`` of the same name (``gmpo``: ``geo_mean``) at the matching config.

    Args:
        old_log_prob: ``[B, T]`` behaviour log-probs.
        log_prob: ``[B, T]`` current log-probs (with grad).
        advantages: ``[B, T]`` advantages.
        response_mask: ``[B, T]`` bool or 0/1.
        loss_agg_mode: verl's aggregation name (``actor.loss_agg_mode``).
        config: verl's actor config (clip ratios, ``global_batch_info``, optional ``rlcredit_strategy``).
        rollout_is_weights: ``[B, T]`` rollout-correction weights or None.

    Returns:
        ``(loss, metrics)``: a scalar and detached scalar tensors under verl's keys with verl's
        formulas (``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``, as the verl
        loss mode the loss equals returns them), plus the loss's own metrics under
        ``actor/rlcredit/`` (``neg_logprob`` with an entropy penalty, ``kl_cov_fraction``...).

    Raises:
        SpecError: no strategy, ``kl_coef > 0``, ``renormalize=True``, a loss verl cannot feed
            (``papo``'s ``aux``), or a verl value rlcredit rejects (``loss_agg_mode="token-sum"``).

    Examples:
        >>> import torch
        >>> from rlcredit.integrations.verl import compute_policy_loss
        >>> mask = torch.ones(1, 2, dtype=torch.bool)
        >>> old, logp = torch.zeros(1, 2), torch.tensor([[0.0, 1.5]])  # ratios 1 and e^1.5 = 4.48
        >>> loss, metrics = compute_policy_loss(old, logp, -torch.ones(1, 2), mask,
        ...                                     config={"rlcredit_strategy": "grpo"})
        >>> loss  # mean of 1 and min(max(4.48, 1.2), 3.0): verl's dual clip at its default 3.0
        tensor(2.)
        >>> sorted(metrics)
        ['actor/pg_clipfrac', 'actor/pg_clipfrac_lower', 'actor/ppo_kl']
    """
    strategy = resolve_strategy(config)
    loss_cfg = verl_policy_loss(strategy, config, loss_agg_mode)  # raises for a loss verl cannot feed
    mask = response_mask.bool()
    zero = torch.zeros((), device=mask.device)
    rollout = Rollout(
        response_mask=mask,
        rewards=torch.zeros(mask.shape[0], device=mask.device),
        group_ids=torch.arange(mask.shape[0], device=mask.device),
        old_logprobs=torch.where(mask, old_log_prob.detach().float(), zero),
    )
    weights = mask.float() if rollout_is_weights is None else torch.where(mask, rollout_is_weights.detach().float(), zero)
    credit = Credit(scores={}, token_weights=weights, advantages=torch.where(mask, advantages.detach().float(), zero))
    logp = torch.where(mask, log_prob, torch.zeros((), dtype=log_prob.dtype, device=log_prob.device))
    info = _global_info(config)
    totals = verl_totals(None, mask, dp_size=info.get("dp_size", 1),
                         batch_num_tokens=info.get("batch_num_tokens"), global_batch_size=info.get("global_batch_size"),
                         loss_scale_factor=info.get("loss_scale_factor"), max_length=getattr(loss_cfg, "max_length", None))
    out = loss_cfg(logp, rollout, credit, totals=totals)
    metrics = _verl_metrics(loss_cfg, log_prob, old_log_prob, advantages, mask, out.metrics)
    metrics.update({f"actor/rlcredit/{k}": out.metrics[k].detach() for k in out.metrics
                    if k not in ("pg_loss", "clip_fraction", "kept_fraction")})
    return out.loss, metrics
