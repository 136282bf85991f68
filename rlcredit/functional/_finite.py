"""Overflow-safe arithmetic: exact power-of-two scaling, and saturation where an exact value cannot fit.

rlcredit computes in float32 and promises that no NaN or inf leaves the library for finite inputs
(docs/troubleshooting.md, "Magnitude limits"). Two tools keep that promise without changing any
number that fits:

- scaling by a power of two (``pow2_scale``, ``length_scale``): dividing by ``2**k`` is exact and
  commutes with every rounding (away from the subnormals), so a sum, a square or a quotient of
  scaled values, scaled back, is the unscaled result to the last bit, while the intermediate
  values can no longer overflow;
- saturation (``saturate``, ``finite_loss``): where the exact result itself lies beyond the
  dtype's range, the largest finite value with the right sign, never inf.
"""

from __future__ import annotations

import torch

__all__: list[str] = []


def pow2_scale(top: torch.Tensor) -> torch.Tensor:
    """A power of two ``2**(e-1)`` for ``top = m * 2**e`` (``0.5 <= m < 1``): ``top / scale`` is in ``[1, 2)``.

    Dividing by a power of two is exact and commutes with every rounding (away from the
    subnormals), so a statistic computed on ``x / scale`` and multiplied back by ``scale`` is
    the statistic of ``x`` to the last bit, while squares and sums of ``x / scale`` cannot
    overflow. ``top = 0`` gives 0.5. ``top`` is a float32 tensor of magnitudes (any shape).

    Examples:
        >>> import torch
        >>> from rlcredit.functional._finite import pow2_scale
        >>> x = torch.tensor([3e38, -1e38])
        >>> scale = pow2_scale(x.abs().max())
        >>> x.square().sum(), (x / scale).square().sum().sqrt() * scale  # the norm, without overflow
        (tensor(inf), tensor(3.1623e+38))
    """
    _, exponent = torch.frexp(top)
    return torch.ldexp(torch.ones_like(top), exponent - 1)


def length_scale(T: int) -> float:
    """The smallest power of two ``P >= T``: a sum of ``T`` finite float32 terms divided by ``P`` cannot overflow.

    Known on the host (no pass over the data); dividing by it is exact, so ``sum(x / P) * P`` is
    ``sum(x)`` to the last bit wherever that is finite (away from subnormal terms).
    """
    return float(2 ** max(T - 1, 0).bit_length())


def finite_sum(x: torch.Tensor, divisor: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``x.sum() / divisor`` of finite float32 ``x`` without overflow in the sum.

    Equal to ``x.sum() / divisor`` to the last bit wherever that does not overflow (see
    ``pow2_scale``); finite for finite ``x`` and ``divisor >= 1``. For metrics over ``[B, T]``
    values (advantages, weights, scores) that may reach float32's range.
    """
    if x.numel() == 0:
        return x.sum() / divisor
    scale = pow2_scale(torch.linalg.vector_norm(x, float("inf")))
    return (x / scale).sum() / divisor * scale


def saturate(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` cast to ``dtype``, with values beyond its finite range set to its largest finite value.

    The one rule for what a loss hands back when the exact value does not fit: a float32
    gradient of 8e4 for a float16 log-prob becomes 65504 (float16's largest), never ``inf``, and a
    loss beyond float32's range becomes +-3.4e38. NaN stays NaN (it can only come from a NaN input).

    Examples:
        >>> import torch
        >>> from rlcredit.functional._finite import saturate
        >>> saturate(torch.tensor([1e5, -2.0, float("-inf")]), torch.float16).tolist()
        [65504.0, -2.0, -65504.0]
    """
    top = min(torch.finfo(dtype).max, torch.finfo(x.dtype).max)
    return x.clamp(-top, top).to(dtype)


class _FiniteValue(torch.autograd.Function):
    """A scalar loss saturated to float32's range in value; its gradient passes unchanged."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return saturate(x, torch.float32)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


def finite_loss(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` (float32) with a value beyond float32's range set to +-3.4e38 (``saturate``).

    The gradient is left as it is: a loss whose exact value does not fit float32 still trains
    (through gradients that ``float32_logprobs`` keeps finite) instead of becoming ``inf``.
    """
    return _FiniteValue.apply(loss)
