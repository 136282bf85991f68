"""verl integration: a policy loss and an advantage estimator named ``"rlcredit"``, plus a worker hook.

Supported: verl 0.9 (the contract test runs verl 0.9.1's own registry and ``agg_loss``). This
module imports without verl. When verl is importable, importing it registers, in verl's own
registries (``verl.trainer.ppo.core_algos``):

- the policy loss ``"rlcredit"`` (``actor_rollout_ref.actor.policy_loss.loss_mode=rlcredit``), with
  verl's exact signature ``(old_log_prob, log_prob, advantages, response_mask,
  loss_agg_mode="token-mean", config=None, rollout_is_weights=None) -> (loss, metrics)``: the
  strategy's own ``policy_loss`` (clip range, dual clip, entropy penalty, aggregation) on verl's
  ``[B, T]`` advantages, with verl's rollout-correction weights as token weights and verl's global
  batch statistics as denominators (so dp ranks and micro-batches add up as in ``agg_loss``);
- the advantage estimator ``"rlcredit"`` (``algorithm.adv_estimator=rlcredit``): the strategy's
  ``assign`` on the rewards, response mask and group ids (``uid``), its token weights folded into
  ``[B, T]`` advantages ``A_{i,t} = w_{i,t} A_i`` (exact for ``w >= 0``).

verl imports every module named in ``VERL_USE_EXTERNAL_MODULES`` in the driver and in each worker,
so ``VERL_USE_EXTERNAL_MODULES=rlcredit.integrations.verl`` is all the wiring needed.

The strategy: the config key ``rlcredit_strategy`` when the config passed to the loss or the
estimator carries one (dict-style configs), else the environment variable ``RLCREDIT_STRATEGY``:
a preset name, a spec file path, or a JSON spec. verl's structured dataclass configs reject unknown
keys, so with them use the environment variable (and make it reach the Ray workers, e.g.
``+ray_kwargs.ray_init.runtime_env.env_vars.RLCREDIT_STRATEGY=entropy_forks``). Hyper-parameters
come from the rlcredit spec; verl's ``clip_ratio*``, ``loss_agg_mode`` and
``norm_adv_by_std_in_grpo`` are not read (a differing ``loss_agg_mode`` warns).

verl's estimator hook only sees rewards, the response mask and the group ids, so a strategy that
scores tokens needs ``apply_credit``, called where the data is (see ``credit_location``):
``entropy_forks`` and ``stapo`` need the per-token entropies (and old log-probs) verl's actor
computes; ``vppo``/``vppo_paper`` need a second forward with the perturbed image and ``at_rl`` an
attention capture, both through the model, so they run in the actor worker.

Examples:
    >>> from rlcredit.integrations.verl import credit_location
    >>> credit_location("grpo"), credit_location("entropy_forks"), credit_location("vppo")
    ('advantage_estimator', 'batch', 'worker')
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit._components import POLICY, requirement_met, requires_of
from rlcredit.errors import RolloutError, SpecError
from rlcredit.policy import HFPolicy
from rlcredit.registry import build
from rlcredit.rollout import Credit, Rollout
from rlcredit.strategy import Strategy

__all__ = [
    "NAME", "STRATEGY_ENV", "CONFIG_KEY", "AGG_MODES", "REGISTERED",
    "resolve_strategy", "compute_policy_loss", "compute_advantage", "aggregate", "apply_credit",
    "credit_location", "register",
]

NAME = "rlcredit"
"""The name of the policy loss and of the advantage estimator in verl's registries."""
STRATEGY_ENV = "RLCREDIT_STRATEGY"
"""Environment variable naming the strategy: a preset name, a spec file path or a JSON spec."""
CONFIG_KEY = "rlcredit_strategy"
"""Config key (in the actor or algorithm config, or its ``policy_loss`` section) naming the strategy."""

