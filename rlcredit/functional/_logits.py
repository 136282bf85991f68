"""Per-token quantities of full-vocabulary distributions, computed in chunks of rows.

A ``[B, T, V]`` float32 copy of the logits of a VLM (V ~ 150k) is tens of GiB, so every kernel
here flattens the leading dims to ``[N, V]`` rows and walks them ``chunk_size`` contiguous rows at a
time: only a ``[chunk_size, V]`` float32 temporary exists at once. Contiguous row chunks are the
fast layout (slicing ``[:, s:e]`` of ``[B, T, V]`` strides across rows and is slower on CPU); 16 to
64 rows is the sweet spot on CPU. The loop is over chunks, never over rows or tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from rlcredit.errors import RolloutError
from rlcredit.functional._checks import (
    check_bool,
    check_device,
    check_float,
    check_int,
    check_positive_int,
    check_real,
    check_shape,
    check_tensor,
)

__all__ = ["fused_token_kl", "selected_logprobs", "token_entropy", "token_kl"]


def _check_vocab_tensor(fn: str, name: str, x: object) -> torch.Tensor:
    x = check_tensor(fn, name, x)
    if x.dim() < 1:
        raise RolloutError(
            f"{fn}: `{name}` must have shape [..., V] (e.g. [B, T, V]), got a 0-d tensor; "
            f"pass the logits with the vocabulary as the last dimension."
        )
    if x.shape[-1] < 1:
        raise RolloutError(
            f"{fn}: the last dimension of `{name}` (V or H) must be >= 1, got shape "
            f"[{', '.join(map(str, x.shape))}]."
        )
    check_float(fn, name, x)
    return x


def _check_hparams(fn: str, temperature: float, chunk_size: int) -> None:
    check_real(fn, "temperature", temperature, low=0.0, low_open=True)
    check_positive_int(fn, "chunk_size", chunk_size)


def _scaled(x: torch.Tensor, temperature: float) -> torch.Tensor:
    x = x.float()
    return x if temperature == 1.0 else x / temperature


def _entropy_rows(logits: torch.Tensor) -> torch.Tensor:
    """H of fp32 logit rows ``[n, V]`` -> ``[n]``; vocabulary entries at -inf add 0, not NaN."""
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros((), device=logits.device))
    # Rounding can leave -1e-7 for a one-hot distribution; entropy is >= 0 (and + 0.0 turns the
    # -0.0 of an exact one-hot into 0.0).
    return (-plogp.sum(-1)).clamp_min(0.0) + 0.0


def _kl_rows(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of fp32 logit rows ``[n, V]`` -> ``[n]``."""
    logp = torch.log_softmax(logits_p, dim=-1)
    logq = torch.log_softmax(logits_q, dim=-1)
    p = logp.exp()
    # p == 0 terms are 0 by convention; also avoids 0 * (-inf - -inf) = NaN where both runs
    # mask the same vocabulary entries with -inf.
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros((), device=logits_p.device))
    # The terms' sum can round to a tiny negative number for p ~= q; KL is >= 0.
    return terms.sum(-1).clamp_min(0.0)


