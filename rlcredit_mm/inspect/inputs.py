"""Loading a local VLM folder (offline) and building the model inputs of one picture, prompt and response."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

import rlcredit
from rlcredit.errors import AdapterError, RolloutError, SpecError

__all__ = ["InspectInputs", "load_vlm", "build_inputs", "display_tokens"]


@attrs.frozen
class InspectInputs:
    """What ``build_inputs`` returns.

    Attributes:
        model_inputs: ``input_ids [1, P+T]`` (response last) and the image inputs.
        response_mask: ``[1, T]`` bool (all True).
        tokens: the ``T`` response tokens as display strings.
    """

    model_inputs: dict[str, Any]
    response_mask: Tensor
    tokens: tuple[str, ...]


@attrs.frozen
class _Processing:
    processor: Any  # a transformers ProcessorMixin, or None when only its parts could be loaded
    tokenizer: Any
    image_processor: Any


def _supported() -> str:
    return ", ".join(rlcredit.available("adapter"))


def load_vlm(folder: str | os.PathLike) -> tuple[Any, _Processing]:
    """Load a local VLM and its processor (offline) from a ``save_pretrained`` folder.

    The processor is ``AutoProcessor``; when that cannot be built (Qwen's processor also needs a
    video processor, which needs torchvision), the image processor and tokenizer are loaded on
    their own and ``build_inputs`` expands the image placeholders itself.

    Raises:
        SpecError: the folder or its ``config.json`` is missing, or no processor can be loaded.
        AdapterError: the model is not a vision-language model rlcredit supports.

    Examples:
        >>> import tempfile
        >>> from rlcredit_mm.demo import model as M
        >>> kit, folder = M.ModelKit(), tempfile.mkdtemp()
        >>> M.build_model(kit.tokenizer, hidden=32).save_pretrained(folder)
        >>> _ = kit.tokenizer.save_pretrained(folder), kit.image_processor.save_pretrained(folder)
        >>> model, proc = load_vlm(folder)
        >>> model.config.model_type, type(proc.image_processor).__name__
        ('qwen2_5_vl', 'Qwen2VLImageProcessorPil')
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers as tf
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bar around our own output

    path = Path(folder)
    if not path.is_dir():
        raise SpecError(f"--model {str(path)!r} is not a folder; pass a save_pretrained() folder of a vision-language model.")
    if not (path / "config.json").is_file():
        raise SpecError(f"--model {str(path)!r} has no config.json; pass a folder written by model.save_pretrained().")
    try:
        config = tf.AutoConfig.from_pretrained(path)
    except Exception as err:
        raise SpecError(f"--model {str(path)!r}: config.json could not be read: {err}") from err
    if getattr(config, "vision_config", None) is None:
        raise AdapterError(
            f"--model {str(path)!r} is a text-only model (model_type {getattr(config, 'model_type', '?')!r}); "
            f"inspect needs a vision-language model. Supported architectures: {_supported()}."
        )
    from rlcredit_mm.adapters import adapter_for

    adapter_for(config)  # raises AdapterError naming the supported architectures
    try:
        model = tf.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    except Exception as err:
        raise AdapterError(
            f"--model {str(path)!r} (model_type {config.model_type!r}) could not be loaded as an image-text-to-text "
            f"model: {err}. Supported architectures: {_supported()}."
        ) from err
    model.eval()
    processor = None
    try:
        candidate = tf.AutoProcessor.from_pretrained(path)
        if hasattr(candidate, "image_processor") and hasattr(candidate, "tokenizer"):
            processor = candidate
    except Exception:  # e.g. Qwen's processor needs a video processor, which needs torchvision
        processor = None
    try:
        tokenizer = processor.tokenizer if processor is not None else tf.AutoTokenizer.from_pretrained(path)
        image_processor = (processor.image_processor if processor is not None
                           else tf.AutoImageProcessor.from_pretrained(path))
    except Exception as err:
        raise SpecError(
            f"--model {str(path)!r}: no processor could be loaded ({err}); save the processor next to the model "
            f"(processor.save_pretrained(folder), or its tokenizer and image processor)."
        ) from err
    return model, _Processing(processor, tokenizer, image_processor)


