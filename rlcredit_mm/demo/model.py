"""The demo's policy: a tiny Qwen2.5-VL built from a config (random init), its processor, its inputs.

The architecture is the real ``Qwen2_5_VLForConditionalGeneration`` of ``transformers`` (windowed
vision tower, 2x2 patch merger, M-RoPE), shrunk to a 64-wide, 2-layer language model and a 2-block
vision tower, so that rollouts, log-probs and perturbed forwards take milliseconds on a CPU. A 56 px
picture is 4x4 patches of 14 px, merged into 2x2 = 4 image tokens, one per cell of the task's grid.

The warm-up teaches the response *format* only: cross-entropy on the filler and the answer template,
and at the colour slot the uniform distribution over the colours (``-mean_c log p(c)``), never which
one is right. Everything the policy knows about the answer afterwards is learnt by RL from the
image, starting from a policy that samples every colour equally often.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rlcredit_mm.demo import task as T

__all__ = ["build_model", "build_image_processor", "ModelKit", "encode_prompts", "join_responses",
           "tokens_per_image", "warmup", "to_device", "resolve_device"]


def resolve_device(name: str) -> torch.device:
    """The torch device of a ``--device`` value: ``"auto"`` is CUDA when available, else the CPU.

    Raises:
        SpecError: ``"cuda"`` (or ``"cuda:N"``) asked for where torch sees no such GPU.

    Examples:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    from rlcredit.errors import SpecError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise SpecError(
            f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s) (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or --device auto."
        )
    return device


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor moved to ``device`` (dicts, tuples and lists are walked).

    Examples:
        >>> to_device(({"a": torch.ones(1)}, [torch.zeros(1)], 3), torch.device("cpu"))
        ({'a': tensor([1.])}, [tensor([0.])], 3)
    """
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def build_image_processor(image_size: int = 56) -> Any:
    """Qwen2-VL's (PIL backend) image processor fixed at ``image_size`` px (no resize happens).

    Built from its class with explicit parameters, so nothing is read from the hub.

    Examples:
        >>> ip = build_image_processor()
        >>> ip.patch_size, ip.merge_size
        (14, 2)
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = image_size * image_size
    return Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14,
                                    temporal_patch_size=2, merge_size=2)


