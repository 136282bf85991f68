"""Token-level heatmaps of visual dependency and attention connectivity (HTML and PNG), and ``rlcredit inspect``.

For one picture, prompt and response this module computes, per response token,

* the **visual dependency** of VPPO (Huang et al. 2025, arXiv 2510.09285), the full-vocabulary
  ``S_t = KL(pi(.|s_t, I) || pi(.|s_t, I'))`` (``rlcredit_mm.VisualKL`` with
  ``estimate="exact"``); ``I'`` defaults to the ``constant`` perturbation (an all-black picture in
  the processor's normalised space), so a heatmap is deterministic and reads "how much would this
  token change without the picture"; ``patch_blackout`` gives VPPO's training-time ``I'``;
* the **connectivity** of AT-RL (Jiao et al., arXiv 2602.11455), the attention mass the token's
  query puts on image tokens, sink-debiased (``rlcredit_mm.AttentionConnectivity``),

and renders them as colour-coded tokens next to the picture: a self-contained HTML page (the picture
embedded as a base64 PNG, the exact values in each token's tooltip) or a PNG figure.

Command line (``rlcredit inspect``)::

    rlcredit inspect --model DIR --image FILE --prompt TEXT --response TEXT [--out FILE.html] [--png]

``DIR`` is a ``save_pretrained`` folder of a supported VLM with its processor files; nothing is
downloaded (``HF_HUB_OFFLINE=1`` is set).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import Tensor

import rlcredit
from rlcredit.errors import AdapterError, RLCreditError, RolloutError, SpecError

__all__ = [
    "SCORE_NAMES", "TokenHeatmap", "InspectInputs", "token_scores", "heatmap_html", "heatmap_png",
    "load_vlm", "build_inputs", "display_tokens", "run_inspect",
]

SCORE_NAMES: tuple[str, str] = ("visual dependency", "connectivity")
"""Score names of ``token_scores``, in display order."""

# One hue per score; a token's background is this colour at alpha = value / row maximum.
_HUES: dict[str, tuple[int, int, int]] = {"visual dependency": (214, 39, 40), "connectivity": (31, 119, 180)}
_DEFAULT_HUE = (44, 160, 44)


@attrs.frozen
class TokenHeatmap:
    """One response to render: its picture, prompt, tokens and per-token scores.

    Attributes:
        image: the picture (an RGB ``PIL.Image``).
        prompt: the question as shown.
        tokens: the response tokens as display strings, ``T`` of them.
        scores: score name -> ``T`` floats (e.g. ``SCORE_NAMES``).
        title: a heading (e.g. ``"vppo, seed 0 - reward 1"``).
        marks: optional score name -> ``T`` bools, drawn underlined (e.g. the tokens a strategy kept).

    Examples:
        >>> from PIL import Image
        >>> h = TokenHeatmap(Image.new("RGB", (4, 4)), "q?", ["a", "b"], {"connectivity": [0.5, 1]})
        >>> h.scores["connectivity"]
        (0.5, 1.0)
    """

    image: Any
    prompt: str
    tokens: tuple[str, ...] = attrs.field(converter=tuple)
    scores: Mapping[str, tuple[float, ...]] = attrs.field(converter=lambda d: {k: tuple(map(float, v)) for k, v in d.items()})
    title: str = ""
    marks: Mapping[str, tuple[bool, ...]] = attrs.field(factory=dict, converter=lambda d: {k: tuple(map(bool, v)) for k, v in d.items()})

    def __attrs_post_init__(self) -> None:
        for name, values in {**self.scores, **self.marks}.items():
            if len(values) != len(self.tokens):
                raise RolloutError(f"TokenHeatmap: {name!r} has {len(values)} values for {len(self.tokens)} tokens.")


def token_scores(policy: rlcredit.HFPolicy, model_inputs: Mapping[str, Any], response_mask: Tensor, *,
                 perturbation: Any = "constant") -> dict[str, Tensor]:
    """Per-token visual dependency (exact KL) and connectivity of a batch of responses.

    ``S_t = KL(pi(.|s_t, I) || pi(.|s_t, I'))`` over the full vocabulary (VPPO, arXiv 2510.09285)
    and ``c_t`` = the response token's sink-debiased attention mass on image tokens (AT-RL,
    arXiv 2602.11455), both under ``no_grad``.

    Args:
        policy: an ``rlcredit.HFPolicy`` of a supported VLM.
        model_inputs: ``input_ids [B, P+T]`` (response in the last ``T`` columns) and the model's
            image inputs.
        response_mask: ``[B, T]`` bool.
        perturbation: ``I'`` (a registered perturbation name, a spec dict or an object).

    Returns:
        ``{"visual dependency": [B, T], "connectivity": [B, T]}`` float32, 0 on padding.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit_mm.demo import model as M, task as T
        >>> kit = M.ModelKit()
        >>> model = M.build_model(kit.tokenizer, hidden=32).eval()
        >>> ex = T.make_example(0)
        >>> prompt = M.encode_prompts(kit, [ex])
        >>> resp = torch.tensor([kit.tokenizer("ok . the answer is red .")["input_ids"]])
        >>> mask = torch.ones_like(resp, dtype=torch.bool)
        >>> s = token_scores(rlcredit.HFPolicy(model), M.join_responses(prompt, resp, mask), mask)
        >>> sorted(s), s["visual dependency"].shape, bool((s["connectivity"] > 0).all())
        (['connectivity', 'visual dependency'], torch.Size([1, 7]), True)
    """
    from rlcredit_mm.connectivity import AttentionConnectivity
    from rlcredit_mm.visual_kl import VisualKL

    mask = response_mask
    B = mask.shape[0]
    rollout = rlcredit.Rollout(mask, torch.zeros(B), torch.zeros(B, dtype=torch.long), model_inputs=dict(model_inputs))
    with torch.no_grad():
        visual = VisualKL(estimate="exact", perturbation=perturbation)(rollout, policy)
        conn = AttentionConnectivity()(rollout, policy)
    conn = conn.score if isinstance(conn, rlcredit.EstimatorOutput) else conn
    zero = torch.zeros((), device=mask.device)
    return {"visual dependency": torch.where(mask, visual.float(), zero),
            "connectivity": torch.where(mask, conn.float(), zero)}


# --------------------------------------------------------------------------------------------
# Rendering


def _png_base64(image: Any) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _rgba(hue: tuple[int, int, int], alpha: float) -> str:
    return f"rgba({hue[0]},{hue[1]},{hue[2]},{max(0.0, min(1.0, alpha)):.3f})"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px} h2{font-size:16px;margin:0 0 6px 0}
.sample{display:flex;gap:20px;align-items:flex-start;border-top:1px solid #ddd;padding:16px 0}
.sample img{width:168px;height:168px;image-rendering:pixelated;border:1px solid #999;flex:none}
.prompt{color:#555;margin-bottom:8px;font-family:ui-monospace,Menlo,monospace}
.row{margin:6px 0;line-height:2.1}
.label{display:inline-block;width:150px;font-size:12px;color:#555;vertical-align:middle}
.tok{font-family:ui-monospace,Menlo,monospace;padding:3px 4px;margin:1px;border-radius:3px;border:1px solid #eee}
.tok.kept{text-decoration:underline;text-decoration-thickness:2px}
.legend{font-size:13px;color:#444;margin-bottom:10px}
.sw{display:inline-block;width:80px;height:10px;vertical-align:middle;margin:0 4px}
"""


def heatmap_html(heatmaps: Sequence[TokenHeatmap], *, title: str = "rlcredit token heatmaps",
                 intro: str = "") -> str:
    """A self-contained HTML page: every response's tokens coloured by each score, next to its picture.

    A token's colour intensity is its value divided by the row's largest value (so each row uses
    the full scale); the exact value is in the tooltip. Tokens in ``marks`` are underlined.

    Args:
        heatmaps: the responses to show.
        title: the page heading.
        intro: a paragraph of (plain) text under the heading.

    Returns:
        The page as a string (UTF-8, no external resources).

    Examples:
        >>> from PIL import Image
        >>> h = TokenHeatmap(Image.new("RGB", (4, 4)), "what?", ["a", "<b>"], {"connectivity": [0.1, 0.3]})
        >>> page = heatmap_html([h])
        >>> "data:image/png;base64," in page, "&lt;b&gt;" in page, "0.3000" in page
        (True, True, True)
    """
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    names: list[str] = []
    for h in heatmaps:
        names += [n for n in h.scores if n not in names]
    legend = " ".join(
        f"<span class='sw' style='background:linear-gradient(90deg,{_rgba(_HUES.get(n, _DEFAULT_HUE), 0)},"
        f"{_rgba(_HUES.get(n, _DEFAULT_HUE), 1)})'></span>{html.escape(n)}" for n in names)
    parts.append(f"<div class='legend'>0 {legend} (row maximum); underlined: kept by the strategy; "
                 f"hover a token for its value.</div>")
    for h in heatmaps:
        parts.append("<div class='sample'>")
        parts.append(f"<img alt='input picture' src='data:image/png;base64,{_png_base64(h.image)}'>")
        parts.append("<div>")
        if h.title:
            parts.append(f"<h2>{html.escape(h.title)}</h2>")
        parts.append(f"<div class='prompt'>{html.escape(h.prompt)}</div>")
        for name, values in h.scores.items():
            top = max((abs(v) for v in values), default=0.0) or 1.0
            hue = _HUES.get(name, _DEFAULT_HUE)
            marks = h.marks.get(name, ())
            toks = []
            for i, (tok, v) in enumerate(zip(h.tokens, values)):
                cls = "tok kept" if marks and marks[i] else "tok"
                toks.append(f"<span class='{cls}' style='background:{_rgba(hue, abs(v) / top)}' "
                            f"title='{html.escape(name)} = {v:.4f}'>{html.escape(tok)}</span>")
            parts.append(f"<div class='row'><span class='label'>{html.escape(name)}<br>max {max(values, default=0):.4f}"
                         f"</span>{''.join(toks)}</div>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def heatmap_png(heatmaps: Sequence[TokenHeatmap], path: str | os.PathLike, *, title: str = "") -> None:
    """The same heatmaps as a PNG figure (matplotlib, Agg backend): picture left, token rows right.

    Token boxes are laid out with their measured widths and wrap onto further lines; a box's
    colour intensity is the value over the row maximum; tokens in ``marks`` get a black frame.

    Args:
        heatmaps: the responses to show (one figure row each).
        path: the PNG file to write.
        title: a figure title.

    Examples:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> h = TokenHeatmap(Image.new("RGB", (8, 8)), "q?", ["a", "b"], {"connectivity": [0.1, 0.3]})
        >>> path = os.path.join(tempfile.mkdtemp(), "heat.png")
        >>> heatmap_png([h], path)
        >>> open(path, "rb").read(4)
        b'\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    heatmaps = list(heatmaps)
    n = max(1, len(heatmaps))
    width_in, dpi = 11.0, 110
    fig = plt.figure(figsize=(width_in, 2.1 * n + (0.4 if title else 0.0)), dpi=dpi)
    renderer = fig.canvas.get_renderer()
    top = 1.0 - (0.4 / (2.1 * n + 0.4) if title else 0.0)
    band = top / n
    for k, h in enumerate(heatmaps):
        y0 = top - k * band  # top of this sample's band, in figure coordinates
        ax_img = fig.add_axes((0.01, y0 - band + 0.1 * band, 0.8 * band * fig.get_figheight() / width_in, 0.8 * band))
        ax_img.imshow(h.image, interpolation="nearest")
        ax_img.set_xticks([])
        ax_img.set_yticks([])
        left = 0.03 + 0.8 * band * fig.get_figheight() / width_in
        head = f"{h.title}\n{h.prompt}" if h.title else h.prompt
        fig.text(left, y0 - 0.06 * band, head, va="top", ha="left", fontsize=9, family="monospace")
        line_h = 0.1 * band
        y = y0 - 0.36 * band
        for name, values in h.scores.items():
            peak = max((abs(v) for v in values), default=0.0) or 1.0
            base = [c / 255 for c in _HUES.get(name, _DEFAULT_HUE)]
            marks = h.marks.get(name, ())
            fig.text(left, y, f"{name}\nmax {max(values, default=0.0):.3g}", va="center", ha="left", fontsize=7,
                     color="#555")
            x = x_start = left + 0.13
            for i, (tok, v) in enumerate(zip(h.tokens, values)):
                a = abs(v) / peak
                face = tuple(1 - a * (1 - c) for c in base)
                kept = bool(marks and marks[i])
                t = fig.text(x, y, tok.strip() or "\u2423", va="center", ha="left", fontsize=8, family="monospace",
                             bbox=dict(boxstyle="round,pad=0.25", facecolor=face,
                                       edgecolor="black" if kept else "#ddd", linewidth=1.2 if kept else 0.5))
                w = t.get_window_extent(renderer).width / (width_in * dpi)
                if x + w > 0.99 and x > x_start:  # wrap: move this token to the next line
                    y -= line_h
                    x = x_start
                    t.set_position((x, y))
                x += w + 0.006
            y -= 1.6 * line_h
    if title:
        fig.suptitle(title, fontsize=11, y=0.995)
    fig.savefig(path, format="png")
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Loading a model folder and building inputs


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


def _open_image(path: str | os.PathLike) -> Any:
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"--image {str(p)!r} does not exist or is not a file.")
    try:
        with Image.open(p) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise SpecError(f"--image {str(p)!r} could not be opened as an image ({err}); pass a PNG or JPEG file.") from err


def _check_writable(path: Path, flag: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise SpecError(f"{flag} {str(path)!r} is a folder; pass a file path.")
    if not parent.is_dir():
        raise SpecError(f"{flag} {str(path)!r}: the folder {str(parent)!r} does not exist.")
    if not os.access(parent, os.W_OK):
        raise SpecError(f"{flag} {str(path)!r}: the folder {str(parent)!r} is not writable.")


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file in the same folder, then rename (no half-written file)."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_inspect(model_dir: str | os.PathLike, image: str | os.PathLike, prompt: str, response: str, *,
                out: str | os.PathLike = "inspect.html", png: bool = False,
                perturbation: Any = "constant") -> list[Path]:
    """The ``rlcredit inspect`` command: heatmaps of one response, written as HTML (and PNG).

    Args:
        model_dir: a ``save_pretrained`` folder (model + processor files).
        image: a picture file.
        prompt: the question (the image placeholder is added; a chat template is applied when the
            processor has one).
        response: the response text to score.
        out: the HTML file to write; with ``png`` the PNG goes next to it (same name, ``.png``).
        png: also write the PNG.
        perturbation: ``I'`` of the visual dependency (default ``constant``: a black picture).

    Returns:
        The paths written.

    Raises:
        rlcredit.RLCreditError: bad input (missing folder, unsupported architecture, an image that
            does not open, a response that tokenises to nothing, an unwritable output).

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from rlcredit_mm.demo import model as M, task as T
        >>> kit, folder = M.ModelKit(), Path(tempfile.mkdtemp())
        >>> M.build_model(kit.tokenizer, hidden=32).save_pretrained(folder)
        >>> _ = kit.tokenizer.save_pretrained(folder), kit.image_processor.save_pretrained(folder)
        >>> T.render(T.make_example(0)).save(folder / "picture.png")
        >>> paths = run_inspect(folder, folder / "picture.png", "what colour is the circle ?",
        ...                     "ok . the answer is red .", out=folder / "heat.html", png=True)
        >>> [p.name for p in paths]
        ['heat.html', 'heat.png']
    """
    out_path = Path(out)
    if out_path.suffix.lower() not in (".html", ".htm"):
        raise SpecError(f"--out {str(out_path)!r} must end in .html (the PNG, with --png, is written next to it).")
    _check_writable(out_path, "--out")
    if not prompt.strip():
        raise SpecError("--prompt is empty; pass the question the response answers.")
    picture = _open_image(image)
    model, proc = load_vlm(model_dir)
    built = build_inputs(model, proc, picture, prompt, response)
    policy = rlcredit.HFPolicy(model)
    scores = token_scores(policy, built.model_inputs, built.response_mask, perturbation=perturbation)
    heat = TokenHeatmap(picture, prompt, built.tokens, {k: v[0].tolist() for k, v in scores.items()},
                        title=f"{Path(model_dir).name}: {response}")
    page = heatmap_html([heat], title="rlcredit inspect",
                        intro=f"Visual dependency: exact KL between the next-token distributions with the picture and "
                              f"with the '{perturbation}' perturbation (VPPO). Connectivity: attention mass on image "
                              f"tokens, sink-debiased (AT-RL).")
    written = [out_path]
    _atomic_write(out_path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    if png:
        png_path = out_path.with_suffix(".png")
        _atomic_write(png_path, lambda tmp: heatmap_png([heat], tmp, title="rlcredit inspect"))
        written.append(png_path)
    return written


def main(args: Any) -> int:
    """Entry point of ``rlcredit inspect`` (``args`` from ``rlcredit.cli``); returns the exit code.

    0: written; 2: bad input (the message goes to stderr, nothing is written).

    Examples:
        >>> from rlcredit.cli import build_parser
        >>> main(build_parser().parse_args(["inspect", "--model", "no/such/folder", "--image", "x.png",
        ...                                 "--prompt", "q", "--response", "r"]))
        2
    """
    try:
        paths = run_inspect(args.model, args.image, args.prompt, args.response, out=args.out, png=args.png,
                            perturbation=args.perturbation)
    except RLCreditError as err:
        import sys

        print(f"rlcredit inspect: error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0
