"""Images stacked as ``pixel_values [n, C, H, W]``, all of one size: LLaVA and Gemma 3."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rlcredit.errors import AdapterError
from rlcredit.registry import register
from rlcredit_mm.adapters.base import HALF_MEAN, HALF_STD, ImageFn, _BaseAdapter, config_of

__all__ = ["StackedImagesAdapter", "LlavaAdapter", "Gemma3Adapter"]


def _row_owners(counts: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Row and within-row index of each of ``n`` images from per-row image counts ``[B]`` (no sync)."""
    B = counts.shape[0]
    rows = torch.repeat_interleave(torch.arange(B, device=counts.device), counts, output_size=n)
    first = torch.cumsum(counts, 0) - counts
    index = torch.arange(n, device=counts.device) - first[rows]
    return rows, index


class StackedImagesAdapter(_BaseAdapter):
    """Images stacked as ``pixel_values [n, C, H, W]``, all of one size, rows in order (LLaVA, Gemma3).

    Each image becomes the same number of placeholder tokens, so a row owns
    ``(its image tokens) / (image tokens / n)`` images. Slicing by rows needs that count without
    the config: from ``type_ids_key`` when the architecture has one, else every row must hold
    the same number of images (checked by ``prepare_inputs``).

    Examples:
        >>> import torch
        >>> from transformers import LlavaConfig
        >>> from rlcredit_mm.adapters import LlavaAdapter
        >>> cfg = LlavaConfig(image_token_index=9)
        >>> inputs = {"input_ids": torch.tensor([[9, 9, 1], [9, 9, 2]]), "pixel_values": torch.zeros(2, 3, 4, 4)}
        >>> out = LlavaAdapter().map_images(inputs, cfg, lambda images, rows, index: images + rows.view(-1, 1, 1, 1))
        >>> out["pixel_values"][:, 0, 0, 0].tolist(), LlavaAdapter().slice_rows(inputs, slice(1, 2))["input_ids"].tolist()
        ([0.0, 1.0], [[9, 9, 2]])
    """

    def _counts(self, inputs: Mapping[str, Any], image_tokens: Tensor) -> Tensor:
        """Images per row ``[B]`` from the ``[B, L]`` image-token mask (no host sync)."""
        n = inputs[self.pixel_key].shape[0]
        per_row = image_tokens.sum(-1)
        total = per_row.sum().clamp_min(1)
        return (per_row * n) // total

    def prepare_inputs(self, inputs: dict[str, Any], model: Any) -> dict[str, Any]:
        out = dict(inputs)
        px = out.get(self.pixel_key)
        if px is None or self.type_ids_key is not None:
            return out
        ids = out["input_ids"]
        B, n = ids.shape[0], px.shape[0]
        counts = self._counts(out, self.image_token_mask(ids, config_of(model)))
        if n % B or bool((counts != n // B).any()):
            raise AdapterError(
                f"{type(self).__name__}: rows must hold the same number of images (pixel_values has {n} images for "
                f"{B} rows, per-row counts {counts.tolist()}); {type(self).__name__} splits pixel_values evenly by "
                f"rows. Batch rows with equal image counts, or register an adapter that records per-row counts."
            )
        return out

    def _slice_images(self, inputs: Mapping[str, Any], start: int, stop: int, B: int) -> dict[str, Any]:
        px = inputs[self.pixel_key]
        n = px.shape[0]
        if self.type_ids_key is not None and inputs.get(self.type_ids_key) is not None:
            counts = self._counts(inputs, inputs[self.type_ids_key] == 1)
            bounds = torch.stack([counts[:start].sum(), counts[:stop].sum()]).tolist()
            i0, i1 = bounds
        else:
            if n % B:
                raise AdapterError(
                    f"{type(self).__name__}: pixel_values holds {n} images for {B} rows; without per-row counts it "
                    f"splits them evenly, which needs a multiple of B. Call prepare_inputs(inputs, model) first."
                )
            per = n // B
            i0, i1 = start * per, stop * per
        out = {}
        for key in self.image_keys:
            value = inputs.get(key)
            if value is not None:
                out[key] = value[i0:i1]
        if out.get(self.pixel_key) is not None and out[self.pixel_key].shape[0] == 0:
            out = {}  # rows without images: no pixel inputs at all
        return out

    def map_images(self, inputs: Mapping[str, Any], config: Any, fn: ImageFn) -> dict[str, Any]:
        out = dict(inputs)
        px = inputs.get(self.pixel_key)
        if px is None or px.shape[0] == 0:
            return out
        n = px.shape[0]
        counts = self._counts(inputs, self.image_token_mask(inputs["input_ids"], config))
        rows, index = _row_owners(counts, n)
        out[self.pixel_key] = fn(px, rows, index).to(px.dtype)
        return out


@register("adapter", "llava")
class LlavaAdapter(StackedImagesAdapter):
    """LLaVA (``LlavaForConditionalGeneration``): CLIP normalisation, ``pixel_values [n, 3, H, W]``.

    Liu et al. 2023, *Visual Instruction Tuning* (arXiv 2304.08485). Every row must
    hold the same number of images (LLaVA's processor layout for batched prompts).

    Examples:
        >>> from transformers import LlavaConfig
        >>> from rlcredit_mm.adapters import LlavaAdapter
        >>> cfg = LlavaConfig(image_token_index=7)
        >>> LlavaAdapter.matches(cfg), LlavaAdapter().image_token_id(cfg), LlavaAdapter().patch_size(cfg)
        (True, 7, 14)
        >>> LlavaAdapter().black().round(decimals=3)
        tensor([-1.7920, -1.7520, -1.4800])
    """

    model_types = ("llava",)
    image_keys = ("pixel_values", "image_sizes")


@register("adapter", "gemma3")
class Gemma3Adapter(StackedImagesAdapter):
    """Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP, ``[-1, 1]`` normalisation, ``token_type_ids``.

    Gemma Team 2025, *Gemma 3 Technical Report* (arXiv 2503.19786). ``prepare_inputs`` adds
    ``token_type_ids`` (1 at image tokens, as the processor returns them) when absent: they make
    attention bidirectional within each image.

    Examples:
        >>> from transformers import Gemma3Config
        >>> from rlcredit_mm.adapters import Gemma3Adapter
        >>> cfg = Gemma3Config(image_token_index=9, boi_token_index=5, eoi_token_index=6)
        >>> Gemma3Adapter.matches(cfg), Gemma3Adapter().marker_token_ids(cfg), Gemma3Adapter().black().tolist()
        (True, (5, 6), [-1.0, -1.0, -1.0])
    """

    model_types = ("gemma3",)
    image_mean = HALF_MEAN
    image_std = HALF_STD
    type_ids_key = "token_type_ids"

    def marker_token_ids(self, config: Any) -> tuple[int, ...]:
        return tuple(int(t) for t in (config.boi_token_id, config.eoi_token_id) if t is not None)

    def prepare_inputs(self, inputs: dict[str, Any], model: Any) -> dict[str, Any]:
        out = dict(inputs)
        if out.get(self.pixel_key) is not None and out.get("token_type_ids") is None:
            out["token_type_ids"] = self.image_token_mask(out["input_ids"], config_of(model)).long()
        return out
