"""How many rows of a ``[N, V]`` vocabulary block the kernels process at once: the one rule.

A chunk of ``r`` rows holds a few ``[r, V]`` temporaries: float32 blocks of the softmax (eager
path), copies of gathered rows in the input's dtype (masked rows), the LM head's logits (fused
KL). ``chunk_size=None`` picks the largest ``r`` whose temporaries fit ``budget_mib``:

    r = max(1, floor(budget_mib * 2**20 / (V * bytes_per_entry)))

where ``bytes_per_entry`` sums, over the ``[r, V]`` blocks alive at the worst moment of the
forward or backward, each block's element size (``temporaries``). Large chunks are what a GPU
wants (a few large kernels instead of thousands of small launches); the budget keeps them from
costing memory that the model needs. An explicit ``chunk_size`` is used exactly as given.
"""

from __future__ import annotations

import torch

from rlcredit.errors import RLCreditError
from rlcredit.functional._checks import check_positive_int, check_real

__all__: list[str] = []

#: ``budget_mib`` when none is given, on GPUs (and any device but the CPU): large chunks turn
#: thousands of small kernel launches into a few large ones, and give the fused KL's LM-head
#: matmul ~900 rows at V = 152k (compute-bound; the weight is re-read once per chunk).
BUDGET_MIB = 512.0
#: ... and on CPU, where float32 blocks above ~8 MiB run slower (measured single-threaded at
#: V = 32000 and 151936: 8-64 rows are fastest, 256 rows 2-3x slower): cache-sized chunks.
CPU_BUDGET_MIB = 16.0

#: Float32 ``[r, V]`` blocks alive at once on the eager path (forward or backward, the larger):
#: entropy ``log p`` + ``p``; log-prob ``z / tau`` + logsumexp's ``exp``; KL ``log p``, ``log q`` and one
#: more, plus its ``p == 0`` bool mask (one byte). Compiled, the forward is fused row reductions
#: and the backward writes into its destination (inductor's CPU code allocates no ``[r, V]``
#: buffer): one float32 block is counted as headroom.
_FP32_BLOCKS = {"entropy": 2, "logprob": 2, "kl": 3}
_EXTRA_BYTES = {"entropy": 0, "logprob": 0, "kl": 1}
#: Blocks in the input's dtype: rows gathered by a mask (forward) and the gradient staged before
#: its scatter (backward), one pair per input.
_INPUTS = {"entropy": 1, "logprob": 1, "kl": 2}


def temporaries(kernel: str, *, compiled: bool = False, masked: bool = False, itemsize: int) -> int:
    """Bytes per vocabulary entry of one chunk row, at the worst moment of forward or backward.

    Args:
        kernel: ``"entropy"``, ``"logprob"``, ``"kl"``, or ``"lm_head"`` (``fused_token_kl``'s
            matmul chunk: both runs' ``[rows, V]`` logits in the head's dtype; the KL over them
            is then chunked as ``"kl"``).
        compiled: whether the rows run through ``torch.compile`` (``_compile.compiles_on``).
        masked: whether rows are gathered by a mask (copies in the input dtype).
        itemsize: bytes per element of the input logits (of the LM head's weight for ``"lm_head"``).

    Examples:
        >>> temporaries("kl", compiled=False, masked=False, itemsize=2)  # 3 float32 blocks + bool
        13
        >>> temporaries("kl", compiled=False, masked=True, itemsize=2)  # + 2 x (gather + gradient)
        21
        >>> temporaries("lm_head", itemsize=2)  # two bf16 logit blocks
        4
    """
    if kernel == "lm_head":
        return 2 * itemsize
    fp32 = 4 * (1 if compiled else _FP32_BLOCKS[kernel]) + (0 if compiled else _EXTRA_BYTES[kernel])
    staged = 2 * _INPUTS[kernel] * itemsize if masked else 0
    return fp32 + staged


def rows_for_budget(width: int, bytes_per_entry: int, budget_mib: float) -> int:
    """``max(1, floor(budget_mib MiB / (width * bytes_per_entry)))``: rows whose temporaries fit.

    The one rule by which the vocabulary kernels and the attention capture size their chunks: the
    flattened ``[..., width]`` rows of an input are processed ``rows`` at a time, and a chunk's
    ``[rows, width]`` temporaries hold ``rows * width * bytes_per_entry`` bytes.

    Args:
        width: entries per row (``V`` for the vocabulary kernels, key columns for attention).
        bytes_per_entry: bytes of temporaries per entry (e.g. 13 for an eager float32 KL row).
        budget_mib: the memory budget, in MiB.

    Returns:
        An int ``>= 1``.

    Examples:
        >>> rows_for_budget(151936, 13, 256.0)  # 268435456 // 1975168
        135
        >>> rows_for_budget(10**9, 4, 1.0)  # never below one row
        1
    """
    return max(1, int(budget_mib * 2**20) // max(1, width * bytes_per_entry))


def default_budget_mib(device: torch.device) -> float:
    """``budget_mib`` when none is given: ``CPU_BUDGET_MIB`` (16) on CPU, ``BUDGET_MIB`` (512) elsewhere.

    The budget bounds a chunk's ``[rows, V]`` temporaries for ``[..., V]`` logits.

    Args:
        device: where the kernel runs.

    Returns:
        The budget in MiB (a float).

    Examples:
        >>> import torch
        >>> from rlcredit.functional import default_budget_mib
        >>> default_budget_mib(torch.device("cpu")), default_budget_mib(torch.device("cuda"))
        (16.0, 512.0)
    """
    return CPU_BUDGET_MIB if device.type == "cpu" else BUDGET_MIB


def chunk_rows(fn: str, chunk_size: object, budget_mib: object, *, width: int, bytes_per_entry: int,
               device: torch.device) -> int:
    """Validate ``chunk_size`` / ``budget_mib`` (at most one given) and return the rows per chunk."""
    if chunk_size is not None:
        if budget_mib is not None:
            raise RLCreditError(
                f"{fn}: pass `chunk_size` (rows per chunk, used exactly) or `budget_mib` (rows derived from a "
                f"memory budget), not both; got chunk_size={chunk_size!r}, budget_mib={budget_mib!r}."
            )
        return check_positive_int(fn, "chunk_size", chunk_size)
    if budget_mib is None:
        budget_mib = default_budget_mib(device)
    budget = check_real(fn, "budget_mib", budget_mib, low=0.0, low_open=True)
    return rows_for_budget(width, bytes_per_entry, float(budget))
