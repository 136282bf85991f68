"""Chunked autograd functions over the rows of ``[N, V]`` logits (the engine of ``_logits``).

Each function walks the flattened rows (all of them, or the valid ones given as an index) in
chunks, runs the row kernels of ``_rows`` on each chunk and keeps only ``[N]`` statistics for the
backward: the inputs themselves are already alive (the model's own graph holds them), so nothing
of ``[N, V]`` size is saved. The backward recomputes each chunk's softmax from the logits and its
saved log-normaliser and writes the gradient chunk by chunk into one ``[N, V]`` tensor of the
input's dtype. Differentiable once (``once_differentiable``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.autograd.function import once_differentiable

from rlcredit.functional import _compile, _rows

__all__: list[str] = []

Rows = slice | torch.Tensor


def blocks(n: int, valid: torch.Tensor | None, chunk: int) -> Iterator[tuple[int, int, Rows]]:
    """``(start, stop, rows)`` per chunk of the processed rows; ``rows`` indexes the flat tensor.

    Without ``valid`` every row is processed and ``rows`` is a slice (a view, no copy); with it,
    only the rows ``valid`` lists (``rows`` is an index tensor: the chunk is gathered).
    """
    m = n if valid is None else valid.numel()
    for s in range(0, m, chunk):
        e = min(m, s + chunk)
        yield s, e, (slice(s, e) if valid is None else valid[s:e])


def destination(grad: torch.Tensor | None, rows: Rows) -> tuple[torch.Tensor | None, Callable[[], None]]:
    """``(dst, commit)``: where a chunk's gradient is written, and what puts it in place afterwards.

    For a slice, ``dst`` is a view of ``grad`` (written directly); for gathered rows, a staged
    block that ``commit()`` scatters into ``grad``. ``grad=None`` (not needed) gives ``None``.
    """
    if grad is None:
        return None, lambda: None
    if isinstance(rows, slice):
        return grad[rows], lambda: None
    staged = grad.new_empty(rows.numel(), grad.shape[1])
    return staged, lambda: grad.index_copy_(0, rows, staged)


def _grad_buffer(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    # Rows outside ``valid`` get no gradient: zeros; otherwise every row is written.
    return torch.zeros_like(x) if valid is not None else torch.empty_like(x)


class Entropy(torch.autograd.Function):
    """``H`` of each processed row of ``flat [N, V]``: ``[M]`` float32 (``M`` = rows processed)."""

    @staticmethod
    def forward(ctx, flat, valid, inv_tau, chunk):  # type: ignore[override]
        m = flat.shape[0] if valid is None else valid.numel()
        h = torch.empty(m, dtype=torch.float32, device=flat.device)
        lse = torch.empty_like(h)
        for s, e, rows in blocks(flat.shape[0], valid, chunk):
            h[s:e], lse[s:e] = _compile.run(_rows.entropy_fwd, flat.device, flat[rows], inv_tau)
        ctx.save_for_backward(flat, valid, lse, h)
        ctx.inv_tau, ctx.chunk = inv_tau, chunk
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        flat, valid, lse, h = ctx.saved_tensors
        grad = _grad_buffer(flat, valid)
        for s, e, rows in blocks(flat.shape[0], valid, ctx.chunk):
            dst, commit = destination(grad, rows)
            _compile.run(_rows.entropy_bwd, flat.device, flat[rows], lse[s:e], h[s:e], g[s:e].float(), ctx.inv_tau, dst)
            commit()
        return grad, None, None, None


class LogProb(torch.autograd.Function):
    """``log softmax(flat / tau)[tokens]`` per row of ``flat [N, V]``: ``[N]`` float32."""

    @staticmethod
    def forward(ctx, flat, tokens, inv_tau, chunk):  # type: ignore[override]
        n = flat.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=flat.device)
        lse = torch.empty_like(out)
        for s, e, rows in blocks(n, None, chunk):
            out[s:e], lse[s:e] = _compile.run(_rows.logprob_fwd, flat.device, flat[rows], tokens[rows], inv_tau)
        ctx.save_for_backward(flat, tokens, lse)
        ctx.inv_tau, ctx.chunk = inv_tau, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        flat, tokens, lse = ctx.saved_tensors
        grad = torch.empty_like(flat)
        for s, e, rows in blocks(flat.shape[0], None, ctx.chunk):
            _compile.run(_rows.logprob_bwd, flat.device, flat[rows], tokens[rows], lse[s:e], g[s:e].float(), ctx.inv_tau,
                      grad[rows])
        return grad, None, None, None


class KL(torch.autograd.Function):
    """``KL(softmax(p / tau) || softmax(q / tau))`` per processed row of ``p, q [N, V]``: ``[M]`` float32."""

    @staticmethod
    def forward(ctx, flat_p, flat_q, valid, inv_tau, chunk):  # type: ignore[override]
        m = flat_p.shape[0] if valid is None else valid.numel()
        kl = torch.empty(m, dtype=torch.float32, device=flat_p.device)
        lse_p, lse_q = torch.empty_like(kl), torch.empty_like(kl)
        for s, e, rows in blocks(flat_p.shape[0], valid, chunk):
            kl[s:e], lse_p[s:e], lse_q[s:e] = _compile.run(_rows.kl_fwd, flat_p.device, flat_p[rows], flat_q[rows], inv_tau)
        ctx.save_for_backward(flat_p, flat_q, valid, lse_p, lse_q, kl)
        ctx.inv_tau, ctx.chunk = inv_tau, chunk
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        flat_p, flat_q, valid, lse_p, lse_q, kl = ctx.saved_tensors
        need_p, need_q = ctx.needs_input_grad[:2]
        grad_p = _grad_buffer(flat_p, valid) if need_p else None
        grad_q = _grad_buffer(flat_q, valid) if need_q else None
        for s, e, rows in blocks(flat_p.shape[0], valid, ctx.chunk):
            dst_p, commit_p = destination(grad_p, rows)
            dst_q, commit_q = destination(grad_q, rows)
            # One pass over both runs' logits writes both gradients.
            _compile.run(_rows.kl_bwd, flat_p.device, flat_p[rows], flat_q[rows], lse_p[s:e], lse_q[s:e], kl[s:e],
                      g[s:e].float(), ctx.inv_tau, dst_p, dst_q)
            commit_p()
            commit_q()
        return grad_p, grad_q, None, None, None
