"""Per-architecture facts about vision-language models: image tokens, pixel layouts, attention modules.

An adapter is a small stateless object that knows, for one family of ``transformers`` VLMs, which
token id marks image positions, how ``pixel_values`` are laid out and how to split them by rows,
where the language model's self-attention modules are, which normalisation the image processor
applies (so that "black" means black), and which inputs transformers 5 silently needs. Adapters
are a registered kind (``"adapter"``): ``rlcredit.HFPolicy`` picks the first registered
adapter whose ``matches(config)`` is True, so supporting a new architecture is one class::

    @rlcredit.register("adapter", "my_vlm")
    class MyVLMAdapter(StackedImagesAdapter):
        model_types = ("my_vlm",)

Built in (``model_type`` -> adapter):

=============================  ===============  ================================================
``model_type``                  adapter          pixel layout
=============================  ===============  ================================================
``qwen2_vl``                    ``qwen2_vl``     ``[N_patches, C*tp*p*p]`` + ``image_grid_thw [n, 3]``
``qwen2_5_vl``                  ``qwen2_5_vl``   same (patch 14, spatial merge 2)
``llava``                       ``llava``        ``[n, 3, H, W]``, the same number of images per row
``gemma3``                      ``gemma3``       ``[n, 3, H, W]`` + ``token_type_ids``
``idefics3`` / ``smolvlm``      ``idefics3``     ``[B, n, 3, H, W]`` + ``pixel_attention_mask``
=============================  ===============  ================================================

The transformers 5 traps they handle:

- Qwen2-VL / Qwen2.5-VL need ``mm_token_type_ids`` (1 at image tokens) for multimodal RoPE;
  without it Qwen2-VL raises and Qwen2.5-VL silently falls back to 1-D positions.
  ``QwenVLAdapter.prepare_inputs`` adds it when absent.
- Gemma3 attends bidirectionally inside an image only when ``token_type_ids`` are passed (its
  processor returns them); ``Gemma3Adapter.prepare_inputs`` adds them when absent.
- Idefics3 / SmolVLM treat an all-zero image as padding: perturbations run in the processor's
  normalised space, where black is ``(0 - mean) / std``, not 0, and a real image that a
  perturbation leaves exactly zero gets one pixel nudged so it is not dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from rlcredit.errors import AdapterError
from rlcredit.registry import available, get, register

__all__ = [
    "VLMAdapter", "ImageFn", "StackedImagesAdapter", "QwenVLAdapter", "Qwen2VLAdapter", "Qwen25VLAdapter",
    "LlavaAdapter", "Gemma3Adapter", "Idefics3Adapter", "adapter_for", "config_of",
    "CLIP_MEAN", "CLIP_STD", "HALF_MEAN", "HALF_STD",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI CLIP normalisation mean (Qwen2-VL, Qwen2.5-VL, LLaVA image processors)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = (0.5, 0.5, 0.5)
"""``IMAGENET_STANDARD_MEAN`` (Gemma3, Idefics3, SmolVLM image processors): black is -1."""
HALF_STD = (0.5, 0.5, 0.5)

ImageFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``fn(images [N, C, H, W], rows [N] int64, index [N] int64) -> [N, C, H, W]``: a pixel transform.

``rows`` is each image's row in the inputs, ``index`` its position among that row's images;
perturbations derive their per-image random keys from them.
"""


def config_of(model_or_config: Any) -> Any:
    """The config of a model (``model.config``), or the argument itself if it is a config.

    Examples:
        >>> from transformers import LlavaConfig
        >>> from rlcredit_mm.adapters import config_of
        >>> cfg = LlavaConfig()
        >>> config_of(cfg) is cfg
        True
    """
    return getattr(model_or_config, "config", model_or_config)


@runtime_checkable
class VLMAdapter(Protocol):
    """What rlcredit needs to know about a VLM architecture (a registered kind, ``"adapter"``).

    ``HFPolicy`` instantiates the first registered class whose ``matches(config)`` is True with
    no arguments, calls ``prepare_inputs`` once per call and ``slice_rows`` per row chunk.
    Shapes: ``B`` rows, ``L = P + T`` columns, ``n`` images, ``C`` channels.
    """

    pixel_key: str
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @classmethod
    def matches(cls, config: Any) -> bool: ...

    def prepare_inputs(self, inputs: dict[str, Any], model: Any) -> dict[str, Any]: ...

    def slice_rows(self, inputs: Mapping[str, Any], rows: slice) -> dict[str, Any]: ...

    def image_token_id(self, config: Any) -> int: ...

    def patch_size(self, config: Any) -> int: ...

    def image_token_mask(self, input_ids: Tensor, config: Any) -> Tensor: ...

    def black(self, config: Any = None) -> Tensor: ...

    def map_images(self, inputs: Mapping[str, Any], config: Any, fn: ImageFn) -> dict[str, Any]: ...

    def drop_images(self, inputs: Mapping[str, Any], config: Any) -> dict[str, Any]: ...

    def attention_modules(self, model: Any) -> list[torch.nn.Module]: ...


