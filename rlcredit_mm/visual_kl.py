"""VPPO's visual dependency of each response token: how much its distribution changes without the image.

Huang et al. 2025, *Spotlight on Token Perception for Multimodal Reinforcement Learning*
(arXiv 2510.09285, ICLR 2026; code ``huaixuheqing/VPPO-RL``).
"""

from __future__ import annotations

from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit import functional as F
from rlcredit.requirements import POLICY, RAW_IMAGES, AllOf, AnyOf, Field, Requirement, Signal
from rlcredit.validators import in_range, one_of, to_component, to_number
from rlcredit.errors import AdapterError, RolloutError, SpecError
from rlcredit.registry import register
from rlcredit.rollout import Rollout
from rlcredit_mm.images import perturb_raw_images, raw_images_of
from rlcredit_mm.perturb import PatchBlackout

__all__ = ["VisualKL", "ESTIMATES", "K3_FORMS", "STAGES"]

ESTIMATES = ("k3", "exact", "fused")
K3_FORMS = ("expm1", "exp")
STAGES = ("pixels", "image")

_MODEL = AllOf(POLICY, Field("model_inputs"))
_RAW_MODEL = AllOf(POLICY, Field("model_inputs"), RAW_IMAGES)  # stage="image": the images before the processor
_SIGNALS = AllOf(Signal("aug_logprobs"), Field("old_logprobs"))


