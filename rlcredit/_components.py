"""Shared helpers for component classes: requirement strings, score lookup, validators, converters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from rlcredit.errors import RolloutError, SpecError
from rlcredit.registry import build_component

# Requirement strings (DESIGN §4): "old_logprobs", "ref_logprobs", "model_inputs", "signal:KEY",
# "policy", "score:NAME" ("score:" reads the strategy's single score). "A|B" means either one.
POLICY = "policy"


def score_requirement(score: str | None) -> str:
    return f"score:{score or ''}"


def requirement_met(req: str, rollout: Any, policy: Any) -> bool:
    """Whether one requirement (alternatives split on ``|``) is satisfied by the rollout or policy."""
    for alt in req.split("|"):
        if alt == POLICY:
            if policy is not None:
                return True
        elif alt.startswith("score:"):
            return True  # scores are checked by Strategy at construction
        elif rollout.has(alt):
            return True
    return False


def describe_requirement(req: str) -> str:
    parts = []
    for alt in req.split("|"):
        if alt == POLICY:
            parts.append("a policy (strategy.assign(rollout, policy=rlcredit.HFPolicy(model)))")
        elif alt.startswith("signal:"):
            parts.append(f"rollout.signals[{alt[7:]!r}]")
        else:
            parts.append(f"rollout.{alt}")
    return " or ".join(parts)


def primary_scores(scores: Mapping[str, Tensor]) -> list[str]:
    """Score names that are not estimator extras (extras are stored as ``name.key``)."""
    return [k for k in scores if "." not in k]


def pick_score(scores: Mapping[str, Tensor], name: str | None, who: str) -> Tensor:
    """The score a weighter or shaper reads: ``scores[name]``, or the single score when name is None."""
    if name is None:
        names = primary_scores(scores)
        if len(names) != 1:
            raise SpecError(
                f"{who} reads an unnamed score, but the strategy produces {len(names)} "
                f"({', '.join(names) or 'none'}); pass score=NAME."
            )
        name = names[0]
    if name not in scores:
        raise SpecError(f"{who} reads score {name!r}, but only {', '.join(sorted(scores)) or 'no scores'} were produced.")
    return scores[name]


def is_builtin(component: Any) -> bool:
    """Whether a component class is rlcredit's own (its outputs are tested to be finite, 0 on padding)."""
    return type(component).__module__.split(".")[0] in ("rlcredit", "rlcredit_mm")


def check_bt(x: Any, mask: Tensor, who: str, *, trusted: bool = False, nonnegative: bool = False) -> Tensor:
    """Check that a component returned a float ``[B, T]`` tensor.

    Outputs of third-party components (``trusted=False``) are also checked for finite (and, with
    ``nonnegative``, non-negative) values and zeroed on padding; built-in components guarantee
    both by construction and skip those full passes over the batch (they are on the hot path).
    """
    if not isinstance(x, Tensor) or tuple(x.shape) != tuple(mask.shape):
        got = f"shape {list(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise RolloutError(f"{who} must return a [B, T] = {list(mask.shape)} tensor, got {got}.")
    x = x.float()
    if trusted:
        return x
    if not bool(torch.isfinite(x).all()):
        raise RolloutError(f"{who} returned non-finite values; scores and weights must be finite.")
    if nonnegative and bool((x < 0).any()):
        raise RolloutError(f"{who} returned negative weights; weights must be >= 0.")
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# --- attrs validators and converters ----------------------------------------------------------


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """attrs validator: a real number in the interval, with a message naming the accepted range."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and lo is not None:
            ok = value > lo if lo_open else value >= lo
        if ok and hi is not None:
            ok = value < hi if hi_open else value <= hi
        if not ok:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
            raise SpecError(f"{type(instance).__name__}.{attribute.name} must be a number in {rng}, got {value!r}.")

    return validate


def one_of(*choices: Any):
    """attrs validator: the value is one of ``choices`` (message lists them)."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if value not in choices:
            raise SpecError(
                f"{type(instance).__name__}.{attribute.name} must be one of {', '.join(map(repr, choices))}, got {value!r}."
            )

    return validate


def int_at_least(lo: int):
    """attrs validator: an int (not a bool) ``>= lo``."""

    def validate(instance: Any, attribute: Any, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise SpecError(f"{type(instance).__name__}.{attribute.name} must be an int >= {lo}, got {value!r}.")

    return validate


def is_bool(instance: Any, attribute: Any, value: Any) -> None:
    """attrs validator: exactly True or False."""
    if not isinstance(value, bool):
        raise SpecError(f"{type(instance).__name__}.{attribute.name} must be True or False, got {value!r}.")


def optional_str(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise SpecError(f"{type(instance).__name__}.{attribute.name} must be a score name (str) or None, got {value!r}.")


def to_component(kind: str):
    """attrs converter: build a component of ``kind`` from a name, a spec dict or an object."""

    def convert(spec: Any) -> Any:
        return build_component(kind, spec)

    return convert


def to_components(kind: str):
    """attrs converter: a tuple of components of ``kind`` from a list of specs."""

    def convert(specs: Iterable[Any]) -> tuple:
        if isinstance(specs, (str, Mapping)) or not isinstance(specs, Iterable):
            raise SpecError(f"expected a list of {kind}s, got {specs!r}.")
        return tuple(build_component(kind, s) for s in specs)

    return convert


def requires_of(obj: Any) -> tuple[str, ...]:
    return tuple(getattr(obj, "requires", ()))
