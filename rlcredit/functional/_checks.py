"""Entry checks shared by the functional kernels.

Every public kernel validates its tensors on entry (shape, dtype, device: all free, no host sync)
and its hyper-parameters, so that a mistake surfaces as one clear ``RolloutError`` or
``RLCreditError`` naming the argument, what was expected, what was given and how to fix it,
instead of a broadcasting accident or an index error deep inside a scatter.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from rlcredit.errors import RLCreditError, RolloutError

__all__: list[str] = []


def _shape(x: torch.Tensor) -> str:
    return "[" + ", ".join(str(d) for d in x.shape) + "]"


def _dims(letters: str, sizes: Sequence[int | None]) -> str:
    parts = []
    for letter, size in zip(letters, sizes):
        parts.append(letter if size is None else f"{letter}={size}")
    return "[" + ", ".join(parts) + "]"


def storage_problem(x: torch.Tensor, *, meta_ok: bool = False) -> str | None:
    """Why a tensor cannot be computed on (a sparse or other non-strided layout, the meta device), or None.

    The one rule for the tensors rlcredit reads: dense (strided), which the kernels need (sparse
    tensors lack most of their ops). The data containers (``Rollout``, ``Credit``) and the losses
    also need values: a meta tensor has none, so every value check would pass vacuously. The
    functional kernels accept meta tensors (``meta_ok``), which give meta results, as torch's own
    functions do for shape inference.
    """
    if x.layout != torch.strided:
        return f"is a {str(x.layout).removeprefix('torch.')} tensor; pass a dense one (`.to_dense()`)"
    if x.device.type == "meta" and not meta_ok:
        return "is on the meta device (a shape without data); pass a tensor that holds values"
    return None


def check_tensor(fn: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise RolloutError(
            f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}; "
            f"wrap it with torch.as_tensor(...)."
        )
    problem = storage_problem(x, meta_ok=True)
    if problem is not None:
        raise RolloutError(f"{fn}: `{name}` {problem}.")
    return x


def check_shape(
    fn: str, name: str, x: object, letters: str, sizes: Sequence[int | None]
) -> torch.Tensor:
    """``x`` has ``len(letters)`` dims; a non-None entry of ``sizes`` fixes that dim."""
    x = check_tensor(fn, name, x)
    if x.dim() != len(letters) or any(
        s is not None and d != s for d, s in zip(x.shape, sizes)
    ):
        expected = _dims(letters, sizes)
        raise RolloutError(
            f"{fn}: `{name}` must have shape {expected}, got shape {_shape(x)}; "
            f"reshape or index it to {expected}."
        )
    return x


def check_same_shape(fn: str, name: str, x: object, ref_name: str, ref: torch.Tensor) -> torch.Tensor:
    x = check_tensor(fn, name, x)
    if x.shape != ref.shape:
        raise RolloutError(
            f"{fn}: `{name}` must have the shape of `{ref_name}` {_shape(ref)}, "
            f"got shape {_shape(x)}; both must describe the same positions."
        )
    return x


def check_float(fn: str, name: str, x: torch.Tensor) -> torch.Tensor:
    if not x.is_floating_point():
        raise RolloutError(
            f"{fn}: `{name}` must be a floating-point tensor (float32, bfloat16, float16 or "
            f"float64), got dtype {x.dtype}; convert it with `.float()`."
        )
    return x


def check_int(fn: str, name: str, x: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise RolloutError(
            f"{fn}: `{name}` must be an integer tensor (int64), got dtype {x.dtype}; "
            f"convert it with `.long()`."
        )
    return x


def check_bool(fn: str, name: str, x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.bool:
        raise RolloutError(
            f"{fn}: `{name}` must be a bool tensor, got dtype {x.dtype}; "
            f"convert it with `.bool()` (True marks a valid position)."
        )
    return x


def check_device(fn: str, named: Sequence[tuple[str, torch.Tensor | None]]) -> None:
    present = [(n, t) for n, t in named if t is not None]
    if not present:
        return
    name0, t0 = present[0]
    for name, t in present[1:]:
        if t.device != t0.device:
            raise RolloutError(
                f"{fn}: `{name}` is on {t.device} but `{name0}` is on {t0.device}; "
                f"move them to one device with `.to({str(t0.device)!r})`."
            )


#: The largest finite float32: every real hyper-parameter must fit in it (the maths is float32).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

#: The largest int64: integer hyper-parameters end up in int64 tensors or seeds.
INT64_MAX = 2**63 - 1

#: The largest token weight. Weights are relative importances (0/1 masks, soft weights up to the
#: response length, anchors 1.5); below 1e20 a weight times a ratio of e^20, the world size and a
#: batch of tokens stays far inside float32, so the loss and its gradient need no clamping there.
TOKEN_WEIGHT_MAX = 1e20


def check_weights(where: str, w: torch.Tensor, error: type[Exception] = RolloutError) -> None:
    """The one rule for token weights: ``0 <= w <= 1e20`` (NaN and inf fail), via ``ensure``.

    One ``aminmax`` pass. Callers pass the entries that count (``Credit``: all; ``aggregate``:
    the valid tokens, padding zeroed).
    """
    if w.numel() == 0:
        return
    low, high = torch.aminmax(w.detach())  # NaN propagates: both tests fail

    def message() -> str:
        counts = {"negative": int((w < 0).sum()), f"above {TOKEN_WEIGHT_MAX:g}": int((w > TOKEN_WEIGHT_MAX).sum()),
                  "NaN": int(w.isnan().sum())}
        found = " and ".join(f"{n} {what} value(s)" for what, n in counts.items() if n)
        return (f"{where} holds {found}; token weights lie in [0, {TOKEN_WEIGHT_MAX:g}] (they fold into the loss "
                f"as w * l, exact only for w >= 0). Put signs in the advantages; rescale relative weights.")

    ensure((low >= 0) & (high <= TOKEN_WEIGHT_MAX), message, error)


def real_problem(
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> str | None:
    """Why ``value`` is not a finite real number in the interval, or None when it is.

    The one rule for real hyper-parameters, shared by the kernels (``check_real``) and the
    components' attrs validators (``rlcredit.validators.in_range``): a ``numbers.Real`` that is
    not a bool (NumPy scalars included), finite and within float32's range (``|x| <= 3.4e38``:
    the maths is float32, so ``1e308`` would turn into ``inf`` there), within the (half-)open or
    closed interval.
    """
    lo = "-inf" if low is None else repr(low)
    hi = "inf" if high is None else repr(high)
    interval = ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (")" if high_open or high is None else "]")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return f"must be a number in {interval}, got {value!r} ({type(value).__name__})"
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond any float
        as_float = math.inf
    if math.isnan(as_float) or (math.isinf(as_float) and not isinstance(value, numbers.Integral)):
        return f"must be a finite number in {interval}, got {value!r}"
    if abs(as_float) > FLOAT32_MAX:
        return (f"must be a number in {interval} within float32's range (|x| <= {FLOAT32_MAX:.4g}: rlcredit "
                f"computes in float32), got {value!r}")
    bad = (low is not None and (value < low or (low_open and value == low))) or (
        high is not None and (value > high or (high_open and value == high))
    )
    return f"must be a number in {interval}, got {value!r}" if bad else None


def int_problem(value: object, *, low: int) -> str | None:
    """Why ``value`` is not an int (not a bool; NumPy integers accepted) in ``[low, 2**63 - 1]``, or None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= INT64_MAX:
        return f"must be an int >= {low} (at most 2**63 - 1), got {value!r}"
    return None


