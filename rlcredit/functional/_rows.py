"""Row kernels of the vocabulary functions: one ``[n, V]`` block of logits in, ``[n]`` stats out.

Each function here is plain torch on one block of rows, the same code whether it runs eagerly or
compiled (``rlcredit.functional._compile.run``: ``torch.compile``-d on CUDA). Compiled, a forward
is a few fused row reductions that read the logits and write only ``[n]`` statistics (no
``[n, V]`` float32 temporary), and a backward writes the gradient straight into its destination
(``out``); eager, each function holds at most the float32 blocks counted in
``rlcredit.functional._chunking``.

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

import torch

__all__: list[str] = []

_MIN = torch.finfo(torch.float32).min


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
    z = x.float() if inv_tau == 1.0 else x.float() * inv_tau  # read only: no copy needed
    lse = torch.logsumexp(z, -1).clamp_min(_MIN)  # an all -inf row: _MIN, so that -inf - lse is -inf
    return z.gather(-1, y[:, None])[:, 0] - lse, lse


def logprob_bwd(x: torch.Tensor, y: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, inv_tau: float,
                out: torch.Tensor) -> None:
    """``out [n, V] = g d log p_y / dx``."""
    gs = torch.where(lse > _MIN, g * inv_tau, 0.0)[:, None]  # an all -inf row: log p_y = -inf, flat
    grad = _log_probs(x, lse, inv_tau).exp_().mul_(gs.neg())
    out.copy_(grad.scatter_add_(-1, y[:, None], gs))
