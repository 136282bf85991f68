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
   head, same multimodal slicing) and ``model_inputs``; plus an ``rlcredit.HFPolicy`` over
   the trainer's own model when a component needs the policy (VPPO's perturbed forward).
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
clip range, aggregation, dual clip, KL, entropy penalty) is reported as a warning at construction:
TRL's loss, configured by ``GRPOConfig``, is what runs. ``trl_config_kwargs`` turns a
strategy's loss into the matching ``GRPOConfig`` arguments.

Examples:
    >>> from rlcredit.integrations.trl import loss_type_for, trl_config_kwargs
    >>> loss_type_for("seq_mean_token_sum_norm")
    'dr_grpo'
    >>> trl_config_kwargs("dapo")
    {'loss_type': 'dapo', 'epsilon': 0.2, 'epsilon_high': 0.28, 'beta': 0.0}
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit.distributed import TorchDistributedReducer
from rlcredit.errors import SpecError
from rlcredit.policy import HFPolicy
from rlcredit.requirements import Field, Requirement, Signal, leaves
from rlcredit.rollout import Credit, Rollout
from rlcredit.specs import build
from rlcredit.strategy import Strategy

try:
    from accelerate.utils import is_peft_model
    from trl import GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rlcredit.integrations.trl needs TRL >= 1.16, < 1.17: pip install 'rlcredit[trl]'."
    ) from err

__all__ = ["CreditGRPOTrainer", "LOSS_TYPES", "loss_type_for", "trl_config_kwargs", "check_trl_args"]

LOSS_TYPES: Mapping[str, str] = {
    "grpo": "seq_mean_token_mean",
    "sapo": "seq_mean_token_mean",
    "bnpo": "token_mean",  # local (micro-batch) token count
    "dapo": "token_mean",  # global token count of the accumulated batch
    "cispo": "token_mean",
    "vespo": "token_mean",
    "luspo": "seq_mean_token_sum",
    "dr_grpo": "seq_mean_token_sum_norm",  # L = max_completion_length
}
"""TRL ``loss_type`` -> the rlcredit aggregation its denominator implements."""

_PREFERRED = {
    "token_mean": "dapo",
    "seq_mean_token_mean": "grpo",
    "seq_mean_token_sum": "luspo",
    "seq_mean_token_sum_norm": "dr_grpo",
}
_CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")  # TRL's clipped-surrogate loss types
# Loss types whose denominator counts valid tokens of whole rows (grpo, sapo) or of the whole
# generation batch (dapo, cispo, vespo): a kept-weight denominator folds into the weights exactly.
_RENORMALIZABLE = ("grpo", "sapo", "dapo", "cispo", "vespo")

# Where the multimodal tensors of TRL's batch go: the keyword arguments of its own
# `_get_per_token_logps_and_entropies` (TRL 1.16) and of the model's forward.
_MM_TENSOR_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")
_MM_LIST_KEYS = ("num_images", "num_tiles")


def loss_type_for(aggregation: str) -> str:
    """The TRL ``loss_type`` whose aggregation is rlcredit's ``aggregation``.

    ``token_mean`` -> ``dapo`` (global token count; ``bnpo`` counts the micro-batch only),
    ``seq_mean_token_mean`` -> ``grpo``, ``seq_mean_token_sum`` -> ``luspo`` (TRL's sequence-sum
    loss; it warns unless ``importance_sampling_level="sequence"``), ``seq_mean_token_sum_norm`` ->
    ``dr_grpo`` (``L = max_completion_length``).

    Args:
        aggregation: one of ``rlcredit.functional.AGGREGATIONS``.

    Returns:
        The TRL ``loss_type`` string.

    Raises:
        SpecError: unknown aggregation.

    Examples:
        >>> from rlcredit.integrations.trl import loss_type_for
        >>> loss_type_for("token_mean"), loss_type_for("seq_mean_token_mean")
        ('dapo', 'grpo')
    """
    if aggregation not in _PREFERRED:
        raise SpecError(
            f"unknown aggregation {aggregation!r}; expected one of {', '.join(map(repr, _PREFERRED))}."
        )
    return _PREFERRED[aggregation]


