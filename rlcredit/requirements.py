"""Typed requirements: what a component reads, as values that check a rollout and describe themselves.

Every component declares ``requires``, a tuple of requirements, all of which must hold:

- ``Field(name)``: an optional ``Rollout`` field is set (``"old_logprobs"``, ``"ref_logprobs"``,
  ``"model_inputs"``, ``"response_ids"``);
- ``Signal(key)``: ``rollout.signals`` holds ``key``;
- ``ModelInput(key)``: ``rollout.model_inputs`` holds ``key``; ``RAW_IMAGES`` is the one for the
  images before the image processor (``VisualKL(stage="image")``), which TRL and verl integrations
  add to ``model_inputs`` only for a strategy that reads it;
- ``POLICY``: ``Strategy.assign`` was given a policy (an ``rlcredit.HFPolicy``);
- ``Aux(name)``: a loss reads a differentiable ``[B, T]`` tensor passed at loss time,
  ``Strategy.loss(..., aux={name: tensor})`` (PAPO's log-probs on the masked image), checked by
  ``Strategy.loss``;
- ``Score(name)``: a weighter, shaper or loss reads the estimators' score ``name`` (``None``: the
  strategy's single score), checked once when the ``Strategy`` is built; ``Score.read`` looks it up;
- ``AnyOf(a, b, ...)`` / ``AllOf(a, b, ...)``: alternatives and conjunctions, nested freely.

``Strategy.assign`` checks every requirement before anything runs and raises one
``rlcredit.RolloutError`` listing each unmet one in words (``describe()``).

Examples:
    >>> import torch, rlcredit
    >>> from rlcredit.requirements import POLICY, AnyOf, Field, Signal
    >>> req = AnyOf(Signal("entropy"), POLICY)
    >>> r = rlcredit.Rollout(torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0]), torch.tensor([0]))
    >>> req.met(r, policy=None), Field("old_logprobs").met(r, None)
    (False, False)
    >>> req.describe()
    "rollout.signals['entropy'] or a policy"
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
from torch import Tensor

from rlcredit.errors import SpecError

__all__ = ["Requirement", "Field", "Signal", "ModelInput", "RAW_IMAGES", "Score", "Aux", "POLICY", "AnyOf", "AllOf",
           "FIELDS", "leaves", "requirements_of"]

FIELDS = ("old_logprobs", "ref_logprobs", "model_inputs", "response_ids")
"""The optional ``Rollout`` fields a ``Field`` requirement can name."""


@runtime_checkable
class Requirement(Protocol):
    """Something a component needs: ``met(rollout, policy)`` says whether it is there,
    ``describe()`` names it for an error message, ``alternatives()`` lists the ways to meet it."""

    def met(self, rollout: Any, policy: Any) -> bool: ...

    def describe(self) -> str: ...

    def alternatives(self) -> tuple[Requirement, ...]: ...


def _field_name(instance: Any, attribute: Any, value: Any) -> None:
    if value not in FIELDS:
        raise SpecError(f"Field({value!r}): the optional Rollout fields are {', '.join(FIELDS)}.")


@attrs.frozen
class Field:
    """An optional ``Rollout`` field that must be set: ``Field("old_logprobs")``.

    Examples:
        >>> from rlcredit.requirements import Field
        >>> Field("ref_logprobs").describe()
        'rollout.ref_logprobs'
    """

    name: str = attrs.field(validator=_field_name)

    def met(self, rollout: Any, policy: Any) -> bool:
        return getattr(rollout, self.name, None) is not None

    def describe(self) -> str:
        return f"rollout.{self.name}"

    def alternatives(self) -> tuple[Requirement, ...]:
        return (self,)


def _non_empty_str(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise SpecError(f"{type(instance).__name__}.{attribute.name} must be a non-empty string, got {value!r}.")


@attrs.frozen
class Signal:
    """A named per-token signal in ``rollout.signals``: ``Signal("entropy")``.

    Examples:
        >>> from rlcredit.requirements import Signal
        >>> Signal("aug_logprobs").describe()
        "rollout.signals['aug_logprobs']"
    """

    key: str = attrs.field(validator=_non_empty_str)

    def met(self, rollout: Any, policy: Any) -> bool:
        return self.key in rollout.signals

    def describe(self) -> str:
        return f"rollout.signals[{self.key!r}]"

    def alternatives(self) -> tuple[Requirement, ...]:
        return (self,)


@attrs.frozen
class ModelInput:
    """A key ``rollout.model_inputs`` must hold: ``ModelInput("raw_images")``.

    For what is not a tensor of the model's forward but travels with its inputs (the adapters
    drop it before any forward). ``what`` says in an error message what to put there; equality
    and ``leaves`` look at ``key`` only, so an integration asks ``ModelInput(key) in leaves(req)``.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit.requirements import ModelInput
        >>> r = rlcredit.Rollout(torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0]), torch.tensor([0]),
        ...                      model_inputs={"input_ids": torch.zeros(1, 3, dtype=torch.long), "extra": 1})
        >>> ModelInput("extra").met(r, None), ModelInput("raw_images").met(r, None)
        (True, False)
        >>> ModelInput("extra", what="a flag") == ModelInput("extra"), ModelInput("extra", what="a flag").describe()
        (True, "rollout.model_inputs['extra'] (a flag)")
    """

    key: str = attrs.field(validator=_non_empty_str)
    what: str = attrs.field(default="", eq=False, repr=False)

    def met(self, rollout: Any, policy: Any) -> bool:
        inputs = getattr(rollout, "model_inputs", None)
        return isinstance(inputs, Mapping) and self.key in inputs

    def describe(self) -> str:
        return f"rollout.model_inputs[{self.key!r}]" + (f" ({self.what})" if self.what else "")

    def alternatives(self) -> tuple[Requirement, ...]:
        return (self,)


RAW_IMAGES: Requirement = ModelInput(
    "raw_images",
    what="each row's images as given to the image processor, and that processor: {'images': [[PIL.Image, ...] "
         "per row], 'processor': processor} or a rlcredit_mm.images.RawImages",
)
"""The images before the image processor, ``rollout.model_inputs["raw_images"]``: read by
``VisualKL(stage="image")``; the TRL and verl integrations add it when a strategy's requirements
mention it (``RAW_IMAGES in leaves(req)``)."""


@attrs.frozen
class _Policy:
    def met(self, rollout: Any, policy: Any) -> bool:
        return policy is not None

    def describe(self) -> str:
        return "a policy"

    def alternatives(self) -> tuple[Requirement, ...]:
        return (self,)

    def __repr__(self) -> str:
        return "POLICY"


POLICY: Requirement = _Policy()
"""The policy handle given to ``Strategy.assign`` (an ``rlcredit.HFPolicy``)."""


def _score_name(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise SpecError(f"Score(name): a score name is a non-empty string or None (the single score), got {value!r}.")


@attrs.frozen
class Score:
    """A score produced by the strategy's estimators: ``Score("visual")``; ``Score(None)``: the single score.

    Checked once, when the ``Strategy`` is built (every score read must be produced). ``read``
    looks the score up in ``credit.scores`` / the scores a weighter or shaper receives.

    Examples:
        >>> import torch
        >>> from rlcredit.requirements import Score
        >>> scores = {"visual": torch.tensor([[1.0, 2.0]]), "visual.profile": torch.zeros(1, 2, 3)}
        >>> Score(None).read(scores, "weighter top_fraction")  # the single primary score
        tensor([[1., 2.]])
        >>> Score("visual").describe()
        "score 'visual'"
    """

    name: str | None = attrs.field(default=None, validator=_score_name)

    def met(self, rollout: Any, policy: Any) -> bool:
        return True  # scores come from the strategy's estimators: checked when the Strategy is built

    def describe(self) -> str:
        return "the strategy's single score" if self.name is None else f"score {self.name!r}"

    def alternatives(self) -> tuple[Requirement, ...]:
        return (self,)

    def resolve(self, scores: Mapping[str, Tensor], who: str) -> str:
        """The name of the score this reads among ``scores`` (raises ``SpecError`` when absent or ambiguous)."""
        name = self.name
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
        return name

    def read(self, scores: Mapping[str, Tensor], who: str) -> Tensor:
        """``scores[name]`` (the single primary score when ``name`` is None)."""
        return scores[self.resolve(scores, who)]


@attrs.frozen
class Aux:
    """A differentiable ``[B, T]`` tensor a loss reads at loss time: ``Aux("masked_logprobs")``.

    Unlike a rollout field or a signal, it is computed by the trainer *inside* the training
    step, with gradient (e.g. PAPO's log-probs of the response under the current policy with a
    masked image), and passed as ``Strategy.loss(logprobs, rollout, credit, aux={name: tensor})``.
    ``Strategy.loss`` checks it (present, ``[B, T]`` like ``logprobs``, floating, same device) and
    passes ``aux`` only to a loss that declares an ``Aux``; at ``assign`` time it is always met.
    Integrations look for it with ``Aux(name) in leaves(req)`` over ``Strategy.requirements``.

    Examples:
        >>> from rlcredit.requirements import Aux
        >>> Aux("masked_logprobs").describe()
        "aux['masked_logprobs'] (a differentiable [B, T] tensor: Strategy.loss(..., aux={'masked_logprobs': ...}))"
    """

    name: str = attrs.field(validator=_non_empty_str)

    def met(self, rollout: Any, policy: Any) -> bool:
        return True  # computed in the training step: checked by Strategy.loss against its `aux`

    def describe(self) -> str:
        return (f"aux[{self.name!r}] (a differentiable [B, T] tensor: Strategy.loss(..., "
                f"aux={{{self.name!r}: ...}}))")

    def alternatives(self) -> tuple[Requirement, ...]:
        return (self,)


def primary_scores(scores: Mapping[str, Any]) -> list[str]:
    """Score names that are not estimator extras (extras are stored as ``name.key``).

    Examples:
        >>> from rlcredit.requirements import primary_scores
        >>> primary_scores({"connectivity": 0, "connectivity.profile": 0})
        ['connectivity']
    """
    return [k for k in scores if "." not in k]


def _requirements(instance: Any, attribute: Any, value: tuple) -> None:
    if len(value) < 2:
        raise SpecError(f"{type(instance).__name__} needs at least two requirements, got {len(value)}.")
    for item in value:
        _check_one(item, f"{type(instance).__name__}(...)")


@attrs.frozen(init=False)
class AnyOf:
    """Met when any of its requirements is: ``AnyOf(Signal("entropy"), POLICY)``.

    Examples:
        >>> from rlcredit.requirements import POLICY, AnyOf, Signal
        >>> [r.describe() for r in AnyOf(Signal("entropy"), POLICY).alternatives()]
        ["rollout.signals['entropy']", 'a policy']
    """

    options: tuple = attrs.field(validator=_requirements)

    def __init__(self, *options: Requirement) -> None:
        self.__attrs_init__(tuple(options))

    def met(self, rollout: Any, policy: Any) -> bool:
        return any(r.met(rollout, policy) for r in self.options)

    def describe(self) -> str:
        return " or ".join(_grouped(r) for r in self.options)

    def alternatives(self) -> tuple[Requirement, ...]:
        return tuple(a for r in self.options for a in r.alternatives())


@attrs.frozen(init=False)
class AllOf:
    """Met when all of its requirements are (useful inside ``AnyOf``).

    Examples:
        >>> from rlcredit.requirements import POLICY, AllOf, AnyOf, Field, Signal
        >>> k3 = AnyOf(AllOf(Signal("aug_logprobs"), Field("old_logprobs")), AllOf(POLICY, Field("model_inputs")))
        >>> k3.describe()
        "(rollout.signals['aug_logprobs'] and rollout.old_logprobs) or (a policy and rollout.model_inputs)"
    """

    requirements: tuple = attrs.field(validator=_requirements)

    def __init__(self, *requirements: Requirement) -> None:
        self.__attrs_init__(tuple(requirements))

    def met(self, rollout: Any, policy: Any) -> bool:
        return all(r.met(rollout, policy) for r in self.requirements)

    def describe(self) -> str:
        return " and ".join(_grouped(r) for r in self.requirements)

    def alternatives(self) -> tuple[Requirement, ...]:
        return (self,)


def leaves(req: Requirement) -> tuple[Requirement, ...]:
    """Every plain requirement inside ``req`` (``AnyOf``/``AllOf`` opened recursively), in order.

    What an integration asks to know whether a strategy may read something at all, e.g. whether
    to compute entropies: ``Signal("entropy") in leaves(req)``.

    Examples:
        >>> from rlcredit.requirements import POLICY, AllOf, AnyOf, Field, Signal, leaves
        >>> leaves(AnyOf(AllOf(Signal("aug_logprobs"), Field("old_logprobs")), POLICY))
        (Signal(key='aug_logprobs'), Field(name='old_logprobs'), POLICY)
    """
    if isinstance(req, AnyOf):
        return tuple(x for r in req.options for x in leaves(r))
    if isinstance(req, AllOf):
        return tuple(x for r in req.requirements for x in leaves(r))
    return (req,)


def _grouped(req: Requirement) -> str:
    text = req.describe()
    return f"({text})" if isinstance(req, (AnyOf, AllOf)) else text


def _check_one(item: Any, who: str) -> Requirement:
    if isinstance(item, str):
        raise SpecError(
            f"{who}: requirement {item!r} is a string; requirements are values from rlcredit.requirements, e.g. "
            f"Field('old_logprobs'), Signal('entropy'), Score('visual'), POLICY, AnyOf(Signal('entropy'), POLICY)."
        )
    if not isinstance(item, Requirement) or isinstance(item, type):
        raise SpecError(
            f"{who}: {item!r} is not a requirement (an object with met(rollout, policy), describe() and "
            f"alternatives(), such as rlcredit.requirements.Signal('entropy'))."
        )
    return item


def requirements_of(component: Any, who: str | None = None) -> tuple[Requirement, ...]:
    """A component's ``requires``, checked to be a tuple of requirements (strings raise with the typed spelling).

    Examples:
        >>> from rlcredit.requirements import requirements_of
        >>> from rlcredit.weighters import TopFraction
        >>> requirements_of(TopFraction(0.2, score="entropy"))
        (Score(name='entropy'),)
    """
    who = who or type(component).__name__
    value = getattr(component, "requires", ())
    if isinstance(value, (str, Requirement)) or not isinstance(value, Iterable):
        raise SpecError(f"{who}.requires must be a tuple of requirements, got {value!r}.")
    return tuple(_check_one(item, who) for item in value)
