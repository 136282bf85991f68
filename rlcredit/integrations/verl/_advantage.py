"""The verl advantage estimator ``"rlcredit"`` and the worker extension ``apply_credit``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rlcredit.errors import RolloutError
from rlcredit.integrations.verl._strategy import _as_strategy, credit_location, resolve_strategy
from rlcredit.policy import HFPolicy
from rlcredit.requirements import POLICY, RAW_IMAGES, leaves
from rlcredit.rollout import Credit, Rollout
from rlcredit.strategy import Strategy

__all__ = ["compute_advantage", "apply_credit"]


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
    advantages = credit.token_advantages(mask)
    return advantages, advantages


def _merge_multimodal(items: Any) -> dict[str, Tensor]:
    """verl's per-sample ``multi_modal_inputs`` dicts -> batch tensors concatenated on dim 0 (Qwen-VL layout)."""
    merged: dict[str, list[Tensor]] = {}
    for item in items if items is not None else ():
        for key, value in dict(item).items():
            if isinstance(value, Tensor):
                merged.setdefault(key, []).append(value)
    return {key: torch.cat(values, dim=0) for key, values in merged.items()}


def _batch_images(non_tensor: Any) -> list[Any] | None:
    """Each row's images from ``non_tensor_batch["multi_modal_data"]`` (``"images"``; verl's older datasets:
    ``"image"``), None for a row without; None when the batch has no ``multi_modal_data``."""
    items = non_tensor.get("multi_modal_data") if non_tensor is not None else None
    if items is None:
        return None
    rows = []
    for i, item in enumerate(items):
        if item is not None and not isinstance(item, Mapping):
            raise RolloutError(f"apply_credit: non_tensor_batch['multi_modal_data'][{i}] must be a dict such as "
                               f"{{'images': [PIL.Image, ...]}}, got {type(item).__name__}.")
        rows.append(None if item is None else item.get("images", item.get("image")))
    return rows


def _raw_images_problem(strategy: Strategy, rollout: Rollout, images: Any, processor: Any) -> str | None:
    """Why the strategy cannot read the images before the processor from this rollout (None: it can, or need not)."""
    if rollout.model_inputs is None or all(req.met(rollout, POLICY) for req in strategy.requirements
                                           if RAW_IMAGES in leaves(req)):
        return None  # no model inputs: Strategy.assign names everything missing
    missing = [name for name, value in (("processor=", processor), ("the images", images)) if value is None]
    return (
        f"apply_credit: the strategy perturbs the images before the image processor (VisualKL(stage='image'), "
        f"the vppo_released preset), so it needs each row's images as given to the processor and that processor; "
        f"missing: {' and '.join(missing)}. In the actor worker pass processor=self.processor and the images, "
        f"one list of PIL images per row after verl's process_image, as raw_images= or in "
        f"non_tensor_batch['multi_modal_data'][i]['images']. Or precompute signals['aug_logprobs'], or use "
        f"stage='pixels' (the processed pixels)."
    )


def apply_credit(
    data: Any,
    *,
    model: Any = None,
    credit: Any = None,
    signals: Mapping[str, Tensor] | None = None,
    reducer: Any = None,
    config: Any = None,
    processor: Any = None,
    raw_images: Sequence[Any] | None = None,
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

    A strategy that perturbs the images before the image processor (``VisualKL(stage="image")``,
    the ``vppo_released`` preset; ``RAW_IMAGES`` in its requirements) also gets
    ``model_inputs["raw_images"] = {"images": rows, "processor": processor}``: ``rows`` is
    ``raw_images`` if given, else each row's ``non_tensor_batch["multi_modal_data"][i]["images"]``
    (``"image"`` in verl's older datasets), the PIL images exactly as the processor got them (after
    verl's ``process_image``); ``processor`` is the actor worker's ``self.processor`` (or its
    ``image_processor``). Other strategies never read them.

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
        processor: the image processor the images went through (the worker's HF processor), for
            a strategy that perturbs the images before it.
        raw_images: one list of PIL images per row (None or empty: no image), as given to
            ``processor``; default: from ``non_tensor_batch["multi_modal_data"]``.

    Returns:
        The ``rlcredit.Credit`` (scores, token weights, advantages, metrics).

    Raises:
        RolloutError: a required batch key or input is missing (for the images before the
            processor: which of ``processor=`` and the images, and where to get them).

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
    reads_raw = any(RAW_IMAGES in leaves(req) for req in strategy.requirements)
    images = None
    if reads_raw:
        images = _batch_images(non_tensor) if raw_images is None else list(raw_images)
        if model_inputs is not None and images is not None and processor is not None:
            model_inputs[RAW_IMAGES.key] = {"images": images, "processor": processor}
    rollout = Rollout(
        response_mask=mask,
        rewards=batch[reward_key].float().sum(dim=-1),
        group_ids=_group_ids(non_tensor.get("uid") if non_tensor is not None else None, B, device),
        old_logprobs=per_token("old_log_probs"),
        ref_logprobs=per_token("ref_log_prob"),
        signals=all_signals,
        model_inputs=model_inputs,
    )
    problem = _raw_images_problem(strategy, rollout, images, processor) if reads_raw else None
    if problem is not None:
        raise RolloutError(problem)
    policy = HFPolicy(model) if model is not None and strategy.needs_policy(rollout) else None
    result = strategy.assign(rollout, policy, reducer=reducer)
    advantages = result.token_advantages(mask)
    batch["advantages"] = advantages
    batch["returns"] = advantages
    return result