def _as_strategy(credit: Any) -> Strategy:
    if isinstance(credit, Strategy):
        return credit
    if isinstance(credit, (str, Mapping)) or hasattr(credit, "__fspath__"):
        return build(credit)
    raise SpecError(
        f"credit= takes a preset name, a spec dict, a spec file path or a rlcredit.Strategy, got "
        f"{type(credit).__name__}; e.g. credit='entropy_forks' (available: rlcredit.available('strategy'))."
    )


def trl_config_kwargs(credit: Any) -> dict[str, Any]:
    """``GRPOConfig`` arguments that make TRL's loss match a strategy's ``clipped_surrogate``.

    Maps ``aggregation`` -> ``loss_type`` (``loss_type_for``), ``clip_low`` -> ``epsilon``,
    ``clip_high`` -> ``epsilon_high``, ``kl_coef`` -> ``beta`` and, when set, ``max_length`` ->
    ``max_completion_length``. ``dual_clip`` and ``entropy_penalty`` have no TRL equivalent (a
    warning at trainer construction says so).

    Args:
        credit: a preset name, a spec dict or file, or a ``rlcredit.Strategy``.

    Returns:
        A dict to splat into ``trl.GRPOConfig(...)``.

    Raises:
        SpecError: the strategy's policy loss is not a clipped surrogate with an aggregation.

    Examples:
        >>> from rlcredit.integrations.trl import trl_config_kwargs
        >>> trl_config_kwargs("dr_grpo")
        {'loss_type': 'dr_grpo', 'epsilon': 0.2, 'epsilon_high': 0.2, 'beta': 0.0}
    """
    loss = _as_strategy(credit).policy_loss
    if not all(hasattr(loss, f) for f in ("aggregation", "clip_low", "clip_high", "kl_coef")):
        raise SpecError(
            f"trl_config_kwargs maps a 'clipped_surrogate' policy loss onto GRPOConfig; this strategy's "
            f"policy loss is {type(loss).__name__}. Set GRPOConfig's loss_type/epsilon/beta yourself."
        )
    out: dict[str, Any] = {
        "loss_type": loss_type_for(loss.aggregation),
        "epsilon": float(loss.clip_low),
        "epsilon_high": float(loss.clip_high),
        "beta": float(loss.kl_coef),
    }
    if getattr(loss, "max_length", None) is not None:
        out["max_completion_length"] = int(loss.max_length)
    return out


def _first_shaper_name(strategy: Strategy) -> str | None:
    from rlcredit.shapers import GroupCenter, GroupNormalize

    if not strategy.shapers:
        return None
    first = strategy.shapers[0]
    return "group" if isinstance(first, GroupNormalize) else "none" if isinstance(first, GroupCenter) else None


