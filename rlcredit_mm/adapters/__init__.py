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

Modules: ``base`` (the protocol, shared behaviour, ``adapter_for``), ``stacked`` (LLaVA, Gemma 3),
``idefics3`` (Idefics3, SmolVLM), ``qwen`` (Qwen2-VL, Qwen2.5-VL); every name is importable from
``rlcredit_mm.adapters``.
"""

from rlcredit_mm.adapters.base import (
    CLIP_MEAN, CLIP_STD, HALF_MEAN, HALF_STD, ImageFn, VLMAdapter, adapter_for, config_of,
)
from rlcredit_mm.adapters.stacked import Gemma3Adapter, LlavaAdapter, StackedImagesAdapter  # registers llava, gemma3
from rlcredit_mm.adapters.idefics3 import Idefics3Adapter  # registers idefics3
from rlcredit_mm.adapters.qwen import Qwen25VLAdapter, Qwen2VLAdapter, QwenVLAdapter  # registers qwen2_vl, qwen2_5_vl

__all__ = [
    "VLMAdapter", "ImageFn", "StackedImagesAdapter", "QwenVLAdapter", "Qwen2VLAdapter", "Qwen25VLAdapter",
    "LlavaAdapter", "Gemma3Adapter", "Idefics3Adapter", "adapter_for", "config_of",
    "CLIP_MEAN", "CLIP_STD", "HALF_MEAN", "HALF_STD",
]
