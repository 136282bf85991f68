"""Tiny random-weight vision-language models built offline from configs, with matching inputs.

Shared by the multimodal tests (VPPO visual dependency, AT-RL connectivity). Every model has a
32-wide, 2-layer language model, a 1-2 layer vision tower and 28-56 px images, so a forward takes
milliseconds on CPU. Nothing is downloaded.

    model, make_inputs = make_vlm("qwen2_vl")
    inputs, response_mask = make_inputs(B=3, P_text=4, T=5, seed=0, lengths=[5, 2, 3], images=[1, 2, 0])

``inputs`` follows the TRL/verl layout: ``input_ids [B, P+T]`` whose last ``T`` columns are the
response (right-padded with ``PAD`` and ``attention_mask`` 0); prompts with fewer image tokens are
left-padded. Each prompt is ``[text] + ([START] [IMAGE] * k [END]) per image + [text] * (P_text - 1)``.
Pixels are standard-normal draws (already in the processor's normalised space). The
processor-provided type ids (``mm_token_type_ids`` for Qwen, ``token_type_ids`` for Gemma3) are left
out unless ``type_ids=True``: adding them is the adapter's job.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

ARCHS: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava", "idefics3", "smolvlm",
                          "gemma3")
"""Architectures :func:`make_vlm` builds (``model.config.model_type`` of each)."""

QWEN_ARCHS: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
"""The Qwen family: flattened patches + ``image_grid_thw``; Qwen3-VL with 16-px patches."""

VOCAB = 96
PAD = 0
TEXT_LO, TEXT_HI = 1, 80  # ordinary text tokens are drawn from [TEXT_LO, TEXT_HI)
IMAGE = 90
VIDEO = 91
START = 92  # vision-start / begin-of-image marker
END = 93  # vision-end / end-of-image marker

# Qwen images cycle through these (H, W) sizes so that rows own different numbers of patches
# (Qwen2-VL / Qwen2.5-VL: 28 px per placeholder token side; Qwen3-VL: 32).
QWEN_SIZES: tuple[tuple[int, int], ...] = ((28, 56), (56, 28), (28, 28), (56, 56))


def qwen_sizes(arch: str) -> tuple[tuple[int, int], ...]:
    """The (H, W) image sizes of ``arch``'s images: ``QWEN_SIZES`` scaled to its patch * merge size."""
    f = qwen_factor(arch)
    return tuple((h // 28 * f, w // 28 * f) for h, w in QWEN_SIZES)


def qwen_factor(arch: str) -> int:
    """Pixels per placeholder-token side: patch size * spatial merge (28, or 32 for Qwen3-VL)."""
    return 32 if arch.startswith("qwen3") else 28

MakeInputs = Callable[..., tuple[dict[str, Any], torch.Tensor]]


def _text(**overrides: Any) -> dict[str, Any]:
    cfg = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
    )
    cfg.update(overrides)
    return cfg


def _config(arch: str, text_kw: dict[str, Any] | None = None, vision_kw: dict[str, Any] | None = None,
            **overrides: Any) -> Any:
    """The tiny config of ``arch``; ``text_kw``/``vision_kw`` patch the sub-configs, ``overrides`` the top level."""
    import transformers as tf

    tk, vk = dict(text_kw or {}), dict(vision_kw or {})
    if arch in ("qwen3_vl", "qwen3_vl_moe"):
        # head_dim 16: 8 rotary frequencies, interleaved T H W T H W T T (mrope_section [4, 2, 2]);
        # DeepStack adds vision layer 0's features to decoder layer 0's image positions.
        text = _text(head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2],
                                                   "mrope_interleaved": True, "rope_theta": 10000.0}, **tk)
        if arch == "qwen3_vl_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                      deepstack_visual_indexes=[0], **vk)
        cls = tf.Qwen3VLConfig if arch == "qwen3_vl" else tf.Qwen3VLMoeConfig
        cfg = cls(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                  vision_start_token_id=START, vision_end_token_id=END)
    elif arch in ("qwen2_vl", "qwen2_5_vl"):
        text = _text(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}, **tk)
        if arch == "qwen2_vl":
            vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                          spatial_merge_size=2, temporal_patch_size=2, **vk)
            cls = tf.Qwen2VLConfig
        else:
            vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2,
                          patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                          fullatt_block_indexes=[1], **vk)
            cls = tf.Qwen2_5_VLConfig
        cfg = cls(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
                  vision_start_token_id=START, vision_end_token_id=END)
    elif arch == "llava":
        vision = tf.CLIPVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32), **vk})
        cfg = tf.LlavaConfig(vision_config=vision, text_config=tf.LlamaConfig(**_text(**tk)), image_token_index=IMAGE,
                             image_seq_length=4, vision_feature_layer=-1)
    elif arch in ("idefics3", "smolvlm"):
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=56, patch_size=14, **vk)
        cls = tf.Idefics3Config if arch == "idefics3" else tf.SmolVLMConfig
        cfg = cls(vision_config=vision, text_config=tf.LlamaConfig(**_text(**tk)).to_dict(), image_token_id=IMAGE,
                  scale_factor=2, pad_token_id=PAD)
    elif arch == "gemma3":
        vision = tf.SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2, image_size=28, patch_size=14), **vk})
        text = tf.Gemma3TextConfig(**_text(**{**dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8), **tk}))
        cfg = tf.Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=4, image_token_index=IMAGE,
                              boi_token_index=START, eoi_token_index=END)
    else:
        raise ValueError(f"make_vlm: unknown arch {arch!r}; choose one of {', '.join(ARCHS)}.")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def _model_class(arch: str) -> type:
    import transformers as tf

    return {
        "qwen2_vl": tf.Qwen2VLForConditionalGeneration,
        "qwen2_5_vl": tf.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl": tf.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": tf.Qwen3VLMoeForConditionalGeneration,
        "llava": tf.LlavaForConditionalGeneration,
        "idefics3": tf.Idefics3ForConditionalGeneration,
        "smolvlm": tf.SmolVLMForConditionalGeneration,
        "gemma3": tf.Gemma3ForConditionalGeneration,
    }[arch]