def check_trl_args(strategy: Strategy, args: Any) -> list[str]:
    """Check a strategy against a ``GRPOConfig``: raise on impossible combinations, list the odd ones.

    Raises for ``use_liger_kernel=True`` (rlcredit folds credit into ``[B, T]`` advantages and
    supports only TRL's own loss path) and for ``renormalize=True`` with a ``loss_type`` whose
    denominator is not a token count of whole rows (``grpo``, ``sapo``) or of the whole generation
    batch (``dapo``, ``cispo``, ``vespo``): only those let a kept-weight denominator be folded into
    the weights. Returns a message for each inconsistency that TRL will silently resolve its own
    way: aggregation vs ``loss_type``, clip range vs ``epsilon``/``epsilon_high``, ``kl_coef`` vs
    ``beta``, ``dual_clip`` and ``entropy_penalty`` (no TRL equivalent), ``max_length`` vs
    ``max_completion_length``, ``top_entropy_quantile < 1`` (TRL's own entropy mask is then applied
    on top of the strategy's weights), reward scaling and multi-objective aggregation (the
    strategy's shapers replace TRL's advantages).

    Args:
        strategy: the ``rlcredit.Strategy``.
        args: a ``trl.GRPOConfig``.

    Returns:
        A list of warning messages (empty when consistent).

    Raises:
        SpecError: ``use_liger_kernel=True``, or ``renormalize=True`` with another ``loss_type``.

    Examples:
        >>> import types, rlcredit
        >>> from rlcredit.integrations.trl import check_trl_args
        >>> args = types.SimpleNamespace(loss_type="grpo", epsilon=0.2, epsilon_high=None)  # a GRPOConfig
        >>> [m.split(":")[0] for m in check_trl_args(rlcredit.build("dapo"), args)]
        ['aggregation', 'clip range']
    """
    if getattr(args, "use_liger_kernel", False):
        raise SpecError(
            "CreditGRPOTrainer does not support use_liger_kernel=True: rlcredit folds its token weights into "
            "[B, T] advantages, which only TRL's own loss path is tested to accept (Liger's fused GRPO loss takes "
            "one advantage per sequence; TRL 1.16 deprecates use_liger_kernel in favour of Hub kernels, "
            "model_init_kwargs={'use_kernels': True}). Set use_liger_kernel=False."
        )
    loss = strategy.policy_loss
    loss_type = getattr(args, "loss_type", "dapo")
    if getattr(loss, "renormalize", False) and loss_type not in _RENORMALIZABLE:
        raise SpecError(
            f"CreditGRPOTrainer cannot run a strategy whose policy loss has renormalize=True with "
            f"loss_type={loss_type!r}: that loss has no token-count denominator (or only a micro-batch one) to "
            f"rescale, so a kept-weight denominator (STAPO) cannot be folded into advantages. Use loss_type in "
            f"{', '.join(map(repr, _RENORMALIZABLE))}, or renormalize=False."
        )
    msgs: list[str] = []
    name = type(loss).__name__
    agg = getattr(loss, "aggregation", None)
    if agg is None:
        msgs.append(
            f"policy loss: the strategy's {name} is not used by TRL; only its credit (token weights and "
            f"advantages) is. TRL's loss_type={loss_type!r} runs."
        )
    elif LOSS_TYPES.get(loss_type) != agg:
        msgs.append(
            f"aggregation: the strategy aggregates with {agg!r} (TRL loss_type={loss_type_for(agg)!r}) but "
            f"GRPOConfig.loss_type={loss_type!r} aggregates as {LOSS_TYPES.get(loss_type, '?')!r}; TRL's "
            f"loss_type is what runs. Pass GRPOConfig(**rlcredit.integrations.trl.trl_config_kwargs(credit)) "
            f"to match."
        )
    if agg is not None and loss_type not in _CLIPPED:
        msgs.append(
            f"loss form: GRPOConfig.loss_type={loss_type!r} is not a clipped surrogate, so the strategy's "
            f"clip_low/clip_high/dual_clip do not apply (token weights still fold in exactly)."
        )
    if agg is not None and loss_type in _CLIPPED:
        eps_low = float(getattr(args, "epsilon", 0.2))
        eps_high = getattr(args, "epsilon_high", None)
        eps_high = eps_low if eps_high is None else float(eps_high)
        if (abs(eps_low - loss.clip_low) > 1e-12) or (abs(eps_high - loss.clip_high) > 1e-12):
            msgs.append(
                f"clip range: the strategy clips at (1 - {loss.clip_low}, 1 + {loss.clip_high}) but GRPOConfig "
                f"has epsilon={eps_low}, epsilon_high={eps_high}; TRL's values are used."
            )
    if getattr(loss, "dual_clip", None) is not None:
        msgs.append(f"dual clip: TRL has no dual clip; the strategy's dual_clip={loss.dual_clip} is ignored.")
    kl_coef = getattr(loss, "kl_coef", None)
    if kl_coef is not None and abs(float(getattr(args, "beta", 0.0)) - kl_coef) > 1e-12:
        msgs.append(f"kl: the strategy has kl_coef={kl_coef} but GRPOConfig.beta={args.beta}; TRL's beta is used.")
    if getattr(loss, "entropy_penalty", 0.0):
        msgs.append(
            f"entropy penalty: TRL has no -log pi penalty; the strategy's entropy_penalty={loss.entropy_penalty} "
            f"is ignored (TRL's entropy_coef is a bonus on the true entropy, a different term)."
        )
    max_length = getattr(loss, "max_length", None)
    if max_length is not None and loss_type == "dr_grpo" and max_length != getattr(args, "max_completion_length", None):
        msgs.append(
            f"max length: the strategy normalises by max_length={max_length} but TRL's dr_grpo uses "
            f"max_completion_length={args.max_completion_length}."
        )
    if float(getattr(args, "top_entropy_quantile", 1.0)) < 1.0:
        msgs.append(
            f"entropy mask: GRPOConfig.top_entropy_quantile={args.top_entropy_quantile} makes TRL multiply its own "
            f"high-entropy mask (current policy, per micro-batch) on top of the strategy's token weights; use "
            f"credit='entropy_forks' with top_entropy_quantile=1.0 instead of both."
        )
    expected = _first_shaper_name(strategy)
    scale = getattr(args, "scale_rewards", "group")
    scale = {True: "group", False: "none"}.get(scale, scale)
    if expected is not None and scale != expected:
        msgs.append(
            f"reward scaling: the strategy's advantages replace TRL's, so GRPOConfig.scale_rewards={scale!r} is "
            f"ignored (the strategy's first shaper behaves like scale_rewards={expected!r})."
        )
    if getattr(args, "multi_objective_aggregation", "sum_then_normalize") != "sum_then_normalize":
        msgs.append(
            "rewards: the strategy shapes the weighted sum of the reward functions (sum_then_normalize); "
            f"GRPOConfig.multi_objective_aggregation={args.multi_objective_aggregation!r} is ignored."
        )
    return msgs


