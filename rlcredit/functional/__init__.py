"""Pure tensor maths of credit assignment: no classes with state, no registry, no ``Rollout``.

Every function takes plain tensors (response tensors ``[B, T]``, right-padded, with a bool
``mask``), validates shapes and dtypes on entry (raising ``rlcredit.RolloutError`` or
``rlcredit.RLCreditError``), computes in float32 whatever the input dtype, gives padding 0,
and defines its degenerate cases (one-sample groups, all-equal rewards, empty rows, all-padding
batches) instead of returning NaN or inf. Batch-scope statistics take ``reducer=None`` (local)
or a ``Reducer``, and then give on R ranks exactly what one process holding every row gives.

Groups of rollouts:
    ``group_normalize`` (GRPO), ``group_center`` (Dr. GRPO), ``leave_one_out``
    (RLOO), ``overlong_penalty`` (DAPO reward shaping).
Losses:
    ``clipped_surrogate``, ``aggregate`` (the four modes in ``AGGREGATIONS``),
    ``k3_kl``, ``masked_mean``, ``loss_coefficients`` (the linear form of
    ``aggregate``).
Per-token quantities of the full vocabulary (chunked over rows):
    ``token_entropy``, ``selected_logprobs``, ``token_kl``, ``fused_token_kl``.
Selection and shaping:
    ``top_fraction_mask`` (scopes in ``SCOPES``), ``dependency_scale`` (VPPO TAS).
"""

from rlcredit.functional._group import group_center, group_normalize, leave_one_out, overlong_penalty
from rlcredit.functional._logits import fused_token_kl, selected_logprobs, token_entropy, token_kl
from rlcredit.functional._loss import (
    AGGREGATIONS,
    aggregate,
    clipped_surrogate,
    k3_kl,
    loss_coefficients,
    masked_mean,
)
from rlcredit.functional._reduce import Reducer
from rlcredit.functional._select import SCOPES, top_fraction_mask
from rlcredit.functional._shaping import dependency_scale

__all__ = [
    "AGGREGATIONS",
    "SCOPES",
    "Reducer",
    "aggregate",
    "clipped_surrogate",
    "dependency_scale",
    "fused_token_kl",
    "group_center",
    "group_normalize",
    "k3_kl",
    "leave_one_out",
    "loss_coefficients",
    "masked_mean",
    "overlong_penalty",
    "selected_logprobs",
    "token_entropy",
    "token_kl",
    "top_fraction_mask",
]
