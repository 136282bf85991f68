"""Image perturbations ``I -> I'`` for visual-dependency estimates (VPPO, PAPO), seeded per sample.

A perturbation is a frozen, registered (kind ``"perturbation"``) object with two entry points:

- ``perturbation(inputs, model, *, adapter=None) -> inputs``: on a batch of model inputs, in the
  processor's normalised pixel space (no image processor re-run). The model's adapter
  (``rlcredit_mm.adapters``) presents every image as ``[C, H, W]`` whatever the architecture's
  layout (Qwen's flattened patches are unflattened and re-flattened), so each perturbation is
  written once. Only the pixels change (``drop`` also masks the image tokens).
- ``perturbation.apply_pil(image, seed=0) -> image``: on a PIL image before processing, in
  ``[0, 1]`` intensities (black is 0), as VPPO's released code does; ``VisualKL(stage="image")``
  applies it to each raw image and re-runs the image processor (``rlcredit_mm.images``).

Random perturbations draw from a counter-based generator (splitmix64 on int64 tensors): every
number is a pure function of ``(seed, hash of the row's attended token ids, image index, pixel
index)``. The mask of a row is thus reproducible, fresh for every rollout (responses differ),
independent of how rows are batched, chunked or padded, identical on CPU and GPU, and needs no
host sync and no hidden state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor

from rlcredit.validators import in_range, to_number
from rlcredit.errors import SpecError
from rlcredit.registry import register
from rlcredit_mm.adapters import adapter_for, config_of

__all__ = ["Perturbation", "PatchBlackout", "GaussianNoise", "Constant", "Blur", "Drop",
           "row_keys", "per_image_keys", "uniform", "normal", "PIL_PATCH_SIZE"]

PIL_PATCH_SIZE = 14
"""Square size of ``patch_blackout`` on PIL images when ``patch_size`` is None (VPPO's 14 px)."""


@runtime_checkable
class Perturbation(Protocol):
    """An image perturbation ``I -> I'`` (registered kind ``"perturbation"``).

    Call:
        ``(inputs, model, *, adapter=None) -> inputs``: a new dict of model inputs whose images
        are perturbed (``model`` may be the config); ``adapter`` defaults to the model's.
    Method:
        ``apply_pil(image, seed=0) -> image`` on a PIL image in ``[0, 1]`` intensities.
    """

    def __call__(self, inputs: Mapping[str, Any], model: Any, *, adapter: Any = None) -> dict[str, Any]: ...

    def apply_pil(self, image: Any, seed: int = 0) -> Any: ...


# ----------------------------------------------------------------------------------- random keys


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_C1 = _i64(0xBF58476D1CE4E5B9)
_C2 = _i64(0x94D049BB133111EB)


def _lsr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64's finaliser on int64 tensors (multiplication wraps modulo 2^64)."""
    x = x ^ _lsr(x, 30)
    x = x * _C1
    x = x ^ _lsr(x, 27)
    x = x * _C2
    return x ^ _lsr(x, 31)


def _seed_key(seed: int, device: torch.device | str | None = None) -> Tensor:
    return _mix(torch.tensor(_i64(seed * 0x2545F4914F6CDD1D + 0x1F), dtype=torch.long, device=device))


def row_keys(input_ids: Tensor, attention_mask: Tensor | None = None, seed: int = 0) -> Tensor:
    """One int64 random key per row from ``(seed, hash of the row's attended token ids)``.

    ``key_b = mix(sum_j mix((j << 32) + id_j XOR s) + n_b * golden)`` over the attended tokens
    ``j = 0..n_b-1`` of row ``b`` (positions counted among attended tokens, so left or right
    padding and batching do not change a row's key), ``s = mix(seed)``.

    Args:
        input_ids: ``[B, L]`` token ids.
        attention_mask: ``[B, L]`` (1 = attended), or None for all attended.
        seed: the perturbation's seed.

    Returns:
        ``[B]`` int64 keys.

    Examples:
        >>> import torch
        >>> from rlcredit_mm.perturb import row_keys
        >>> ids = torch.tensor([[0, 5, 6, 7], [5, 6, 7, 0]])
        >>> keys = row_keys(ids, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 0]]))
        >>> bool(keys[0] == keys[1]), bool(row_keys(ids, seed=1)[0] != row_keys(ids, seed=0)[0])
        (True, True)
    """
    ids = input_ids.long()
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    pos = torch.cumsum(valid.long(), -1) - 1
    s = _seed_key(seed, ids.device)
    tok = _mix(((pos << 32) + ids) ^ s)
    total = torch.where(valid, tok, torch.zeros((), dtype=torch.long, device=ids.device)).sum(-1)
    return _mix(total + valid.sum(-1) * _GOLDEN)


def per_image_keys(row_key: Tensor, index: Tensor) -> Tensor:
    """Per-image keys ``[N]`` from the owning rows' keys ``[N]`` and within-row image indices ``[N]``.

    ``key = mix(row_key XOR mix((index + 1) * golden))``: the images of one row get independent draws.

    Examples:
        >>> import torch
        >>> from rlcredit_mm.perturb import per_image_keys
        >>> k = per_image_keys(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]))
        >>> len(set(k.tolist()))
        3
    """
    return _mix(row_key ^ _mix((index.long() + 1) * _GOLDEN))


def _bits(keys: Tensor, n: int, stream: int = 0) -> Tensor:
    """``[N, n]`` int64 random words: ``mix(key + (stream * n + i + 1) * golden)``."""
    counter = (torch.arange(n, device=keys.device, dtype=torch.long) + stream * n + 1) * _GOLDEN
    return _mix(keys[:, None] + counter[None, :])


def uniform(keys: Tensor, n: int, stream: int = 0) -> Tensor:
    """``[N, n]`` float32 uniforms in ``[0, 1)`` (24-bit), a pure function of ``keys [N]``.

    Examples:
        >>> import torch
        >>> from rlcredit_mm.perturb import uniform
        >>> u = uniform(torch.tensor([1, 2]), 1000)
        >>> bool((u >= 0).all() and (u < 1).all()), round(float(u.mean()), 1)
        (True, 0.5)
    """
    return _lsr(_bits(keys, n, stream), 40).float() * 2.0**-24


def normal(keys: Tensor, n: int) -> Tensor:
    """``[N, n]`` float32 standard normals from ``keys [N]``: Box-Muller on two counter streams.

    ``z = sqrt(-2 log u1) cos(2 pi u2)`` with ``u1`` in ``(0, 1]`` (so the log is finite) and ``u2``
    in ``[0, 1)``, 24-bit uniforms.

    Examples:
        >>> import torch
        >>> from rlcredit_mm.perturb import normal
        >>> z = normal(torch.tensor([3]), 20000)
        >>> round(float(z.mean()), 1), round(float(z.std()), 1)
        (0.0, 1.0)
    """
    u1 = (_lsr(_bits(keys, n, 0), 40).float() + 1.0) * 2.0**-24  # (0, 1]: log stays finite
    u2 = uniform(keys, n, 1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)


# ------------------------------------------------------------------------------------- validators


def _int_field(lo: int | None = None, *, optional: bool = False):
    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if optional and value is None:
            return
        if not isinstance(value, int) or isinstance(value, bool) or (lo is not None and value < lo):
            want = "an integer" + (f" >= {lo}" if lo is not None else "") + (" or None" if optional else "")
            raise SpecError(f"{type(instance).__name__}.{attribute.name} must be {want}, got {value!r}.")

    return validate


def _optional_float(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)):
        raise SpecError(f"{type(instance).__name__}.{attribute.name} must be a finite number or None, got {value!r}.")