def tokens_per_image(image_size: int = 56) -> int:
    """Image placeholder tokens of one ``image_size`` px picture (14 px patches, 2x2 merge).

    Examples:
        >>> tokens_per_image(56), tokens_per_image(112)
        (4, 16)
    """
    return (image_size // 28) ** 2


def build_model(tokenizer: Any, *, seed: int = 0, hidden: int = 64, layers: int = 2, vision_init_std: float = 1.0,
                attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A randomly initialised tiny ``Qwen2_5_VLForConditionalGeneration`` for ``tokenizer``'s vocabulary.

    Args:
        tokenizer: the task tokenizer (``rlcredit_mm.demo.task.build_tokenizer``).
        seed: weight-initialisation seed (the global RNG is restored afterwards).
        hidden: width of the language model and the vision tower.
        layers: language-model layers.
        vision_init_std: standard deviation of the vision tower's random weight matrices. With
            transformers' default (0.02) the colours move the random tower's output by ~1% of its
            norm and even supervised training on the answers sits on a plateau for hundreds of
            steps; a wider random init (still random, no pretraining) makes the picture legible
            within the demo's budget (supervised: ~25 steps instead of > 150).
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        The model in training mode (``from_config`` default); call ``.eval()`` for sampling.

    Examples:
        >>> model = build_model(T.build_tokenizer(), hidden=32)
        >>> model.config.model_type, model.config.text_config.hidden_size
        ('qwen2_5_vl', 32)
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in T.SPECIAL_TOKENS}
    heads = max(2, hidden // 16)
    text = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        pad_token_id=ids[T.PAD], bos_token_id=ids[T.EOS], eos_token_id=ids[T.EOS], tie_word_embeddings=False,
    )
    vision = dict(depth=2, hidden_size=hidden, out_hidden_size=hidden, intermediate_size=2 * hidden,
                  num_heads=heads, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[T.IMAGE_PAD], video_token_id=ids[T.VIDEO_PAD],
        vision_start_token_id=ids[T.VISION_START], vision_end_token_id=ids[T.VISION_END],
        pad_token_id=ids[T.PAD], eos_token_id=ids[T.EOS], bos_token_id=ids[T.EOS], tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
        with torch.no_grad():
            for param in model.model.visual.parameters():
                if param.ndim >= 2:
                    param.normal_(0.0, vision_init_std)
    model.generation_config.pad_token_id = ids[T.PAD]
    model.generation_config.eos_token_id = ids[T.EOS]
    model.generation_config.bos_token_id = ids[T.EOS]
    return model


class ModelKit:
    """The tokenizer, image processor and a few token ids the demo needs, bundled.

    Args:
        image_size: picture side in pixels (a multiple of 28).

    Examples:
        >>> kit = ModelKit()
        >>> kit.words(torch.tensor([kit.colour_ids["red"], kit.eos_id, kit.colour_ids["blue"]]))
        ['red']
    """

    def __init__(self, image_size: int = 56) -> None:
        self.image_size = image_size
        self.tokenizer = T.build_tokenizer()
        self.image_processor = build_image_processor(image_size)
        tok = self.tokenizer
        self.pad_id = tok.convert_tokens_to_ids(T.PAD)
        self.eos_id = tok.convert_tokens_to_ids(T.EOS)
        self.image_id = tok.convert_tokens_to_ids(T.IMAGE_PAD)
        self.colour_ids = {c: tok.convert_tokens_to_ids(c) for c in T.COLOURS}
        self.vocab = T.vocabulary()

    def pixels(self, images: Sequence[Any]) -> dict[str, Tensor]:
        """``pixel_values [N*16, 1176]`` and ``image_grid_thw [N, 3]`` of PIL ``images``."""
        out = self.image_processor(images=list(images), return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def words(self, ids: Tensor) -> list[str]:
        """The words of one row of token ids, stopping at ``<eos>`` / ``<pad>``."""
        out = []
        for i in ids.tolist():
            if i in (self.eos_id, self.pad_id):
                break
            out.append(self.vocab[i])
        return out


def encode_prompts(kit: ModelKit, examples: Sequence[T.Example], repeat: int = 1) -> dict[str, Tensor]:
    """Model inputs of the prompts, each repeated ``repeat`` times (rows ``i*repeat .. i*repeat+repeat-1``).

    Every prompt has the same length (one image, a one-word shape), so no padding is needed.

    Returns:
        ``input_ids [N, P]``, ``attention_mask [N, P]``, ``mm_token_type_ids [N, P]`` (1 on image
        tokens), ``pixel_values [N*patches, D]``, ``image_grid_thw [N, 3]`` with ``N = len(examples) * repeat``.

    Examples:
        >>> inputs = encode_prompts(ModelKit(), T.make_examples(2, seed=0), repeat=3)
        >>> inputs["input_ids"].shape, inputs["pixel_values"].shape, int(inputs["mm_token_type_ids"][0].sum())
        (torch.Size([6, 12]), torch.Size([96, 1176]), 4)
    """
    n_img = tokens_per_image(kit.image_size)
    texts = [T.prompt_text(ex, n_img) for ex in examples]
    ids = torch.tensor([kit.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts], dtype=torch.long)
    images = [T.render(ex, kit.image_size) for ex in examples]
    px = kit.pixels(images)
    per = int(px["image_grid_thw"][0].prod())
    pixel_values = px["pixel_values"].view(len(examples), per, -1).repeat_interleave(repeat, 0).flatten(0, 1)
    ids = ids.repeat_interleave(repeat, 0)
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "mm_token_type_ids": (ids == kit.image_id).long(),
        "pixel_values": pixel_values,
        "image_grid_thw": px["image_grid_thw"].repeat_interleave(repeat, 0),
    }


def join_responses(prompt_inputs: dict[str, Tensor], responses: Tensor, response_mask: Tensor) -> dict[str, Tensor]:
    """Prompt inputs with the right-padded responses ``[N, T]`` appended (TRL/verl layout ``[N, P+T]``).

    Examples:
        >>> kit = ModelKit()
        >>> prompt = encode_prompts(kit, T.make_examples(1, seed=0))
        >>> joined = join_responses(prompt, torch.tensor([[kit.eos_id, kit.pad_id]]), torch.tensor([[True, False]]))
        >>> joined["input_ids"].shape, joined["attention_mask"][0, -2:].tolist()
        (torch.Size([1, 14]), [1, 0])
    """
    ids = torch.cat([prompt_inputs["input_ids"], responses], dim=1)
    attn = torch.cat([prompt_inputs["attention_mask"], response_mask.long()], dim=1)
    types = torch.cat([prompt_inputs["mm_token_type_ids"], torch.zeros_like(responses)], dim=1)
    return {**prompt_inputs, "input_ids": ids, "attention_mask": attn, "mm_token_type_ids": types}


def format_batch(kit: ModelKit, examples: Sequence[T.Example], rng: random.Random, *,
                 filler_words: int = 0) -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """Warm-up batch: well-formed responses with ``filler_words`` random filler words (each drawn
    uniformly) and a random filler phrase; the colour slot holds a placeholder.

    Returns:
        ``(model_inputs [N, P+T], response_mask [N, T], answer_slot [N, T])``; the response ends
        with ``<eos>``; ``answer_slot`` is True at the colour token, whose id is a random colour
        (never read by the warm-up loss).

    Examples:
        >>> inputs, mask, slot = format_batch(ModelKit(), T.make_examples(3, seed=0), random.Random(0))
        >>> slot.sum(1).tolist(), bool((slot <= mask).all())
        ([1, 1, 1], True)
    """
    prompt = encode_prompts(kit, examples)
    rows, slots = [], []
    for ex in examples:
        colour = rng.choice(sorted(T.COLOURS))  # a placeholder: the loss never looks at which colour
        words = [rng.randrange(len(T.FILLER_WORDS)) for _ in range(filler_words)]
        text = T.response_text(ex, colour, rng.randrange(len(T.FILLERS)), words)
        ids = kit.tokenizer(text, add_special_tokens=False)
        rows.append(ids["input_ids"] + [kit.eos_id])
        slots.append(len(rows[-1]) - 3)  # ... colour . <eos>
    width = max(map(len, rows))
    resp = torch.full((len(rows), width), kit.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    slot = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        resp[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
        slot[i, slots[i]] = True
    return join_responses(prompt, resp, mask), mask, slot


def format_loss(logits: Tensor, targets: Tensor, mask: Tensor, slot: Tensor, colour_ids: Tensor) -> Tensor:
    """Format-only loss: cross-entropy on every response token but the colour slot, and at the slot
    the cross-entropy to the uniform distribution over the ``K`` colours, ``-(1/K) sum_c log p(c)``:
    *that* a colour comes, each as likely as the others, never *which* one is right.

    (``-log sum_c p(c)``, "some colour", would leave the split among the colours to the random
    initialisation: a warm-up that way answered one colour ~80% of the time whatever the picture,
    and RL then rarely sampled the right answer to the other pictures.)

    Args:
        logits: ``[N, T, V]`` at the positions predicting the response tokens.
        targets: ``[N, T]`` response token ids.
        mask: ``[N, T]`` bool response tokens; slot: ``[N, T]`` bool colour slots.
        colour_ids: ``[K]`` the colour tokens.

    Returns:
        The scalar mean over all text tokens and slots.

    Examples:
        >>> logits = torch.zeros(1, 2, 5)  # uniform over 5 tokens; tokens 3 and 4 are "colours"
        >>> loss = format_loss(logits, torch.tensor([[0, 3]]), torch.ones(1, 2, dtype=torch.bool),
        ...                    torch.tensor([[False, True]]), torch.tensor([3, 4]))
        >>> round(float(loss), 4)  # mean of log 5 and -(log(1/5) + log(1/5)) / 2
        1.6094
    """
    logp = logits.float().log_softmax(-1)
    text = mask & ~slot
    ce = -logp.gather(-1, targets[..., None]).squeeze(-1)[text]
    uniform = -logp[slot][:, colour_ids].mean(-1)
    return torch.cat([ce, uniform]).mean()


def warmup(model: torch.nn.Module, kit: ModelKit, *, steps: int, batch_size: int = 32, lr: float = 5e-3,
           seed: int = 0, shapes: int = 1, filler_words: int = 0, progress: Any = None) -> list[float]:
    """Supervised warm-up on the response format only (``format_loss``), AdamW, on the model's device.

    No answer is ever a target: the colour slot is trained towards the uniform distribution over
    the colours, so after the warm-up the policy writes well-formed responses and picks each colour
    about equally often, whatever the picture.

    Returns:
        The loss of every step.

    Examples:
        >>> kit = ModelKit()
        >>> losses = warmup(build_model(kit.tokenizer, hidden=32), kit, steps=2, batch_size=4)
        >>> len(losses), losses[1] < losses[0]
        (2, True)
    """
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    colour_ids = torch.tensor(sorted(kit.colour_ids.values()), device=device)
    model.train()
    losses = []
    for _ in range(steps):
        examples = T.make_examples(batch_size, rng.randrange(2**31), shapes)
        inputs, mask, slot = format_batch(kit, examples, rng, filler_words=filler_words)
        inputs, mask, slot = to_device((inputs, mask, slot), device)
        logits = model(**inputs, use_cache=False).logits[:, -mask.shape[1] - 1:-1]
        loss = format_loss(logits, inputs["input_ids"][:, -mask.shape[1]:], mask, slot, colour_ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress.update(1)
    model.eval()
    return losses
