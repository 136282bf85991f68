"""Row kernels of the vocabulary functions: one ``[n, V]`` block of logits in, ``[n]`` stats out.

Each function here is plain torch on one block of rows, the same code whether it runs eagerly or
compiled: ``run(name, device, *args)`` calls the ``torch.compile``-d version on the devices of
``COMPILE_DEVICES`` (CUDA) and the eager one elsewhere, or after compilation failed once. Compiled,
a forward is a few fused row reductions that read the logits and write only ``[n]`` statistics
(no ``[n, V]`` float32 temporary), and a backward writes the gradient straight into its
destination; eager, each function holds at most the float32 blocks listed in
``rlcredit.functional._chunking.TEMPORARIES``.

Maths (``z = x / tau`` in float32, ``log p = z - lse(z)``): ``H = -sum p log p`` with
``dH/dz = -p (log p + H)``; ``KL(p||q) = sum p (log p - log q)`` with ``dKL/dz_p = p (log p -
log q - KL)`` and ``dKL/dz_q = q - p``; ``log p_y`` with ``d/dz = onehot(y) - p``; every
``d/dx = d/dz / tau``.

Masked vocabularies. A ``-inf`` logit has ``p = 0`` and must contribute 0 to values and gradients
(``0 * log 0 = 0``), which plain ``p * log p`` turns into ``0 * -inf = NaN``. The entropy clamps
``log p`` to the most negative float32 (``_MIN``: finite, and ``exp`` of it is exactly 0), so
``p log p`` is 0 there without a select; the KL zeroes its ``p = 0`` terms explicitly (where ``q``
is masked too, ``log p - log q`` is ``-inf - -inf``). A row with *every* logit at ``-inf`` (no
distribution at all) gets entropy 0, KL 0 and zero gradients (its log-prob is ``-inf``): its row
max is clamped to ``_MIN``, so ``z - max`` stays ``-inf`` instead of NaN, and its ``lse`` is
``_MIN``. NaN logits give NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

__all__: list[str] = []

_MIN = torch.finfo(torch.float32).min

#: Device types whose rows run through ``torch.compile``. CUDA only: that is where the fused
#: kernels pay off against the launch- and bandwidth-bound eager ops; on CPU a first compilation
#: takes ~20 s per graph and needs a C++ toolchain, for a 2-3x gain at most. Tests add "cpu".
COMPILE_DEVICES: tuple[str, ...] = ("cuda",)


# --------------------------------------------------------------------------------------- maths


def _f32(x: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """``x / tau`` as a new float32 block (one allocation whatever ``x``'s dtype)."""
    return x.to(torch.float32, copy=True).mul_(inv_tau)


def _log_softmax_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: ``z [n, V]`` float32 (owned) -> ``(log p [n, V], lse [n, 1])``; ``-inf`` stays ``-inf``.

    ``s >= 1`` whenever the row has a finite max (its own term is ``exp(0)``); ``clamp_min(1)``
    only touches all ``-inf`` rows, whose max (and ``lse``) becomes ``_MIN``: finite, so ``z - max``
    is ``-inf``, never ``-inf - -inf``.
    """
    m = z.amax(-1, keepdim=True).clamp_min(_MIN)
    log_s = (z - m).exp_().sum(-1, keepdim=True).clamp_min(1.0).log_()
    return z.sub_(m).sub_(log_s), m + log_s


def _log_probs(x: torch.Tensor, lse: torch.Tensor, inv_tau: float) -> torch.Tensor:
    """``log p`` of rows ``x`` from their saved ``lse [n]`` (a new float32 block)."""
    return _f32(x, inv_tau).sub_(lse[:, None])


def entropy_fwd(x: torch.Tensor, inv_tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H [n], lse [n])`` of logit rows ``x [n, V]`` at temperature ``1 / inv_tau``."""
    logp, lse = _log_softmax_(_f32(x, inv_tau))
    logp.clamp_min_(_MIN)  # p log p = 0 * _MIN = 0 at -inf logits
    h = logp.exp().mul_(logp).sum(-1).neg_()
    # Rounding can leave -1e-7 for a one-hot row; H >= 0 (and + 0.0 turns -0.0 into 0.0).
    return h.clamp_min_(0.0) + 0.0, lse[:, 0]


def entropy_bwd(x: torch.Tensor, lse: torch.Tensor, h: torch.Tensor, g: torch.Tensor, inv_tau: float,
                out: torch.Tensor) -> None:
    """``out [n, V] = g dH/dx`` (cast to ``out``'s dtype)."""
    logp = _log_probs(x, lse, inv_tau).clamp_min_(_MIN)
    p = logp.exp()
    out.copy_(logp.add_(h[:, None]).mul_(p).mul_((g * -inv_tau)[:, None]))


def kl_fwd(xp: torch.Tensor, xq: torch.Tensor, inv_tau: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(KL(p||q) [n], lse_p [n], lse_q [n])`` of two runs' logit rows ``[n, V]``.

    ``p_v = 0`` terms are 0 whatever ``q_v`` (both runs masking a token give ``-inf - -inf``);
    ``q_v = 0 < p_v`` gives ``inf``, the true value.
    """
    logp, lse_p = _log_softmax_(_f32(xp, inv_tau))
    logq, lse_q = _log_softmax_(_f32(xq, inv_tau))
    terms = logq.neg_().add_(logp)  # log p - log q
    p = logp.exp_()
    terms = terms.mul_(p).masked_fill_(p == 0, 0.0)
    # The terms' sum can round to a tiny negative number for p ~= q; KL >= 0.
    return terms.sum(-1).clamp_min_(0.0), lse_p[:, 0], lse_q[:, 0]


def kl_bwd(xp: torch.Tensor, xq: torch.Tensor, lse_p: torch.Tensor, lse_q: torch.Tensor, kl: torch.Tensor,
           g: torch.Tensor, inv_tau: float, out_p: torch.Tensor | None, out_q: torch.Tensor | None) -> None:
    """``out_p = g dKL/dx_p``, ``out_q = g dKL/dx_q`` (either may be None: not needed)."""
    logp = _log_probs(xp, lse_p, inv_tau)
    logq = _log_probs(xq, lse_q, inv_tau)
    p = logp.exp()
    gs = torch.where(lse_p > _MIN, g * inv_tau, 0.0)[:, None]  # an all -inf p row: KL = 0 for any q
    if out_p is not None:
        grad_p = logp.sub_(logq).sub_(kl[:, None]).mul_(p).masked_fill_(p == 0, 0.0)
        out_p.copy_(grad_p.mul_(gs))
    if out_q is not None:
        out_q.copy_(logq.exp_().sub_(p).mul_(gs))


def logprob_fwd(x: torch.Tensor, y: torch.Tensor, inv_tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p_y [n], lse [n])`` of logit rows ``x [n, V]`` at token ids ``y [n]``."""
    z = _f32(x, inv_tau)
    m = z.amax(-1, keepdim=True).clamp_min(_MIN)
    lse = (z - m).exp_().sum(-1, keepdim=True).clamp_min(1.0).log_().add_(m)[:, 0]
    return z.gather(-1, y[:, None])[:, 0] - lse, lse


def logprob_bwd(x: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, inv_tau: float,
                out: torch.Tensor) -> None:
    """``out [n, V] = g d log p_y / dx``."""
    gs = torch.where(lse > _MIN, g * inv_tau, 0.0)[:, None]  # an all -inf row: log p_y = -inf, flat
    grad = _log_probs(x, lse, inv_tau).exp_().mul_(gs.neg())
    out.copy_(grad.scatter_add_(-1, y[:, None], gs))


ROW_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "entropy_fwd": entropy_fwd, "entropy_bwd": entropy_bwd,
    "kl_fwd": kl_fwd, "kl_bwd": kl_bwd,
    "logprob_fwd": logprob_fwd, "logprob_bwd": logprob_bwd,
}


# ------------------------------------------------------------------------------------ dispatch

_compiled: dict[str, Callable[..., Any]] = {}
_failure: list[str] = []  # the reason compilation was given up, once it failed


def _compile(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, fullgraph=True)


def _compile_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this machine cannot compile" (no toolchain, no Triton, unsupported op)."""
    from torch._dynamo import exc

    return (exc.BackendCompilerFailed, exc.Unsupported)


def compiles_on(device: torch.device) -> bool:
    """Whether rows on ``device`` run through ``torch.compile`` (``COMPILE_DEVICES``, compiler usable)."""
    if device.type not in COMPILE_DEVICES or _failure or torch.compiler.is_compiling():
        return False
    if not torch._dynamo.is_dynamo_supported():
        return False
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return has_triton()
    return True


def run(name: str, device: torch.device, *args: Any) -> Any:
    """``ROW_FUNCTIONS[name](*args)``, compiled where ``compiles_on(device)``, eager otherwise.

    The row dimension of every tensor argument is marked dynamic, so chunks of any length (the
    short last one included) share one graph per dtype and vocabulary size. If compilation fails
    (``torch._dynamo`` cannot trace, or the backend has no compiler), a ``RuntimeWarning`` says
    so once and every later call runs eagerly: same numbers, more memory traffic.
    """
    fn = ROW_FUNCTIONS[name]
    if compiles_on(device):
        compiled = _compiled.get(name)
        if compiled is None:
            compiled = _compiled[name] = _compile(fn)
        for a in args:
            if isinstance(a, torch.Tensor) and a.ndim:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        try:
            return compiled(*args)
        except _compile_errors() as err:
            cause = getattr(err, "inner_exception", None) or err  # the backend's own error, if it raised one
            _failure.append(f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"[:300])
            warnings.warn(
                f"rlcredit.functional: torch.compile of the vocabulary kernels failed ({_failure[0]}); "
                f"they run eagerly from now on (same values, more memory traffic).",
                RuntimeWarning, stacklevel=3,
            )
    return fn(*args)
