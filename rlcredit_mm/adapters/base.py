"""The adapter protocol, the behaviour every built-in adapter shares, and ``adapter_for``.

``VLMAdapter`` is what ``rlcredit.HFPolicy`` and the multimodal estimators call; ``_BaseAdapter``
implements the architecture-independent parts (row slicing, dropping images, the language model's
attention modules); the architecture files (``stacked``, ``idefics3``, ``qwen``) add the pixel layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from rlcredit.errors import AdapterError
from rlcredit.registry import available, get
from rlcredit.requirements import RAW_IMAGES

__all__ = ["VLMAdapter", "ImageFn", "adapter_for", "config_of", "CLIP_MEAN", "CLIP_STD", "HALF_MEAN", "HALF_STD",
           "RAW_IMAGES_KEY"]

RAW_IMAGES_KEY: str = RAW_IMAGES.key
"""``model_inputs`` key of the images before the processor (``"raw_images"``, the key of the core's
``rlcredit.requirements.RAW_IMAGES``; a ``rlcredit_mm.images.RawImages`` or its plain mapping).

Not a model input: every adapter's ``prepare_inputs`` drops it, so a forward never sees it.
"""

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
    supports_raw_images: ClassVar[bool] = True
    """Whether the image processor's outputs, image by image, concatenate into the model's image inputs
    (what ``VisualKL(stage="image")`` re-processes perturbed raw images into)."""

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
        """Add what transformers needs but processors may leave out (a new dict; no copy of tensors).

        Drops ``RAW_IMAGES_KEY`` (the images before the processor are not a model input).
        """
        return _without_raw(inputs)

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


def _without_raw(inputs: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict of ``inputs`` without ``RAW_IMAGES_KEY``."""
    return {k: v for k, v in inputs.items() if k != RAW_IMAGES_KEY}


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
