"""Dependency estimators: per-token scores ``[B, T]`` that say how much credit each token deserves.

An estimator is called once per rollout batch, under ``torch.no_grad()``, as
``estimator(rollout, policy=None)``, and returns ``[B, T]`` float scores with 0 on padding, or an
``rlcredit.EstimatorOutput`` when it also produces auxiliary per-token data. Estimators are
per-token: every batch-scope statistic belongs to weighters, shapers and losses.
"""

from __future__ import annotations

import numbers
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import Tensor

from rlcredit.errors import RolloutError, SpecError
from rlcredit.registry import register
from rlcredit.requirements import POLICY, AllOf, AnyOf, Field, Requirement
from rlcredit.requirements import Signal as SignalRequirement
from rlcredit.rollout import EstimatorOutput, Rollout
from rlcredit.validators import in_range, non_empty_str, to_number

__all__ = ["DependencyEstimator", "Uniform", "Signal", "Entropy"]


@runtime_checkable
class DependencyEstimator(Protocol):
    """Per-token scores from a rollout (and optionally a policy).

    Attributes:
        requires: a tuple of ``rlcredit.requirements`` values checked by ``Strategy.assign`` before
            anything runs: ``Field("old_logprobs")``, ``Signal("entropy")``, ``POLICY``,
            ``AnyOf(...)`` when either suffices, ``AllOf(...)`` inside it.
        extras: names of the auxiliary tensors it returns in ``EstimatorOutput.extras`` (stored by
            the strategy as ``f"{name}.{extra}"``); empty for most estimators.

    Call:
        ``(rollout, policy=None) -> Tensor [B, T] | EstimatorOutput``, no grad, 0 on padding.

    Examples:
        Any callable with ``requires`` fits; register it to use it from configs:

        >>> import attrs, torch, rlcredit
        >>> @attrs.frozen
        ... class Position:  # later tokens score higher
        ...     requires = ()
        ...     def __call__(self, rollout, policy=None):
        ...         return rollout.response_mask.float().cumsum(-1) * rollout.response_mask
        >>> from rlcredit.estimators import DependencyEstimator
        >>> isinstance(Position(), DependencyEstimator)
        True
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, False]]), torch.tensor([1.0]), torch.tensor([0]))
        >>> rlcredit.Strategy(estimators={"pos": Position()}).assign(r).scores["pos"]
        tensor([[1., 2., 0.]])
    """

    requires: tuple[Requirement, ...]

    def __call__(self, rollout: Rollout, policy: Any = None) -> Tensor | EstimatorOutput: ...


@register("estimator", "uniform")
@attrs.frozen
class Uniform:
    """Every valid token scores 1 (GRPO's uniform credit): ``S_t = 1`` on valid tokens, 0 on padding.

    Returns:
        ``[B, T]`` float32.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.estimators import Uniform
        >>> r = rlcredit.Rollout(torch.tensor([[True, False]]), torch.tensor([1.0]), torch.tensor([0]))
        >>> Uniform()(r)
        tensor([[1., 0.]])
    """

    requires = ()
    extras = ()

    def __call__(self, rollout: Rollout, policy: Any = None) -> Tensor:
        return rollout.response_mask.float()


@register("estimator", "signal")
@attrs.frozen
class Signal:
    """Reads a precomputed per-token signal: ``S_t = rollout.signals[key][b, t]``, 0 on padding.

    Use it for any score computed outside rlcredit (a process reward model, a trainer's own
    statistics...).

    Args:
        key: the signal name in ``rollout.signals`` (a ``[B, T]`` tensor).

    Returns:
        ``[B, T]`` float32.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.estimators import Signal
        >>> r = rlcredit.Rollout(torch.tensor([[True, False]]), torch.tensor([1.0]), torch.tensor([0]),
        ...                      signals={"prm": torch.tensor([[0.7, 5.0]])})
        >>> Signal("prm")(r)
        tensor([[0.7000, 0.0000]])
    """

    key: str = attrs.field(validator=non_empty_str)

    extras = ()

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return (SignalRequirement(self.key),)

    def __call__(self, rollout: Rollout, policy: Any = None) -> Tensor:
        value = rollout.signals[self.key]
        if value.ndim != 2:
            raise RolloutError(
                f"signal estimator: rollout.signals[{self.key!r}] must be [B, T] to serve as a score, "
                f"got shape {list(value.shape)}."
            )
        return torch.where(rollout.response_mask, value.float(), torch.zeros((), device=value.device))