def _reads(strategy: Strategy, target: Requirement) -> bool:
    """Whether any of the strategy's requirements mentions ``target`` (it may read it)."""
    return any(target in leaves(req) for req in strategy.requirements)


class CreditGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with a credit-assignment strategy: ``credit=`` is the only new argument.

    Once per generation batch, after TRL's rewards, the strategy's ``assign`` runs on a
    ``rlcredit.Rollout`` of the batch (see the module docstring for the fields) and its credit
    replaces TRL's advantages as ``A_{i,t} = w_{i,t} * A_i`` (exact for ``w >= 0``, every
    ``loss_type``); TRL's own loss then runs. Rows for which every reward function returned None
    get advantage 0 and stay out of their group's baseline, as in TRL. With several processes,
    batch statistics (group baselines of groups split over processes, batch quantiles) span them
    through ``rlcredit.distributed.TorchDistributedReducer``.

    Args:
        *args: ``GRPOTrainer``'s positional arguments (``model``, ``reward_funcs``, ``args``...).
        credit: a preset name (``"grpo"``, ``"entropy_forks"``, ``"vppo"``...), a spec dict, a spec
            file path, or a ``rlcredit.Strategy``.
        **kwargs: ``GRPOTrainer``'s keyword arguments.

    Attributes:
        credit_strategy: the ``rlcredit.Strategy`` in use.
        last_rollout: the ``rlcredit.Rollout`` of the latest generation batch.
        last_credit: its ``rlcredit.Credit`` (scores ``[B, T]``, ``token_weights [B, T]``,
            advantages ``[B]`` or ``[B, T]``).

    Raises:
        SpecError: a bad ``credit``, ``use_liger_kernel=True``, or ``renormalize=True`` with a
            ``loss_type`` it cannot be folded into (see ``check_trl_args``).

    Logged metrics: ``rlcredit/kept_fraction``, ``rlcredit/weight_mean``,
    ``rlcredit/advantage_abs_mean`` and ``rlcredit/score/NAME``.

    Examples:
        >>> from rlcredit.integrations.trl import CreditGRPOTrainer
        >>> CreditGRPOTrainer.__mro__[1].__name__
        'GRPOTrainer'
    """

    def __init__(self, *args: Any, credit: Any = "grpo", **kwargs: Any) -> None:
        strategy = _as_strategy(credit)
        grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if grpo_args is not None:
            check_trl_args(strategy, grpo_args)  # fail before loading anything
        super().__init__(*args, **kwargs)
        self.credit_strategy = strategy
        for msg in check_trl_args(strategy, self.args):
            warnings.warn(f"CreditGRPOTrainer: {msg}", UserWarning, stacklevel=2)
        self._credit_policy: HFPolicy | None = None
        self._credit_reducer: TorchDistributedReducer | None = None
        self._credit_rewards_per_func: Tensor | None = None
        self.last_rollout: Rollout | None = None
        self.last_credit: Credit | None = None

    # --- TRL hooks ---------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # noqa: D102
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._credit_rewards_per_func = rewards_per_func  # [B_global, n_funcs], gathered by TRL
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):  # noqa: D102
        self._credit_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        if self._credit_rewards_per_func is None:
            raise RuntimeError(
                "CreditGRPOTrainer: TRL did not call _calculate_rewards during generation; this TRL version is "
                "not supported (pip install 'rlcredit[trl]' for the supported range)."
            )
        output["advantages"] = self._credit_advantages(output, self._credit_rewards_per_func)
        self._credit_rewards_per_func = None
        return output

    # --- credit --------------------------------------------------------------------------------

    def _credit_forward(self, output: Mapping[str, Any], input_ids: Tensor, attention_mask: Tensor,
                        entropy: bool) -> tuple[Tensor, Tensor | None]:
        """Old log-probs (and entropies) of the batch through TRL's own chunked forward, no grad."""
        mode = "train" if self.model.training else "eval"
        batch_size = self.args.per_device_train_batch_size if mode == "train" else self.args.per_device_eval_batch_size
        mm = {k: output[k] for k in _MM_TENSOR_KEYS + _MM_LIST_KEYS if k in output}
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            logps, entropies, _ = self._get_per_token_logps_and_entropies(
                self.model, input_ids, attention_mask, output["completion_ids"].size(1),
                batch_size=batch_size, compute_entropy=entropy, **mm,
            )
        return logps.detach().float(), None if entropies is None else entropies.detach().float()

    def _credit_reducer_handle(self) -> TorchDistributedReducer | None:
        """Batch statistics across TRL's processes (accelerate initialises torch.distributed), or None."""
        if self.accelerator.num_processes == 1:
            return None
        if self._credit_reducer is None:
            self._credit_reducer = TorchDistributedReducer()
        return self._credit_reducer

    def _credit_policy_handle(self) -> HFPolicy:
        if self._credit_policy is None:
            model = self.accelerator.unwrap_model(self.model)
            if is_peft_model(model):
                model = model.get_base_model()  # LoRA layers live in the base model's modules
            self._credit_policy = HFPolicy(model)
        return self._credit_policy

    def _renormalized(self, weights: Tensor, mask: Tensor, num_items: Tensor, reducer: Any) -> Tensor:
        """Weights ``w * n / sum(w)`` so that TRL's valid-token denominator ``n`` becomes ``sum(w)``.

        Per row for ``grpo``/``sapo`` (their denominator is each row's valid tokens); over the
        generation batch for ``dapo``/``cispo``/``vespo`` (TRL's ``num_items_in_batch``, all
        processes). A scope with no kept weight keeps weight 0.
        """
        # The ratio of the renormalised to the plain coefficients of TRL's aggregation, c_kept / c_all =
        # w * n / sum(w): rlcredit.functional.loss_coefficients derives both denominators.
        if self.loss_type in ("grpo", "sapo"):
            mode, totals = "seq_mean_token_mean", None
        else:
            kept = weights.sum().reshape(1)
            kept = (kept if reducer is None else reducer.sum(kept)).reshape(())
            mode, totals = "token_mean", F.Totals(tokens=num_items, weight=kept)
        renormalized = F.loss_coefficients(mask, weights, mode=mode, renormalize=True, totals=totals)
        plain = F.loss_coefficients(mask, None, mode=mode, totals=totals)
        return torch.where(mask, renormalized / torch.where(mask, plain, 1.0), 0.0)

    def _credit_advantages(self, output: dict[str, Any], rewards_per_func: Tensor) -> Tensor:
        """Build the rollout, run ``strategy.assign`` once and fold weights into ``[B, T]`` advantages."""
        mode = "train" if self.model.training else "eval"
        completion_mask = output["completion_mask"]
        loss_mask = completion_mask if "tool_mask" not in output else completion_mask * output["tool_mask"]
        mask = loss_mask.bool()
        B = mask.shape[0]
        device = mask.device

        # Rewards as TRL sums them (sum_then_normalize) over the gathered batch; this process's rows
        # start at process_index * B. A group is num_generations consecutive rows. A row every reward
        # function skipped (NaN) gets a group of its own (ids < 0), so it stays out of the baseline of
        # its prompt's group (TRL's nanmean/nanstd) and gets advantage 0.
        G = self.num_generations if mode == "train" else self.num_generations_eval
        start = self.accelerator.process_index * B
        local = rewards_per_func[start:start + B].to(device)
        weights = self.reward_weights.to(device)
        unscorable = torch.isnan(local).all(dim=1)
        rewards = torch.where(unscorable, 0.0, (local * weights.unsqueeze(0)).nansum(dim=1)).float()
        row = torch.arange(start, start + B, device=device)
        group_ids = torch.where(unscorable, -1 - row, torch.div(row, G, rounding_mode="floor"))

        input_ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
        attention_mask = torch.cat([output["prompt_mask"], completion_mask], dim=1)
        strategy = self.credit_strategy
        old = output.get("old_per_token_logps")
        entropy = None
        need_entropy = _reads(strategy, Signal("entropy"))
        if need_entropy or (old is None and _reads(strategy, Field("old_logprobs"))):
            logps, entropy = self._credit_forward(output, input_ids, attention_mask, entropy=need_entropy)
            old = logps if old is None else old
        model_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        model_inputs.update({k: output[k] for k in _MM_TENSOR_KEYS if k in output})
        rollout = Rollout(
            response_mask=mask,
            rewards=rewards,
            group_ids=group_ids,
            old_logprobs=None if old is None else torch.where(mask, old.float(), 0.0),
            ref_logprobs=None if output.get("ref_per_token_logps") is None
            else torch.where(mask, output["ref_per_token_logps"].float(), 0.0),
            signals={} if entropy is None else {"entropy": torch.where(mask, entropy, 0.0)},
            model_inputs=model_inputs,
        )
        policy = self._credit_policy_handle() if strategy.needs_policy(rollout) else None
        reducer = self._credit_reducer_handle()
        credit = strategy.assign(rollout, policy, reducer=reducer)
        folding = credit
        if getattr(strategy.policy_loss, "renormalize", False):
            folding = attrs.evolve(credit, token_weights=self._renormalized(credit.token_weights, mask,
                                                                            output["num_items_in_batch"], reducer))
        folded = folding.token_advantages()  # w * A, exact for w >= 0; 0 on padding
        folded = torch.where(unscorable.unsqueeze(1), 0.0, folded)
        self.last_rollout, self.last_credit = rollout, credit
        keys = list(credit.metrics)
        if keys:  # one collective and one host sync for all the metrics, not one per metric
            local = torch.stack([credit.metrics[k].detach().float().reshape(()) for k in keys])
            means = self.accelerator.gather(local.reshape(1, -1)).mean(0).tolist()
            for key, value in zip(keys, means):
                self._metrics[mode][f"rlcredit/{key}"].append(value)
        return folded.float()
