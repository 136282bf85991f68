"""The per-layer maths of the attention-connectivity capture (``rlcredit_mm.connectivity``).

``_layer_connectivity`` turns one layer's post-rotary queries and keys into the debiased image
mass, density and pooled profile of the response tokens, a block of query rows at a time:
``q k^T`` in the model's dtype, then ``_picked_probs`` (the softmax only at image and sink keys,
``torch.compile``-d on CUDA), then ``_debias``. See ``AttentionConnectivity`` for the definition.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from rlcredit.functional import default_budget_mib, rows_for_budget, run_compiled

if TYPE_CHECKING:
    from rlcredit_mm.connectivity import AttentionConnectivity, _Capture

__all__: list[str] = []

_LOG2E = math.log2(math.e)


def _picked_probs(logits: Tensor, mask_rows: Tensor | None, cols: Tensor, col_ok: Tensor, scale: float,
                  softcap: float | None) -> Tensor:
    """Head-mean softmax probabilities at key columns ``cols`` for one block of ``n`` query rows.

    Args:
        logits: ``[b, Hkv, g, n, Lc]`` raw ``q k^T`` in the model's dtype (GQA: ``g`` query heads per
            key/value head), keys cut at the block's last query.
        mask_rows: the layer's mask rows ``[b|1, 1|Hq, n, Lc]``: bool (True: visible) or additive float;
            None: sdpa's plain causal mask (the block's queries are the last ``n`` of the ``Lc`` keys).
        cols: ``[b, C]`` key columns (image keys, then sink keys), clamped below ``Lc``.
        col_ok: ``[b, C]`` bool, whether the unclamped column is below ``Lc`` (else probability 0).
        scale, softcap: the layer's ``scaling`` and logit soft-capping.

    Returns:
        ``[b, n, C]`` float32: ``p_v = 2^(l_v - m) / sum_j 2^(l_j - m)`` (base 2, ``scale * log2 e``
        folded into the logits; exactly the natural-base softmax), averaged over heads. A query that
        sees no key (a padding row) has ``m = -inf``, clamped so that everything is 0, not NaN.
        Runs ``torch.compile``-d on CUDA (``rlcredit.functional._compile``): one fused pass over the
        block instead of a dozen.
    """
    b, Hkv, g, n, Lc = logits.shape
    C = cols.shape[1]
    if softcap:
        lg = torch.tanh(logits.float() * (scale / softcap)).mul_(softcap * _LOG2E)
    else:
        lg = logits.float() * (scale * _LOG2E)  # a new float32 block (even for float32 logits)
    if mask_rows is None:
        # Causal: only the block's own key range [Lc - n, Lc) holds keys later than some of its queries.
        later = torch.ones(n, n, dtype=torch.bool, device=lg.device).triu_(1)
        lg[..., Lc - n:].masked_fill_(later, float("-inf"))
    else:
        heads = (Hkv, g) if mask_rows.shape[1] != 1 else (1, 1)
        m5 = mask_rows.reshape(mask_rows.shape[0], *heads, n, Lc)
        if m5.dtype == torch.bool:
            lg.masked_fill_(~m5, float("-inf"))
        else:  # additive (eager-style) mask: its very negative entries mean hidden
            lg.add_(m5.float() * _LOG2E).masked_fill_(m5 <= torch.finfo(m5.dtype).min / 2, float("-inf"))
    picked = lg.gather(4, cols[:, None, None, None, :].expand(b, Hkv, g, n, C))
    # The row max contributes exp2(0) = 1, so the sum is >= 1 whenever a key is visible.
    top = lg.amax(dim=-1, keepdim=True).clamp_min_(-1e30)
    z = lg.sub_(top).exp2_().sum(dim=-1, keepdim=True).clamp_min_(1.0)
    p = picked.sub_(top).exp2_().div_(z)
    return p.mean(dim=(1, 2)) * col_ok[:, None, :]


def _query_rows(est: AttentionConnectivity, b: int, Hq: int, L: int, query: Tensor, mask: Tensor | None) -> int:
    """Response query rows per block: ``query_chunk``, or as many as fit the memory budget.

    A block holds ``[b, Hq, rows, L]`` logits in the model's dtype, their float32 copy, a bool
    visibility mask and, for additive masks, their float32 copy: ``rlcredit.functional._chunking``'s
    rule (256 MiB on GPUs, 16 MiB on CPU) over ``b * Hq * L`` entries per row.
    """
    if est.query_chunk is not None:
        return est.query_chunk
    per_entry = query.element_size() + 4 + 1 + (4 if mask is not None and mask.dtype != torch.bool else 0)
    return rows_for_budget(b * Hq * L, per_entry, default_budget_mib(query.device))


def _layer_connectivity(state: _Capture, query: Tensor, key: Tensor, mask: Tensor | None,
                        scale: float, softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's debiased image mass ``[b, T]``, density ``[b, T]`` and profile ``[b, T, K]``.

    Per block of response query rows: logits ``[b, Hkv, g*n, keys]`` in one GEMM per kv head in the
    model's dtype (GQA without repeating keys; as the eager attention computes them), keys cut at
    the block's last query (a decoder query never sees a later key), then ``_picked_probs``: the
    softmax only at the image and sink keys, never written out in full. No host synchronisation.
    """
    est = state.estimator
    b, Hq, L, d = query.shape
    Hkv = key.shape[1]
    g = Hq // Hkv
    T = state.rows.stop - state.rows.start
    I = state.image_index.shape[1]
    F = state.sink_index.shape[1]
    device = query.device
    density = est.measure == "density"
    kT = key.transpose(-1, -2)  # [b, Hkv, d, L], the model's dtype
    cols = torch.cat([state.image_index, state.sink_index], 1)  # [b, I + F]
    probs = torch.empty(b, T, I + F, device=device)  # head-mean probability at image and sink keys
    vis_cols = torch.zeros(b, T, I + F, dtype=torch.bool, device=device) if density else None
    n_ctx = torch.zeros(b, T, device=device) if density else None
    step = _query_rows(est, b, Hq, L, query, mask)
    for c0 in range(0, T, step):
        c1 = min(T, c0 + step)
        n = c1 - c0
        rows = slice(state.rows.start + c0, state.rows.start + c1)
        Lc = rows.stop  # keys after the block's last query are hidden from all its rows
        q = query[:, :, rows].reshape(b, Hkv, g * n, d)
        logits = torch.matmul(q, kT[..., :Lc]).view(b, Hkv, g, n, Lc)
        del q
        mask_rows = None if mask is None else mask[:, :, rows, :Lc]
        cols_c = cols.clamp_max(Lc - 1)  # image keys after the block's last query are hidden (zeroed)
        col_ok = cols < Lc
        probs[:, c0:c1] = run_compiled(_picked_probs, device, logits, mask_rows, cols_c, col_ok, scale, softcap)
        del logits
        if density:
            vis = _visible(mask_rows, rows, Lc, device)
            vis0 = vis[:, 0].expand(b, n, Lc)
            vis_cols[:, c0:c1] = vis0.gather(2, cols_c[:, None, :].expand(b, n, I + F)) & col_ok[:, None, :]
            n_ctx[:, c0:c1] = vis0.sum(-1).float()
    img_p, sink_p = probs[..., :I], probs[..., I:]
    if density:
        img_vis, sink_vis = vis_cols[..., :I], vis_cols[..., I:]
    else:
        img_vis = sink_vis = None
    return _debias(state, img_p, sink_p, img_vis, sink_vis, n_ctx)


