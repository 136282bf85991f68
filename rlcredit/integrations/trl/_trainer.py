"""``CreditGRPOTrainer``: TRL's ``GRPOTrainer`` whose advantages come from an rlcredit strategy."""

from __future__ import annotations

import types
import warnings
from collections.abc import Mapping
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit.distributed import TorchDistributedReducer
from rlcredit.integrations.trl._config import _as_strategy, check_trl_args
from rlcredit.errors import SpecError
from rlcredit.policy import HFPolicy
from rlcredit.requirements import POLICY, RAW_IMAGES, Field, Requirement, Signal, leaves, requirements_of
from rlcredit.rollout import Credit, Rollout
from rlcredit.strategy import Strategy

try:
    from accelerate.utils import is_peft_model
    from trl import GRPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "rlcredit.integrations.trl needs TRL >= 1.16, < 1.17: pip install 'rlcredit[trl]'."
    ) from err

__all__ = ["CreditGRPOTrainer"]

# Where the multimodal tensors of TRL's batch go: the keyword arguments of its own
# `_get_per_token_logps_and_entropies` (TRL 1.16) and of the model's forward.
_MM_TENSOR_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                   "token_type_ids", "mm_token_type_ids", "image_position_ids")
_MM_LIST_KEYS = ("num_images", "num_tiles")


def _reads(strategy: Strategy, target: Requirement) -> bool:
    """Whether any of the strategy's requirements mentions ``target`` (it may read it)."""
    return any(target in leaves(req) for req in strategy.requirements)


def _parts(strategy: Strategy) -> list[tuple[str, Any]]:
    """``(who, component)`` for the strategy's estimators, weighter, shapers and policy loss."""
    parts = [(f"estimator {name!r}", est) for name, est in strategy.estimators.items()]
    parts.append((f"weighter {type(strategy.weighter).__name__}", strategy.weighter))
    return parts + [(f"shaper {type(s).__name__}", s) for s in strategy.shapers] \
        + [(f"policy_loss {type(strategy.policy_loss).__name__}", strategy.policy_loss)]


def _trl_view(beta: float) -> Any:
    """What the trainer gives every strategy, as a stand-in rollout for requirement checks: old log-probs,
    entropies, model inputs (with the raw images for a strategy that reads them), completion ids, and reference
    log-probs when ``beta > 0`` (never precomputed perturbed-image signals such as ``aug_logprobs``)."""
    inputs = dict.fromkeys(("input_ids", "attention_mask", RAW_IMAGES.key), True)
    return types.SimpleNamespace(old_logprobs=True, ref_logprobs=True if beta else None, model_inputs=inputs,
                                 response_ids=True, signals={"entropy": True})


def _prompt_images(prompts: list) -> list[list[Any]]:
    """Each conversational prompt's images in message order (the rule of TRL's ``_tokenize_prompts``)."""
    rows = []
    for prompt in prompts:
        messages = prompt if isinstance(prompt, list) else []
        rows.append([part["image"] for message in messages if isinstance(message.get("content"), list)
                     for part in message["content"] if part.get("type") == "image"])
    return rows


