"""The synthetic visual-reasoning task of ``rlcredit demo``: coloured shapes, one question, one answer.

Every example is generated on the fly from a seed, nothing is downloaded:

* **image** — a ``size x size`` black canvas with ``n_shapes`` shapes (square, circle or triangle,
  all different) of distinct colours (red, green, blue, yellow), jittered in size, position and
  hue. One shape (the default) fills most of the canvas; several share a 2x2 grid of cells, one
  cell each (a cell is exactly one merged Qwen2.5-VL image token at 56 px).
* **prompt** — ``"what colour is the {shape} ?"``: the shape named is in the picture, its colour can
  only be read from the image.
* **response format** — ``"{filler} the answer is {colour} ."`` then ``<eos>``. The filler is any
  sequence of ``FILLER_WORDS`` ("hmm so wait ...") and ``FILLERS`` phrases ("let me look at the
  picture ."), image-independent "reasoning" that the reward ignores; only the colour token
  depends on the image. (The warm-up writes ``filler_words`` words, then one phrase.)
  Every filler word is a free choice among ``len(FILLER_WORDS)`` equally good ones: a token with a
  high entropy, a gradient, and no bearing on the reward. GRPO gives it the response's whole
  advantage anyway, which is why token-level credit should matter here.
* **reward** — 1.0 when the response is well formed (``parse_answer``), names the asked shape's
  colour and ends with ``<eos>``; else 0.0 (a broken format earns nothing).

The tokenizer is word-level, built offline with the ``tokenizers`` library.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from typing import Any

import attrs

__all__ = [
    "COLOURS", "SHAPES", "FILLERS", "FILLER_WORDS", "longest_response", "SPECIAL_TOKENS", "Example", "vocabulary", "build_tokenizer",
    "make_example", "make_examples", "render", "prompt_text", "response_text", "reward", "parse_answer",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 210, 40),
}
"""Answer colours and their RGB values."""

SHAPES: tuple[str, ...] = ("square", "circle", "triangle")

FILLERS: tuple[str, ...] = (
    "let me look at the picture .",
    "i will check each shape in turn .",
    "first i find the {shape} .",
    "ok .",
    "the question asks about the {shape} .",
)
"""Image-independent "reasoning" phrases before the answer (``{shape}`` is the asked shape)."""

FILLER_WORDS: tuple[str, ...] = ("hmm", "so", "well", "wait", "right", "now", "then", "thus")
"""Image-independent filler words that may open a response, any number of them, in any order
(none of them occurs in ``FILLERS`` or in the answer template)."""

PAD, EOS, UNK, VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = (
    "<pad>", "<eos>", "<unk>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>",
)
SPECIAL_TOKENS: tuple[str, ...] = (PAD, EOS, UNK, VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD)

ANSWER_PREFIX: tuple[str, ...] = ("the", "answer", "is")
_FILLER_TEXTS = frozenset(f.format(shape=s) for f in FILLERS for s in SHAPES)
_PHRASE_LENGTHS = sorted({len(t.split()) for t in _FILLER_TEXTS})


def vocabulary() -> list[str]:
    """The word list of the task, specials first (ids are list positions).

    Examples:
        >>> v = vocabulary()
        >>> v[:2], "yellow" in v
        (['<pad>', '<eos>'], True)
    """
    words: list[str] = list(SPECIAL_TOKENS)
    text = " ".join(["what colour is the ?", *SHAPES, *COLOURS, *FILLERS, " ".join(ANSWER_PREFIX), *FILLER_WORDS])
    for w in text.replace("{shape}", "").split():
        if w not in words:
            words.append(w)
    return words


def build_tokenizer() -> Any:
    """A word-level ``PreTrainedTokenizerFast`` over ``vocabulary`` (whitespace split, offline).

    Examples:
        >>> tok = build_tokenizer()
        >>> tok.decode(tok("the answer is red .")["input_ids"])
        'the answer is red .'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation: "square?" -> "square", "?"
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                  model_max_length=512)
    tok.add_special_tokens({"additional_special_tokens": [VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD]})
    tok.padding_side = "left"
    return tok


@attrs.frozen
class Example:
    """One task instance.

    Attributes:
        shapes: ``(shape, colour, cell)`` for each drawn shape (cell 0-3, row-major in the 2x2 grid).
        asked: the shape the question names.
        answer: its colour.
        seed: the seed the example (and its image jitter) was drawn from.
    """

    shapes: tuple[tuple[str, str, int], ...]
    asked: str
    answer: str
    seed: int


def make_example(seed: int, n_shapes: int = 1) -> Example:
    """A random example; equal seeds give equal examples.

    Args:
        seed: any integer.
        n_shapes: shapes in the picture, 1-3 (distinct shapes, distinct colours, distinct cells).

    Examples:
        >>> ex = make_example(0)
        >>> ex.answer in COLOURS, ex.asked in [s for s, _, _ in ex.shapes]
        (True, True)
    """
    if not 1 <= n_shapes <= len(SHAPES):
        raise ValueError(f"n_shapes must be in [1, {len(SHAPES)}], got {n_shapes}.")
    rng = random.Random(seed)
    shapes = rng.sample(SHAPES, n_shapes)
    colours = rng.sample(sorted(COLOURS), n_shapes)
    cells = rng.sample(range(4), n_shapes)
    asked = rng.randrange(n_shapes)
    return Example(tuple(zip(shapes, colours, cells)), shapes[asked], colours[asked], seed)