@register("estimator", "entropy")
@attrs.frozen
class Entropy:
    """Token entropy of the sampling policy, the "forking token" score of arXiv 2506.01939.

    ``H_t = -sum_v p_v log p_v`` with ``p = softmax(logits_t / temperature)``.

    Reads ``rollout.signals["entropy"]`` when a trainer already computed it (then ``temperature``
    was the trainer's business and is not applied again); otherwise computes it from the policy
    (``rlcredit.HFPolicy``) and ``rollout.model_inputs``, chunked over rows.

    Args:
        temperature: sampling temperature applied to the policy's logits (> 0).

    Returns:
        ``[B, T]`` float32 entropies, 0 on padding.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.estimators import Entropy
        >>> r = rlcredit.Rollout(torch.tensor([[True, False]]), torch.tensor([1.0]), torch.tensor([0]),
        ...                      signals={"entropy": torch.tensor([[0.5, 0.9]])})
        >>> Entropy()(r)
        tensor([[0.5000, 0.0000]])
    """

    temperature: float = attrs.field(default=1.0, converter=to_number, validator=in_range(0.0, lo_open=True))

    requires = (AnyOf(SignalRequirement("entropy"), AllOf(POLICY, Field("model_inputs"))),)
    extras = ()

    def __call__(self, rollout: Rollout, policy: Any = None) -> Tensor:
        mask = rollout.response_mask
        if "entropy" in rollout.signals:
            value = rollout.signals["entropy"].float()
        else:
            if policy is None or rollout.model_inputs is None:
                raise RolloutError(
                    "entropy estimator: rollout.signals['entropy'] is absent, so it needs a policy and "
                    "rollout.model_inputs to compute it; pass both, or precompute the signal."
                )
            value = policy.response_stats(
                rollout.model_inputs, mask, temperature=self.temperature, entropy=True
            ).entropy
        return torch.where(mask, value, torch.zeros((), device=value.device))


# ------------------------------------------------------------------------------------------------
# Text-aware scores from the sampled token ids (rollout.response_ids).

__all__ += ["TokenMatch"]


def _token_ids(value: Any) -> tuple[int, ...]:
    """attrs converter: an integer or an iterable of integers (NumPy ones too) as a tuple of Python ints."""

    def as_int(v: Any) -> Any:
        return int(v) if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v

    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return (as_int(value),) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    return tuple(as_int(v) for v in value)


def _check_token_ids(instance: Any, attribute: Any, value: Any) -> None:
    bad = not isinstance(value, tuple) or not value or any(
        not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in value)
    if bad:
        raise SpecError(f"TokenMatch.ids must be a non-empty list of token ids (ints >= 0), got {value!r}; e.g. "
                        f"ids=tokenizer.convert_tokens_to_ids(['Wait', 'But']).")


@register("estimator", "token_match")
@attrs.frozen
class TokenMatch:
    """1 where the sampled token is one of ``ids``, else 0: ``S_t = [y_t in ids]``, 0 on padding.

    Reads ``rollout.response_ids`` (``[B, T]`` int64, the sampled ids; the integrations fill it),
    so a text-aware score (digits, planning words such as "wait" or "therefore", a tool call's
    tokens) needs no slicing of ``model_inputs``. Combine it with weighters (``threshold(1.0)``
    keeps the matches, ``complement`` of that drops them, ``union`` with another score adds them)
    or shapers.

    Args:
        ids: the token ids to match (an int or a list of ints >= 0; e.g. from
            ``tokenizer.convert_tokens_to_ids([...])``).

    Returns:
        ``[B, T]`` float32 scores in ``{0, 1}``.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.estimators import TokenMatch
        >>> r = rlcredit.Rollout(torch.tensor([[True, True, True, False]]), torch.tensor([1.0]), torch.tensor([0]),
        ...                      response_ids=torch.tensor([[5, 7, 9, 7]]))
        >>> TokenMatch(ids=[7, 9])(r)  # the padded 7 scores 0
        tensor([[0., 1., 1., 0.]])
    """

    ids: tuple[int, ...] = attrs.field(converter=_token_ids, validator=_check_token_ids)

    requires = (Field("response_ids"),)
    extras = ()

    def __call__(self, rollout: Rollout, policy: Any = None) -> Tensor:
        sampled = rollout.response_ids
        if sampled is None:
            raise RolloutError("token_match estimator needs rollout.response_ids ([B, T] int64, the sampled token ids).")
        hit = torch.isin(sampled, torch.tensor(self.ids, dtype=sampled.dtype, device=sampled.device))
        return (hit & rollout.response_mask).float()