@attrs.define(eq=False)
class _TrainerPolicy(HFPolicy):
    """``HFPolicy`` whose forwards run under the trainer's ``accelerator.autocast()``, as TRL's own do.

    TRL computes the old log-probs under autocast (bf16 by default, ``GRPOConfig.bf16``); a
    policy forward in another precision would put that precision gap (~1e-3 in log-probs) into
    every difference with them, e.g. VPPO's ``d = log pi(y | I') - log pi_old(y | I)``.
    """

    autocast: Any = attrs.field(kw_only=True)  # a context-manager factory: the accelerator's autocast

    def response_stats(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        with self.autocast():
            return super().response_stats(*args, **kwargs)


_ZERO_KEPT = (
    "CreditGRPOTrainer: the strategy's token weights kept no token of a generation batch (rlcredit/kept_tokens = 0): "
    "the policy loss is 0 there and that step trains nothing. Its weighter ({weighter}) selected nothing, e.g. an "
    "intersect of masks that never overlap (digits AND the top-20% entropy tokens). Loosen it (a union, a larger "
    "fraction) and watch rlcredit/kept_fraction; see 'A strategy that keeps no token' in docs/troubleshooting.md. "
    "(Shown once; the metric records every batch.)"
)


class CreditGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with a credit-assignment strategy: ``credit=`` is the only new argument.

    Once per generation batch, after TRL's rewards, the strategy's ``assign`` runs on a
    ``rlcredit.Rollout`` of the batch (see ``rlcredit.integrations.trl`` for the fields) and its credit
    replaces TRL's advantages as ``A_{i,t} = w_{i,t} * A_i`` (exact for ``w >= 0``, every
    ``loss_type``); TRL's own loss then runs. Rows for which every reward function returned None
    get advantage 0 and stay out of their group's baseline, as in TRL. With several processes,
    batch statistics (group baselines of groups split over processes, batch quantiles) span them
    through ``rlcredit.distributed.TorchDistributedReducer``. A strategy that blackens the images
    before the image processor (``vppo_released``: ``RAW_IMAGES`` in its requirements) gets each
    row's images of TRL's forward and ``processing_class`` in ``model_inputs["raw_images"]``; the
    policy's forwards run under ``accelerator.autocast()``, the precision of TRL's old log-probs.

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
        SpecError: a bad ``credit``, ``use_liger_kernel=True``, ``renormalize=True`` with a
            ``loss_type`` it cannot be folded into, a policy loss TRL has no ``loss_type`` for (see
            ``check_trl_args``; a subclass whose ``_compute_loss`` runs the strategy's own loss is
            exempt), or a strategy that reads images (``vppo``, ``vppo_paper``, ``at_rl``: a
            component of ``rlcredit_mm`` that needs the policy) with a text-only model.

    Logged metrics (the mean over processes): ``rlcredit/kept_tokens`` (valid tokens with weight
    > 0), ``rlcredit/kept_fraction``, ``rlcredit/weight_mean``, ``rlcredit/advantage_abs_mean``
    and ``rlcredit/score/NAME``. A generation batch whose weights keep no token on any process
    also warns (once), at the metrics gather TRL already does: no extra host sync.

    Examples:
        >>> from rlcredit.integrations.trl import CreditGRPOTrainer
        >>> CreditGRPOTrainer.__mro__[1].__name__
        'GRPOTrainer'
    """

    def __init__(self, *args: Any, credit: Any = "grpo", **kwargs: Any) -> None:
        strategy = _as_strategy(credit)
        # A subclass whose _compute_loss runs the strategy's own loss (the PAPO recipe) needs no TRL loss_type.
        own_loss = type(self)._compute_loss is not GRPOTrainer._compute_loss
        grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        if grpo_args is not None:
            check_trl_args(strategy, grpo_args, strategy_loss=own_loss)  # fail before loading anything
        super().__init__(*args, **kwargs)
        self.credit_strategy = strategy
        for msg in check_trl_args(strategy, self.args, strategy_loss=own_loss):
            warnings.warn(f"CreditGRPOTrainer: {msg}", UserWarning, stacklevel=2)
        self._credit_policy: HFPolicy | None = None
        self._check_model_sees_images(strategy)
        self._credit_warned_zero_kept = False
        self._credit_reducer: TorchDistributedReducer | None = None
        self._credit_rewards_per_func: Tensor | None = None
        self._credit_reads_raw_images = _reads(strategy, RAW_IMAGES)
        self._credit_images: list[Any] | None = None
        self.last_rollout: Rollout | None = None
        self.last_credit: Credit | None = None

    # --- TRL hooks ---------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # noqa: D102
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._credit_rewards_per_func = rewards_per_func  # [B_global, n_funcs], gathered by TRL
        return rewards_per_func

    def _generate(self, prompts):  # noqa: D102
        result = super()._generate(prompts)
        if self._credit_reads_raw_images:
            # The images of TRL's forward: those _generate extracted (tool images merged), else (a rollout_func)
            # the dataset images that TRL restores, which sit in the prompts' image parts.
            images = result[6]
            self._credit_images = list(images) if images is not None else _prompt_images(prompts)
        return result

    def _generate_and_score_completions(self, inputs):  # noqa: D102
        self._credit_rewards_per_func = None
        self._credit_images = None
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

    def _new_policy(self) -> HFPolicy:
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model):
            model = model.get_base_model()  # LoRA layers live in the base model's modules
        return _TrainerPolicy(model, autocast=self.accelerator.autocast)

    def _credit_policy_handle(self) -> HFPolicy:
        if self._credit_policy is None:  # built at the first training step, after accelerate prepared the model
            self._credit_policy = self._new_policy()
        return self._credit_policy

    def _check_model_sees_images(self, strategy: Strategy) -> None:
        """Fail at construction when a part that reads images (an ``rlcredit_mm`` component needing the policy)
        meets a text-only model, instead of at the first training step."""
        view = _trl_view(float(self.args.beta))
        readers = [(who, req) for who, part in _parts(strategy) for req in requirements_of(part, who)
                   if type(part).__module__.split(".")[0] == "rlcredit_mm"
                   and not req.met(view, None) and req.met(view, POLICY)]
        if not readers:
            return
        policy = self._new_policy()  # resolves the model's adapter (None: a text-only model)
        if policy.adapter is not None:
            return
        model = policy.model
        who, req = readers[0]
        raise SpecError(
            f"CreditGRPOTrainer: the strategy needs a vision-language model: its {who} requires {req.describe()}, "
            f"which under TRL only the trainer's model can give, by a forward on the prompt's (perturbed) images. "
            f"The model ({type(model).__name__}, model_type {getattr(model.config, 'model_type', '?')!r}) is "
            f"text-only (no vision_config). Use a VLM rlcredit_mm supports (Qwen2-VL, Qwen2.5-VL, LLaVA, Idefics3, "
            f"Gemma 3...) with its processor as processing_class and an 'image' column in the dataset "
            f"(examples/trl_vppo.py), or a text strategy such as 'entropy_forks'."
        )

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
        if self._credit_reads_raw_images:  # VisualKL(stage="image"): the images before the processor
            images = self._credit_images
            if images is None or len(images) != B:
                raise RuntimeError(
                    f"CreditGRPOTrainer: the strategy reads the images before the image processor, but TRL's _generate "
                    f"gave {'none' if images is None else len(images)} rows of images for {B} completions; this TRL "
                    f"version is not supported (pip install 'rlcredit[trl]')."
                )
            model_inputs[RAW_IMAGES.key] = {"images": images, "processor": self.processing_class}
            self._credit_images = None
        rollout = Rollout(
            response_mask=mask,
            rewards=rewards,
            group_ids=group_ids,
            old_logprobs=None if old is None else torch.where(mask, old.float(), 0.0),
            ref_logprobs=None if output.get("ref_per_token_logps") is None
            else torch.where(mask, output["ref_per_token_logps"].float(), 0.0),
            signals={} if entropy is None else {"entropy": torch.where(mask, entropy, 0.0)},
            model_inputs=model_inputs,
            response_ids=output["completion_ids"],
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
            if "kept_tokens" in keys and means[keys.index("kept_tokens")] == 0 and not self._credit_warned_zero_kept:
                self._credit_warned_zero_kept = True
                warnings.warn(_ZERO_KEPT.format(weighter=type(strategy.weighter).__name__), UserWarning, stacklevel=2)
        return folded.float()