AGG_MODES: Mapping[str, str] = {
    "token-mean": "token_mean",
    "seq-mean-token-mean": "seq_mean_token_mean",
    "seq-mean-token-sum": "seq_mean_token_sum",
    "seq-mean-token-sum-norm": "seq_mean_token_sum_norm",
}
"""verl ``loss_agg_mode`` -> rlcredit aggregation (verl's ``token-sum`` has no rlcredit equivalent)."""

_VERL_MODES = {ours: theirs for theirs, ours in AGG_MODES.items()}
_CACHE: dict[str, Strategy] = {}


# --- strategy resolution -----------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """OmegaConf/dataclass containers to plain dicts and lists (configs are data)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _config_spec(config: Any) -> Any:
    if config is None:
        return None
    for section in (config, _get(config, "policy_loss")):
        value = _get(section, CONFIG_KEY)
        if value is not None:
            return _plain(value)
    return None


def _get(config: Any, key: str) -> Any:
    if config is None:
        return None
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(key, None)
        except Exception:  # noqa: BLE001 - a structured config may raise on unknown keys
            return None
    return getattr(config, key, None)


def resolve_strategy(config: Any = None) -> Strategy:
    """The strategy named by ``config[CONFIG_KEY]`` (or its ``policy_loss`` section), else ``$RLCREDIT_STRATEGY``.

    A value is a preset name (``"entropy_forks"``), a path to a JSON/YAML/TOML spec, a JSON spec
    string (``'{"weighter": ...}'``) or a spec dict (from a config). Built strategies are cached by
    spec, so the per-micro-batch loss does not rebuild them.

    Args:
        config: verl's actor or algorithm config (any mapping-like object), or None.

    Returns:
        The ``rlcredit.Strategy``.

    Raises:
        SpecError: no strategy named anywhere, or a bad spec. RegistryError: an unknown name.

    Examples:
        >>> from rlcredit.integrations.verl import resolve_strategy
        >>> resolve_strategy({"rlcredit_strategy": "dr_grpo"}).policy_loss.aggregation
        'seq_mean_token_sum_norm'
    """
    spec = _config_spec(config)
    if spec is None:
        spec = os.environ.get(STRATEGY_ENV, "").strip() or None
        if isinstance(spec, str) and spec.startswith("{"):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as err:
                raise SpecError(f"${STRATEGY_ENV} looks like a JSON spec but does not parse: {err}.") from err
    if spec is None:
        raise SpecError(
            f"no rlcredit strategy is named: set the environment variable {STRATEGY_ENV} (a preset name such as "
            f"'grpo' or 'entropy_forks', a spec file path or a JSON spec) in the driver and the Ray workers, or "
            f"put {CONFIG_KEY}=... in a dict-style actor/algorithm config."
        )
    key = json.dumps(spec, sort_keys=True, default=str)
    if key not in _CACHE:
        _CACHE[key] = build(spec)
    return _CACHE[key]


def _as_strategy(credit: Any, config: Any = None) -> Strategy:
    if credit is None:
        return resolve_strategy(config)
    return credit if isinstance(credit, Strategy) else build(credit)


def _requirements(strategy: Strategy) -> list[str]:
    parts = list(strategy.estimators.values()) + [strategy.weighter, *strategy.shapers, strategy.policy_loss]
    return [req for part in parts for req in requires_of(part)]