def _visible(mask_rows: Tensor | None, rows: slice, n_keys: int, device: torch.device) -> Tensor:
    """``[b|1, h, n, n_keys]`` bool visibility of the keys for query rows ``rows`` (``measure="density"``).

    ``None`` is sdpa's plain causal mask; a bool mask marks visible keys; a float mask is additive
    (eager style), its very negative entries meaning hidden.
    """
    if mask_rows is None:
        q = torch.arange(rows.start, rows.stop, device=device)
        return (torch.arange(n_keys, device=device)[None, :] <= q[:, None])[None, None]
    if mask_rows.dtype == torch.bool:
        return mask_rows
    return mask_rows > torch.finfo(mask_rows.dtype).min / 2


def _debias(state: _Capture, img_p: Tensor, sink_p: Tensor, img_vis: Tensor | None, sink_vis: Tensor | None,
            n_ctx: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Drop sink keys, renormalise rows, and reduce to mass, density and pooled profile.

    Sinks: the first ``sink_first_keys`` valid keys, and the image keys whose mean received
    attention over the valid response rows exceeds the ``sink_quantile`` quantile of the
    sequence's image keys. ``c_t = sum_{kept image} a / (1 - sum_{sinks} a)``. The visibility
    counts (``img_vis``, ``sink_vis``, ``n_ctx``) are only computed for ``measure="density"``.
    """
    est = state.estimator
    valid = state.image_valid  # [b, I]
    resp = state.response_mask.float()  # [b, T]
    if est.debias_sinks:
        col_mean = (img_p * resp[:, :, None]).sum(1) / resp.sum(1, keepdim=True).clamp_min(1.0)  # [b, I]
        tau = torch.nanquantile(col_mean.masked_fill(~valid, float("nan")), est.sink_quantile, dim=1)
        outlier = valid & (col_mean > tau[:, None])  # NaN tau (no image) compares False
        dropped = sink_p.sum(-1) + (img_p * outlier[:, None, :]).sum(-1)
        keep = valid & ~outlier
    else:
        dropped = torch.zeros_like(resp)
        outlier = torch.zeros_like(valid)
        keep = valid
    kept = img_p * keep[:, None, :]
    mass = kept.sum(-1)
    # 1 - dropped >= mass up to rounding; the max keeps c_t in [0, 1].
    denom = torch.maximum(1.0 - dropped, mass)
    scale = torch.where(denom > 0, 1.0 / denom.clamp_min(1e-30), 0.0)
    mass = mass * scale
    if n_ctx is None:
        density = torch.zeros_like(mass)
    else:
        n_img = (img_vis & keep[:, None, :]).sum(-1).float()
        n_dropped = (img_vis & outlier[:, None, :]).sum(-1)
        if est.debias_sinks:
            n_dropped = n_dropped + sink_vis.sum(-1)
        ctx = n_ctx - n_dropped
        density = torch.where(n_img > 0, mass * ctx / n_img.clamp_min(1.0), 0.0)
    profile = torch.bmm(kept * scale[:, :, None], state.image_bins)  # [b, T, I] @ [b, I, K]
    return mass, density, profile
