"""Pure tensor maths of credit assignment: no classes with state, no registry, no ``Rollout``.

Every function takes plain tensors (response tensors ``[B, T]``, right-padded, with a bool
``mask``), validates shapes and dtypes on entry (raising ``rlcredit.RolloutError`` or
``rlcredit.RLCreditError``), computes in float32 whatever the input dtype, gives padding 0,
and defines its degenerate cases (one-sample groups, all-equal rewards, empty rows, all-padding
batches) instead of returning NaN or inf. Batch-scope statistics take ``reducer=None`` (local)
or a ``Reducer``, and then give on R ranks exactly what one process holding every row gives.

Groups of rollouts:
    ``group_normalize`` (GRPO), ``group_center`` (Dr. GRPO), ``leave_one_out``
    (RLOO), ``overlong_penalty`` (DAPO reward shaping); over the whole batch,
    ``batch_normalize`` (TRL's batch scaling, RLOO's advantage normalisation).
Losses:
    ``clipped_surrogate``, ``sequence_log_ratio`` (GSPO), ``k3_kl``.
Aggregation:
    ``aggregate`` (the four modes in ``AGGREGATIONS``), ``loss_coefficients`` (its linear
    form, the one place the denominators are derived), ``Totals`` and ``batch_totals`` (the
    batch statistics it divides by), ``masked_mean``.
Per-token quantities of the full vocabulary (chunked over rows):
    ``token_entropy``, ``selected_logprobs``, ``token_kl``, ``fused_token_kl``.
Selection and shaping:
    ``top_fraction_mask`` (scopes in ``SCOPES``), ``dependency_scale`` (VPPO TAS).
"""

from rlcredit.functional._group import (
    batch_normalize,
    group_center,
    group_normalize,
    leave_one_out,
    overlong_penalty,
)
from rlcredit.functional._logits import fused_token_kl, selected_logprobs, token_entropy, token_kl
from rlcredit.functional._aggregate import (
    AGGREGATIONS,
    Totals,
    aggregate,
    batch_totals,
    loss_coefficients,
    masked_mean,
)
from rlcredit.functional._loss import clipped_surrogate, k3_kl, sequence_log_ratio
from rlcredit.functional._reduce import Reducer
from rlcredit.functional._chunking import default_budget_mib, rows_for_budget
from rlcredit.functional._compile import run as run_compiled
from rlcredit.functional._select import SCOPES, top_fraction_mask
from rlcredit.functional._shaping import dependency_scale

__all__ = [
    "AGGREGATIONS",
    "SCOPES",
    "Reducer",
    "Totals",
    "aggregate",
    "batch_normalize",
    "batch_totals",
    "clipped_surrogate",
    "default_budget_mib",
    "dependency_scale",
    "fused_token_kl",
    "group_center",
    "group_normalize",
    "k3_kl",
    "leave_one_out",
    "loss_coefficients",
    "masked_mean",
    "overlong_penalty",
    "rows_for_budget",
    "run_compiled",
    "selected_logprobs",
    "sequence_log_ratio",
    "token_entropy",
    "token_kl",
    "top_fraction_mask",
]
