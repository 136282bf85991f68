"""Raw images for ``VisualKL(stage="image")``: perturb the images *before* the image processor.

VPPO's released code (huaixuheqing/VPPO-RL, ``verl/workers/fsdp_workers.py`` L497-518 and
``verl/workers/perc_utils.py`` L5-18) blackens 14-px squares of each PIL image with p = 0.5 after
its own resize and before the model's image processor, which may resize again: the black squares
then straddle the ViT patches (most patches end up partly black). ``stage="pixels"`` (the default)
perturbs the processed pixels instead, squares aligned to the ViT patches. For ``stage="image"``
a trainer puts the images exactly as it handed them to the processor, and the processor, into
``rollout.model_inputs["raw_images"]``: a ``RawImages``, or the plain mapping
``{"images": [[PIL...] per row], "processor": processor}`` that the core's TRL and verl
integrations put there (the core does not import ``rlcredit_mm``); ``raw_images_of`` turns either
into a checked ``RawImages``. The adapters drop that key before any forward, so the same
``model_inputs`` serve every other estimator and the loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from rlcredit.errors import AdapterError, RolloutError, SpecError
from rlcredit_mm.adapters.base import RAW_IMAGES_KEY
from rlcredit_mm.perturb import per_image_keys, row_keys

__all__ = ["RAW_IMAGES_KEY", "RawImages", "raw_images_of", "perturb_raw_images"]


def _rows(value: Any) -> tuple[tuple[Any, ...], ...]:
    from PIL import Image

    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SpecError(f"RawImages.images must be a list with one list of PIL images per row, got {type(value).__name__}.")
    rows = []
    for b, row in enumerate(value):
        if row is None:  # a row without an image, as TRL writes it
            row = ()
        if isinstance(row, Image.Image) or isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise SpecError(
                f"RawImages.images[{b}] must be the list of that row's PIL images (an empty list or None for a row "
                f"without an image), got {type(row).__name__}."
            )
        for i, img in enumerate(row):
            if not isinstance(img, Image.Image):
                raise SpecError(f"RawImages.images[{b}][{i}] must be a PIL.Image.Image, got {type(img).__name__}.")
        rows.append(tuple(row))
    return tuple(rows)


def _processor(instance: Any, attribute: Any, value: Any) -> None:
    if not callable(getattr(value, "image_processor", value)):
        raise SpecError(
            f"RawImages.processor must be the model's image processor (callable as processor(images=[...], "
            f"return_tensors='pt')) or a processor with an .image_processor, got {type(value).__name__}."
        )


@attrs.frozen(eq=False)
class RawImages:
    """The rollout's images before the image processor, one list per row, and that processor.

    Put it in ``rollout.model_inputs["raw_images"]`` (``RAW_IMAGES_KEY``) for
    ``VisualKL(stage="image")``. ``images[b]`` are row ``b``'s images in prompt order, exactly as
    they were given to the image processor (after any resize the trainer does first: verl/EasyR1's
    ``process_image``; TRL passes the dataset's images); ``processor`` is that image processor (or
    a processor holding it as ``.image_processor``). Re-processing an unperturbed image must give
    the model inputs' pixels; the perturbed ones are processed the same way.

    Args:
        images: ``B`` lists of ``PIL.Image.Image`` (empty, or None, for a row without an image).
        processor: ``processor(images=[PIL...], return_tensors="pt")`` giving the adapter's image
            inputs (``pixel_values``, and ``image_grid_thw`` for the Qwen family).

    Examples:
        >>> from PIL import Image
        >>> from rlcredit_mm.demo.model import build_image_processor
        >>> from rlcredit_mm.images import RawImages
        >>> raw = RawImages([[Image.new("RGB", (56, 56))], []], build_image_processor())
        >>> len(raw), [len(r) for r in raw.images]
        (2, [1, 0])
    """

    images: tuple[tuple[Any, ...], ...] = attrs.field(converter=_rows)
    processor: Any = attrs.field(validator=_processor)

    def __len__(self) -> int:
        return len(self.images)


def raw_images_of(model_inputs: Mapping[str, Any] | None, batch_size: int, who: str) -> RawImages:
    """``model_inputs["raw_images"]`` as a checked ``RawImages`` with ``batch_size`` rows.

    The value is a ``RawImages`` or the plain mapping ``{"images": ..., "processor": ...}`` (what
    ``CreditGRPOTrainer`` and verl's ``apply_credit`` put there), converted here with
    ``RawImages``' own checks; anything else raises.

    Args:
        model_inputs: the rollout's model inputs (or None).
        batch_size: ``B``, the rows the images must cover.
        who: the caller, named in error messages.

    Returns:
        The ``RawImages``.

    Raises:
        RolloutError: the key is missing or holds something else, a mapping with other keys or bad
            content, or not ``B`` rows.

    Examples:
        >>> from PIL import Image
        >>> from rlcredit_mm.demo.model import build_image_processor
        >>> from rlcredit_mm.images import raw_images_of
        >>> raw = {"images": [[Image.new("RGB", (56, 56))], None], "processor": build_image_processor()}
        >>> [len(r) for r in raw_images_of({"raw_images": raw}, 2, "doc").images]
        [1, 0]
    """
    raw = None if model_inputs is None else model_inputs.get(RAW_IMAGES_KEY)
    where = f"rollout.model_inputs[{RAW_IMAGES_KEY!r}]"
    if isinstance(raw, Mapping):
        if set(raw) != {"images", "processor"}:
            raise RolloutError(
                f"{who}: {where} as a mapping must have exactly the keys 'images' (one list of PIL images per row) "
                f"and 'processor' (the image processor they were given to), got {sorted(map(str, raw))}."
            )
        try:
            raw = RawImages(raw["images"], raw["processor"])
        except SpecError as err:
            raise RolloutError(f"{who}: {where}: {err} Give the images exactly as the processor got them (PIL "
                               f"images after any resize the trainer does, e.g. verl/EasyR1's process_image).") from err
    if not isinstance(raw, RawImages):
        raise RolloutError(
            f"{who} perturbs the images before the image processor, so {where} must be a "
            f"rlcredit_mm.images.RawImages or a mapping {{'images': [[PIL.Image, ...] per row], 'processor': "
            f"processor}} (each row's images as given to the processor, and the processor), got "
            f"{type(raw).__name__}. CreditGRPOTrainer adds it; with verl, pass apply_credit(..., processor=...) and "
            f"the images; else use stage='pixels' to perturb the processed pixels."
        )
    if len(raw) != batch_size:
        raise RolloutError(f"{who}: {where} holds {len(raw)} rows, not B = {batch_size}.")
    return raw


def perturb_raw_images(inputs: Mapping[str, Any], raw: RawImages, rows: slice, perturbation: Any,
                       adapter: Any) -> dict[str, Any]:
    """The model inputs of rows ``rows`` with their images perturbed as PIL images, then re-processed.

    Image ``i`` of row ``b`` becomes ``perturbation.apply_pil(image, seed=k)`` with
    ``k = per_image_keys(row_keys(input_ids, attention_mask, perturbation.seed), i)[b]`` (the row's
    token-id hash: reproducible however rows are batched, fresh for every rollout); the chunk's
    perturbed images go through ``raw.processor`` in one call, and its outputs replace the
    adapter's image inputs, which must keep their shapes (and grids).

    Args:
        inputs: one row chunk's prepared model inputs (``input_ids [b, L]``, image inputs...).
        raw: the whole batch's raw images; ``raw.images[rows]`` belong to this chunk.
        rows: the chunk's rows in the batch.
        perturbation: an object with ``apply_pil(image, seed=...)`` (e.g. ``PatchBlackout``).
        adapter: the model's adapter (its ``image_keys`` name the inputs that are replaced).

    Returns:
        A new dict of model inputs.
    """
    if not getattr(adapter, "supports_raw_images", False):
        raise AdapterError(
            f"{type(adapter).__name__}: stage='image' needs a processor that lays each image out on its own, "
            f"which this architecture's does not (it tiles and pads images per row); use stage='pixels'."
        )
    images = raw.images[rows]
    counts = torch.tensor([len(r) for r in images], dtype=torch.long)
    present = [k for k in adapter.image_keys if inputs.get(k) is not None]
    if int(counts.sum()) == 0:
        if present:
            raise RolloutError(f"raw_images: rows {rows.start}-{rows.stop - 1} hold no raw image but their model inputs "
                               f"hold {', '.join(present)}; give each row's images in RawImages.images.")
        return dict(inputs)
    ids = inputs["input_ids"]
    keys = row_keys(ids.cpu(), None if inputs.get("attention_mask") is None else inputs["attention_mask"].cpu(),
                    int(getattr(perturbation, "seed", 0)))
    owner = torch.repeat_interleave(torch.arange(len(images)), counts)
    index = torch.arange(len(owner)) - (torch.cumsum(counts, 0) - counts)[owner]
    seeds = per_image_keys(keys[owner], index).tolist()
    flat = [img for row in images for img in row]
    perturbed = [perturbation.apply_pil(img, seed=s) for img, s in zip(flat, seeds)]
    processor = getattr(raw.processor, "image_processor", raw.processor)
    processed = processor(images=perturbed, return_tensors="pt")
    out = dict(inputs)
    replaced = []
    for key in adapter.image_keys:
        new = processed.get(key)
        if new is None:
            continue
        old = inputs.get(key)
        if old is None or tuple(new.shape) != tuple(old.shape) or (not old.is_floating_point()
                                                                  and not torch.equal(new.to(old.device), old)):
            raise AdapterError(
                f"raw_images: the processor's {key!r} for rows {rows.start}-{rows.stop - 1} "
                f"({None if new is None else list(new.shape)}) does not match the model inputs' "
                f"({None if old is None else list(old.shape)}); RawImages must hold the images exactly as they were "
                f"given to this processor (same sizes, same settings)."
            )
        out[key] = new.to(device=old.device, dtype=old.dtype)
        replaced.append(key)
    if adapter.pixel_key not in replaced:
        raise AdapterError(f"raw_images: the processor returned no {adapter.pixel_key!r} (got {', '.join(processed)}).")
    return out