def token_entropy(
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int = 32,
) -> torch.Tensor:
    """Entropy of the next-token distribution at every position, chunked over rows.

    Wang et al. 2025, *Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL for
    LLM Reasoning* (arXiv 2506.01939), with ``p = softmax(logits / temperature)`` of the policy
    that sampled:

        H = -sum_v p_v log p_v

    Logits are cast to float32 one chunk of ``chunk_size`` flattened rows at a time. Vocabulary
    entries at ``-inf`` (masked tokens) contribute 0. Differentiable (autograd keeps each chunk's
    float32 temporaries for the backward pass, so call it under ``torch.no_grad()`` for scores).

    Args:
        logits: ``[..., V]`` logits, e.g. ``[B, T, V]``, any float dtype.
        mask: optional ``[...]`` bool (e.g. ``[B, T]``); only its True positions are computed, the
            others are 0 (as in ``token_kl``).
        temperature: ``> 0``, the sampling temperature.
        chunk_size: rows of the flattened ``[N, V]`` logits per float32 chunk.

    Returns:
        ``[...]`` float32 entropies (``[B, T]`` for ``[B, T, V]`` logits), 0 where ``mask`` is False.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import token_entropy
        >>> logits = torch.tensor([[[0.0, 0.0], [0.0, float("-inf")]]])  # uniform, one-hot
        >>> token_entropy(logits)  # log 2 and 0
        tensor([[0.6931, 0.0000]])
        >>> token_entropy(logits, torch.tensor([[False, True]]))
        tensor([[0., 0.]])
    """
    fn = "token_entropy"
    logits = _check_vocab_tensor(fn, "logits", logits)
    _check_hparams(fn, temperature, chunk_size)
    lead, V = logits.shape[:-1], logits.shape[-1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(lead):
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise RolloutError(f"{fn}: `mask` must be a bool tensor of shape {list(lead)} (logits without V), got {got}.")
        # Only valid positions go through the vocabulary (one sync to size them, as in token_kl).
        out = torch.zeros(lead, dtype=torch.float32, device=logits.device)
        return out.masked_scatter(mask, token_entropy(logits[mask], temperature=temperature, chunk_size=chunk_size))
    flat = logits.reshape(-1, V)
    parts = [
        _entropy_rows(_scaled(flat[s : s + chunk_size], temperature))
        for s in range(0, flat.shape[0], chunk_size)
    ]
    if not parts:  # no rows: an empty result, still attached to the graph
        return flat.float().sum(-1).reshape(lead)
    return torch.cat(parts).reshape(lead)


class _SelectedLogprobs(torch.autograd.Function):
    """log_softmax(logits / tau)[token], with a backward that recomputes softmax per chunk.

    Plain autograd would keep every chunk's float32 temporaries alive until backward, i.e. a full
    ``[N, V]`` float32 copy. Here forward saves only the logits (already alive for the model's
    own backward) and the ``[N]`` log-normalisers; backward rebuilds ``softmax`` one chunk at a
    time: ``d logp_y / d z_v = ([v == y] - p_v) / tau``.
    """

    @staticmethod
    def forward(ctx, flat, tokens, temperature, chunk_size):  # type: ignore[override]
        n = flat.shape[0]
        out = torch.empty(n, dtype=torch.float32, device=flat.device)
        lse = torch.empty(n, dtype=torch.float32, device=flat.device)
        for s in range(0, n, chunk_size):
            z = _scaled(flat[s : s + chunk_size], temperature)
            norm = torch.logsumexp(z, dim=-1)
            lse[s : s + chunk_size] = norm
            out[s : s + chunk_size] = z.gather(-1, tokens[s : s + chunk_size, None])[:, 0] - norm
        ctx.save_for_backward(flat, tokens, lse)
        ctx.temperature = temperature
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        flat, tokens, lse = ctx.saved_tensors
        tau, chunk = ctx.temperature, ctx.chunk_size
        grad = torch.empty_like(flat)
        for s in range(0, flat.shape[0], chunk):
            z = _scaled(flat[s : s + chunk], tau)
            g = grad_out[s : s + chunk, None].float()
            gz = -g * torch.exp(z - lse[s : s + chunk, None])
            gz.scatter_add_(-1, tokens[s : s + chunk, None], g)
            if tau != 1.0:
                gz = gz / tau
            grad[s : s + chunk] = gz
        return grad, None, None, None


def selected_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 32,
) -> torch.Tensor:
    """Log-probability of the given tokens under ``softmax(logits / temperature)``, chunked.

    The policy log-prob of the sampled response that every policy-gradient loss starts from
    (``logpi(y_t | s_t)``; Williams 1992, REINFORCE):

        logp_t = z_{t, y_t} / tau - logsumexp_v(z_{t, v} / tau)

    computed one ``chunk_size``-row float32 chunk at a time. Differentiable w.r.t. ``logits``
    through a custom backward that recomputes each chunk's softmax instead of storing it (no
    double backward). Token ids must lie in ``[0, V)``.

    Args:
        logits: ``[..., V]`` logits, e.g. ``[B, T, V]`` (the logits that *predict* each response
            token, i.e. already shifted by one), any float dtype.
        tokens: ``[...]`` integer token ids, e.g. ``[B, T]``.
        temperature: ``> 0``, the sampling temperature.
        chunk_size: rows of the flattened ``[N, V]`` logits per float32 chunk.

    Returns:
        ``[...]`` float32 log-probs.

    Examples:
        >>> import torch
        >>> from rlcredit.functional import selected_logprobs
        >>> logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
        >>> selected_logprobs(logits, torch.tensor([[1, 0]]))  # log 1/2, log e^2/(e^2 + 1)
        tensor([[-0.6931, -0.1269]])
    """
    fn = "selected_logprobs"
    logits = _check_vocab_tensor(fn, "logits", logits)
    tokens = check_tensor(fn, "tokens", tokens)
    check_int(fn, "tokens", tokens)
    if tokens.shape != logits.shape[:-1]:
        raise RolloutError(
            f"{fn}: `tokens` must have the leading shape of `logits` "
            f"[{', '.join(map(str, logits.shape[:-1]))}] (logits are [..., V]), got shape "
            f"[{', '.join(map(str, tokens.shape))}]; align the logits that predict each token "
            f"with that token (shift by one)."
        )
    check_device(fn, [("logits", logits), ("tokens", tokens)])
    _check_hparams(fn, temperature, chunk_size)
    lead, V = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, V)
    out = _SelectedLogprobs.apply(flat, tokens.reshape(-1).long(), float(temperature), chunk_size)
    return out.reshape(lead)