def make_examples(n: int, seed: int, n_shapes: int = 1) -> list[Example]:
    """``n`` examples drawn from one seed (distinct per-example seeds)."""
    rng = random.Random(seed)
    return [make_example(rng.randrange(2**31), n_shapes) for _ in range(n)]


def render(example: Example, size: int = 56) -> Any:
    """The example's picture as an RGB ``PIL.Image`` of ``size x size`` pixels (black background).

    Examples:
        >>> img = render(make_example(3))
        >>> img.size, img.mode
        ((56, 56), 'RGB')
    """
    from PIL import Image, ImageDraw

    rng = random.Random(example.seed ^ 0x5EED)
    img = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    # One shape gets the whole canvas; several share the 2x2 grid, one per cell.
    cell = size if len(example.shapes) == 1 else size // 2
    for shape, colour, where in example.shapes:
        x0, y0 = (0, 0) if cell == size else ((where % 2) * cell, (where // 2) * cell)
        side = rng.randint(math.ceil(cell * 0.55), math.floor(cell * 0.8))
        ox = x0 + rng.randint(1, cell - side - 1)
        oy = y0 + rng.randint(1, cell - side - 1)
        rgb = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[colour])
        box = [ox, oy, ox + side, oy + side]
        if shape == "square":
            draw.rectangle(box, fill=rgb)
        elif shape == "circle":
            draw.ellipse(box, fill=rgb)
        else:
            draw.polygon([(ox + side / 2, oy), (ox, oy + side), (ox + side, oy + side)], fill=rgb)
    return img


def prompt_text(example: Example, image_tokens: int) -> str:
    """The prompt: the image block (``image_tokens`` placeholders) then the question."""
    image = " ".join([VISION_START] + [IMAGE_PAD] * image_tokens + [VISION_END])
    return f"{image} what colour is the {example.asked} ?"


def response_text(example: Example, colour: str, filler: int, words: Sequence[int] = ()) -> str:
    """A well-formed response (no ``<eos>``): the filler words ``words`` (indices into
    ``FILLER_WORDS``), the filler phrase ``filler`` (an index into ``FILLERS``), the answer ``colour``.

    Examples:
        >>> ex = make_example(0)
        >>> response_text(ex, "red", 3), response_text(ex, "red", 3, words=[0, 3])
        ('ok . the answer is red .', 'hmm wait ok . the answer is red .')
    """
    lead = FILLERS[filler % len(FILLERS)].format(shape=example.asked)
    head = "".join(f"{FILLER_WORDS[w % len(FILLER_WORDS)]} " for w in words)
    return f"{head}{lead} {' '.join(ANSWER_PREFIX)} {colour} ."


def longest_response(filler_words: int) -> int:
    """Tokens of the longest well-formed response with ``filler_words`` filler words, ``<eos>`` included.

    Examples:
        >>> longest_response(0), longest_response(8)  # "i will check each shape in turn ." is 8 words
        (14, 22)
    """
    longest = max(len(f.format(shape=SHAPES[0]).split()) for f in FILLERS)
    return filler_words + longest + len(ANSWER_PREFIX) + 3  # ... the answer is X . <eos>


def parse_answer(words: Sequence[str]) -> str | None:
    """The colour of a well-formed response, or None when the format is broken.

    Well formed: a filler made of ``FILLER_WORDS`` and ``FILLERS`` phrases (each with any
    shape), any number of each in any order, none included; then ``the answer is X .`` and
    nothing else (the ``<eos>`` after it is checked by ``reward``). No filler word starts a
    phrase, so the split is unique.

    Examples:
        >>> parse_answer("ok . the answer is blue .".split())
        'blue'
        >>> parse_answer("hmm so ok . hmm the answer is blue .".split())
        'blue'
        >>> parse_answer("the answer is blue .".split())
        'blue'
        >>> parse_answer("ok ok . the answer is blue .".split()) is None  # "ok ok ." is no phrase
        True
    """
    n = len(ANSWER_PREFIX)
    if len(words) < n + 2 or tuple(words[-n - 2:-2]) != ANSWER_PREFIX or words[-1] != ".":
        return None
    lead, i = list(words[:-n - 2]), 0
    while i < len(lead):
        if lead[i] in FILLER_WORDS:
            i += 1
            continue
        size = next((k for k in _PHRASE_LENGTHS if " ".join(lead[i:i + k]) in _FILLER_TEXTS), None)
        if size is None:
            return None
        i += size
    return words[-2]


def reward(example: Example, words: Sequence[str], finished: bool = True) -> float:
    """The verifiable 0/1 reward: 1.0 iff the response is well formed, ended with ``<eos>`` and
    names the asked shape's colour.

    Args:
        example: the task instance.
        words: the response's words before ``<eos>``.
        finished: whether the response ended with ``<eos>`` (not cut at the length limit).

    Examples:
        >>> ex = make_example(0)
        >>> reward(ex, response_text(ex, ex.answer, 0).split()), reward(ex, ["ok"])
        (1.0, 0.0)
        >>> reward(ex, response_text(ex, ex.answer, 0).split(), finished=False)
        0.0
    """
    return 1.0 if finished and parse_answer(words) == example.answer else 0.0
