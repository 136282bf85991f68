"""Qwen3-VL and Qwen3-VL-MoE: the Qwen2-VL patch layout with 16-px patches, DeepStack and interleaved mRoPE."""

from __future__ import annotations

from rlcredit.registry import register
from rlcredit_mm.adapters.base import HALF_MEAN, HALF_STD
from rlcredit_mm.adapters.qwen import QwenVLAdapter

__all__ = ["Qwen3VLAdapter", "Qwen3VLMoeAdapter"]


@register("adapter", "qwen3_vl")
class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL (``Qwen3VLForConditionalGeneration``): patch 16, spatial merge 2, ``[0.5]`` normalisation.

    Qwen Team 2025, *Qwen3-VL* (github.com/QwenLM/Qwen3-VL). The inputs are Qwen2-VL's
    (``pixel_values [N_patches, 3*2*16*16]`` + ``image_grid_thw``; 32 px of image per placeholder
    token side), so ``QwenVLAdapter`` slices, unflattens and drops them; what differs:

    - 16-px ViT patches (``patch_blackout`` on pixels aligns its squares to them) and the image
      processor's ``image_mean = image_std = 0.5`` (black is -1);
    - DeepStack: features of some vision layers are added to the hidden states at the image
      positions of the first decoder layers. The model computes them from ``pixel_values``, so a
      perturbation of the pixels reaches them too, and ``drop`` removes them with the image;
    - interleaved multimodal RoPE (the T/H/W frequencies alternate); the positions come from
      ``mm_token_type_ids``, which transformers 5 requires with images (it raises without) and
      ``prepare_inputs`` adds when absent (1 at image tokens, 2 at video tokens).

    Examples:
        >>> from transformers import Qwen3VLConfig
        >>> from rlcredit_mm.adapters import Qwen3VLAdapter
        >>> ad, cfg = Qwen3VLAdapter(), Qwen3VLConfig()
        >>> Qwen3VLAdapter.matches(cfg), ad.image_token_id(cfg), ad.patch_size(cfg), ad.black().tolist()
        (True, 151655, 16, [-1.0, -1.0, -1.0])
    """

    model_types = ("qwen3_vl",)
    image_mean = HALF_MEAN
    image_std = HALF_STD


@register("adapter", "qwen3_vl_moe")
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``): Qwen3-VL's inputs, a mixture-of-experts decoder.

    The sparse MLPs change nothing rlcredit reads (inputs, image tokens, attention modules), so
    everything is ``Qwen3VLAdapter``'s.

    Examples:
        >>> from transformers import Qwen3VLMoeConfig
        >>> from rlcredit_mm.adapters import Qwen3VLAdapter, Qwen3VLMoeAdapter
        >>> Qwen3VLMoeAdapter.matches(Qwen3VLMoeConfig()), Qwen3VLAdapter.matches(Qwen3VLMoeConfig())
        (True, False)
    """

    model_types = ("qwen3_vl_moe",)