def _check_kl_mask(
    fn: str, mask: object, lead: torch.Size, ref_name: str
) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = check_tensor(fn, "mask", mask)
    if mask.shape != lead:
        raise RolloutError(
            f"{fn}: `mask` must have the leading shape of `{ref_name}` "
            f"[{', '.join(map(str, lead))}], got shape [{', '.join(map(str, mask.shape))}]; "
            f"pass the [B, T] response mask."
        )
    check_bool(fn, "mask", mask)
    return mask


def _chunked_rows_kl(
    n: int,
    mask: torch.Tensor | None,
    chunk_size: int,
    rows_kl,
    device: torch.device,
) -> torch.Tensor:
    """Run ``rows_kl(rows)`` over the valid flattened rows, chunk by chunk; 0 elsewhere.

    ``rows`` is a slice (all rows valid) or an index tensor of valid rows. Selecting the valid
    rows first (one host sync to size them) skips the padding's share of the vocabulary work.
    """
    if mask is None:
        parts = [rows_kl(slice(s, s + chunk_size)) for s in range(0, n, chunk_size)]
        return torch.cat(parts) if parts else torch.zeros(0, device=device)
    valid = mask.reshape(-1).nonzero().squeeze(1)
    m = valid.numel()
    parts = [rows_kl(valid[s : s + chunk_size]) for s in range(0, m, chunk_size)]
    out = torch.zeros(n, device=device)
    if not parts:
        return out
    return out.index_copy(0, valid, torch.cat(parts))