def check_real(
    fn: str,
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real hyper-parameter in a (half-)open or closed interval (see ``real_problem``)."""
    problem = real_problem(value, low=low, high=high, low_open=low_open, high_open=high_open)
    if problem is not None:
        raise RLCreditError(f"{fn}: `{name}` {problem}.")
    return value


def check_positive_int(fn: str, name: str, value: object) -> int:
    problem = int_problem(value, low=1)
    if problem is not None:
        raise RLCreditError(f"{fn}: `{name}` {problem}.")
    return int(value)


def check_choice(fn: str, name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise RLCreditError(f"{fn}: unknown {name} {value!r}; valid values: {listed}.")


def ensure(ok: torch.Tensor, message: Callable[[], str], error: type[Exception] = RolloutError) -> None:
    """Raise ``error(message())`` unless the one-element bool tensor ``ok`` holds True.

    The one way value checks (finiteness, signs, index ranges) are enforced. On the CPU the
    check is immediate and ``message`` is built only on failure. On an accelerator it is
    ``torch._assert_async(ok)``: no host synchronisation, so ``Strategy.assign`` and
    ``Strategy.loss`` stay asynchronous on CUDA; a failure stops the process at the next
    synchronisation with a device-side assertion (run the same step on the CPU to read the
    message).
    """
    if ok.device.type == "cpu":
        if not bool(ok):
            raise error(message())
    else:
        torch._assert_async(ok)
