"""Per-token quantities of full-vocabulary distributions, computed in chunks of rows.

A ``[B, T, V]`` float32 copy of the logits of a VLM (V ~ 150k) is tens of GiB, so every kernel
here flattens the leading dims to ``[N, V]`` rows and walks them a chunk of contiguous rows at a
time (the valid rows only, when a mask is given): only ``[chunk, V]`` temporaries exist at once,
and only ``[N]`` statistics are saved for the backward, which recomputes each chunk's softmax.

Chunk size: ``chunk_size=None`` (the default) takes as many rows as fit ``budget_mib`` MiB of
temporaries (``rlcredit.functional._chunking``: 512 MiB on GPUs, 16 MiB on CPU); an int is used
exactly. Speed: on CUDA each chunk runs through ``torch.compile``-d row kernels (fused
reductions, no float32 ``[chunk, V]`` block); on CPU, or where compilation is unavailable, the
same row functions run eagerly (``rlcredit.functional._rows``, ``_compile``). Both give the same values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlcredit.errors import RolloutError
from rlcredit.functional import _compile
from rlcredit.functional._checks import (
    ensure,
    check_bool,
    check_device,
    check_float,
    check_int,
    check_real,
    check_shape,
    check_tensor,
)
from rlcredit.functional._chunking import chunk_rows, temporaries
from rlcredit.functional._vocab import KL, Entropy, LogProb
from rlcredit.functional._vocab import blocks as _blocks

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


def _inv_tau(fn: str, temperature: object) -> float:
    return 1.0 / float(check_real(fn, "temperature", temperature, low=0.0, low_open=True))


def _rows_per_chunk(fn: str, chunk_size: object, budget_mib: object, kernel: str, device: torch.device, V: int,
                    itemsize: int, *, masked: bool) -> int:
    """Rows per chunk over a vocabulary of ``V`` (the rule and its table: ``_chunking``)."""
    per_entry = temporaries(kernel, compiled=_compile.compiles_on(device), masked=masked, itemsize=itemsize)
    return chunk_rows(fn, chunk_size, budget_mib, width=V, bytes_per_entry=per_entry, device=device)


def _check_mask(fn: str, mask: object, lead: torch.Size, ref_name: str) -> torch.Tensor | None:
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


def _valid_rows(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of the True positions of the flattened mask (one host sync: their count sizes the loop)."""
    return None if mask is None else mask.reshape(-1).nonzero().squeeze(1)


def _scatter(values: torch.Tensor, valid: torch.Tensor | None, lead: torch.Size) -> torch.Tensor:
    """``[M]`` values of the processed rows -> ``lead``-shaped float32, 0 on the others (differentiable)."""
    if valid is None:
        return values.reshape(lead)
    out = torch.zeros(lead.numel(), dtype=torch.float32, device=values.device)
    return out.index_copy(0, valid, values).reshape(lead)


