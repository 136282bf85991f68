"""Run a tensor function ``torch.compile``-d on the devices where that pays, eagerly elsewhere.

``run(fn, device, *args)`` is the one switch between the fused and the eager path of the
vocabulary kernels (``_rows``) and of the attention capture (``rlcredit_mm.connectivity``): the
same Python function either way, so both paths give the same numbers (up to the order of float
additions). Compiled on ``COMPILE_DEVICES`` (CUDA), when ``torch._dynamo`` supports this Python
and a backend (Triton) is installed; eager on CPU and everywhere else. If a compilation fails
once, a ``RuntimeWarning`` says why and every later call runs eagerly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__: list[str] = []

#: Device types whose functions run through ``torch.compile``. CUDA only: there the fused kernels
#: replace chains of bandwidth- and launch-bound eager ops; on CPU a first compilation takes ~20 s
#: per graph and needs a C++ toolchain, for a 2-3x gain on these functions. Tests add "cpu".
COMPILE_DEVICES: tuple[str, ...] = ("cuda",)

_compiled: dict[Callable[..., Any], Callable[..., Any]] = {}
_failure: list[str] = []  # why compilation was given up, once it failed


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, fullgraph=True)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this machine cannot compile" (no toolchain, no Triton, untraceable)."""
    from torch._dynamo import exc

    return (exc.BackendCompilerFailed, exc.Unsupported)


def compiles_on(device: torch.device) -> bool:
    """Whether functions on ``device`` run compiled (``COMPILE_DEVICES``, and a usable compiler)."""
    if device.type not in COMPILE_DEVICES or _failure or torch.compiler.is_compiling():
        return False
    if not torch._dynamo.is_dynamo_supported():
        return False
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return True


def run(fn: Callable[..., Any], device: torch.device, *args: Any) -> Any:
    """``fn(*args)``, compiled where ``compiles_on(device)``, eager otherwise.

    Every dimension of every tensor argument is marked dynamic, so blocks of any size (the short
    last chunk, a growing key range, another vocabulary) share one graph per dtype and argument
    pattern (sizes 0 and 1 are still specialised by ``torch._dynamo``). If compilation
    fails, a ``RuntimeWarning`` says so once and every later call runs eagerly. Public as
    ``rlcredit.functional.run_compiled``, for plugins with their own per-chunk maths.

    Args:
        fn: a plain-torch function of tensors (traceable by ``torch.compile`` with ``fullgraph``).
        device: the device its tensors live on (decides compiled or eager).
        *args: its arguments (tensors of any shape ``[...]``; every dimension is dynamic).

    Returns:
        What ``fn(*args)`` returns.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import run_compiled
        >>> run_compiled(torch.add, torch.device("cpu"), torch.ones(2), torch.ones(2))  # eager on CPU
        tensor([2., 2.])
    """
    if compiles_on(device):
        compiled = _compiled.get(fn)
        if compiled is None:
            compiled = _compiled[fn] = _compile(fn)
        for a in args:
            if isinstance(a, torch.Tensor):
                for dim in range(a.ndim):
                    torch._dynamo.maybe_mark_dynamic(a, dim)
        try:
            return compiled(*args)
        except _compile_errors() as err:
            cause = getattr(err, "inner_exception", None) or err  # the backend's own error, if it raised one
            text = str(cause).strip()
            _failure.append(f"{type(cause).__name__}: {text.splitlines()[0] if text else ''}"[:300])
            warnings.warn(
                f"rlcredit: torch.compile failed ({_failure[0]}); the vocabulary kernels and the attention "
                f"capture run eagerly from now on (same values, more memory traffic).",
                RuntimeWarning, stacklevel=3,
            )
    return fn(*args)