def display_tokens(tokenizer: Any, ids: Sequence[int]) -> tuple[str, ...]:
    """Each token id decoded on its own (BPE space markers become spaces), for display.

    Examples:
        >>> from rlcredit_mm.demo.task import build_tokenizer
        >>> tok = build_tokenizer()
        >>> display_tokens(tok, tok("the answer is red")["input_ids"])
        ('the', 'answer', 'is', 'red')
    """
    return tuple(tokenizer.decode([int(i)]) for i in ids)


def _is_qwen(model: Any) -> bool:
    return getattr(model.config, "model_type", "") in ("qwen2_vl", "qwen2_5_vl")


def _prompt_text(model: Any, proc: _Processing, prompt: str) -> str:
    """The prompt with the image placeholder, through the chat template when there is one."""
    owner = proc.processor if proc.processor is not None else proc.tokenizer
    template = getattr(owner, "chat_template", None)
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return owner.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if _is_qwen(model):
        return "<|vision_start|><|image_pad|><|vision_end|> " + prompt
    token = getattr(proc.processor, "boi_token", None) or getattr(proc.processor, "image_token", None) or "<image>"
    return f"{token} {prompt}"


def build_inputs(model: Any, proc: _Processing, image: Any, prompt: str, response: str) -> InspectInputs:
    """Model inputs for one picture, prompt and response (the response in the last ``T`` columns).

    Raises:
        RolloutError: the response tokenises to nothing.
        AdapterError: no processor and an architecture whose placeholders we cannot expand.

    Examples:
        >>> import tempfile
        >>> from PIL import Image
        >>> from rlcredit_mm.demo import model as M
        >>> kit, folder = M.ModelKit(), tempfile.mkdtemp()
        >>> M.build_model(kit.tokenizer, hidden=32).save_pretrained(folder)
        >>> _ = kit.tokenizer.save_pretrained(folder), kit.image_processor.save_pretrained(folder)
        >>> model, proc = load_vlm(folder)
        >>> built = build_inputs(model, proc, Image.new("RGB", (56, 56)), "what colour is it ?", "red .")
        >>> built.tokens, built.model_inputs["input_ids"].shape
        (('red', '.'), torch.Size([1, 13]))
    """
    response_ids = proc.tokenizer(response, add_special_tokens=False)["input_ids"]
    if len(response_ids) == 0:
        raise RolloutError(f"--response {response!r} tokenises to nothing; pass the response text the model wrote.")
    text = _prompt_text(model, proc, prompt)
    if proc.processor is not None:
        enc = dict(proc.processor(images=[image], text=[text], return_tensors="pt"))
    elif _is_qwen(model):
        px = proc.image_processor(images=[image], return_tensors="pt")
        grid = px["image_grid_thw"]
        merge = int(getattr(proc.image_processor, "merge_size", 2))
        n = int(grid[0].prod()) // (merge * merge)
        text = text.replace("<|image_pad|>", "<|image_pad|>" * n, 1)
        ids = torch.tensor([proc.tokenizer(text, add_special_tokens=False)["input_ids"]])
        image_id = int(model.config.image_token_id)
        enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == image_id).long(),
               "pixel_values": px["pixel_values"], "image_grid_thw": grid}
    else:
        raise AdapterError(
            f"no processor could be loaded for model_type {model.config.model_type!r}, and rlcredit only expands image "
            f"placeholders itself for Qwen2-VL/Qwen2.5-VL; save the model's processor in the folder."
        )
    prompt_ids = enc["input_ids"]
    if prompt_ids.shape[0] != 1:
        raise RolloutError("build_inputs: the processor returned more than one row for one prompt.")
    P = prompt_ids.shape[1]
    resp = torch.tensor([response_ids], dtype=prompt_ids.dtype)
    T = resp.shape[1]
    inputs: dict[str, Any] = {}
    for key, value in enc.items():
        if isinstance(value, Tensor) and value.ndim == 2 and value.shape == (1, P):
            fill = resp if key == "input_ids" else torch.ones_like(resp) if key == "attention_mask" else torch.zeros_like(resp)
            inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
        else:
            inputs[key] = value
    return InspectInputs(inputs, torch.ones(1, T, dtype=torch.bool), display_tokens(proc.tokenizer, response_ids))