def token_entropy(
    logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    budget_mib: float | None = None,
) -> torch.Tensor:
    """Entropy of the next-token distribution at every position, chunked over rows.

    Wang et al. 2025, *Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive Effective RL for
    LLM Reasoning* (arXiv 2506.01939), with ``p = softmax(logits / temperature)`` of the policy
    that sampled:

        H = -sum_v p_v log p_v,   dH/dz_v = -p_v (log p_v + H) / temperature

    Logits are cast to float32 one chunk of rows at a time. Vocabulary entries at ``-inf``
    (masked tokens) contribute 0 to the value and get gradient 0; a row whose logits are all
    ``-inf`` has entropy 0. Differentiable (once): the backward recomputes each chunk's softmax
    from the logits and the saved ``[N]`` log-normalisers, so no float32 ``[N, V]`` copy is kept.

    Args:
        logits: ``[..., V]`` logits, e.g. ``[B, T, V]``, any float dtype.
        mask: optional ``[...]`` bool (e.g. ``[B, T]``); only its True positions are computed, the
            others are 0 (and may hold anything, NaN included).
        temperature: ``> 0``, the sampling temperature.
        chunk_size: rows of the flattened ``[N, V]`` logits per chunk, used exactly; None
            (default): as many as fit ``budget_mib``.
        budget_mib: MiB of ``[chunk, V]`` temporaries a chunk may hold when ``chunk_size`` is None
            (default None: 512 on GPUs, 16 on CPU); the rows are ``floor(budget / (V * bytes per
            entry))``, at least 1 (``rlcredit.functional._chunking``). Pass one of the two.

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
    lead, V = logits.shape[:-1], logits.shape[-1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(lead):
            got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise RolloutError(f"{fn}: `mask` must be a bool tensor of shape {list(lead)} (logits without V), got {got}.")
        check_device(fn, [("logits", logits), ("mask", mask)])
    inv_tau = _inv_tau(fn, temperature)
    chunk = _rows_per_chunk(fn, chunk_size, budget_mib, "entropy", logits.device, V, logits.element_size(),
                            masked=mask is not None)
    valid = _valid_rows(mask)
    return _scatter(Entropy.apply(logits.reshape(-1, V), valid, inv_tau, chunk), valid, lead)


def selected_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    budget_mib: float | None = None,
) -> torch.Tensor:
    """Log-probability of the given tokens under ``softmax(logits / temperature)``, chunked.

    The policy log-prob of the sampled response that every policy-gradient loss starts from
    (``logpi(y_t | s_t)``; Williams 1992, REINFORCE):

        logp_t = z_{t, y_t} / tau - logsumexp_v(z_{t, v} / tau),   d logp_t / dz_{t, v} = ([v = y_t] - p_v) / tau

    computed one chunk of float32 rows at a time. Differentiable (once) w.r.t. ``logits``
    through a backward that recomputes each chunk's softmax instead of storing it. A token whose
    logit is ``-inf`` has log-prob ``-inf`` and a finite gradient; other ``-inf`` entries get
    gradient 0. Token ids must lie in ``[0, V)``.

    Args:
        logits: ``[..., V]`` logits, e.g. ``[B, T, V]`` (the logits that *predict* each response
            token, i.e. already shifted by one), any float dtype.
        tokens: ``[...]`` integer token ids, e.g. ``[B, T]``.
        temperature: ``> 0``, the sampling temperature.
        chunk_size: rows of the flattened ``[N, V]`` logits per chunk, used exactly; None
            (default): as many as fit ``budget_mib``.
        budget_mib: MiB of ``[chunk, V]`` temporaries a chunk may hold when ``chunk_size`` is None
            (default None: 512 on GPUs, 16 on CPU); the rows are ``floor(budget / (V * bytes per
            entry))``, at least 1 (``rlcredit.functional._chunking``). Pass one of the two.

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
    inv_tau = _inv_tau(fn, temperature)
    lead, V = logits.shape[:-1], logits.shape[-1]
    if tokens.numel():
        ensure(((tokens >= 0) & (tokens < V)).all(), lambda: (
            f"{fn}: token ids must lie in [0, {V}) (the vocabulary of `logits`), got min {int(tokens.min())}, "
            f"max {int(tokens.max())}; check that the logits and the ids come from the same tokenizer and model."))
    chunk = _rows_per_chunk(fn, chunk_size, budget_mib, "logprob", logits.device, V, logits.element_size(),
                            masked=False)
    out = LogProb.apply(logits.reshape(-1, V), tokens.reshape(-1).long(), inv_tau, chunk)
    return out.reshape(lead)