def _check_rows(rows: slice, B: int, who: str) -> tuple[int, int]:
    if not isinstance(rows, slice) or rows.step not in (None, 1):
        raise AdapterError(f"{who}.slice_rows takes a contiguous slice of rows (step 1), got {rows!r}.")
    start, stop, _ = rows.indices(B)
    return start, max(start, stop)


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


class _BaseAdapter:
    """Shared behaviour; subclasses set the class attributes and the image-specific methods."""

    model_types: ClassVar[tuple[str, ...]] = ()
    pixel_key: ClassVar[str] = "pixel_values"
    image_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)
    """Inputs that belong to images (sliced by the rows that own the images)."""
    drop_keys: ClassVar[tuple[str, ...] | None] = None
    """Inputs removed by ``drop_images`` (default: ``image_keys``)."""
    image_mean: ClassVar[tuple[float, ...]] = CLIP_MEAN
    image_std: ClassVar[tuple[float, ...]] = CLIP_STD
    language_model_path: ClassVar[tuple[str, ...]] = ("model", "language_model")
    type_ids_key: ClassVar[str | None] = None
    """A ``[B, L]`` input that is 1 at image tokens (Qwen ``mm_token_type_ids``, Gemma3 ``token_type_ids``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))

    @classmethod
    def matches(cls, config: Any) -> bool:
        """Whether this adapter serves ``config`` (by ``config.model_type``)."""
        return getattr(config, "model_type", None) in cls.model_types

    # --- facts ------------------------------------------------------------------------------

    def image_token_id(self, config: Any) -> int:
        """The placeholder token id that marks image positions in ``input_ids``."""
        return int(config.image_token_id)

    def patch_size(self, config: Any) -> int:
        """The vision tower's patch size in pixels (squares that blackout aligns to)."""
        size = config.vision_config.patch_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def marker_token_ids(self, config: Any) -> tuple[int, ...]:
        """Tokens that wrap an image (vision start/end, begin/end of image); ``drop`` removes them too."""
        return ()

    def image_token_mask(self, input_ids: Tensor, config: Any) -> Tensor:
        """``[B, L]`` bool, True at image placeholder tokens."""
        return input_ids == self.image_token_id(config)

    def black(self, config: Any = None) -> Tensor:
        """``[C]`` float32: a black pixel in the image processor's normalised space, ``(0 - mean) / std``."""
        return -torch.tensor(self.image_mean, dtype=torch.float32) / torch.tensor(self.image_std, dtype=torch.float32)

    def language_model(self, model: Any) -> torch.nn.Module:
        """The decoder-only language model inside the VLM (the module with ``.layers``)."""
        module = model
        for name in self.language_model_path:
            module = getattr(module, name, None)
            if module is None:
                raise AdapterError(
                    f"{type(self).__name__}: {type(model).__name__} has no "
                    f"{'.'.join(self.language_model_path)}; is it a *ForConditionalGeneration model of "
                    f"model_type {', '.join(self.model_types)}?"
                )
        return module

    def attention_modules(self, model: Any) -> list[torch.nn.Module]:
        """The language model's decoder self-attention modules, in layer order (``[L]`` modules)."""
        return [layer.self_attn for layer in self.language_model(model).layers]

    # --- inputs -----------------------------------------------------------------------------

    def prepare_inputs(self, inputs: dict[str, Any], model: Any) -> dict[str, Any]:
        """Add what transformers needs but processors may leave out (a new dict; no copy of tensors)."""
        return dict(inputs)

    def _slice_images(self, inputs: Mapping[str, Any], start: int, stop: int, B: int) -> dict[str, Any]:
        """The image inputs of rows ``[start, stop)`` (keys of ``image_keys``)."""
        raise NotImplementedError

    def slice_rows(self, inputs: Mapping[str, Any], rows: slice) -> dict[str, Any]:
        """The inputs of rows ``rows`` (a contiguous slice), image tensors included.

        Row-aligned tensors (leading dim ``B``) are sliced; the image tensors by the rows that own
        them; non-tensors pass through. Qwen's ``position_ids [3, B, L]`` are sliced on dim 1.
        """
        B = inputs["input_ids"].shape[0]
        start, stop = _check_rows(rows, B, type(self).__name__)
        out: dict[str, Any] = {}
        present = [k for k in self.image_keys if inputs.get(k) is not None]
        if present:
            out.update(self._slice_images(inputs, start, stop, B))
        for key, value in inputs.items():
            if key in self.image_keys:
                continue
            if isinstance(value, Tensor) and value.ndim > 0:
                if key == "position_ids" and value.ndim == 3 and value.shape[1] == B:
                    out[key] = value[:, start:stop]
                elif value.shape[0] == B:
                    out[key] = value[start:stop]
                else:
                    raise AdapterError(
                        f"{type(self).__name__}: model_inputs[{key!r}] has leading dim {value.shape[0]}, not B = {B}, "
                        f"and is not an image input of this architecture ({', '.join(self.image_keys)}); "
                        f"it cannot be split by rows. Remove it or register an adapter that knows it."
                    )
            else:
                out[key] = value
        return out

    # --- pixels -----------------------------------------------------------------------------

    def map_images(self, inputs: Mapping[str, Any], config: Any, fn: ImageFn) -> dict[str, Any]:
        """Apply ``fn`` to every real image of ``inputs`` in a uniform ``[N, C, H, W]`` view.

        Only the pixel tensor changes; padding images (Idefics3) and padded pixels are kept as
        they are. Returns a new dict.
        """
        raise NotImplementedError

    def drop_images(self, inputs: Mapping[str, Any], config: Any) -> dict[str, Any]:
        """The same prompts without their images (VPPO's "no image" control), response columns kept last.

        Each row's image placeholder tokens, and the ``marker_token_ids`` right next to them,
        are removed; rows are then left-padded (pad token, ``attention_mask`` 0) to the longest
        remaining row, so the response stays in the last ``T`` columns and every remaining token
        keeps its neighbours at their column distance, as in the prompt written without the image
        (which also keeps sliding-window attention exact). Every ``[B, L]`` input (type ids...)
        is compacted alike; the image inputs are removed; given ``position_ids`` are recomputed
        as ``cumsum(attention_mask) - 1``. Placeholder tokens never occur in a response (the
        model's own forward would reject them), so the response is never shortened.
        """
        ids = inputs["input_ids"]
        B, L = ids.shape
        gone = self.image_token_mask(ids, config)
        markers = self.marker_token_ids(config)
        if markers:
            beside = torch.zeros_like(gone)
            beside[:, 1:] |= gone[:, :-1]
            beside[:, :-1] |= gone[:, 1:]
            gone = gone | (beside & torch.isin(ids, torch.tensor(markers, device=ids.device)))
        keep = ~gone
        n_keep = keep.sum(-1)
        L2 = int(n_keep.max()) if B else 0  # one host sync: the new width
        # Destination column of each kept token (right-aligned); removed ones go to a dump column.
        dest = (L2 - n_keep)[:, None] + torch.cumsum(keep.long(), -1) - 1
        dest = torch.where(keep, dest, torch.full_like(dest, L2))

        def compact(x: Tensor, fill: int) -> Tensor:
            buf = torch.full((B, L2 + 1), fill, dtype=x.dtype, device=x.device)
            return buf.scatter(1, dest, x)[:, :L2]

        pad = getattr(_text_config(config), "pad_token_id", None)
        drop = self.image_keys if self.drop_keys is None else self.drop_keys
        attn = inputs.get("attention_mask")
        out: dict[str, Any] = {}
        for key, value in inputs.items():
            if key in drop:
                continue
            if key == "input_ids":
                out[key] = compact(value, 0 if pad is None else int(pad))
            elif isinstance(value, Tensor) and value.shape == (B, L) and key != "position_ids":
                out[key] = compact(value, 0)
            else:
                out[key] = value
        out["attention_mask"] = compact(torch.ones_like(ids) if attn is None else attn, 0)
        if "position_ids" in inputs:
            out["position_ids"] = (out["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
        return out


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


def adapter_for(model_or_config: Any) -> Any:
    """The registered adapter serving a model (or config), instantiated.

    Args:
        model_or_config: a ``transformers`` VLM or its config.

    Returns:
        An adapter instance (the first registered class whose ``matches(config)`` is True).

    Raises:
        AdapterError: no registered adapter matches; the message lists the supported ones.

    Examples:
        >>> from transformers import LlavaConfig, LlamaConfig
        >>> from rlcredit_mm.adapters import adapter_for
        >>> adapter_for(LlavaConfig())
        LlavaAdapter()
        >>> adapter_for(LlamaConfig())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        rlcredit.errors.AdapterError: no rlcredit adapter supports model_type 'llama'; ...
    """
    config = config_of(model_or_config)
    adapters = {name: get("adapter", name) for name in available("adapter")}  # plugins loaded first
    for cls in adapters.values():
        matches = getattr(cls, "matches", None)
        if matches is not None and matches(config):
            return cls()
    supported = ", ".join(
        f"{name} ({'/'.join(getattr(cls, 'model_types', ()) or ('?',))})" for name, cls in adapters.items()
    )
    raise AdapterError(
        f"no rlcredit adapter supports model_type {getattr(config, 'model_type', '?')!r}; supported: {supported}. "
        f"Add one with @rlcredit.register('adapter', NAME) on a class with a classmethod matches(config) -> bool "
        f"(subclass rlcredit_mm.adapters.StackedImagesAdapter or QwenVLAdapter), or pass HFPolicy(model, adapter=...)."
    )