def image_tokens_per_image(arch: str, size: tuple[int, int] | None = None) -> int:
    """How many ``IMAGE`` placeholder tokens one image of ``size`` (Qwen: ``(H, W)``) takes."""
    if arch in QWEN_ARCHS:
        h, w = size or qwen_sizes(arch)[0]
        f = qwen_factor(arch)
        return (h // f) * (w // f)
    return 4  # llava: (28/14)^2 patches; idefics3: (56/14)^2 / 2^2; gemma3: mm_tokens_per_image


def _qwen_patchify(image: torch.Tensor, p: int, m: int, tp: int) -> torch.Tensor:
    """``[C, H, W]`` -> ``[h*w, C*tp*p*p]`` exactly as transformers' Qwen2-VL image processor lays patches out."""
    C, H, W = image.shape
    gh, gw = H // p, W // p
    x = image.reshape(C, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, tp, -1, -1)  # temporal copies of a still image
    return x.reshape(gh * gw, C * tp * p * p)


def make_vlm(
    arch: str,
    *,
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    text: dict[str, Any] | None = None,
    vision: dict[str, Any] | None = None,
    **overrides: Any,
) -> tuple[torch.nn.Module, MakeInputs]:
    """A tiny random-weight VLM of ``arch`` in eval mode, and its input builder.

    Args:
        arch: one of :data:`ARCHS`.
        seed: weight-initialisation seed (the global RNG is left untouched).
        attn_implementation: ``"sdpa"`` (transformers' default) or ``"eager"``.
        dtype: parameter dtype.
        text: language-model config fields to change (e.g. ``{"num_hidden_layers": 4}``); the
            image-token layout assumes the defaults of ``vision``'s image/patch sizes.
        vision: vision-tower config fields to change (e.g. ``{"num_hidden_layers": 2}``).
        **overrides: top-level config fields to set (e.g. ``tie_word_embeddings=True``).

    Returns:
        ``(model, make_inputs)``; see :func:`make_inputs_for` for the builder's arguments.
    """
    cfg = _config(arch, text, vision, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # _from_config mutates the config it is given: hand it a copy.
        model = _model_class(arch)._from_config(copy.deepcopy(cfg), attn_implementation=attn_implementation)
        if arch == "gemma3":
            # Gemma3's image projection starts at zero, which would make every image invisible.
            torch.nn.init.normal_(model.model.multi_modal_projector.mm_input_projection_weight, std=0.5)
    model = model.to(dtype).eval()
    return model, make_inputs_for(arch, model.config)


def make_inputs_for(arch: str, config: Any) -> MakeInputs:
    """The input builder of :func:`make_vlm` for ``arch`` (and its config)."""

    def make_inputs(
        B: int = 2,
        P_text: int = 4,
        T: int = 5,
        seed: int = 0,
        *,
        lengths: Sequence[int] | None = None,
        images: Sequence[int] | None = None,
        type_ids: bool = False,
    ) -> tuple[dict[str, Any], torch.Tensor]:
        """Synthetic ``(model_inputs, response_mask [B, T])``.

        Args:
            B: rows.
            P_text: text tokens per prompt (>= 1), besides the image blocks.
            T: padded response length.
            seed: seed of the token ids and pixels.
            lengths: valid response tokens per row (default: all ``T``).
            images: images per row (default: 1 each; LLaVA needs the same count in every row).
            type_ids: also add the processor's type ids (``mm_token_type_ids`` / ``token_type_ids``).
        """
        g = torch.Generator().manual_seed(seed)
        lengths = [T] * B if lengths is None else list(lengths)
        images = [1] * B if images is None else list(images)
        if len(lengths) != B or len(images) != B or P_text < 1:
            raise ValueError("make_inputs: lengths and images need B entries and P_text >= 1.")
        qwen = arch in QWEN_ARCHS
        prompts, sizes = [], []
        k = 0
        for b in range(B):
            text = torch.randint(TEXT_LO, TEXT_HI, (P_text,), generator=g).tolist()
            row = text[:1]
            for _ in range(images[b]):
                size = qwen_sizes(arch)[k % len(QWEN_SIZES)] if qwen else None
                sizes.append(size)
                k += 1
                row += [START] + [IMAGE] * image_tokens_per_image(arch, size) + [END]
            prompts.append(row + text[1:])
        P = max(len(p) for p in prompts)
        ids = torch.full((B, P + T), PAD, dtype=torch.long)
        attn = torch.zeros(B, P + T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b in range(B):
            ids[b, P - len(prompts[b]):P] = torch.tensor(prompts[b])  # left-padded prompt
            attn[b, P - len(prompts[b]):P] = 1
            ids[b, P:P + lengths[b]] = torch.randint(TEXT_LO, TEXT_HI, (lengths[b],), generator=g)
            attn[b, P:P + lengths[b]] = 1
            mask[b, :lengths[b]] = True
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": attn}
        n = sum(images)
        if qwen:
            vc = config.vision_config
            p, tp = vc.patch_size, vc.temporal_patch_size
            if n:
                m = vc.spatial_merge_size
                grids = [[1, h // p, w // p] for h, w in sizes]
                patches = [_qwen_patchify(torch.randn(3, h, w, generator=g), p, m, tp) for h, w in sizes]
                inputs["pixel_values"] = torch.cat(patches)
                inputs["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
            if type_ids:
                inputs["mm_token_type_ids"] = (ids == IMAGE).long()
        elif arch in ("idefics3", "smolvlm"):
            s = config.vision_config.image_size
            n_max = max(images)
            if n_max:
                px = torch.zeros(B, n_max, 3, s, s)
                pam = torch.zeros(B, n_max, s, s, dtype=torch.bool)
                for b in range(B):
                    px[b, :images[b]] = torch.randn(images[b], 3, s, s, generator=g)
                    pam[b, :images[b]] = True
                inputs["pixel_values"] = px
                inputs["pixel_attention_mask"] = pam
        else:
            s = config.vision_config.image_size
            if arch == "llava" and len(set(images)) > 1:
                raise ValueError("make_inputs: LLaVA rows must hold the same number of images.")
            if n:
                inputs["pixel_values"] = torch.randn(n, 3, s, s, generator=g)
            if arch == "gemma3" and type_ids:
                inputs["token_type_ids"] = (ids == IMAGE).long()
        return inputs, mask

    return make_inputs


def run_rows_alone(inputs: dict[str, Any], rows: Sequence[int], arch: str, config: Any) -> list[dict[str, Any]]:
    """Each row of ``inputs`` as its own batch of one, prompt padding stripped (slow, for references)."""
    out = []
    ids = inputs["input_ids"]
    qwen = arch in QWEN_ARCHS
    img_counts = (ids == IMAGE).sum(1)
    # Qwen: patches per image from the grid; image -> row by cumulative token counts.
    if qwen and "image_grid_thw" in inputs:
        grid = inputs["image_grid_thw"]
        per_img_patches = grid.prod(-1).tolist()
        per_img_tokens = [x // 4 for x in per_img_patches]
    for b in rows:
        keep = inputs["attention_mask"][b].bool()
        first = int(keep.nonzero()[0])  # strip left padding only; right padding is kept
        row: dict[str, Any] = {"input_ids": ids[b:b + 1, first:], "attention_mask": inputs["attention_mask"][b:b + 1, first:]}
        if qwen and "image_grid_thw" in inputs:
            before = int(img_counts[:b].sum())
            mine = int(img_counts[b])
            acc, i0 = 0, 0
            while acc < before:
                acc += per_img_tokens[i0]
                i0 += 1
            i1, acc = i0, 0
            while acc < mine:
                acc += per_img_tokens[i1]
                i1 += 1
            if i1 > i0:
                p0 = sum(per_img_patches[:i0])
                p1 = sum(per_img_patches[:i1])
                row["pixel_values"] = inputs["pixel_values"][p0:p1]
                row["image_grid_thw"] = grid[i0:i1]
        elif arch in ("idefics3", "smolvlm") and "pixel_values" in inputs and bool(inputs["pixel_values"][b].any()):
            row["pixel_values"] = inputs["pixel_values"][b:b + 1]
            row["pixel_attention_mask"] = inputs["pixel_attention_mask"][b:b + 1]
        elif "pixel_values" in inputs:
            per = inputs["pixel_values"].shape[0] // ids.shape[0] if arch == "llava" else None
            if arch == "llava":
                row["pixel_values"] = inputs["pixel_values"][b * per:(b + 1) * per]
            else:
                before, mine = int(img_counts[:b].sum()) // 4, int(img_counts[b]) // 4
                if mine:
                    row["pixel_values"] = inputs["pixel_values"][before:before + mine]
        out.append(row)
    return out