# ------------------------------------------------------------------------------ pixel perturbations


class _PixelPerturbation:
    """Shared plumbing: ``perturb_images`` is the only method a pixel perturbation writes."""

    seed: int = 0

    def perturb_images(self, images: Tensor, keys: Tensor, *, black: Tensor, patch_size: int) -> Tensor:
        """``images [N, C, H, W]`` float32 -> perturbed ``[N, C, H, W]``; ``keys [N]`` int64, ``black [C]``."""
        raise NotImplementedError

    def __call__(self, inputs: Mapping[str, Any], model: Any, *, adapter: Any = None) -> dict[str, Any]:
        config = config_of(model)
        adapter = adapter_for(config) if adapter is None else adapter
        ids = inputs["input_ids"]
        keys = row_keys(ids, inputs.get("attention_mask"), self.seed)
        black = adapter.black(config).to(ids.device)
        patch = getattr(self, "patch_size", None) or adapter.patch_size(config)

        def fn(images: Tensor, rows: Tensor, index: Tensor) -> Tensor:
            k = per_image_keys(keys.to(images.device)[rows], index)
            return self.perturb_images(images.float(), k, black=black.to(images.device), patch_size=patch)

        return adapter.map_images(inputs, config, fn)

    def apply_pil(self, image: Any, seed: int = 0) -> Any:
        """The perturbation of a PIL image in ``[0, 1]`` intensities (black = 0), before processing.

        Args:
            image: a ``PIL.Image.Image`` (``L`` and ``RGB`` kept; other modes converted to ``RGB``).
            seed: a per-image seed (e.g. the rollout's index), combined with the object's ``seed``.

        Returns:
            A new PIL image of the same size.
        """
        import numpy as np
        from PIL import Image

        img = image if image.mode in ("L", "RGB") else image.convert("RGB")
        arr = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 255.0
        x = arr[None] if arr.ndim == 2 else arr.permute(2, 0, 1)
        key = _mix(_seed_key(self.seed) ^ _seed_key(seed))[None]
        patch = getattr(self, "patch_size", None) or PIL_PATCH_SIZE
        out = self.perturb_images(x[None], key, black=torch.zeros(x.shape[0]), patch_size=patch)[0]
        out = (out.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
        data = out[0].numpy() if img.mode == "L" else out.permute(1, 2, 0).contiguous().numpy()
        return Image.fromarray(data, mode=img.mode)


def _cells(H: int, W: int, patch: int) -> tuple[int, int]:
    return -(-H // patch), -(-W // patch)


@register("perturbation", "patch_blackout")
@attrs.frozen
class PatchBlackout(_PixelPerturbation):
    """Blacken every ``patch_size``-square of the image independently with probability ``p``.

    VPPO (Huang et al. 2025, arXiv 2510.09285, released code): every 14x14 pixel square is set to
    black with p = 0.5, a fresh mask per rollout (PAPO, arXiv 2507.06448, uses p = 0.6). Squares
    are aligned to the model's patch grid (its adapter's ``patch_size``: 14 for Qwen2/2.5-VL, 16
    for Qwen3-VL); a partial square at the right/bottom edge is one square. Black is the
    processor's ``(0 - mean) / std``. On PIL images (``apply_pil``, ``VisualKL(stage="image")``)
    the squares are 14 px from the top-left corner, as in the released code, whatever the model.

    ``I'[c, y, x] = black[c] if u[key, (y // s) * ceil(W / s) + x // s] < p else I[c, y, x]``

    Args:
        p: probability that a square is blackened, in ``[0, 1]``.
        patch_size: square side in pixels; None: the model's patch size (14 on PIL images).
        seed: base seed (combined with each row's token-id hash).

    Examples:
        >>> import torch
        >>> from rlcredit_mm.perturb import PatchBlackout
        >>> images, keys = torch.ones(1, 1, 4, 4), torch.tensor([7])
        >>> PatchBlackout(p=1.0).perturb_images(images, keys, black=torch.tensor([-1.0]), patch_size=2)[0, 0, 0]
        tensor([-1., -1., -1., -1.])
        >>> out = PatchBlackout().perturb_images(images, keys, black=torch.tensor([-1.0]), patch_size=2)
        >>> sorted(set(out[0, 0].unfold(0, 2, 2).unfold(1, 2, 2).reshape(4, 4).std(-1).tolist()))  # whole squares
        [0.0]
    """

    p: float = attrs.field(default=0.5, converter=to_number, validator=in_range(0.0, 1.0))
    patch_size: int | None = attrs.field(default=None, converter=to_number, validator=_int_field(1, optional=True))
    seed: int = attrs.field(default=0, converter=to_number, validator=_int_field())

    def perturb_images(self, images: Tensor, keys: Tensor, *, black: Tensor, patch_size: int) -> Tensor:
        N, C, H, W = images.shape
        gh, gw = _cells(H, W, patch_size)
        hit = (uniform(keys, gh * gw) < self.p).view(N, gh, gw)
        hit = hit.repeat_interleave(patch_size, 1)[:, :H].repeat_interleave(patch_size, 2)[:, :, :W]
        return torch.where(hit[:, None], black.view(1, -1, 1, 1).to(images), images)


@register("perturbation", "gaussian_noise")
@attrs.frozen
class GaussianNoise(_PixelPerturbation):
    """Add i.i.d. Gaussian noise to every pixel: ``I' = I + std * z``, ``z ~ N(0, 1)``.

    On model inputs ``std`` is in the processor's normalised units (1.0 = one dataset standard
    deviation); on PIL images in ``[0, 1]`` intensities (the result is clipped to ``[0, 1]``).

    Args:
        std: noise standard deviation (>= 0).
        seed: base seed (combined with each row's token-id hash).

    Examples:
        >>> import torch
        >>> from rlcredit_mm.perturb import GaussianNoise
        >>> x = torch.zeros(2, 3, 8, 8)
        >>> out = GaussianNoise(std=0.5).perturb_images(x, torch.tensor([1, 2]), black=torch.zeros(3), patch_size=1)
        >>> round(float(out.std()), 1), bool((out[0] != out[1]).any())
        (0.5, True)
    """

    std: float = attrs.field(default=0.5, converter=to_number, validator=in_range(0.0))
    seed: int = attrs.field(default=0, converter=to_number, validator=_int_field())

    def perturb_images(self, images: Tensor, keys: Tensor, *, black: Tensor, patch_size: int) -> Tensor:
        noise = normal(keys, images[0].numel()).view(images.shape)
        return images + self.std * noise.to(images)


@register("perturbation", "constant")
@attrs.frozen
class Constant(_PixelPerturbation):
    """Replace the image by a constant: ``I'[c, y, x] = value`` (default: black).

    Args:
        value: on model inputs, a value in the processor's normalised space (``0.0`` is the
            dataset-mean image; None: black, ``(0 - mean) / std`` per channel); on PIL images an
            intensity in ``[0, 1]`` (None: black, 0).

    Examples:
        >>> import torch
        >>> from rlcredit_mm.perturb import Constant
        >>> Constant().perturb_images(torch.ones(1, 2, 1, 1), torch.tensor([0]), black=torch.tensor([-1.0, -2.0]), patch_size=1).flatten()
        tensor([-1., -2.])
    """

    value: float | None = attrs.field(default=None, converter=to_number, validator=_optional_float)

    def perturb_images(self, images: Tensor, keys: Tensor, *, black: Tensor, patch_size: int) -> Tensor:
        fill = black.view(1, -1, 1, 1).to(images) if self.value is None else torch.tensor(float(self.value)).to(images)
        return torch.zeros_like(images) + fill


@register("perturbation", "blur")
@attrs.frozen
class Blur(_PixelPerturbation):
    """Gaussian blur of every channel: ``I' = G_sigma * I`` (separable kernel, replicate padding).

    Args:
        sigma: kernel standard deviation in pixels (> 0).
        kernel_size: odd kernel width; None: ``2 * ceil(3 * sigma) + 1``.

    Examples:
        >>> import torch
        >>> from rlcredit_mm.perturb import Blur
        >>> x = torch.zeros(1, 1, 9, 9); x[0, 0, 4, 4] = 1.0  # a point spreads, its mass stays
        >>> out = Blur(sigma=1.0).perturb_images(x, torch.tensor([0]), black=torch.zeros(1), patch_size=1)
        >>> round(float(out.sum()), 4), bool(out[0, 0, 4, 4] < 1)
        (1.0, True)
    """

    sigma: float = attrs.field(default=2.0, converter=to_number, validator=in_range(0.0, lo_open=True))
    kernel_size: int | None = attrs.field(default=None, converter=to_number, validator=_int_field(1, optional=True))

    def __attrs_post_init__(self) -> None:
        if self.kernel_size is not None and self.kernel_size % 2 == 0:
            raise SpecError(f"Blur.kernel_size must be odd (the kernel is centred), got {self.kernel_size}.")

    def perturb_images(self, images: Tensor, keys: Tensor, *, black: Tensor, patch_size: int) -> Tensor:
        N, C, H, W = images.shape
        k = self.kernel_size or 2 * math.ceil(3 * self.sigma) + 1
        r = k // 2
        x = torch.arange(k, dtype=torch.float32, device=images.device) - r
        g = torch.exp(-0.5 * (x / self.sigma) ** 2)
        g = (g / g.sum()).to(images.dtype)
        flat = images.reshape(N * C, 1, H, W)
        # Replicate padding: reflect needs the pad smaller than the image, which tiny tiles break.
        flat = F.conv2d(F.pad(flat, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, k))
        flat = F.conv2d(F.pad(flat, (0, 0, r, r), mode="replicate"), g.view(1, 1, k, 1))
        return flat.reshape(N, C, H, W)


@register("perturbation", "drop")
@attrs.frozen
class Drop:
    """The same prompt without its image (the "no image" control): ``I' = none``.

    The image placeholder tokens (and the markers right next to them: Qwen's vision start/end,
    Gemma3's begin/end of image) are removed from each row and the rows left-padded again, so
    the response stays in the last ``T`` columns and the forward equals that of the prompt
    written without the image (RoPE depends on relative positions only); the image inputs are
    removed. Supported by every built-in adapter (Qwen2-VL, Qwen2.5-VL, LLaVA, Gemma3,
    Idefics3/SmolVLM); textual markers that the adapter does not know (Idefics3's
    ``<fake_token_around_image>``, row/column tags) stay in the prompt. There is no PIL form:
    build the prompt without the image instead.

    Examples:
        >>> import torch
        >>> from transformers import LlavaConfig
        >>> from rlcredit_mm.perturb import Drop
        >>> cfg = LlavaConfig(image_token_index=9)
        >>> out = Drop()({"input_ids": torch.tensor([[3, 9, 9, 4, 5]]), "pixel_values": torch.zeros(1, 3, 28, 28)}, cfg)
        >>> out["input_ids"].tolist(), out["attention_mask"].tolist(), "pixel_values" in out
        ([[3, 4, 5]], [[1, 1, 1]], False)
    """

    def __call__(self, inputs: Mapping[str, Any], model: Any, *, adapter: Any = None) -> dict[str, Any]:
        config = config_of(model)
        adapter = adapter_for(config) if adapter is None else adapter
        return adapter.drop_images(inputs, config)

    def apply_pil(self, image: Any, seed: int = 0) -> Any:
        raise SpecError(
            "drop removes the image from the model inputs; it has no PIL form. Build the prompt without the "
            "image, or apply Drop() to the processed model inputs."
        )