def token_kl(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int = 32,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact full-vocabulary KL(p || q) per token between two runs' logits, chunked.

    VPPO's visual dependency, paper form (arXiv 2510.09285): ``S(s_t, I) = KL(pi(.|s_t, I) ||
    pi(.|s_t, I'))`` with ``p`` the run on the original image and ``q`` on the perturbed one:

        KL_t = sum_v p_v (log p_v - log q_v),  p = softmax(z_p / tau), q = softmax(z_q / tau)

    Computed over the flattened rows in float32 chunks of ``chunk_size``, valid rows only, so no
    ``[B, T, V]`` float32 temporary exists. Masked positions get 0; rounding negatives are
    clamped to 0; vocabulary entries at ``-inf`` in ``p`` contribute 0. Meant for
    ``torch.no_grad()`` (works, uncheaply, with autograd on).

    Args:
        logits_p: ``[B, T, V]`` logits of ``p`` (any ``[..., V]``), any float dtype.
        logits_q: ``[B, T, V]`` logits of ``q``, same shape.
        mask: optional ``[B, T]`` bool; only True positions are computed.
        chunk_size: flattened rows per float32 chunk.
        temperature: ``> 0``, applied to both runs' logits.

    Returns:
        ``[B, T]`` float32 KL per token (0 on masked positions).

    Examples:
        >>> import torch
        >>> from rlcredit.functional import token_kl
        >>> p = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
        >>> q = torch.tensor([[[0.0, 0.6931], [1.0, 2.0]]])  # q = (1/3, 2/3) at t = 0
        >>> token_kl(p, q)  # 0.5 log(1.5) + 0.5 log(0.75) = 0.0589; identical rows give 0
        tensor([[0.0589, 0.0000]])
    """
    fn = "token_kl"
    logits_p = _check_vocab_tensor(fn, "logits_p", logits_p)
    logits_q = _check_vocab_tensor(fn, "logits_q", logits_q)
    if logits_q.shape != logits_p.shape:
        raise RolloutError(
            f"{fn}: `logits_q` must have the shape of `logits_p` "
            f"[{', '.join(map(str, logits_p.shape))}], got [{', '.join(map(str, logits_q.shape))}];"
            f" both runs must score the same positions over the same vocabulary."
        )
    lead, V = logits_p.shape[:-1], logits_p.shape[-1]
    mask = _check_kl_mask(fn, mask, lead, "logits_p")
    check_device(fn, [("logits_p", logits_p), ("logits_q", logits_q), ("mask", mask)])
    _check_hparams(fn, temperature, chunk_size)
    flat_p = logits_p.reshape(-1, V)
    flat_q = logits_q.reshape(-1, V)

    def rows_kl(rows):
        return _kl_rows(_scaled(flat_p[rows], temperature), _scaled(flat_q[rows], temperature))

    return _chunked_rows_kl(flat_p.shape[0], mask, chunk_size, rows_kl, logits_p.device).reshape(
        lead
    )


def fused_token_kl(
    hidden_p: torch.Tensor,
    hidden_q: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 32,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact KL(p || q) per token from two runs' last hidden states and the LM head, fused.

    The same quantity as ``token_kl`` (VPPO's paper-form visual dependency, arXiv
    2510.09285) with ``z = hidden @ weight.T + bias``:

        KL_t = sum_v p_v (log p_v - log q_v),  p = softmax(z_p / tau), q = softmax(z_q / tau)

    but neither run's ``[B, T, V]`` logits are ever materialised: valid rows are index-selected
    (padding is skipped entirely), projected ``chunk_size`` rows at a time in the weight's dtype
    (bf16 matmul is fine), and the softmax/KL runs in float32 on that ``[chunk_size, V]`` block.

    Args:
        hidden_p: ``[B, T, H]`` last hidden states of the ``p`` run (any ``[..., H]``).
        hidden_q: ``[B, T, H]`` hidden states of the ``q`` run, same shape.
        weight: ``[V, H]`` LM-head (unembedding) weight.
        mask: optional ``[B, T]`` bool; only True positions are computed.
        bias: optional ``[V]`` LM-head bias.
        chunk_size: flattened rows per chunk.
        temperature: ``> 0``, applied to both runs' logits.

    Returns:
        ``[B, T]`` float32 KL per token (0 on masked positions).

    Examples:
        >>> import torch
        >>> from rlcredit.functional import fused_token_kl
        >>> weight = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # logits = hidden
        >>> hp = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
        >>> hq = torch.tensor([[[0.0, 0.6931], [1.0, 2.0]]])
        >>> fused_token_kl(hp, hq, weight)
        tensor([[0.0589, 0.0000]])
        >>> fused_token_kl(hp, hq, weight, torch.tensor([[False, True]]))
        tensor([[0., 0.]])
    """
    fn = "fused_token_kl"
    hidden_p = _check_vocab_tensor(fn, "hidden_p", hidden_p)
    hidden_q = _check_vocab_tensor(fn, "hidden_q", hidden_q)
    if hidden_q.shape != hidden_p.shape:
        raise RolloutError(
            f"{fn}: `hidden_q` must have the shape of `hidden_p` "
            f"[{', '.join(map(str, hidden_p.shape))}], got [{', '.join(map(str, hidden_q.shape))}];"
            f" both runs must cover the same positions."
        )
    H = hidden_p.shape[-1]
    weight = check_shape(fn, "weight", weight, "VH", [None, H])
    check_float(fn, "weight", weight)
    if bias is not None:
        bias = check_shape(fn, "bias", bias, "V", [weight.shape[0]])
        check_float(fn, "bias", bias)
    lead = hidden_p.shape[:-1]
    mask = _check_kl_mask(fn, mask, lead, "hidden_p")
    check_device(
        fn,
        [("hidden_p", hidden_p), ("hidden_q", hidden_q), ("weight", weight), ("bias", bias),
         ("mask", mask)],
    )
    _check_hparams(fn, temperature, chunk_size)
    flat_p = hidden_p.reshape(-1, H)
    flat_q = hidden_q.reshape(-1, H)
    b = None if bias is None else bias.to(weight.dtype)

    def rows_kl(rows):
        # The matmul runs in the LM head's dtype, as in the model's own forward.
        zp = F.linear(flat_p[rows].to(weight.dtype), weight, b)
        zq = F.linear(flat_q[rows].to(weight.dtype), weight, b)
        return _kl_rows(_scaled(zp, temperature), _scaled(zq, temperature))

    return _chunked_rows_kl(flat_p.shape[0], mask, chunk_size, rows_kl, hidden_p.device).reshape(
        lead
    )
