"""Strategy: named estimators -> one weighter -> a shaper chain -> a policy loss."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit._components import (
    check_bt, describe_requirement, is_builtin, primary_scores, requirement_met, requires_of, to_component, to_components,
)
from rlcredit.distributed import Reducer
from rlcredit.errors import RolloutError, SpecError
from rlcredit.estimators import DependencyEstimator
from rlcredit.losses import ClippedSurrogate, check_credit, check_logprobs
from rlcredit.registry import build_component, component_spec
from rlcredit.rollout import Credit, EstimatorOutput, LazyMetrics, LossOutput, Rollout
from rlcredit.shapers import GroupNormalize
from rlcredit.weighters import Uniform

__all__ = ["Strategy"]


def _to_estimators(value: Any) -> Mapping[str, DependencyEstimator]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise SpecError(
            f"Strategy.estimators must be a mapping score-name -> estimator (e.g. {{'visual': 'visual_kl'}}), "
            f"got {type(value).__name__}."
        )
    out = {}
    for name, spec in value.items():
        if not isinstance(name, str) or not name or "." in name:
            raise SpecError(f"score names must be non-empty strings without '.', got {name!r} ('.' marks estimator extras).")
        out[name] = build_component("estimator", spec)
    return MappingProxyType(out)


def _default_shapers() -> tuple:
    return (GroupNormalize(),)


@attrs.frozen(hash=False, repr=False)
class Strategy:
    """A credit-assignment strategy: the composition of the four interfaces.

    Data flow, once per rollout batch (``assign``, no grad): every estimator scores the tokens
    (``scores[name]``, ``[B, T]``; extras as ``name.key``), the weighter turns scores into
    per-token weights ``[B, T]``, and the shaper chain turns ``rollout.rewards`` ``[B]`` into
    advantages ``[B]`` or ``[B, T]``. Per (micro-)batch (``loss``, differentiable), the policy loss
    combines current log-probs ``[B, T]`` with that credit.

    Parts may be objects or specs (a registered name or ``{"name": ..., **params}``). Left out, they
    default to GRPO: no estimators, ``uniform`` weighter, ``[group_normalize]``,
    ``clipped_surrogate``. At construction every score a weighter, shaper or loss reads must be
    produced by an estimator (else ``rlcredit.SpecError``).

    Args:
        estimators: score name -> estimator.
        weighter: a token weighter.
        shapers: the advantage chain, applied in order starting from the rewards.
        policy_loss: the policy loss.

    Examples:
        >>> import torch, rlcredit
        >>> s = rlcredit.Strategy(estimators={"entropy": "entropy"},
        ...                       weighter={"name": "uniform"}, shapers=["group_normalize"])
        >>> r = rlcredit.Rollout(torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, 0.0]),
        ...                      torch.tensor([0, 0]), signals={"entropy": torch.rand(2, 3)})
        >>> credit = s.assign(r)
        >>> credit.advantages
        tensor([ 0.7071, -0.7071])
        >>> out = s.loss(torch.zeros(2, 3, requires_grad=True), r, credit)
        >>> out.loss.shape
        torch.Size([])
        >>> rlcredit.build(s.to_spec()) == s
        True
    """

    estimators: Mapping[str, DependencyEstimator] = attrs.field(factory=dict, converter=_to_estimators)
    weighter: Any = attrs.field(factory=Uniform, converter=to_component("weighter"))
    shapers: tuple = attrs.field(factory=_default_shapers, converter=to_components("shaper"))
    policy_loss: Any = attrs.field(factory=ClippedSurrogate, converter=to_component("loss"))

    def __attrs_post_init__(self) -> None:
        produced = set(self.estimators)
        for name, est in self.estimators.items():
            produced.update(f"{name}.{extra}" for extra in getattr(est, "extras", ()))
        for who, component in self._readers():
            for req in requires_of(component):
                if not req.startswith("score:"):
                    continue
                score = req[len("score:"):]
                if score == "" and len(self.estimators) != 1:
                    raise SpecError(
                        f"{who} reads an unnamed score, but the strategy has {len(self.estimators)} estimators "
                        f"({', '.join(self.estimators) or 'none'}); pass score=NAME, or add an estimator."
                    )
                if score and score not in produced:
                    raise SpecError(
                        f"{who} reads score {score!r}, which no estimator produces; produced: "
                        f"{', '.join(sorted(produced)) or '(none: add estimators={{...}})'}."
                    )

    def _readers(self) -> list[tuple[str, Any]]:
        items = [(f"weighter {type(self.weighter).__name__}", self.weighter)]
        items += [(f"shaper {type(s).__name__}", s) for s in self.shapers]
        items.append((f"policy_loss {type(self.policy_loss).__name__}", self.policy_loss))
        return items

    def _check_requirements(self, rollout: Rollout, policy: Any, components: list[tuple[str, Any]]) -> None:
        missing = []
        for who, component in components:
            for req in requires_of(component):
                if not requirement_met(req, rollout, policy):
                    missing.append(f"{who} needs {describe_requirement(req)}")
        if missing:
            raise RolloutError("missing inputs: " + "; ".join(missing) + ".")

    # ------------------------------------------------------------------------------------------

    def assign(self, rollout: Rollout, policy: Any = None, *, reducer: Reducer | None = None) -> Credit:
        """Compute scores, token weights and advantages for one rollout batch (no grad).

        Args:
            rollout: the batch (``rlcredit.Rollout``).
            policy: an ``rlcredit.HFPolicy`` for estimators that need the model, else None.
            reducer: a ``rlcredit.distributed.Reducer`` for batch statistics across ranks.

        Returns:
            ``rlcredit.Credit`` with ``scores``, ``token_weights [B, T]``, ``advantages`` and
            detached ``metrics``.

        Raises:
            RolloutError: the rollout or policy lacks what a component requires (all listed).
        """
        if not isinstance(rollout, Rollout):
            raise RolloutError(f"Strategy.assign takes a rlcredit.Rollout, got {type(rollout).__name__}.")
        components = [(f"estimator {name!r}", est) for name, est in self.estimators.items()] + self._readers()
        self._check_requirements(rollout, policy, components)
        mask = rollout.response_mask
        B, T = mask.shape
        with torch.no_grad():
            scores: dict[str, Tensor] = {}
            for name, est in self.estimators.items():
                out = est(rollout, policy)
                who = f"estimator {name!r} ({type(est).__name__})"
                trusted = is_builtin(est)
                if isinstance(out, EstimatorOutput):
                    scores[name] = check_bt(out.score, mask, who, trusted=trusted)
                    for key, extra in out.extras.items():
                        if not isinstance(extra, Tensor) or tuple(extra.shape[:2]) != (B, T):
                            raise RolloutError(f"{who}: extra {key!r} must have leading shape [B, T] = [{B}, {T}].")
                        scores[f"{name}.{key}"] = extra.detach()
                else:
                    scores[name] = check_bt(out, mask, who, trusted=trusted)
            weights = check_bt(self.weighter(scores, rollout, reducer=reducer), mask,
                               f"weighter {type(self.weighter).__name__}", trusted=is_builtin(self.weighter),
                               nonnegative=True)
            advantages = rollout.rewards.float()
            for shaper in self.shapers:
                advantages = shaper(advantages, scores, rollout, reducer=reducer)
                if not isinstance(advantages, Tensor) or tuple(advantages.shape) not in ((B,), (B, T)):
                    raise RolloutError(f"shaper {type(shaper).__name__} must return [B] or [B, T] advantages.")
                if not is_builtin(shaper) and not bool(torch.isfinite(advantages).all()):
                    raise RolloutError(f"shaper {type(shaper).__name__} returned non-finite advantages.")
            advantages = advantages.float()
            metrics = self._metrics(scores, weights, advantages, mask)
        return Credit._trusted(scores, weights, advantages, metrics)

    @staticmethod
    def _metrics(scores: Mapping[str, Tensor], weights: Tensor, advantages: Tensor, mask: Tensor) -> LazyMetrics:
        """Batch metrics, each computed on first access (weights and scores are 0 on padding)."""

        def n_valid() -> Tensor:
            return mask.sum().clamp_min(1).float()

        thunks = {
            "kept_fraction": lambda: (weights > 0).sum() / n_valid(),
            "weight_mean": lambda: weights.sum() / n_valid(),
            "advantage_abs_mean": lambda: advantages.abs().mean(),
        }
        for name in primary_scores(scores):
            thunks[f"score/{name}"] = lambda s=scores[name]: s.sum() / n_valid()
        return LazyMetrics(thunks)

    def loss(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *,
             reducer: Reducer | None = None) -> LossOutput:
        """The differentiable policy loss of a (micro-)batch.

        Args:
            logprobs: ``[B, T]`` log-probs of the response tokens under the current policy (with grad).
            rollout: the rollout, or ``rollout.select(rows)`` for a micro-batch.
            credit: the credit from ``assign``, or ``credit.select(rows)`` (same rows).
            reducer: for token-mean denominators across ranks.

        Returns:
            ``rlcredit.LossOutput``.
        """
        check_logprobs(logprobs, rollout, "Strategy.loss")
        check_credit(rollout, credit, "Strategy.loss")
        self._check_requirements(rollout, True, [(f"policy_loss {type(self.policy_loss).__name__}", self.policy_loss)])
        return self.policy_loss(logprobs, rollout, credit, reducer=reducer)

    # ------------------------------------------------------------------------------------------

    def to_spec(self) -> dict[str, Any]:
        """The spec (plain data: JSON/YAML-serialisable) that ``rlcredit.build`` turns back into this strategy."""
        return {
            "estimators": {name: component_spec(est) for name, est in self.estimators.items()},
            "weighter": component_spec(self.weighter),
            "shapers": [component_spec(s) for s in self.shapers],
            "policy_loss": component_spec(self.policy_loss),
        }

    def __repr__(self) -> str:
        return f"rlcredit.build({self.to_spec()!r})"
