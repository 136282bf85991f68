"""Typed requirements, the public validators, and the registry's checks of what it is given."""

from __future__ import annotations

import attrs
import numpy as np
import pytest
import torch

import rlcredit
from rlcredit import RegistryError, RolloutError, SpecError
from rlcredit.requirements import POLICY, AllOf, AnyOf, Field, Score, Signal, leaves, requirements_of
from rlcredit.validators import in_range, int_at_least, non_empty_str, one_of


def _rollout(**kw):
    base = dict(response_mask=torch.ones(2, 3, dtype=torch.bool), rewards=torch.tensor([1.0, 0.0]),
                group_ids=torch.tensor([0, 0]))
    base.update(kw)
    return rlcredit.Rollout(**base)


# --- requirement values -------------------------------------------------------------------------


def test_each_requirement_checks_the_rollout_and_describes_itself():
    bare = _rollout()
    full = _rollout(old_logprobs=torch.zeros(2, 3), signals={"entropy": torch.zeros(2, 3)},
                    model_inputs={"input_ids": torch.zeros(2, 4, dtype=torch.long)},
                    response_ids=torch.zeros(2, 3, dtype=torch.long))
    cases = [
        (Field("old_logprobs"), "rollout.old_logprobs"),
        (Field("model_inputs"), "rollout.model_inputs"),
        (Field("response_ids"), "rollout.response_ids"),
        (Signal("entropy"), "rollout.signals['entropy']"),
    ]
    for req, text in cases:
        assert not req.met(bare, None) and req.met(full, None), req
        assert req.describe() == text and req.alternatives() == (req,)
    assert not POLICY.met(bare, None) and POLICY.met(bare, object()) and POLICY.describe() == "a policy"
    assert Score("visual").met(bare, None)  # scores are checked when the Strategy is built


def test_combinators_nest_and_describe_with_parentheses():
    req = AnyOf(AllOf(Signal("aug_logprobs"), Field("old_logprobs")), AllOf(POLICY, Field("model_inputs")))
    r = _rollout(signals={"aug_logprobs": torch.zeros(2, 3)})
    assert not req.met(r, None)
    assert req.met(_rollout(signals={"aug_logprobs": torch.zeros(2, 3)}, old_logprobs=torch.zeros(2, 3)), None)
    assert not req.met(r, object())  # a policy alone is not enough: model_inputs are missing
    assert req.describe() == ("(rollout.signals['aug_logprobs'] and rollout.old_logprobs) or "
                              "(a policy and rollout.model_inputs)")
    assert leaves(req) == (Signal("aug_logprobs"), Field("old_logprobs"), POLICY, Field("model_inputs"))
    assert req.alternatives() == req.options
    assert AnyOf(Signal("a"), POLICY) == AnyOf(Signal("a"), POLICY)  # values: equal and hashable
    assert len({AnyOf(Signal("a"), POLICY), AnyOf(Signal("a"), POLICY)}) == 1


@pytest.mark.parametrize("make, fragment", [
    (lambda: Field("rewards"), "optional Rollout fields are"),
    (lambda: Signal(""), "non-empty string"),
    (lambda: Score(3), "score name"),
    (lambda: AnyOf(Signal("a")), "at least two"),
    (lambda: AnyOf(Signal("a"), "old_logprobs"), "is a string"),
    (lambda: AllOf(POLICY, 5), "is not a requirement"),
])
def test_bad_requirements_raise_spec_errors(make, fragment):
    with pytest.raises(SpecError, match=fragment):
        make()


def test_string_requirements_raise_with_the_typed_spelling():
    @attrs.frozen
    class Legacy:
        requires = ("signal:entropy",)

        def __call__(self, rollout, policy=None):
            return rollout.float_mask

    with pytest.raises(SpecError, match=r"'signal:entropy' is a string.*Signal\('entropy'\)"):
        rlcredit.Strategy(estimators={"x": Legacy()})
    with pytest.raises(SpecError, match="must be a tuple of requirements"):
        requirements_of(type("One", (), {"requires": Signal("a")})())


def test_strategy_requirements_and_needs_policy():
    vppo = rlcredit.build("vppo")
    assert len(vppo.requirements) == 1 and Signal("aug_logprobs") in leaves(vppo.requirements[0])
    inputs = {"input_ids": torch.zeros(2, 4, dtype=torch.long)}
    assert vppo.needs_policy(_rollout(model_inputs=inputs))
    assert not vppo.needs_policy(_rollout(old_logprobs=torch.zeros(2, 3), signals={"aug_logprobs": torch.zeros(2, 3)}))
    assert not vppo.needs_policy(_rollout())  # nothing would help: assign will say what is missing
    assert rlcredit.build("grpo").requirements == () and not rlcredit.build("grpo").needs_policy(_rollout())
    stapo = rlcredit.build("stapo")
    assert Field("old_logprobs") in stapo.requirements
    kl = rlcredit.build("grpo", policy_loss={"name": "clipped_surrogate", "kl_coef": 0.1})
    assert kl.requirements == (Field("ref_logprobs"),)
    with pytest.raises(RolloutError, match="policy_loss ClippedSurrogate needs rollout.ref_logprobs"):
        kl.assign(_rollout())  # the loss's requirements are checked at assign, the earliest point