def token_kl(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    budget_mib: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact full-vocabulary KL(p || q) per token between two runs' logits, chunked.

    VPPO's visual dependency, paper form (arXiv 2510.09285): ``S(s_t, I) = KL(pi(.|s_t, I) ||
    pi(.|s_t, I'))`` with ``p`` the run on the original image and ``q`` on the perturbed one:

        KL_t = sum_v p_v (log p_v - log q_v),  p = softmax(z_p / tau), q = softmax(z_q / tau)

    Computed over the flattened rows in float32 chunks, valid rows only, so no ``[B, T, V]``
    float32 temporary exists. Masked positions get 0; rounding negatives are clamped to 0;
    vocabulary entries at ``-inf`` in ``p`` contribute 0 (and get gradient 0) whatever ``q``
    holds there; an entry ``p`` allows and ``q`` rules out (``-inf``) makes the KL ``inf``.
    Differentiable (once) w.r.t. both runs (``dKL/dz_p = p (log p - log q - KL) / tau``,
    ``dKL/dz_q = (q - p) / tau``) without keeping float32 ``[N, V]`` copies; scores are usually
    computed under ``torch.no_grad()``.

    Args:
        logits_p: ``[B, T, V]`` logits of ``p`` (any ``[..., V]``), any float dtype.
        logits_q: ``[B, T, V]`` logits of ``q``, same shape.
        mask: optional ``[B, T]`` bool; only True positions are computed.
        chunk_size: rows of the flattened ``[N, V]`` logits per chunk, used exactly; None
            (default): as many as fit ``budget_mib``.
        budget_mib: MiB of ``[chunk, V]`` temporaries a chunk may hold when ``chunk_size`` is None
            (default None: 512 on GPUs, 16 on CPU); the rows are ``floor(budget / (V * bytes per
            entry))``, at least 1 (``rlcredit.functional._chunking``). Pass one of the two.
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
    mask = _check_mask(fn, mask, lead, "logits_p")
    check_device(fn, [("logits_p", logits_p), ("logits_q", logits_q), ("mask", mask)])
    inv_tau = _inv_tau(fn, temperature)
    chunk = _rows_per_chunk(fn, chunk_size, budget_mib, "kl", logits_p.device, V, logits_p.element_size(),
                            masked=mask is not None)
    valid = _valid_rows(mask)
    kl = KL.apply(logits_p.reshape(-1, V), logits_q.reshape(-1, V), valid, inv_tau, chunk)
    return _scatter(kl, valid, lead)


def fused_token_kl(
    hidden_p: torch.Tensor,
    hidden_q: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    budget_mib: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact KL(p || q) per token from two runs' last hidden states and the LM head, fused.

    The same quantity as ``token_kl`` (VPPO's paper-form visual dependency, arXiv
    2510.09285) with ``z = hidden @ weight.T + bias``:

        KL_t = sum_v p_v (log p_v - log q_v),  p = softmax(z_p / tau), q = softmax(z_q / tau)

    but neither run's ``[B, T, V]`` logits are ever materialised: valid rows are index-selected
    (padding is skipped entirely), projected one chunk of rows at a time in the weight's dtype
    (bf16 matmul is fine), and the softmax/KL runs in float32 on that ``[chunk, V]`` block.
    Here ``chunk_size`` / ``budget_mib`` size the matmul chunk (its two logit blocks fill the
    budget: ~880 rows at V = 152k in bf16 on a GPU, so the matmul stays compute-bound although it
    re-reads the weight per chunk); the KL over a block is chunked as ``token_kl``'s by default.
    Differentiable w.r.t. the hidden states, the weight and the bias; with autograd on, each
    chunk's logits are kept for the backward (a ``[N, V]`` copy per run in the weight's dtype),
    so score under ``torch.no_grad()``.

    Args:
        hidden_p: ``[B, T, H]`` last hidden states of the ``p`` run (any ``[..., H]``).
        hidden_q: ``[B, T, H]`` hidden states of the ``q`` run, same shape.
        weight: ``[V, H]`` LM-head (unembedding) weight.
        mask: optional ``[B, T]`` bool; only True positions are computed.
        bias: optional ``[V]`` LM-head bias.
        chunk_size: flattened positions per LM-head matmul chunk, used exactly; None (default):
            as many as fit ``budget_mib``.
        budget_mib: MiB of the chunk's two ``[chunk, V]`` logit blocks when ``chunk_size`` is None
            (default None: 512 on GPUs, 16 on CPU); the rows are ``floor(budget / (V * 2 *
            itemsize))``, at least 1 (``rlcredit.functional._chunking``). Pass one of the two.
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
    mask = _check_mask(fn, mask, lead, "hidden_p")
    check_device(
        fn,
        [("hidden_p", hidden_p), ("hidden_q", hidden_q), ("weight", weight), ("bias", bias),
         ("mask", mask)],
    )
    inv_tau = _inv_tau(fn, temperature)
    # A chunk is both runs' [rows, V] logits in the weight's dtype; the KL over them is chunked as
    # token_kl's (default budget), so on a CPU the softmax blocks stay cache-sized while the matmul
    # gets enough rows to amortise reading the [V, H] weight once per chunk.
    V, itemsize = weight.shape[0], weight.element_size()
    chunk = _rows_per_chunk(fn, chunk_size, budget_mib, "lm_head", weight.device, V, itemsize, masked=False)
    kl_chunk = _rows_per_chunk(fn, None, None, "kl", weight.device, V, itemsize, masked=False)
    flat_p, flat_q = hidden_p.reshape(-1, H), hidden_q.reshape(-1, H)
    b = None if bias is None else bias.to(weight.dtype)
    valid = _valid_rows(mask)
    parts = []
    for _, _, rows in _blocks(flat_p.shape[0], valid, chunk):
        # The matmul runs in the LM head's dtype, as in the model's own forward.
        zp = F.linear(flat_p[rows].to(weight.dtype), weight, b)
        zq = F.linear(flat_q[rows].to(weight.dtype), weight, b)
        parts.append(KL.apply(zp, zq, None, inv_tau, kl_chunk))
    kl = torch.cat(parts) if parts else torch.zeros(0, device=hidden_p.device)
    return _scatter(kl, valid, lead)

