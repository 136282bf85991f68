"""PAPO's masked image: square patches blackened with p = 0.6, one mask per prompt shared by its rollouts.

Wang et al. 2025, *Perception-Aware Policy Optimization for Multimodal Reasoning* (arXiv 2507.06448).
The ``papo`` loss (``rlcredit.losses.PAPO``) compares the policy's log-probs of each response with
the original image and with a masked one; these helpers make the masked inputs and, for your own
loop, the differentiable masked log-probs it reads as ``aux["masked_logprobs"]``:

    masked = papo_masked_logprobs(policy, model_inputs, response_mask, group_ids)   # with grad
    out = strategy.loss(logprobs, rollout, credit, aux={"masked_logprobs": masked})

The mask is ``patch_blackout``'s (``rlcredit_mm.perturb.PatchBlackout``), seeded from the group id
instead of the row's tokens: every rollout of a prompt sees the same masked image (the released
code masks the prompt's image once, before its rollouts are repeated), and a prompt's mask is the
same in every micro-batch and on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rlcredit.errors import RolloutError
from rlcredit_mm.adapters import adapter_for, config_of
from rlcredit_mm.perturb import PIL_PATCH_SIZE, PatchBlackout, per_image_keys, row_keys

__all__ = ["PAPO_MASK_PROB", "group_keys", "papo_masked_inputs", "papo_masked_image", "papo_masked_logprobs"]

PAPO_MASK_PROB = 0.6
"""The probability that PAPO blackens a square patch (the released configs' ``black_prob``)."""


def group_keys(group_ids: Tensor, seed: int = 0) -> Tensor:
    """One int64 random key per row from ``(seed, group id)``: rows of one prompt share it.

    ``row_keys`` of the one-token "sequence" ``[group_id]``, so the key is a pure function of the
    seed and the id, on any device.

    Examples:
        >>> import torch
        >>> from rlcredit_mm.papo import group_keys
        >>> k = group_keys(torch.tensor([7, 7, 3]))
        >>> bool(k[0] == k[1]), bool(k[0] != k[2]), bool(group_keys(torch.tensor([7]), seed=1)[0] != k[0])
        (True, True, True)
    """
    if not isinstance(group_ids, Tensor) or group_ids.ndim != 1 or group_ids.dtype.is_floating_point:
        raise RolloutError(f"group_keys: group_ids must be a [B] integer tensor (one id per rollout), got {group_ids!r:.80}.")
    return row_keys(group_ids.long().reshape(-1, 1), None, seed)


def papo_masked_inputs(inputs: Mapping[str, Any], model: Any, group_ids: Tensor, *, p: float = PAPO_MASK_PROB,
                       patch_size: int | None = None, seed: int = 0, adapter: Any = None) -> dict[str, Any]:
    """The model inputs with every image masked as PAPO does: ``I_mask``, shared by a prompt's rollouts.

    Each ``patch_size`` square of each image (aligned to the model's patch grid: 14 px for
    Qwen2/2.5-VL, PAPO's 14 px) is set to black (the processor's ``(0 - mean) / std``) with
    probability ``p``, in the processor's normalised pixel space, through the model's adapter
    (any supported architecture). The draw of image ``j`` of row ``b`` is a pure function of
    ``(seed, group_ids[b], j)``: the rows of one group get the same mask, other groups others.

    Args:
        inputs: model inputs of ``B`` rows (``input_ids [B, P+T]``, pixels, ...).
        model: the VLM or its config.
        group_ids: ``[B]`` integer ids; rows of one prompt share one (``rollout.group_ids``).
        p: probability of blackening a square (PAPO: 0.6).
        patch_size: square side in pixels (None: the model's patch size).
        seed: base seed; change it per step for a fresh mask every step.
        adapter: the model's ``rlcredit_mm`` adapter (None: resolved from the config).

    Returns:
        A new dict of inputs; only the pixel tensor differs.

    Examples:
        >>> import torch
        >>> from transformers import LlavaConfig
        >>> from rlcredit_mm.papo import papo_masked_inputs
        >>> inputs = {"input_ids": torch.tensor([[9, 5], [9, 6], [9, 7]]), "pixel_values": torch.ones(3, 3, 28, 28)}
        >>> px = papo_masked_inputs(inputs, LlavaConfig(image_token_index=9), torch.tensor([4, 4, 8]))["pixel_values"]
        >>> bool(torch.equal(px[0], px[1])), bool(torch.equal(px[0], px[2]))  # same group, same mask
        (True, False)
    """
    if not isinstance(group_ids, Tensor) or group_ids.ndim != 1 or group_ids.shape[0] != inputs["input_ids"].shape[0]:
        raise RolloutError(f"papo_masked_inputs: group_ids must be [B] = [{inputs['input_ids'].shape[0]}] (one id per "
                           f"row of input_ids), got {group_ids!r:.80}.")
    config = config_of(model)
    adapter = adapter_for(config) if adapter is None else adapter
    blackout = PatchBlackout(p=p, patch_size=patch_size)
    keys = group_keys(group_ids, seed)
    black = adapter.black(config)
    patch = patch_size or adapter.patch_size(config)

    def fn(images: Tensor, rows: Tensor, index: Tensor) -> Tensor:
        k = per_image_keys(keys.to(images.device)[rows.to(images.device)], index.to(images.device))
        return blackout.perturb_images(images.float(), k, black=black.to(images.device), patch_size=patch)

    return adapter.map_images(inputs, config, fn)


def papo_masked_image(image: Any, group_id: int, *, p: float = PAPO_MASK_PROB, patch_size: int = PIL_PATCH_SIZE,
                      seed: int = 0) -> Any:
    """A PIL image masked as the released PAPO code does, before the processor: one mask per prompt.

    Every ``patch_size`` (14) pixel square is set to black (0) with probability ``p``; the draw is
    a pure function of ``(seed, group_id)``, so masking the prompt's image once or once per
    rollout gives the same result.

    Examples:
        >>> from PIL import Image
        >>> from rlcredit_mm.papo import papo_masked_image
        >>> img = Image.new("RGB", (56, 56), (255, 255, 255))
        >>> a, b = papo_masked_image(img, 3), papo_masked_image(img, 3)
        >>> a.tobytes() == b.tobytes(), a.tobytes() == papo_masked_image(img, 4).tobytes()
        (True, False)
    """
    return PatchBlackout(p=p, patch_size=patch_size, seed=seed).apply_pil(image, seed=int(group_id))


def papo_masked_logprobs(policy: Any, model_inputs: Mapping[str, Any], response_mask: Tensor, group_ids: Tensor, *,
                         p: float = PAPO_MASK_PROB, patch_size: int | None = None, seed: int = 0,
                         temperature: float = 1.0) -> Tensor:
    """``[B, T]`` log-probs of the responses under the current policy with PAPO's masked images, **with gradient**.

    What the ``papo`` loss reads as ``aux["masked_logprobs"]``: ``rlcredit.HFPolicy.response_stats``
    with ``grad=True``, masking one row chunk of pixels at a time (``papo_masked_inputs`` per chunk,
    so only one chunk of masked pixels exists at once).

    Args:
        policy: an ``rlcredit.HFPolicy`` of the VLM being trained.
        model_inputs: the inputs the responses were scored with (``input_ids [B, P+T]``, pixels...).
        response_mask: ``[B, T]`` bool.
        group_ids: ``[B]`` integer prompt ids (``rollout.group_ids``).
        p, patch_size, seed: as in ``papo_masked_inputs``.
        temperature: the sampling temperature (as for the log-probs with the original image).

    Returns:
        ``[B, T]`` float32, differentiable, 0 on padding.
    """
    ids = group_ids.to(policy.device)

    def transform(chunk: Mapping[str, Any], rows: slice) -> dict[str, Any]:
        return papo_masked_inputs(chunk, policy.model, ids[rows], p=p, patch_size=patch_size, seed=seed,
                                  adapter=policy.adapter)

    return policy.response_stats(model_inputs, response_mask, temperature=temperature, grad=True,
                                 transform=transform).logprobs
