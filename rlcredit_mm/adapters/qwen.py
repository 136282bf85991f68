"""The Qwen2-VL family: flattened patches ``pixel_values [N, C*tp*p*p]`` + ``image_grid_thw [n, 3]``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from rlcredit.errors import AdapterError
from rlcredit.registry import register
from rlcredit_mm.adapters.base import ImageFn, _BaseAdapter, config_of

__all__ = ["QwenVLAdapter", "Qwen2VLAdapter", "Qwen25VLAdapter"]


class QwenVLAdapter(_BaseAdapter):
    """Qwen2-VL family: flattened patches ``pixel_values [N, C*tp*p*p]`` + ``image_grid_thw [n, 3]``.

    Each image of grid ``(t, h, w)`` (in patches) owns ``t*h*w`` consecutive patch rows and
    ``t*h*w / m^2`` placeholder tokens (``m`` the spatial merge size). ``prepare_inputs``
    adds ``mm_token_type_ids`` (1 at image tokens, 2 at video tokens), without which multimodal
    RoPE is not computed; ``slice_rows`` uses it to find each row's images, so it needs
    prepared inputs (as ``HFPolicy`` gives it). Videos (``pixel_values_videos``,
    ``video_grid_thw``) are sliced the same way and left unperturbed.

    Examples:
        >>> import torch
        >>> from transformers import Qwen2VLConfig
        >>> from rlcredit_mm.adapters import Qwen2VLAdapter
        >>> ad, cfg = Qwen2VLAdapter(), Qwen2VLConfig()
        >>> patches = torch.randn(8, 3 * 2 * 14 * 14)  # one 28 x 56 image: grid (1, 2, 4)
        >>> frames = ad.unflatten(patches, [1, 2, 4], cfg)
        >>> frames.shape, torch.equal(ad.flatten(frames, [1, 2, 4], cfg), patches)
        (torch.Size([2, 3, 28, 56]), True)
    """

    image_keys = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
    drop_keys = ("pixel_values", "image_grid_thw")
    type_ids_key = "mm_token_type_ids"

    def drop_images(self, inputs: Mapping[str, Any], config: Any) -> dict[str, Any]:
        out = super().drop_images(inputs, config)
        if out.get("video_grid_thw") is not None:
            out.pop("position_ids", None)  # videos keep multimodal RoPE, computed by the model from the mask
        return out

    def marker_token_ids(self, config: Any) -> tuple[int, ...]:
        return tuple(int(t) for t in (getattr(config, "vision_start_token_id", None),
                                      getattr(config, "vision_end_token_id", None)) if t is not None)

    def prepare_inputs(self, inputs: dict[str, Any], model: Any) -> dict[str, Any]:
        out = dict(inputs)
        multimodal = out.get("image_grid_thw") is not None or out.get("video_grid_thw") is not None
        if multimodal and out.get("mm_token_type_ids") is None:
            config = config_of(model)
            ids = out["input_ids"]
            types = (ids == self.image_token_id(config)).long()
            video = getattr(config, "video_token_id", None)
            if video is not None:
                types = types + 2 * (ids == int(video)).long()
            out["mm_token_type_ids"] = types
        return out

    @staticmethod
    def _bounds(tokens_per_row: Tensor, grid: Tensor, start: int, stop: int, what: str) -> tuple[int, int, int, int]:
        """``(i0, i1, p0, p1)``: the images and patch rows owned by rows ``[start, stop)``."""
        patches = grid.prod(-1)  # [n] patch rows per image
        total_tokens = tokens_per_row.sum()
        facts = torch.stack([patches.sum(), total_tokens, tokens_per_row[:start].sum(), tokens_per_row[:stop].sum()])
        total_patches, total, before, upto = facts.tolist()  # one host sync: shapes depend on it
        if total == 0 or total_patches % total:
            raise AdapterError(
                f"QwenVLAdapter: {what}: {total_patches} patches for {total} placeholder tokens in mm_token_type_ids; "
                f"every image of grid (t, h, w) needs t*h*w / merge^2 tokens. Check input_ids against the grid."
            )
        merge2 = total_patches // total
        tok_cum = torch.cumsum(patches // merge2, 0)
        patch_cum = torch.cumsum(patches, 0)
        i0 = int(torch.searchsorted(tok_cum, torch.tensor(before, device=tok_cum.device), right=True))
        i1 = int(torch.searchsorted(tok_cum, torch.tensor(upto, device=tok_cum.device), right=True))
        p0 = int(patch_cum[i0 - 1]) if i0 else 0
        p1 = int(patch_cum[i1 - 1]) if i1 else 0
        if (int(tok_cum[i0 - 1]) if i0 else 0) != before or (int(tok_cum[i1 - 1]) if i1 else 0) != upto:
            raise AdapterError(f"QwenVLAdapter: {what}: an image's placeholder tokens span two rows; check input_ids.")
        return i0, i1, p0, p1

    def _slice_images(self, inputs: Mapping[str, Any], start: int, stop: int, B: int) -> dict[str, Any]:
        types = inputs.get("mm_token_type_ids")
        if types is None:
            raise AdapterError(
                "QwenVLAdapter.slice_rows needs mm_token_type_ids (1 at image tokens) to find each row's images; "
                "call adapter.prepare_inputs(inputs, model) first (HFPolicy does), or pass the processor's output."
            )
        out: dict[str, Any] = {}
        for pix, grid_key, code in (("pixel_values", "image_grid_thw", 1), ("pixel_values_videos", "video_grid_thw", 2)):
            grid = inputs.get(grid_key)
            if grid is None:
                continue
            i0, i1, p0, p1 = self._bounds((types == code).sum(-1), grid, start, stop, grid_key)
            if i1 > i0:
                out[grid_key] = grid[i0:i1]
                if inputs.get(pix) is not None:
                    out[pix] = inputs[pix][p0:p1]
                if code == 2 and inputs.get("second_per_grid_ts") is not None:
                    out["second_per_grid_ts"] = inputs["second_per_grid_ts"][i0:i1]
        return out

    def _layout(self, config: Any) -> tuple[int, int, int, int]:
        vc = config.vision_config
        tp = vc.temporal_patch_size
        tp = int(tp[0] if isinstance(tp, (list, tuple)) else tp)
        return int(getattr(vc, "in_channels", 3)), tp, self.patch_size(config), int(vc.spatial_merge_size)

    def unflatten(self, patches: Tensor, grid: Sequence[int], config: Any) -> Tensor:
        """One image's patch rows ``[t*h*w, C*tp*p*p]`` -> frames ``[t*tp, C, h*p, w*p]`` (the processor's inverse)."""
        C, tp, p, m = self._layout(config)
        t, h, w = (int(x) for x in grid)
        x = patches.reshape(t, h // m, w // m, m, m, C, tp, p, p)
        # (t, h/m, w/m, mh, mw, C, tp, ph, pw) -> (t, tp, C, h/m, mh, ph, w/m, mw, pw)
        return x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * tp, C, h * p, w * p)

    def flatten(self, frames: Tensor, grid: Sequence[int], config: Any) -> Tensor:
        """Inverse of ``unflatten``: frames ``[t*tp, C, H, W]`` -> patch rows ``[t*h*w, C*tp*p*p]``."""
        C, tp, p, m = self._layout(config)
        t, h, w = (int(x) for x in grid)
        x = frames.reshape(t, tp, C, h // m, m, p, w // m, m, p)
        return x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(t * h * w, C * tp * p * p)

    def map_images(self, inputs: Mapping[str, Any], config: Any, fn: ImageFn) -> dict[str, Any]:
        out = dict(inputs)
        px, grid = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if px is None or grid is None or grid.shape[0] == 0:
            return out
        ids = inputs["input_ids"]
        tokens = self.image_token_mask(ids, config).sum(-1)  # [B] image tokens per row
        _, _, _, m = self._layout(config)
        per_image = grid.prod(-1) // (m * m)
        # Image -> row: the row whose cumulative token count first exceeds the image's first token.
        first_token = torch.cumsum(per_image, 0) - per_image
        rows = torch.searchsorted(torch.cumsum(tokens, 0), first_token, right=True)
        per_row = torch.bincount(rows, minlength=ids.shape[0])
        index = torch.arange(grid.shape[0], device=grid.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
        grids = grid.tolist()  # patch layout sizes: one host sync (the model does the same)
        n_tokens, n_expected = torch.stack([tokens.sum(), per_image.sum()]).tolist()
        if n_tokens != n_expected:
            raise AdapterError(
                f"{type(self).__name__}: input_ids hold {n_tokens} image tokens (id {self.image_token_id(config)}) but "
                f"image_grid_thw implies {n_expected} (t*h*w / {m}^2 per image); the inputs do not match this config."
            )
        offsets = [0]
        for t, h, w in grids:
            offsets.append(offsets[-1] + t * h * w)
        new = px.clone()
        # Images of one grid share one call of fn: [n_same * t * tp, C, H, W].
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, g in enumerate(grids):
            groups.setdefault(tuple(g), []).append(i)
        for g, members in groups.items():
            frames = torch.stack([self.unflatten(px[offsets[i]:offsets[i + 1]], g, config) for i in members])
            k, F = frames.shape[:2]
            sel = torch.tensor(members, device=px.device)
            rows_k = rows[sel].repeat_interleave(F)
            index_k = index[sel].repeat_interleave(F)
            done = fn(frames.flatten(0, 1).float(), rows_k, index_k).reshape(frames.shape)
            for j, i in enumerate(members):
                new[offsets[i]:offsets[i + 1]] = self.flatten(done[j], g, config).to(px.dtype)
        out["pixel_values"] = new
        return out


@register("adapter", "qwen2_vl")
class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL (``Qwen2VLForConditionalGeneration``): patch 14, spatial merge 2, CLIP normalisation.

    Wang et al. 2024, *Qwen2-VL* (arXiv 2409.12191).

    Examples:
        >>> from transformers import Qwen2VLConfig
        >>> from rlcredit_mm.adapters import Qwen2VLAdapter
        >>> cfg = Qwen2VLConfig()
        >>> Qwen2VLAdapter.matches(cfg), Qwen2VLAdapter().image_token_id(cfg), Qwen2VLAdapter().patch_size(cfg)
        (True, 151655, 14)
    """

    model_types = ("qwen2_vl",)


@register("adapter", "qwen2_5_vl")
class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): patch 14, spatial merge 2, CLIP normalisation.

    Bai et al. 2025, *Qwen2.5-VL Technical Report* (arXiv 2502.13923). Without
    ``mm_token_type_ids`` transformers 5 silently uses 1-D positions; ``prepare_inputs`` adds them.

    Examples:
        >>> from transformers import Qwen2_5_VLConfig
        >>> from rlcredit_mm.adapters import Qwen25VLAdapter
        >>> Qwen25VLAdapter.matches(Qwen2_5_VLConfig()), Qwen25VLAdapter.matches(object())
        (True, False)
    """

    model_types = ("qwen2_5_vl",)
