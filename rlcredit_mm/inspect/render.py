"""Token heatmaps as a self-contained HTML page or a PNG figure (matplotlib, Agg backend)."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from rlcredit.errors import RolloutError

__all__ = ["TokenHeatmap", "heatmap_html", "heatmap_png"]

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
        response: the response text, shown under the prompt ("" shows the prompt line only).

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
    response: str = ""

    def __attrs_post_init__(self) -> None:
        for name, values in {**self.scores, **self.marks}.items():
            if len(values) != len(self.tokens):
                raise RolloutError(f"TokenHeatmap: {name!r} has {len(values)} values for {len(self.tokens)} tokens.")

    def header(self) -> list[str]:
        """The lines above the token rows, in reading order: the prompt, then the response (if given)."""
        if not self.response:
            return [self.prompt]
        return [f"prompt: {self.prompt}", f"response: {self.response}"]


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
    the full scale); the exact value is in the tooltip. Tokens in ``marks`` are underlined (the
    legend mentions underlining only when some heatmap has marks).

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
    underline = "underlined: kept by the strategy; " if any(h.marks for h in heatmaps) else ""
    parts.append(f"<div class='legend'>0 {legend} (row maximum); {underline}hover a token for its value.</div>")
    for h in heatmaps:
        parts.append("<div class='sample'>")
        parts.append(f"<img alt='input picture' src='data:image/png;base64,{_png_base64(h.image)}'>")
        parts.append("<div>")
        if h.title:
            parts.append(f"<h2>{html.escape(h.title)}</h2>")
        parts += [f"<div class='prompt'>{html.escape(line)}</div>" for line in h.header()]
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
        head = "\n".join(([h.title] if h.title else []) + h.header())
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
