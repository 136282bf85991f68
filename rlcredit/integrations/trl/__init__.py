"""TRL integration: ``CreditGRPOTrainer``, TRL's ``GRPOTrainer`` with an rlcredit strategy.

Supported: TRL ``>=1.16,<1.17`` (the ``trl`` extra pins it; the overridden hooks are private TRL
methods, so every TRL minor release is checked before the pin moves).

How it plugs in, once per generation batch (TRL calls ``_generate_and_score_completions`` once
per ``steps_per_generation * num_iterations`` optimiser steps):

1. TRL generates, scores and computes its own ``[B]`` advantages, unchanged.
2. We build a ``rlcredit.Rollout`` from the same batch: ``response_mask`` (TRL's loss mask,
   ``completion_mask`` times ``tool_mask``), the weighted rewards TRL summed, ``group_ids`` from
   TRL's grouping (``num_generations`` consecutive completions of the gathered batch),
   ``old_logprobs`` (TRL's ``old_per_token_logps``, or our own forward when the strategy needs
   them and TRL skipped them), ``ref_logprobs``, ``signals["entropy"]`` when a component reads it
   (computed by TRL's own ``_get_per_token_logps_and_entropies``: same temperature, same fused
   head, same multimodal slicing) and ``model_inputs``, with ``model_inputs["raw_images"] =
   {"images": per_row_images, "processor": processing_class}`` (the images of TRL's forward) for a
   strategy whose requirements mention ``rlcredit.requirements.RAW_IMAGES`` (``vppo_released``'s
   ``visual_kl(stage="image")``); plus an ``rlcredit.HFPolicy`` over the trainer's own model, its
   forwards under TRL's autocast, when a component needs the policy (VPPO's perturbed forward).
3. ``strategy.assign`` runs once; the token weights are folded into ``[B, T]`` advantages,
   ``A_{i,t} = w_{i,t} * A_i`` (0 on padding), which replace TRL's ``inputs["advantages"]``.
4. TRL's own ``_compute_loss`` runs untouched. It accepts ``[B, T]`` advantages (it unsqueezes
   only 1-D ones), so no TRL loss code is copied or overridden.

The fold is exact for ``w >= 0`` and every TRL ``loss_type``: the per-token losses are positively
homogeneous in ``A`` and only read its sign (``-min(rho A w, clip(rho) A w) = w * -min(rho A,
clip(rho) A)``), and TRL's denominators count all valid tokens, as rlcredit's default
(``renormalize=False``) does. With ``renormalize=True`` (STAPO) the weights are first rescaled by
``n / sum(w)`` over the scope TRL's denominator counts (each row for ``grpo``/``sapo``, the whole
generation batch for ``dapo``/``cispo``/``vespo``), which turns that denominator into the kept
weight exactly. What the strategy's ``policy_loss`` would do differently (its own
clip range, aggregation, dual clip, ratio level, KL, entropy penalty) and its shapers vs
``scale_rewards`` are reported as warnings at construction (``check_trl_args``): TRL's loss,
configured by ``GRPOConfig``, is what runs. ``trl_config_kwargs`` turns a strategy into the
matching ``GRPOConfig`` arguments (``dual_clip`` -> ``delta``, TRL's dual clip;
``kl_bias_correction`` -> ``use_bias_correction_kl``; ``cispo`` -> ``loss_type="cispo"`` with
``epsilon_high = 1 + clip_high``; ``sapo`` -> ``loss_type="sapo"`` with its temperatures; the
shaper chain -> ``scale_rewards``). A policy loss TRL has no ``loss_type`` for (``gmpo``,
``kl_cov``, ``clip_cov``, ``papo``) raises a ``SpecError`` at construction, unless a subclass's
``_compute_loss`` runs the strategy's own loss; a strategy that reads images raises with a
text-only model. Runnable recipes: ``examples/trl_grpo.py`` (text) and ``examples/trl_vppo.py``
(a VLM with images).

Examples:
    >>> from rlcredit.integrations.trl import loss_type_for, trl_config_kwargs
    >>> loss_type_for("seq_mean_token_sum_norm")
    'dr_grpo'
    >>> trl_config_kwargs("dapo")
    {'loss_type': 'dapo', 'epsilon': 0.2, 'epsilon_high': 0.28, 'beta': 0.0, 'scale_rewards': 'group'}
"""


from __future__ import annotations

from rlcredit.integrations.trl._config import (
    LOSS_TYPES,
    check_trl_args,
    loss_type_for,
    scale_rewards_for,
    trl_config_kwargs,
)
from rlcredit.integrations.trl._trainer import CreditGRPOTrainer

__all__ = ["CreditGRPOTrainer", "LOSS_TYPES", "loss_type_for", "scale_rewards_for", "trl_config_kwargs",
           "check_trl_args"]