def credit_location(credit: Any = None) -> str:
    """Where a strategy's ``assign`` can run inside verl.

    - ``"advantage_estimator"``: it needs only rewards, the response mask and group ids, so the
      registered estimator does everything (``grpo``, ``dapo``, ``dr_grpo``).
    - ``"batch"``: it also reads per-token tensors verl already computes (old log-probs,
      reference log-probs, entropies): call ``apply_credit`` on the batch, no model needed
      (``entropy_forks``, ``stapo``).
    - ``"worker"``: it needs the model (a second forward, attention capture): call
      ``apply_credit`` with ``model=`` in the actor worker (``vppo``, ``vppo_paper``, ``at_rl``).

    Args:
        credit: a preset name, spec or ``rlcredit.Strategy`` (None: ``resolve_strategy``).

    Returns:
        ``"advantage_estimator"``, ``"batch"`` or ``"worker"``.

    Examples:
        >>> from rlcredit.integrations.verl import credit_location
        >>> credit_location("dr_grpo"), credit_location("stapo"), credit_location("at_rl")
        ('advantage_estimator', 'batch', 'worker')
    """
    batch_fields = {"old_logprobs", "ref_logprobs", "signal:entropy"}
    location = "advantage_estimator"
    for req in _requirements(_as_strategy(credit)):
        alternatives = req.split("|")
        if req.startswith("score:"):
            continue
        if any(a in batch_fields for a in alternatives):
            location = "batch" if location == "advantage_estimator" else location
        else:
            return "worker"
    return location


# --- aggregation ---------------------------------------------------------------------------------


def _global_scale(aggregation: str, mask: Tensor, dp_size: int, batch_num_tokens: Any,
                  global_batch_size: Any) -> Tensor:
    """Factor turning rlcredit's local denominator into verl's global one (times ``dp_size``).

    rlcredit divides by this micro-batch's valid tokens (``token_mean``) or rows (``seq_*``);
    verl's ``agg_loss`` divides by the global batch's (``batch_num_tokens``, ``global_batch_size``)
    and multiplies by ``dp_size``, so that the gradients summed over micro-batches and averaged over
    ranks equal the loss of one process holding the whole mini-batch. Without global statistics
    verl's ``seq-*`` modes count only rows with a valid token; so does this factor.
    """
    dp = float(dp_size or 1)
    if aggregation == "token_mean":
        local = mask.sum().float()
        if batch_num_tokens is None:
            if dp > 1:
                raise SpecError("verl passes dp_size > 1 without batch_num_tokens; token-mean needs the global count.")
            return torch.ones((), device=mask.device)
        return local.clamp_min(1.0) / max(float(batch_num_tokens), 1.0) * dp  # no 0/0: an empty batch gives 0
    rows = float(mask.shape[0])
    if global_batch_size is None:
        if dp > 1:
            raise SpecError("verl passes dp_size > 1 without global_batch_size; seq-mean modes need it.")
        nonempty = mask.any(dim=-1).sum().float()
        return torch.where(nonempty > 0, rows / nonempty.clamp_min(1.0), torch.ones((), device=mask.device))
    return torch.full((), rows / max(float(global_batch_size), 1.0) * dp, device=mask.device)


