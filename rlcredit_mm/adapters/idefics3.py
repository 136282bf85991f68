"""Idefics3 and SmolVLM: images per row, ``pixel_values [B, n, 3, H, W]``, all-zero images are padding."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from rlcredit.errors import AdapterError
from rlcredit.registry import register
from rlcredit_mm.adapters.base import HALF_MEAN, HALF_STD, ImageFn, _BaseAdapter

__all__ = ["Idefics3Adapter"]


@register("adapter", "idefics3")
class Idefics3Adapter(_BaseAdapter):
    """Idefics3 and SmolVLM: ``pixel_values [B, n, 3, H, W]`` + ``pixel_attention_mask [B, n, H, W]``.

    Laurençon et al. 2024, *Building and better understanding vision-language models*
    (arXiv 2408.12637); Marafioti et al. 2025, *SmolVLM* (arXiv 2504.05299). Rows own their
    images directly (dim 0); an all-zero image is padding and is left alone, as are pixels outside
    ``pixel_attention_mask``. A real image that a transform leaves exactly all-zero (the dataset
    mean image, ``constant(value=0.0)``) gets its first value set to ``1e-6`` so that the model
    does not take it for padding.

    Examples:
        >>> from transformers import Idefics3Config
        >>> from rlcredit_mm.adapters import Idefics3Adapter
        >>> cfg = Idefics3Config(image_token_id=11)
        >>> Idefics3Adapter.matches(cfg), Idefics3Adapter().image_token_id(cfg), Idefics3Adapter().patch_size(cfg)
        (True, 11, 32)
    """

    model_types = ("idefics3", "smolvlm")
    image_keys = ("pixel_values", "pixel_attention_mask")
    image_mean = HALF_MEAN
    image_std = HALF_STD
    language_model_path = ("model", "text_model")

    def _slice_images(self, inputs: Mapping[str, Any], start: int, stop: int, B: int) -> dict[str, Any]:
        out = {}
        for key in self.image_keys:
            value = inputs.get(key)
            if value is not None:
                if value.shape[0] != B:
                    raise AdapterError(
                        f"Idefics3Adapter: model_inputs[{key!r}] must be [B, n, ...] with B = {B}, got {list(value.shape)}."
                    )
                out[key] = value[start:stop]
        px = out.get(self.pixel_key)
        if px is not None and not bool((px != 0).any()):
            return {}  # only padding images: Idefics3 fails on zero real images, so pass none
        return out

    def map_images(self, inputs: Mapping[str, Any], config: Any, fn: ImageFn) -> dict[str, Any]:
        out = dict(inputs)
        px = inputs.get(self.pixel_key)
        if px is None or px.numel() == 0:
            return out
        B, n = px.shape[:2]
        flat = px.reshape(B * n, *px.shape[2:])
        real = (flat != 0).flatten(1).any(-1)  # all-zero images are padding (the model drops them)
        rows = torch.arange(B, device=px.device).repeat_interleave(n)
        index = torch.arange(n, device=px.device).repeat(B)
        new = fn(flat, rows, index).to(px.dtype)
        keep = real[:, None, None, None]
        pam = inputs.get("pixel_attention_mask")
        if pam is not None:
            keep = keep & pam.reshape(B * n, 1, *pam.shape[2:]).bool()
        new = torch.where(keep, new, flat)
        # A real image must not become all-zero, or it would be taken for padding.
        zero = real & ~(new != 0).flatten(1).any(-1)
        first = torch.zeros_like(new).flatten(1)
        first[:, 0] = 1e-6
        new = torch.where(zero[:, None, None, None], new + first.view_as(new), new)
        out[self.pixel_key] = new.reshape(px.shape)
        return out