@register("estimator", "visual_kl")
@attrs.frozen
class VisualKL:
    """Visual dependency ``S_t``: the divergence of the next-token distribution with the image ``I``
    from the one with a perturbed image ``I'`` (VPPO, Huang et al. 2025, arXiv 2510.09285).

    ``estimate="k3"`` (the released code, the ``vppo`` preset's default): the sampled-token k3
    estimate from the old policy, no gradient,

        d_t = clamp(log pi_old(y_t | s_t, I') - log pi_old(y_t | s_t, I), -20, 20)
        S_t = clamp(exp(d_t) - d_t - 1, 0, 10)

    computed in float32 as ``expm1(d) - d`` (``k3_form="expm1"``: accurate for small ``d``, never
    negative) or, ``k3_form="exp"``, as the released code does, ``exp(d) - d - 1`` (for
    ``|d| ~ 1e-3`` it is quantised to multiples of ``~6e-8`` and often clamped from below to 0,
    which changes which low-score tokens TGF keeps), with ``log pi_old(y | I)`` = ``rollout.old_logprobs`` (else the policy's) and
    ``log pi_old(y | I')`` = ``rollout.signals["aug_logprobs"]`` when a trainer precomputed it
    (then no model is needed), else the policy's forward on the perturbed inputs.

    ``estimate="exact"`` (the paper): the full-vocabulary ``S_t = KL(pi(.|s_t, I) || pi(.|s_t, I'))``
    from both runs' logits (``rlcredit.functional.token_kl``), computed one row chunk of the
    policy at a time and, within it, ``tokens_per_chunk`` positions at a time: at most
    ``[tokens_per_chunk, V]`` logits per run exist. ``estimate="fused"``: the same KL from the two
    runs' last hidden states and the LM head (``rlcredit.functional.fused_token_kl``), never
    materialising either run's logits (not for models with final-logit soft-capping: use
    ``"exact"``).

    Where ``I'`` is made (``stage``): ``"pixels"`` perturbs the processor's output (normalised
    pixels, squares aligned to the ViT patches); ``"image"`` perturbs each raw image, as
    ``perturbation.apply_pil``, before the image processor, as VPPO's released code does (its 14-px
    squares then straddle the patches once the processor resizes), and re-runs the processor: it
    needs ``rollout.model_inputs["raw_images"]`` (``rlcredit.requirements.RAW_IMAGES``): a
    ``rlcredit_mm.images.RawImages`` or the mapping ``{"images": [[PIL...] per row], "processor":
    processor}`` (each row's images as given to the processor, and the processor), which no
    forward sees; ``CreditGRPOTrainer`` and verl's ``apply_credit`` add it for such a strategy.

    The perturbed forward reuses every input but the image inputs (``drop`` also masks the image
    tokens); the perturbation runs on one row chunk at a time through ``HFPolicy``'s
    ``transform``, so only one chunk of perturbed pixels is ever on the device. Random
    perturbations are seeded per row from ``(seed, hash of its token ids)``: the same row gets the
    same ``I'`` however it is batched. Padding gets 0; everything runs under ``no_grad``.

    Args:
        estimate: ``"k3"``, ``"exact"`` or ``"fused"``.
        perturbation: how ``I'`` is made: a registered name (``"patch_blackout"``,
            ``"gaussian_noise"``, ``"constant"``, ``"blur"``, ``"drop"``), a spec dict
            (``{"name": "patch_blackout", "p": 0.6}``) or a perturbation object.
        temperature: the sampling temperature, applied to the policy's logits (> 0); it should be
            the one behind ``old_logprobs``.
        k3_form: ``"expm1"`` or ``"exp"`` (the released code's float32 rounding); ``k3`` only.
        stage: ``"pixels"`` (after the image processor) or ``"image"`` (before it, from
            ``model_inputs["raw_images"]``; the perturbation needs a PIL form).

    Requires:
        ``k3``: ``signals["aug_logprobs"]`` and ``old_logprobs``, or a policy
        (``rlcredit.HFPolicy`` of a VLM) and ``model_inputs``. ``exact``/``fused``: a policy and
        ``model_inputs``. ``stage="image"`` with a policy: ``model_inputs["raw_images"]`` too
        (``RAW_IMAGES``).

    Returns:
        ``[B, T]`` float32 scores >= 0, 0 on padding.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit_mm import VisualKL
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, False]]), torch.tensor([1.0]), torch.tensor([0]),
        ...                      old_logprobs=torch.tensor([[-1.0, -2.0, 0.0]]),
        ...                      signals={"aug_logprobs": torch.tensor([[-1.0, -1.0, 0.0]])})
        >>> VisualKL()(r)  # d = (0, 1): S = (0, e - 2)
        tensor([[0.0000, 0.7183, 0.0000]])
        >>> r = rlcredit.Rollout(torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0]), torch.tensor([0]),
        ...                      old_logprobs=torch.zeros(1, 2), signals={"aug_logprobs": torch.tensor([[5e-4, -5e-4]])})
        >>> VisualKL()(r) * 1e7, VisualKL(k3_form="exp")(r) * 1e7  # d^2 / 2 = 1.25e-7; exp(d) rounds in float32
        (tensor([[1.2503, 1.2497]]), tensor([[1.1921, 1.1921]]))
        >>> [r.describe()[:8] for r in VisualKL(estimate="exact", perturbation={"name": "patch_blackout", "p": 0.6}).requires]
        ['a policy']
    """

    estimate: str = attrs.field(default="k3", validator=one_of(*ESTIMATES))
    perturbation: Any = attrs.field(factory=PatchBlackout, converter=to_component("perturbation"))
    temperature: float = attrs.field(default=1.0, converter=to_number, validator=in_range(0.0, lo_open=True))
    k3_form: str = attrs.field(default="expm1", validator=one_of(*K3_FORMS))
    stage: str = attrs.field(default="pixels", validator=one_of(*STAGES))

    extras = ()

    def __attrs_post_init__(self) -> None:
        if not callable(self.perturbation):
            raise SpecError(
                f"VisualKL.perturbation must be callable as perturbation(inputs, model, adapter=...), got "
                f"{type(self.perturbation).__name__}; use a registered name such as 'patch_blackout'."
            )
        if self.k3_form != "expm1" and self.estimate != "k3":
            raise SpecError(
                f"VisualKL.k3_form={self.k3_form!r} sets how the k3 estimate is rounded; estimate={self.estimate!r} "
                f"computes a full-vocabulary KL. Drop k3_form or use estimate='k3'."
            )
        if self.stage == "image" and (not callable(getattr(self.perturbation, "apply_pil", None))
                                      or type(self.perturbation).__name__ == "Drop"):
            raise SpecError(
                f"VisualKL(stage='image') perturbs raw PIL images, which {type(self.perturbation).__name__} cannot "
                f"(no apply_pil form); use stage='pixels' or a perturbation such as 'patch_blackout'."
            )

    @property
    def requires(self) -> tuple[Requirement, ...]:
        model = _RAW_MODEL if self.stage == "image" else _MODEL
        return (AnyOf(_SIGNALS, model),) if self.estimate == "k3" else (model,)

    # --- entry point ----------------------------------------------------------------------------

    def __call__(self, rollout: Rollout, policy: Any = None) -> Tensor:
        mask = rollout.response_mask
        with torch.no_grad():
            if self.estimate == "k3":
                return self._k3(rollout, policy)  # float32, 0 on padding
            score = self._kl(rollout, self._check_policy(rollout, policy)).float().to(mask.device)
            return torch.where(mask, score, torch.zeros((), device=mask.device))

    # --- pieces ---------------------------------------------------------------------------------

    def _check_policy(self, rollout: Rollout, policy: Any) -> Any:
        if policy is None or rollout.model_inputs is None:
            raise RolloutError(
                f"visual_kl(estimate={self.estimate!r}) needs a policy (rlcredit.HFPolicy of a VLM) and "
                f"rollout.model_inputs (input_ids [B, P+T], pixel inputs...) to run the original and the perturbed "
                f"forward; got policy={'set' if policy is not None else 'None'}, model_inputs="
                f"{'set' if rollout.model_inputs is not None else 'None'}."
                + (" With estimate='k3', precomputed signals['aug_logprobs'] and old_logprobs need no model."
                   if self.estimate == "k3" else "")
            )
        if getattr(policy, "adapter", None) is None:
            model_type = getattr(getattr(getattr(policy, "model", None), "config", None), "model_type", "?")
            raise AdapterError(
                f"visual_kl needs a vision-language model with an rlcredit_mm adapter; the policy's model "
                f"(model_type {model_type!r}) has none (a text-only model has no image to perturb)."
            )
        return policy

    def _transform(self, policy: Any, rollout: Rollout):
        perturbation, model, adapter = self.perturbation, policy.model, policy.adapter
        if self.stage == "image":
            raw = raw_images_of(rollout.model_inputs, rollout.batch_size, "visual_kl(stage='image')")

            def from_raw(chunk: dict[str, Any], rows: slice) -> dict[str, Any]:
                return perturb_raw_images(chunk, raw, rows, perturbation, adapter)

            return from_raw

        def transform(chunk: dict[str, Any], rows: slice) -> dict[str, Any]:
            return perturbation(chunk, model, adapter=adapter)

        return transform

    def _k3(self, rollout: Rollout, policy: Any) -> Tensor:
        mask = rollout.response_mask
        aug = rollout.signals.get("aug_logprobs")
        base = rollout.old_logprobs
        if aug is None or base is None:
            policy = self._check_policy(rollout, policy)
            inputs = dict(rollout.model_inputs)
            if aug is None:
                aug = policy.response_stats(inputs, mask, temperature=self.temperature,
                                            transform=self._transform(policy, rollout)).logprobs
            if base is None:
                base = policy.response_stats(inputs, mask, temperature=self.temperature).logprobs
        if aug.shape != mask.shape:
            raise RolloutError(
                f"visual_kl: signals['aug_logprobs'] must be [B, T] = {list(mask.shape)} log-probs of the sampled "
                f"tokens with the perturbed image, got {list(aug.shape)}."
            )
        aug, base = aug.to(mask.device).float(), base.to(mask.device).float()
        if self.k3_form == "exp":  # the released expression (dp_actor.py L403-405), op for op
            d = (aug - base).clamp(-20.0, 20.0)
            return (d.exp() - d - 1).clamp(0.0, 10.0).mul_(rollout.float_mask)
        # k3_kl clamps d = aug - base to [-20, 20] before exp (a -inf log-prob stays finite); VPPO
        # then caps the score at 10. Both inputs are finite everywhere (the rollout checks its
        # tensors, the policy gives 0 on padding), so the product with the 0/1 mask zeroes padding
        # exactly, several times faster on CPU than a where() with a bool condition.
        return F.k3_kl(base, aug).clamp_(0.0, 10.0).mul_(rollout.float_mask)

    def _kl(self, rollout: Rollout, policy: Any) -> Tensor:
        mask = rollout.response_mask
        weight, bias = policy.lm_head
        if self.estimate == "fused" and policy.logit_softcap:
            raise SpecError(
                f"visual_kl(estimate='fused') computes logits as hidden @ W.T and cannot apply this model's final "
                f"logit soft-capping ({policy.logit_softcap}); use estimate='exact'."
            )
        inputs = dict(rollout.model_inputs)
        if policy.adapter is not None and hasattr(policy.adapter, "prepare_inputs"):
            inputs = policy.adapter.prepare_inputs(inputs, policy.model)  # row slicing may rely on it
        transform = self._transform(policy, rollout)
        B = mask.shape[0]
        step = policy.rows_per_chunk
        parts = []
        # One row chunk at a time: both runs' hidden states exist only for the chunk.
        for start in range(0, B, step):
            rows = slice(start, min(B, start + step))
            chunk = policy.slice_rows(inputs, rows)
            m = mask[rows].to(policy.device)
            h_p = policy.response_stats(chunk, m, logprobs=False, hidden=True).hidden
            h_q = policy.response_stats(chunk, m, logprobs=False, hidden=True, transform=transform).hidden
            if self.estimate == "fused":
                kl = F.fused_token_kl(h_p, h_q, weight, m, bias=bias, chunk_size=policy.tokens_per_chunk,
                                      temperature=self.temperature)
            else:
                kl = self._exact_chunk(policy, h_p, h_q, m)
            parts.append(kl)
        return torch.cat(parts, 0)

    def _exact_chunk(self, policy: Any, h_p: Tensor, h_q: Tensor, m: Tensor) -> Tensor:
        """``[r, T]`` KL from one row chunk's hidden states, ``tokens_per_chunk`` positions at a time."""
        flat_p, flat_q = h_p[m], h_q[m]  # [n, H] valid positions only
        k = policy.tokens_per_chunk
        vals = []
        for s in range(0, flat_p.shape[0], k):
            # logits_from_hidden applies the LM head, soft-capping and the temperature (fp32).
            z_p = policy.logits_from_hidden(flat_p[s:s + k], temperature=self.temperature)
            z_q = policy.logits_from_hidden(flat_q[s:s + k], temperature=self.temperature)
            vals.append(F.token_kl(z_p, z_q, chunk_size=k))
        out = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
        return out.masked_scatter(m, torch.cat(vals)) if vals else out