def test_token_advantages_fold_weights_exactly():
    c = rlcredit.Credit({}, torch.tensor([[1.0, 0.5, 2.0], [0.0, 3.0, 1.0]]), torch.tensor([2.0, -1.0]))
    assert torch.equal(c.token_advantages(), torch.tensor([[2.0, 1.0, 4.0], [0.0, -3.0, -1.0]]))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(c.token_advantages(mask), torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    per_token = rlcredit.Credit({}, torch.ones(1, 2), torch.tensor([[0.5, -0.25]]))
    assert torch.equal(per_token.token_advantages(), torch.tensor([[0.5, -0.25]]))
    with pytest.raises(RolloutError, match="mask must be a"):
        c.token_advantages(mask.float())


# --- validators -----------------------------------------------------------------------------------


@attrs.frozen
class _Params:
    rate: float = attrs.field(default=0.5, validator=in_range(0.0, 1.0, hi_open=True))
    steps: int = attrs.field(default=1, validator=int_at_least(1))
    mode: str = attrs.field(default="a", validator=one_of("a", "b"))
    key: str = attrs.field(default="k", validator=non_empty_str)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(rate=float("inf")), r"_Params.rate must be a finite number in \[0.0, 1.0\), got inf"),
    (dict(rate=float("nan")), "must be a finite number"),
    (dict(rate=1.0), r"must be a number in \[0.0, 1.0\), got 1.0"),
    (dict(rate=True), r"got True \(bool\)"),
    (dict(rate="0.5"), r"got '0.5' \(str\)"),
    (dict(steps=1.0), "must be an int >= 1"),
    (dict(steps=0), "must be an int >= 1"),
    (dict(mode="c"), "must be one of 'a', 'b'"),
    (dict(mode=torch.tensor(1)), "must be one of"),
    (dict(key=""), "non-empty string"),
])
def test_validators_name_the_field_and_the_rule(kwargs, fragment):
    with pytest.raises(SpecError, match=fragment):
        _Params(**kwargs)


def test_numpy_scalars_are_numbers():
    p = _Params(rate=np.float32(0.25), steps=np.int64(3))
    assert p.rate == 0.25 and p.steps == 3
    s = rlcredit.build({"estimators": {"h": "entropy"}, "weighter": {"name": "top_fraction", "fraction": np.float64(0.2)}})
    assert s.weighter.fraction == 0.2


def test_functional_kernels_share_the_rule():
    x = torch.zeros(2, 3)
    with pytest.raises(rlcredit.RLCreditError, match=r"`clip_low` must be a finite number in \[0.0, 1.0\)"):
        rlcredit.functional.clipped_surrogate(x, x, torch.zeros(2), clip_low=float("nan"))


# --- registry checks ------------------------------------------------------------------------------


@pytest.mark.parametrize("obj, fragment", [
    (5, "register a class"),
    (lambda rollout, policy=None: rollout.float_mask, "register a class"),
    (rlcredit.estimators.Uniform(), "register a class"),
    (type("Plain", (), {"requires": (), "__call__": lambda self, r, p=None: None}), "not an attrs class"),
])
def test_register_refuses_what_cannot_round_trip(obj, fragment):
    with pytest.raises(RegistryError, match=fragment):
        rlcredit.register("estimator", "never_registered")(obj)
    assert "never_registered" not in rlcredit.available("estimator")


def test_register_a_class_under_a_second_name_keeps_its_spec_name():
    from rlcredit.estimators import Uniform

    try:
        rlcredit.register("estimator", "uniform_alias")(Uniform)
        assert rlcredit.build({"estimators": {"u": "uniform_alias"}}).to_spec()["estimators"] == {"u": "uniform"}
    finally:
        from rlcredit import registry

        registry._REGISTRY["estimator"].pop("uniform_alias", None)


@pytest.mark.parametrize("spec, fragment", [
    ({"weighter": "top_fraction"}, r"weighter 'top_fraction'.*required parameter\(s\): fraction"),
    ({"weighter": rlcredit.weighters.Uniform}, "got the class Uniform; instantiate it"),
    ({"weighter": object()}, "expected a weighter"),
    ({"shapers": [3]}, "expected a shaper"),
])
def test_build_component_errors(spec, fragment):
    with pytest.raises(SpecError, match=fragment):
        rlcredit.build(spec)


def test_a_raw_model_as_policy_is_refused():
    s = rlcredit.build("grpo")
    with pytest.raises(RolloutError, match=r"wrap it: policy=rlcredit.HFPolicy\(model\)"):
        s.assign(_rollout(), torch.nn.Linear(2, 2))
