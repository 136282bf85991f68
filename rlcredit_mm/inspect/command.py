"""``rlcredit inspect``: score one response and write its heatmaps (HTML, and PNG with ``--png``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import rlcredit
from rlcredit.errors import SpecError
from rlcredit_mm._files import write_atomic
from rlcredit_mm.inspect.inputs import build_inputs, load_vlm
from rlcredit_mm.inspect.render import TokenHeatmap, heatmap_html, heatmap_png
from rlcredit_mm.inspect.scores import token_scores

__all__ = ["run_inspect"]


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
                        title=Path(model_dir).name, response=response)
    page = heatmap_html([heat], title="rlcredit inspect",
                        intro=f"Visual dependency: exact KL between the next-token distributions with the picture and "
                              f"with the '{perturbation}' perturbation (VPPO). Connectivity: attention mass on image "
                              f"tokens, sink-debiased (AT-RL).")
    written = [out_path]
    write_atomic(out_path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    if png:
        png_path = out_path.with_suffix(".png")
        write_atomic(png_path, lambda tmp: heatmap_png([heat], tmp, title="rlcredit inspect"))
        written.append(png_path)
    return written
