"""Policy losses: the only part of rlcredit that builds a graph (through ``logprobs``).

A loss is called per (mini/micro-)batch as ``loss(logprobs [B, T], rollout, credit, *, reducer=None)``
(plus ``totals=`` when the caller has a larger batch's denominators) and returns a
``rlcredit.LossOutput``. Built-ins: the clipped surrogate family (``clipped_surrogate`` with a token
or a sequence ratio, ``gspo``), in ``rlcredit.losses.surrogate``; ``cispo`` (``losses.cispo``),
``sapo`` (``losses.sapo``), ``gmpo`` (``losses.gmpo``), ``kl_cov`` and ``clip_cov``
(``losses.covariance``); and ``papo`` (``losses.papo``), PAPO's perception and double-entropy
terms on top of any of them, which reads a differentiable ``aux`` input at loss time.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from rlcredit.functional import AGGREGATIONS, Reducer
from rlcredit.losses.surrogate import GSPO, RATIOS, ClippedSurrogate, check_credit, check_logprobs
from rlcredit.losses.cispo import CISPO
from rlcredit.losses.sapo import SAPO
from rlcredit.losses.gmpo import GMPO
from rlcredit.losses.covariance import ClipCov, KLCov
from rlcredit.losses.papo import PAPO
from rlcredit.requirements import Requirement
from rlcredit.rollout import Credit, LossOutput, Rollout

__all__ = ["PolicyLoss", "ClippedSurrogate", "GSPO", "CISPO", "SAPO", "GMPO", "KLCov", "ClipCov", "PAPO",
           "AGGREGATIONS", "RATIOS", "check_credit", "check_logprobs"]


@runtime_checkable
class PolicyLoss(Protocol):
    """Per-token log-probs, the rollout and its credit to a scalar loss.

    Attributes:
        requires: a tuple of ``rlcredit.requirements`` values (e.g. ``Field("ref_logprobs")``
            when a KL term is on).

    Call:
        ``(logprobs [B, T], rollout, credit, *, reducer=None, totals=None) -> LossOutput``.
        ``totals`` (an ``rlcredit.functional.Totals``) is passed only when the caller has the
        statistics of a batch larger than these rows (gradient accumulation, verl's global batch
        info); a loss that aggregates should divide by them. A loss that declares
        ``rlcredit.requirements.Aux(name)`` in ``requires`` also gets ``aux={name: [B, T]}``:
        differentiable tensors the trainer computes in the training step (PAPO's masked-image
        log-probs), passed as ``Strategy.loss(..., aux=...)``; other losses never see it.

    Examples:
        >>> import attrs, torch, rlcredit
        >>> @attrs.frozen
        ... class Reinforce:  # -mean(w * A * logp) over valid tokens
        ...     requires = ()
        ...     def __call__(self, logprobs, rollout, credit, *, reducer=None):
        ...         m = rollout.response_mask
        ...         x = credit.token_weights * credit.advantages[:, None] * logprobs
        ...         return rlcredit.LossOutput(-(x * m).sum() / m.sum())
        >>> r = rlcredit.Rollout(torch.ones(2, 1, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
        >>> s = rlcredit.Strategy(policy_loss=Reinforce())
        >>> round(s.loss(torch.tensor([[-1.0], [-2.0]]), r, s.assign(r)).loss.item(), 4)
        -0.3536
    """

    requires: tuple[Requirement, ...]

    def __call__(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
                 reducer: Reducer | None = None) -> LossOutput: ...