def aggregate(loss_mat: Tensor, loss_mask: Tensor, loss_agg_mode: str, *, dp_size: int = 1,
              batch_num_tokens: int | None = None, global_batch_size: int | None = None,
              loss_scale_factor: int | None = None) -> Tensor:
    """rlcredit's aggregation with verl's names and global batch statistics (verl's ``agg_loss`` contract).

    ``rlcredit.functional.aggregate`` on this micro-batch, rescaled from local to global
    denominators (``token_mean``: ``sum x / batch_num_tokens * dp_size``; ``seq_*``:
    ``sum_i s_i / global_batch_size * dp_size``; ``seq-mean-token-sum-norm`` further divides by
    ``loss_scale_factor``, or the padded ``T``). The policy loss ``"rlcredit"`` scales the same way.

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
    max_length = int(loss_scale_factor) if (mode == "seq_mean_token_sum_norm" and loss_scale_factor) else None
    local = F.aggregate(loss_mat, mask, mode=mode, max_length=max_length)
    return local * _global_scale(mode, mask, dp_size, batch_num_tokens, global_batch_size)


# --- the policy loss -----------------------------------------------------------------------------


def _global_info(config: Any) -> dict[str, Any]:
    info = _get(config, "global_batch_info")
    return dict(info) if isinstance(info, Mapping) else {}


def _check_loss(strategy: Strategy) -> Any:
    loss = strategy.policy_loss
    if getattr(loss, "aggregation", None) not in _VERL_MODES:
        raise SpecError(
            f"the verl policy loss 'rlcredit' needs a policy loss with an `aggregation` field (clipped_surrogate); "
            f"got {type(loss).__name__}."
        )
    if getattr(loss, "kl_coef", 0.0):
        raise SpecError(
            "verl does not pass reference log-probs to policy losses; set the strategy's kl_coef=0 and use verl's "
            "actor.use_kl_loss=True / actor.kl_loss_coef for the KL term."
        )
    if getattr(loss, "renormalize", False):
        raise SpecError(
            "verl's global batch statistics count valid tokens, not kept weight; renormalize=True is not supported "
            "by the 'rlcredit' verl loss. Set renormalize=False."
        )
    return loss


def compute_policy_loss(
    old_log_prob: Tensor,
    log_prob: Tensor,
    advantages: Tensor,
    response_mask: Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """verl policy loss ``"rlcredit"``: the strategy's ``policy_loss`` with verl's global denominators.

    With the strategy's clipped surrogate (Schulman et al. 2017; clip-higher, dual clip, VPPO's
    entropy penalty as configured in the rlcredit spec) and token weights ``w`` = verl's
    rollout-correction weights (1 without them)::

        loss = aggregate(w * l(logp, old_logp, A), mask, mode) * local_den / global_den * dp_size

    where ``A`` is verl's ``[B, T]`` advantages (credit already folded by the ``"rlcredit"``
    estimator or ``apply_credit``), ``mode`` the strategy's aggregation and the denominators
    those of ``aggregate``. verl's ``loss_agg_mode`` is not used (a differing one warns: verl
    aggregates its entropy and KL terms with it).

    Args:
        old_log_prob: ``[B, T]`` behaviour log-probs.
        log_prob: ``[B, T]`` current log-probs (with grad).
        advantages: ``[B, T]`` advantages.
        response_mask: ``[B, T]`` bool or 0/1.
        loss_agg_mode: verl's aggregation name (compared with the strategy's).
        config: verl's actor config (``global_batch_info``, optional ``rlcredit_strategy``).
        rollout_is_weights: ``[B, T]`` rollout-correction weights or None.

    Returns:
        ``(loss, metrics)``: a scalar and detached scalar tensors ``actor/pg_clipfrac``,
        ``actor/ppo_kl``, ``rlcredit/pg_loss``, ``rlcredit/kept_fraction`` (and
        ``rlcredit/neg_logprob`` with an entropy penalty).

    Raises:
        SpecError: no strategy, ``kl_coef > 0``, ``renormalize=True`` or a loss without aggregation.

    Examples:
        >>> import torch
        >>> from rlcredit.integrations.verl import compute_policy_loss
        >>> mask = torch.ones(1, 2, dtype=torch.bool)
        >>> loss, metrics = compute_policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), mask,
        ...                                     config={"rlcredit_strategy": "grpo"})
        >>> loss
        tensor(-1.)
    """
    strategy = resolve_strategy(config)
    loss_cfg = _check_loss(strategy)
    aggregation = loss_cfg.aggregation
    if loss_agg_mode != _VERL_MODES[aggregation]:
        warnings.warn(
            f"rlcredit: the strategy aggregates with {aggregation!r} (verl {_VERL_MODES[aggregation]!r}) but the "
            f"actor's loss_agg_mode is {loss_agg_mode!r}; the policy loss follows the strategy, verl's entropy/KL "
            f"terms follow loss_agg_mode. Set actor.loss_agg_mode={_VERL_MODES[aggregation]} to match.",
            UserWarning, stacklevel=2,
        )
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
    out = strategy.loss(logp, rollout, credit)
    info = _global_info(config)
    scale = _global_scale(aggregation, mask, info.get("dp_size", 1), info.get("batch_num_tokens"),
                          info.get("global_batch_size"))
    if aggregation == "seq_mean_token_sum_norm" and getattr(loss_cfg, "max_length", None) is None \
            and info.get("loss_scale_factor"):
        scale = scale * mask.shape[1] / float(info["loss_scale_factor"])  # verl's fixed L, not the padded T
    loss = out.loss * scale
    with torch.no_grad():
        ppo_kl = F.masked_mean((old_log_prob.float() - log_prob.detach().float()).reshape(1, -1), mask.reshape(1, -1))[0]
    metrics = {"actor/pg_clipfrac": out.metrics.get("clip_fraction", zero), "actor/ppo_kl": ppo_kl}
    metrics.update({f"rlcredit/{k}": v.detach() for k, v in out.metrics.items() if k != "clip_fraction"})
    return loss, metrics


# --- the advantage estimator ---------------------------------------------------------------------


def _group_ids(index: Any, batch: int, device: torch.device) -> Tensor:
    if index is None:
        raise RolloutError(
            "the 'rlcredit' advantage estimator needs verl's group index (non_tensor_batch['uid']), got None."
        )
    if isinstance(index, Tensor):
        ids = index.to(device=device).long().reshape(-1)
    else:
        import numpy as np

        _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
        ids = torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=device)
    if ids.numel() != batch:
        raise RolloutError(f"group index has {ids.numel()} entries for {batch} responses.")
    return ids


def _fold(credit: Credit, mask: Tensor) -> Tensor:
    advantages = credit.advantages if credit.advantages.ndim == 2 else credit.advantages.unsqueeze(1)
    return torch.where(mask, credit.token_weights * advantages, torch.zeros((), device=mask.device))


def compute_advantage(
    token_level_rewards: Tensor,
    response_mask: Tensor,
    index: Any = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[Tensor, Tensor]:
    """verl advantage estimator ``"rlcredit"``: the strategy's ``assign`` folded into ``[B, T]`` advantages.

    ``r_i = sum_t token_level_rewards[i, t]``; groups from ``index`` (verl's ``uid`` per response);
    ``A_{i,t} = w_{i,t} * A_i`` with the strategy's shaper chain and weighter (exact fold for
    ``w >= 0``). Only strategies whose ``credit_location`` is ``"advantage_estimator"`` can
    run here; the others raise, pointing at ``apply_credit``.

    Args:
        token_level_rewards: ``[B, T]`` rewards (verl puts the outcome reward on the last token).
        response_mask: ``[B, T]`` bool or 0/1.
        index: ``[B]`` group ids (verl's ``uid`` array of strings, or an int tensor).
        config: verl's algorithm config (optional ``rlcredit_strategy``).
        **kwargs: other keywords verl passes (``reward_baselines``...), ignored.

    Returns:
        ``(advantages, returns)``, both the same ``[B, T]`` float32 tensor, 0 on padding.

    Raises:
        RolloutError: the strategy needs more than rewards (message names ``apply_credit``).

    Examples:
        >>> import torch
        >>> from rlcredit.integrations.verl import compute_advantage
        >>> rewards = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
        >>> adv, _ = compute_advantage(rewards, torch.ones(2, 2), index=["a", "a"], config={"rlcredit_strategy": "grpo"})
        >>> adv
        tensor([[ 0.7071,  0.7071],
                [-0.7071, -0.7071]])
    """
    strategy = resolve_strategy(config)
    mask = response_mask.bool()
    rewards = token_level_rewards.float().sum(dim=-1)
    rollout = Rollout(mask, rewards, _group_ids(index, mask.shape[0], mask.device))
    try:
        credit = strategy.assign(rollout)
    except RolloutError as err:
        raise RolloutError(
            f"{err} The verl advantage estimator 'rlcredit' only sees rewards, the response mask and group ids; "
            f"this strategy runs at credit_location {credit_location(strategy)!r}: call "
            f"rlcredit.integrations.verl.apply_credit(batch, ...) after old log-probs (and entropies) are computed "
            f"(with model= in the actor worker for 'worker' strategies), instead of verl's compute_advantage."
        ) from err
    advantages = _fold(credit, mask)
    return advantages, advantages


# --- the worker extension ------------------------------------------------------------------------


def _merge_multimodal(items: Any) -> dict[str, Tensor]:
    """verl's per-sample ``multi_modal_inputs`` dicts -> batch tensors concatenated on dim 0 (Qwen-VL layout)."""
    merged: dict[str, list[Tensor]] = {}
    for item in items if items is not None else ():
        for key, value in dict(item).items():
            if isinstance(value, Tensor):
                merged.setdefault(key, []).append(value)
    return {key: torch.cat(values, dim=0) for key, values in merged.items()}


def apply_credit(
    data: Any,
    *,
    model: Any = None,
    credit: Any = None,
    signals: Mapping[str, Tensor] | None = None,
    reducer: Any = None,
    config: Any = None,
) -> Credit:
    """The worker extension: run the strategy on a verl batch and write its ``[B, T]`` advantages.

    Use it instead of verl's ``compute_advantage`` for strategies whose ``credit_location``
    is ``"batch"`` (entropy forks, STAPO: after the actor's ``compute_log_prob`` with
    ``calculate_entropy=True``) or ``"worker"`` (VPPO's perturbed second forward, AT-RL's attention
    capture: call it in the actor worker with ``model=`` the actor's unwrapped HF module, after
    ``compute_log_prob``). The rollout is read from verl's batch keys:

    ``response_mask``, ``token_level_rewards`` (else ``token_level_scores``) summed over tokens,
    ``uid`` (group ids), ``old_log_probs``, ``ref_log_prob``, ``entropys`` or ``entropy`` (verl's legacy
    and v1 trainers; -> ``signals["entropy"]``),
    and as ``model_inputs`` ``input_ids [B, P+T]``, ``attention_mask``, 2-D ``position_ids`` and the
    per-sample ``multi_modal_inputs`` concatenated on dim 0. Then ``A_{i,t} = w_{i,t} * A_i`` is
    written to ``batch["advantages"]`` and ``batch["returns"]``.

    Args:
        data: a verl ``DataProto`` (``.batch``, ``.non_tensor_batch``) or a dict with the keys above.
        model: the actor's HF model (``transformers``), for strategies that need the policy; it is
            wrapped in ``rlcredit.HFPolicy``.
        credit: a preset name, spec or ``rlcredit.Strategy`` (None: ``resolve_strategy``).
        signals: extra per-token signals ``[B, T]`` (e.g. ``{"aug_logprobs": ...}``).
        reducer: a ``rlcredit.distributed.Reducer`` when the batch is sharded over ranks,
            e.g. ``rlcredit.distributed.TorchDistributedReducer()`` in verl's FSDP workers (batch
            statistics and groups split over shards then span the ranks).
        config: a config that may carry ``rlcredit_strategy``.

    Returns:
        The ``rlcredit.Credit`` (scores, token weights, advantages, metrics).

    Raises:
        RolloutError: a required batch key or input is missing.

    Examples:
        >>> import torch
        >>> from rlcredit.integrations.verl import apply_credit
        >>> batch = {"response_mask": torch.ones(2, 3, dtype=torch.bool), "uid": ["p", "p"],
        ...          "token_level_rewards": torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]),
        ...          "entropys": torch.tensor([[0.1, 2.0, 0.3], [0.2, 0.1, 3.0]])}
        >>> credit = apply_credit(batch, credit={"estimators": {"entropy": "entropy"},
        ...                       "weighter": {"name": "top_fraction", "fraction": 0.5, "score": "entropy"}})
        >>> batch["advantages"]  # per row, the top half of tokens by entropy keep A = +-0.7071
        tensor([[ 0.0000,  0.7071,  0.7071],
                [-0.7071, -0.0000, -0.7071]])
    """
    strategy = _as_strategy(credit, config)
    batch = data.batch if hasattr(data, "batch") else data
    non_tensor = getattr(data, "non_tensor_batch", None) if hasattr(data, "batch") else data
    keys = set(batch.keys())
    if "response_mask" in keys:
        mask = batch["response_mask"].bool()
    elif {"responses", "attention_mask"} <= keys:
        mask = batch["attention_mask"][:, -batch["responses"].shape[1]:].bool()
    else:
        raise RolloutError("apply_credit: the batch has neither 'response_mask' nor 'responses' + 'attention_mask'.")
    reward_key = "token_level_rewards" if "token_level_rewards" in keys else "token_level_scores"
    if reward_key not in keys:
        raise RolloutError("apply_credit: the batch has no 'token_level_rewards' (or 'token_level_scores'); "
                           "compute rewards first.")
    B, T = mask.shape
    device = mask.device
    zero = torch.zeros((), device=device)

    def per_token(key: str) -> Tensor | None:
        return torch.where(mask, batch[key].float(), zero) if key in keys else None

    entropy_key = next((k for k in ("entropys", "entropy") if k in keys), None)  # legacy trainer / v1 trainer
    all_signals = {} if entropy_key is None else {"entropy": per_token(entropy_key)}
    all_signals.update({k: v for k, v in (signals or {}).items()})
    model_inputs = None
    if "input_ids" in keys:
        model_inputs = {"input_ids": batch["input_ids"]}
        if "attention_mask" in keys:
            model_inputs["attention_mask"] = batch["attention_mask"]
        if "position_ids" in keys and batch["position_ids"].ndim == 2:  # mrope (3-D) is recomputed by the model
            model_inputs["position_ids"] = batch["position_ids"]
        model_inputs.update(_merge_multimodal(non_tensor.get("multi_modal_inputs") if non_tensor is not None else None))
    rollout = Rollout(
        response_mask=mask,
        rewards=batch[reward_key].float().sum(dim=-1),
        group_ids=_group_ids(non_tensor.get("uid") if non_tensor is not None else None, B, device),
        old_logprobs=per_token("old_log_probs"),
        ref_logprobs=per_token("ref_log_prob"),
        signals=all_signals,
        model_inputs=model_inputs,
    )
    policy = None
    if model is not None and any(not requirement_met(r, rollout, None) and POLICY in r.split("|")
                                 for r in _requirements(strategy)):
        policy = HFPolicy(model)
    result = strategy.assign(rollout, policy, reducer=reducer)
    advantages = _fold(result, mask)
    batch["advantages"] = advantages
    batch["returns"] = advantages
    return result


# --- registration --------------------------------------------------------------------------------


def register() -> bool:
    """Register ``"rlcredit"`` in verl's policy-loss and advantage-estimator registries.

    Called on import; idempotent (re-importing this module replaces its own earlier entries).

    Returns:
        True when verl is importable and both names are registered, False without verl.

    Examples:
        >>> from rlcredit.integrations.verl import register
        >>> isinstance(register(), bool)
        True
    """
    try:
        from verl.trainer.ppo import core_algos
    except ImportError:
        return False
    estimators = getattr(core_algos, "ADV_ESTIMATOR_REGISTRY", {})
    previous = estimators.get(NAME)
    if previous is not None and previous is not compute_advantage and \
            getattr(previous, "__module__", None) == __name__:
        del estimators[NAME]  # our own entry from an earlier import of this module (e.g. a reload)
    core_algos.register_policy_loss(NAME)(compute_policy_loss)
    core_algos.register_adv_est(NAME)(compute_advantage)
    return True


REGISTERED: bool = register()
"""Whether importing this module registered ``"rlcredit"`` in verl (False when verl is absent)."""
