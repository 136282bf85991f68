"""Strategy: named estimators -> one weighter -> a shaper chain -> a policy loss."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import attrs
import torch
from torch import Tensor

from rlcredit._outputs import per_token
from rlcredit.errors import RolloutError, SpecError
from rlcredit.estimators import DependencyEstimator
from rlcredit.functional import Reducer, Totals
from rlcredit.functional._finite import finite_sum
from rlcredit.functional._loss import float32_logprobs
from rlcredit.functional._reduce import check_reducer
from rlcredit.losses import ClippedSurrogate, check_credit, check_logprobs
from rlcredit.losses._common import aux_names, check_aux
from rlcredit.registry import build_component, component_spec
from rlcredit.requirements import POLICY, Requirement, Score, leaves, primary_scores, requirements_of
from rlcredit.rollout import Credit, EstimatorOutput, LazyMetrics, LossOutput, Rollout
from rlcredit.shapers import GroupNormalize
from rlcredit.validators import to_component, to_components
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
        for who, component in self._components():
            for req in requirements_of(component, who):
                if not isinstance(req, Score):
                    continue
                if req.name is None and len(self.estimators) != 1:
                    raise SpecError(
                        f"{who} reads an unnamed score, but the strategy has {len(self.estimators)} estimators "
                        f"({', '.join(self.estimators) or 'none'}); pass score=NAME, or add an estimator."
                    )
                if req.name is not None and req.name not in produced:
                    raise SpecError(
                        f"{who} reads score {req.name!r}, which no estimator produces; produced: "
                        f"{', '.join(sorted(produced)) or '(none: add estimators={{...}})'}."
                    )

    def _components(self) -> list[tuple[str, Any]]:
        """``(who, component)`` for every part, in the order ``assign`` and ``loss`` run them."""
        items = [(f"estimator {name!r}", est) for name, est in self.estimators.items()]
        items.append((f"weighter {type(self.weighter).__name__}", self.weighter))
        items += [(f"shaper {type(s).__name__}", s) for s in self.shapers]
        items.append((f"policy_loss {type(self.policy_loss).__name__}", self.policy_loss))
        return items

    @property
    def requirements(self) -> tuple[Requirement, ...]:
        """What the strategy reads from a rollout and the policy: every part's requirements, each once.

        Scores (``Score``) are internal wiring, checked at construction, and not listed.

        Examples:
            >>> import rlcredit
            >>> [r.describe() for r in rlcredit.build("entropy_forks").requirements]
            ["rollout.signals['entropy'] or (a policy and rollout.model_inputs)"]
            >>> rlcredit.build("grpo").requirements
            ()
        """
        reqs = [req for who, c in self._components() for req in requirements_of(c, who) if not isinstance(req, Score)]
        return tuple(dict.fromkeys(reqs))

    def needs_policy(self, rollout: Rollout) -> bool:
        """Whether ``assign`` on this rollout needs a policy: a requirement the rollout alone does not
        meet, but the rollout and a policy do (integrations build an ``rlcredit.HFPolicy`` only then).

        Examples:
            >>> import torch, rlcredit
            >>> mask, rewards, groups = torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0]), torch.tensor([0])
            >>> inputs = {"input_ids": torch.zeros(1, 3, dtype=torch.long)}
            >>> s = rlcredit.build("entropy_forks")
            >>> s.needs_policy(rlcredit.Rollout(mask, rewards, groups, model_inputs=inputs))
            True
            >>> s.needs_policy(rlcredit.Rollout(mask, rewards, groups, signals={"entropy": torch.ones(1, 2)}))
            False
        """
        return any(not req.met(rollout, None) and req.met(rollout, POLICY) for req in self.requirements)

    def _check_requirements(self, rollout: Rollout, policy: Any, components: list[tuple[str, Any]]) -> None:
        missing, policy_helps = [], False
        for who, component in components:
            for req in requirements_of(component, who):
                if not req.met(rollout, policy):
                    missing.append(f"{who} needs {req.describe()}")
                    policy_helps |= policy is None and POLICY in leaves(req)
        if missing:
            hint = " A policy is passed as strategy.assign(rollout, policy=rlcredit.HFPolicy(model))." if policy_helps else ""
            raise RolloutError("missing inputs: " + "; ".join(missing) + "." + hint)

    # ------------------------------------------------------------------------------------------

    def assign(self, rollout: Rollout, policy: Any = None, *, reducer: Reducer | None = None) -> Credit:
        """Compute scores, token weights and advantages for one rollout batch (no grad).

        Every part's output is checked alike, built-in or third-party: ``[B, T]`` shapes (scores,
        weights), ``[B]`` or ``[B, T]`` advantages, then values (finite; weights ``>= 0``) once, by
        ``rlcredit.Credit``. Scores and weights are set to exactly 0 on padding.

        Args:
            rollout: the batch (``rlcredit.Rollout``).
            policy: an ``rlcredit.HFPolicy`` for estimators that need the model, else None.
            reducer: a ``rlcredit.distributed.Reducer`` for batch statistics across ranks.

        Returns:
            ``rlcredit.Credit`` with ``scores``, ``token_weights [B, T]``, ``advantages`` and
            detached ``metrics`` (computed on first access, no host sync): ``kept_tokens`` (valid
            tokens with weight > 0; **0 means this batch trains nothing**), ``kept_fraction`` (their
            share of the valid tokens), ``weight_mean``, ``advantage_abs_mean``, ``score/NAME``.

        Raises:
            RolloutError: the rollout or policy lacks what a component requires (all listed), or a
                part returned a wrong shape or non-finite values (the part is named).

        Examples:
            >>> import torch, rlcredit
            >>> r = rlcredit.Rollout(torch.tensor([[True, True, False]] * 2), torch.tensor([1.0, 0.0]),
            ...                      torch.tensor([0, 0]))
            >>> rlcredit.build("grpo").assign(r).token_advantages()
            tensor([[ 0.7071,  0.7071,  0.0000],
                    [-0.7071, -0.7071, -0.0000]])
        """
        if not isinstance(rollout, Rollout):
            raise RolloutError(f"Strategy.assign takes a rlcredit.Rollout, got {type(rollout).__name__}.")
        if isinstance(policy, torch.nn.Module):
            raise RolloutError(
                f"Strategy.assign: policy is a raw {type(policy).__name__}; wrap it: policy=rlcredit.HFPolicy(model)."
            )
        if policy is not None and not hasattr(policy, "response_stats"):
            raise RolloutError(
                f"Strategy.assign: policy must be a rlcredit.HFPolicy (or None when the rollout carries every signal), "
                f"got {type(policy).__name__}."
            )
        check_reducer(reducer, "Strategy.assign: reducer")
        components = self._components()
        self._check_requirements(rollout, policy, components)
        mask = rollout.response_mask
        B, T = mask.shape
        with torch.no_grad():
            scores: dict[str, Tensor] = {}
            for name, est in self.estimators.items():
                out = est(rollout, policy)
                who = f"estimator {name!r} ({type(est).__name__})"
                if isinstance(out, EstimatorOutput):
                    scores[name] = per_token(out.score, mask, who)
                    for key, extra in out.extras.items():
                        if not isinstance(extra, Tensor) or tuple(extra.shape[:2]) != (B, T) or extra.device != mask.device:
                            raise RolloutError(
                                f"{who}: extra {key!r} must be a tensor with leading shape [B, T] = [{B}, {T}] on "
                                f"{mask.device}."
                            )
                        scores[f"{name}.{key}"] = extra.detach()
                else:
                    scores[name] = per_token(out, mask, who)
            weighter = f"weighter {type(self.weighter).__name__}"
            weights = per_token(self.weighter(scores, rollout, reducer=reducer), mask, weighter)
            advantages = rollout.rewards.float()
            for shaper in self.shapers:
                advantages = shaper(advantages, scores, rollout, reducer=reducer)
                if not isinstance(advantages, Tensor) or tuple(advantages.shape) not in ((B,), (B, T)) \
                        or advantages.is_complex() or advantages.device != mask.device:
                    raise RolloutError(f"shaper {type(shaper).__name__} must return real [B] or [B, T] advantages on "
                                       f"{mask.device}, got {advantages!r:.80}.")
            advantages = advantages.float()
            metrics = self._metrics(scores, weights, advantages, mask)
        try:
            return Credit(scores, weights, advantages, metrics)
        except RolloutError as err:
            sources = (f"scores come from the estimators, token_weights from the {weighter}, advantages from the "
                       f"shapers {[type(s).__name__ for s in self.shapers]}")
            raise RolloutError(f"{err} ({sources}.)") from None

    @staticmethod
    def _metrics(scores: Mapping[str, Tensor], weights: Tensor, advantages: Tensor, mask: Tensor) -> LazyMetrics:
        """Batch metrics, each computed on first access (weights and scores are 0 on padding)."""

        def n_valid() -> Tensor:
            return mask.sum().clamp_min(1).float()

        # finite_sum: the sums of values near float32's range (rewards of 1e38) must not overflow.
        thunks = {
            "kept_tokens": lambda: (weights > 0).sum().float(),  # 0: the batch trains nothing (no host sync here)
            "kept_fraction": lambda: (weights > 0).sum() / n_valid(),
            "weight_mean": lambda: finite_sum(weights, n_valid()),
            "advantage_abs_mean": lambda: finite_sum(advantages.abs(), max(advantages.numel(), 1)),
        }
        for name in primary_scores(scores):
            thunks[f"score/{name}"] = lambda s=scores[name]: finite_sum(s, n_valid())
        return LazyMetrics(thunks)

    def loss(self, logprobs: Tensor, rollout: Rollout, credit: Credit, *, reducer: Reducer | None = None,
             totals: Totals | None = None, aux: Mapping[str, Tensor] | None = None) -> LossOutput:
        """The differentiable policy loss of a (micro-)batch.

        The loss computes in float32 whatever the log-probs' dtype and its gradient comes back in
        their dtype, saturated at its largest finite value (65504 for float16) rather than inf.

        Args:
            logprobs: ``[B, T]`` log-probs of the response tokens under the current policy (with grad;
                float32, bfloat16, float16 or float64).
            rollout: the rollout, or ``rollout.select(rows)`` for a micro-batch.
            credit: the credit from ``assign``, or ``credit.select(rows)`` (same rows).
            reducer: for denominators across ranks.
            totals: the batch statistics to divide by when these rows are part of a larger batch
                (``strategy.policy_loss.totals(whole_rollout, whole_credit)``): the micro-batch
                losses then add up to the whole batch's loss. None: these rows are the batch.
            aux: differentiable ``[B, T]`` tensors of these rows computed in the training step, for a
                loss that declares ``rlcredit.requirements.Aux(name)`` (PAPO: ``{"masked_logprobs":
                ...}``, the current policy's log-probs with the masked image); passed only to such a
                loss, and an error for any other.

        Returns:
            ``rlcredit.LossOutput``.

        Examples:
            >>> import torch, rlcredit
            >>> s = rlcredit.build("dapo")
            >>> r = rlcredit.Rollout(torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, 0.0]),
            ...                      torch.tensor([0, 0]), old_logprobs=torch.full((2, 3), -1.0))
            >>> out = s.loss(torch.full((2, 3), -1.0, requires_grad=True), r, s.assign(r))
            >>> out.loss, out.metrics["clip_fraction"]
            (tensor(0., grad_fn=<...>), tensor(0.))
        """
        if not isinstance(rollout, Rollout) or not isinstance(credit, Credit):
            bad, want = (rollout, "Rollout") if not isinstance(rollout, Rollout) else (credit, "Credit")
            raise RolloutError(f"Strategy.loss takes a rlcredit.{want}, got {type(bad).__name__}.")
        check_logprobs(logprobs, rollout, "Strategy.loss")
        check_credit(rollout, credit, "Strategy.loss")
        check_reducer(reducer, "Strategy.loss: reducer")
        if totals is not None and not isinstance(totals, Totals):
            raise RolloutError(f"Strategy.loss: totals must be a rlcredit.functional.Totals (from "
                               f"strategy.policy_loss.totals(rollout, credit)) or None, got {type(totals).__name__}.")
        self._check_requirements(rollout, POLICY, self._components()[-1:])
        extra: dict[str, Any] = {} if totals is None else {"totals": totals}
        names = aux_names(self.policy_loss)
        if names or aux:
            # Auxiliary log-probs take the same float32 path as the log-probs (gradients fit their dtype).
            extra["aux"] = {k: float32_logprobs(v) for k, v in check_aux(aux, names, logprobs, "Strategy.loss").items()}
        # Every loss computes in float32; the gradient it returns fits the log-probs' dtype.
        out = self.policy_loss(float32_logprobs(logprobs), rollout, credit, reducer=reducer, **extra)
        if not isinstance(out, LossOutput):
            raise RolloutError(f"policy_loss {type(self.policy_loss).__name__} must return a rlcredit.LossOutput(loss, "
                               f"metrics), got {type(out).__name__}.")
        return out

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
        try:
            return f"rlcredit.build({self.to_spec()!r})"
        except SpecError:  # a part that cannot be written as a spec: show the objects instead
            parts = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in attrs.fields(type(self)))
            return f"Strategy({parts})"
