"""Token weighters: golden cases by regime, Hypothesis properties, plain references, bad specs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import rlcredit
from rlcredit import Rollout, RolloutError, SpecError, Strategy
from rlcredit.estimators import Signal
from rlcredit.requirements import Field, Score
from rlcredit.weighters import Complement, Intersect, SoftWeight, Stapo, Threshold, TopFraction, Union, Uniform
from tests.strategies import run_ranks
from tests.strategies_credit import (
    clear_advantage_signs, credit_batches, fractions, ref_stapo, ref_top_batch_trl, ref_top_sequence, rollout_of,
)

SCOPES = ("sequence", "group", "batch")


def _rollout(mask, rewards=None, groups=None, **kw):
    mask = torch.as_tensor(mask, dtype=torch.bool)
    B = mask.shape[0]
    rewards = torch.zeros(B) if rewards is None else torch.as_tensor(rewards, dtype=torch.float32)
    groups = torch.zeros(B, dtype=torch.long) if groups is None else torch.as_tensor(groups)
    return Rollout(mask, rewards, groups, **kw)


def _check_weights(w, mask):
    assert w.dtype == torch.float32 and w.shape == mask.shape
    assert bool((w >= 0).all()) and bool(torch.isfinite(w).all())
    assert bool((w[~mask] == 0).all()), "padding must get weight exactly 0"


# --- top_fraction: golden cases -----------------------------------------------------------------


def test_top_fraction_sequence_exact_ceil_and_stable_ties():
    # T = (5, 3, 1, 0): ceil(0.4 * 5) = 2 (float32 0.4 * 5 would ceil to 3), ceil(1.2) = 2, >= 1, 0.
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]).bool()
    s = torch.tensor([[0.5, 0.9, 0.9, 0.9, 0.1], [1.0, 1.0, 1.0, 0, 0], [0.0, 0, 0, 0, 0], [0.0] * 5])
    w = TopFraction(0.4)({"visual": s}, _rollout(mask))
    expected = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]).float()
    assert torch.equal(w, expected)


def test_top_fraction_group_scope_counts_per_group_and_ties_to_earlier_row():
    mask = torch.ones(4, 2, dtype=torch.bool)
    s = torch.tensor([[1.0, 5.0], [5.0, 2.0], [3.0, 3.0], [0.0, 4.0]])
    groups = torch.tensor([7, 3, 7, 3])  # group 7 = rows 0, 2; group 3 = rows 1, 3
    # ceil(0.5 * 4) = 2 per group: group 7 keeps 5.0 and the first 3.0; group 3 keeps 5.0 and 4.0.
    w = TopFraction(0.5, scope="group")({"s": s}, _rollout(mask, groups=groups))
    assert torch.equal(w, torch.tensor([[0, 1], [1, 0], [1, 0], [0, 1]]).float())


def test_top_fraction_batch_scope_is_trls_quantile_rule_with_ties_kept():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    s = torch.tensor([[0.1, 0.8, 0.8, 0.3], [0.8, 0.2, 9.0, 9.0]])  # padding values must not count
    # quantile of the 6 valid scores at 0.5 (linear): sorted (.1 .2 .3 .8 .8 .8) -> 0.55; keep >= .55
    w = TopFraction(0.5, scope="batch")({"s": s}, _rollout(mask))
    assert torch.equal(w, torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]]).float())


def test_top_fraction_all_padding_batch_gives_zeros():
    mask = torch.zeros(2, 3, dtype=torch.bool)
    for scope in SCOPES:
        w = TopFraction(0.3, scope=scope)({"s": torch.zeros(2, 3)}, _rollout(mask))
        assert torch.equal(w, torch.zeros(2, 3))


# --- top_fraction: properties -------------------------------------------------------------------


@given(t=credit_batches(), scope=st.sampled_from(SCOPES))
def test_top_fraction_one_equals_the_mask(t, scope):
    w = TopFraction(1.0, scope=scope)({"s": t["scores"]}, rollout_of(t))
    assert torch.equal(w, t["response_mask"].float())


@given(t=credit_batches(), k=fractions)
def test_top_fraction_sequence_keeps_exact_counts_and_matches_plain_reference(t, k):
    mask = t["response_mask"]
    w = TopFraction(k)({"s": t["scores"]}, rollout_of(t))
    _check_weights(w, mask)
    expected = ref_top_sequence(t["scores"].tolist(), mask.tolist(), k)
    assert w.tolist() == expected


@given(t=credit_batches(), k=fractions)
def test_top_fraction_group_keeps_ceil_k_n_per_group(t, k):
    from fractions import Fraction

    mask = t["response_mask"]
    w = TopFraction(k, scope="group")({"s": t["scores"]}, rollout_of(t))
    _check_weights(w, mask)
    assert set(w.unique().tolist()) <= {0.0, 1.0}
    kr = Fraction(k).limit_denominator(10**6)
    for g in t["group_ids"].unique():
        rows = t["group_ids"] == g
        n = int(mask[rows].sum())
        expected = max(1, math.ceil(kr * n)) if n else 0
        assert int(w[rows].sum()) == expected
        # the kept tokens are the highest of the group: every kept score >= every dropped score
        kept = t["scores"][rows][w[rows] > 0]
        dropped = t["scores"][rows][(w[rows] == 0) & mask[rows]]
        if kept.numel() and dropped.numel():
            assert kept.min() >= dropped.max()


@given(t=credit_batches(), k=fractions)
def test_top_fraction_batch_equals_trl_reference(t, k):
    w = TopFraction(k, scope="batch")({"s": t["scores"]}, rollout_of(t))
    assert torch.equal(w.bool(), ref_top_batch_trl(t["scores"], t["response_mask"], k))


@given(t=credit_batches(), k=fractions, scope=st.sampled_from(SCOPES), data=st.data())
def test_top_fraction_monotone_raising_a_kept_score_keeps_it(t, k, scope, data):
    r = rollout_of(t)
    w = TopFraction(k, scope=scope)({"s": t["scores"]}, r)
    kept = w.nonzero().tolist()
    assume(kept)
    i, j = data.draw(st.sampled_from(kept))
    raised = t["scores"].clone()
    raised[i, j] += data.draw(st.floats(0.0, 10.0))
    assert TopFraction(k, scope=scope)({"s": raised}, r)[i, j] == 1.0


@given(t=credit_batches(distinct=True), k=fractions, scope=st.sampled_from(SCOPES), data=st.data())
def test_top_fraction_permutation_equivariant_over_rows(t, k, scope, data):
    B = t["response_mask"].shape[0]
    perm = torch.tensor(data.draw(st.permutations(range(B))), dtype=torch.long)
    w = TopFraction(k, scope=scope)({"s": t["scores"]}, rollout_of(t))
    permuted = {key: v[perm] for key, v in t.items()}
    w_perm = TopFraction(k, scope=scope)({"s": permuted["scores"]}, rollout_of(permuted))
    assert torch.equal(w_perm, w[perm])


@given(t=credit_batches(distinct=True), k=fractions, data=st.data())
def test_top_fraction_sequence_equivariant_to_token_order_within_a_response(t, k, data):
    mask = t["response_mask"]
    i = data.draw(st.integers(0, mask.shape[0] - 1))
    n = int(mask[i].sum())
    perm = torch.arange(mask.shape[1])
    perm[:n] = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.long)
    s = t["scores"].clone()
    s2 = s.clone()
    s2[i] = s[i, perm]
    w = TopFraction(k)({"s": s}, rollout_of(t))
    w2 = TopFraction(k)({"s": s2}, rollout_of(t))
    assert torch.equal(w2[i], w[i, perm])


@given(t=credit_batches(max_B=6), k=fractions, data=st.data())
def test_top_fraction_batch_across_ranks_equals_one_process(t, k, data):
    B = t["response_mask"].shape[0]
    assume(B >= 2)
    cut = data.draw(st.integers(1, B - 1))
    full = TopFraction(k, scope="batch")({"s": t["scores"]}, rollout_of(t))

    def rank_fn(reducer, rank):
        part = {key: v[:cut] if rank == 0 else v[cut:] for key, v in t.items()}
        return TopFraction(k, scope="batch")({"s": part["scores"]}, rollout_of(part), reducer=reducer)

    assert torch.equal(torch.cat(run_ranks(rank_fn, 2)), full)


# --- threshold ----------------------------------------------------------------------------------


@given(t=credit_batches(), value=st.floats(-1.0, 6.0))
def test_threshold_keeps_scores_at_or_above_value(t, value):
    w = Threshold(value)({"s": t["scores"]}, rollout_of(t))
    _check_weights(w, t["response_mask"])
    assert torch.equal(w.bool(), t["response_mask"] & (t["scores"] >= value))


def test_threshold_golden_ties_are_kept():
    w = Threshold(0.5, score="e")({"e": torch.tensor([[0.5, 0.49999, 0.7]])}, _rollout([[1, 1, 0]]))
    assert torch.equal(w, torch.tensor([[1.0, 0.0, 0.0]]))


# --- soft ---------------------------------------------------------------------------------------


def test_soft_golden_hand_computed():
    # valid scores (3, 1): mean 2, population std 1, z = (+1, -1); sigmoid(1) = 0.731059
    r = _rollout([[1, 1, 0], [1, 0, 0]])
    s = {"v": torch.tensor([[3.0, 1.0, 0.0], [4.0, 0.0, 0.0]])}
    w = SoftWeight()(s, r)
    sig = 1 / (1 + math.exp(-1))
    assert torch.allclose(w, torch.tensor([[sig, 1 - sig, 0.0], [0.5, 0.0, 0.0]]), atol=1e-5)
    w2 = SoftWeight(temperature=0.5, normalize=True)(s, r)  # sigmoid(+-2), rescaled to sum 2
    sig2 = 1 / (1 + math.exp(-2))
    assert torch.allclose(w2, torch.tensor([[2 * sig2, 2 * (1 - sig2), 0.0], [1.0, 0.0, 0.0]]), atol=1e-5)


@given(t=credit_batches(), temperature=st.floats(0.05, 20.0), normalize=st.booleans())
def test_soft_is_monotone_positive_and_mean_one_when_normalised(t, temperature, normalize):
    mask, s = t["response_mask"], t["scores"]
    w = SoftWeight(temperature=temperature, normalize=normalize)({"s": s}, rollout_of(t))
    _check_weights(w, mask)
    assert bool((w[mask] > 0).all()), "every valid token keeps some credit"
    for i in range(mask.shape[0]):
        idx = mask[i].nonzero().flatten()
        for a in idx:
            for b in idx:
                if s[i, a] > s[i, b]:
                    assert w[i, a] >= w[i, b]
                if s[i, a] == s[i, b]:
                    assert w[i, a] == w[i, b]
    if normalize:
        sums = w.sum(-1)
        assert torch.allclose(sums, mask.sum(-1).float(), rtol=1e-5, atol=1e-5)
    else:
        assert bool((w <= 1).all())


@given(t=credit_batches(), scale=st.floats(0.1, 100.0), shift=st.floats(-10, 10))
def test_soft_is_invariant_to_positive_affine_maps_of_the_score(t, scale, shift):
    mask = t["response_mask"]
    # Scores are drawn with std >> 1e-6 or exactly equal, so the stabilising eps is negligible.
    w = SoftWeight()({"s": t["scores"]}, rollout_of(t))
    w2 = SoftWeight()({"s": torch.where(mask, t["scores"] * scale + shift, torch.zeros(()))}, rollout_of(t))
    assert torch.allclose(w, w2, atol=2e-4)


# --- combinators --------------------------------------------------------------------------------

UNIT_PARTS = [
    {"name": "top_fraction", "fraction": 0.5, "score": "a"},
    {"name": "top_fraction", "fraction": 0.3, "scope": "batch", "score": "b"},
    {"name": "threshold", "value": 1.0, "score": "b"},
    {"name": "soft", "score": "a"},
    {"name": "soft", "score": "b", "temperature": 0.3},
]


@given(t=credit_batches(), idx=st.lists(st.integers(0, len(UNIT_PARTS) - 1), min_size=1, max_size=3))
def test_intersect_le_each_part_le_union_for_unit_weights(t, idx):
    scores, r = {"a": t["scores"], "b": t["scores2"]}, rollout_of(t)
    parts = [UNIT_PARTS[i] for i in idx]
    inter = Intersect(parts)(scores, r)
    union = Union(parts)(scores, r)
    _check_weights(inter, t["response_mask"])
    _check_weights(union, t["response_mask"])
    for p in parts:
        w = rlcredit.get("weighter", p["name"])(**{k: v for k, v in p.items() if k != "name"})(scores, r)
        assert bool((inter <= w + 1e-7).all()) and bool((w <= union + 1e-7).all())


@given(t=credit_batches(), i=st.integers(0, len(UNIT_PARTS) - 1))
def test_complement_partitions_the_mask(t, i):
    scores, r, mask = {"a": t["scores"], "b": t["scores2"]}, rollout_of(t), t["response_mask"]
    part = rlcredit.registry.build_component("weighter", UNIT_PARTS[i])
    inside = part(scores, r) > 0
    outside = Complement(UNIT_PARTS[i])(scores, r)
    _check_weights(outside, mask)
    assert set(outside.unique().tolist()) <= {0.0, 1.0}
    assert not bool((inside & outside.bool()).any())
    assert torch.equal(inside | outside.bool(), mask)


@given(t=credit_batches())
def test_de_morgan_on_binary_masks(t):
    scores, r = {"a": t["scores"], "b": t["scores2"]}, rollout_of(t)
    a, b = UNIT_PARTS[0], UNIT_PARTS[2]
    lhs = Complement({"name": "union", "parts": [a, b]})(scores, r)
    rhs = Intersect([{"name": "complement", "part": a}, {"name": "complement", "part": b}])(scores, r)
    assert torch.equal(lhs, rhs)


def test_combinators_nest_in_specs_and_round_trip():
    spec = {
        "estimators": {"a": {"name": "signal", "key": "a"}, "b": {"name": "signal", "key": "b"}},
        "weighter": {"name": "intersect", "parts": [
            {"name": "top_fraction", "fraction": 0.5, "score": "a"},
            {"name": "union", "parts": [{"name": "threshold", "value": 0.5, "score": "b"},
                                        {"name": "complement", "part": {"name": "top_fraction", "fraction": 0.25,
                                                                        "score": "b"}}]},
        ]},
    }
    s = rlcredit.build(spec)
    assert isinstance(s.weighter, Intersect) and isinstance(s.weighter.parts[1], Union)
    assert isinstance(s.weighter.parts[1].parts[1], Complement)
    assert s.weighter.requires == (Score("a"), Score("b"))
    assert rlcredit.build(s.to_spec()) == s
    assert s.to_spec()["weighter"] == spec["weighter"]
    mask = torch.ones(1, 4, dtype=torch.bool)
    r = _rollout(mask, signals={"a": torch.tensor([[4.0, 3.0, 2.0, 1.0]]), "b": torch.tensor([[0.0, 0.0, 0.9, 1.0]])})
    # top half of a = tokens 0, 1; b >= 0.5 = tokens 2, 3; complement of top-25 % of b = tokens 0, 1, 2
    assert torch.equal(s.assign(r).token_weights, torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_combinator_requires_is_the_union_of_parts():
    w = Union([Stapo(score="entropy"), TopFraction(0.2, score="visual"), Uniform(), Stapo(score="entropy")])
    assert w.requires == (Field("old_logprobs"), Score("entropy"), Score("visual"))
    assert Complement(TopFraction(0.2)).requires == (Score(None),)


def test_combinator_with_a_non_tensor_part_raises_naming_it():
    class Broken:
        requires = ()

        def __call__(self, scores, rollout, *, reducer=None):
            return [[1.0]]

    with pytest.raises(RolloutError, match=r"intersect part Broken must return a \[B, T\] = \[1, 1\] tensor, got list"):
        Intersect([Broken()])({}, _rollout([[1]]))


# --- stapo --------------------------------------------------------------------------------------


def test_stapo_golden():
    lp = math.log
    old = torch.tensor([[lp(1e-3), lp(1e-4), lp(0.5), lp(1e-3)],
                        [lp(1e-3), lp(1e-3), lp(0.5), 0.0],
                        [lp(1e-3), lp(1e-3), lp(1e-3), 0.0]])
    H = torch.tensor([[0.1, 3.0, 0.1, 1.0], [0.2, 0.3, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]]).bool()
    # group 0 = rows 0, 1 with rewards 1 > 0.5 > 0: only row 0 has A > 0; row 2 is a one-sample group.
    r = _rollout(mask, rewards=[1.0, 0.0, 5.0], groups=[0, 0, 1], old_logprobs=old)
    # candidates: row 0 tokens 0, 1, 3 (H = 0.1, 3.0, 1.0); q75 (linear) = 1.0 + 0.5 * 2.0 = 2.0
    w = Stapo(score="h")({"h": H}, r)
    assert torch.equal(w, torch.tensor([[0, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]]).float())


@given(t=credit_batches(), p=st.sampled_from([0.002, 0.05, 0.3, 1.0]), q=st.floats(0.0, 1.0))
def test_stapo_matches_plain_reference(t, p, q):
    assume(clear_advantage_signs(t["rewards"].tolist(), t["group_ids"].tolist()))
    entropy = t["scores2"]
    w = Stapo(prob_threshold=p, entropy_quantile=q)({"h": entropy}, rollout_of(t))
    _check_weights(w, t["response_mask"])
    expected = ref_stapo(t["rewards"].tolist(), t["group_ids"].tolist(), t["old_logprobs"].tolist(),
                         entropy.tolist(), t["response_mask"].tolist(), p=p, q=q)
    assert w.tolist() == expected


def test_stapo_needs_old_logprobs_and_an_entropy_score():
    s = Strategy(estimators={"entropy": "entropy"}, weighter=Stapo(score="entropy"))
    r = _rollout([[1, 1]], signals={"entropy": torch.ones(1, 2)})
    with pytest.raises(RolloutError, match="weighter Stapo needs rollout.old_logprobs"):
        s.assign(r)
    with pytest.raises(SpecError, match="reads score 'h', which no estimator produces; produced: entropy"):
        Strategy(estimators={"entropy": "entropy"}, weighter=Stapo(score="h"))


# --- bad specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0, 0.0, -0.1, 1.5, float("nan"), "0.5", True])
def test_top_fraction_rejects_fractions_outside_0_1(fraction):
    with pytest.raises(SpecError, match=r"TopFraction.fraction must be a (finite )?number in \(0.0, 1.0\]"):
        TopFraction(fraction)
    with pytest.raises(SpecError, match=r"must be a (finite )?number in \(0.0, 1.0\]"):
        rlcredit.build({"weighter": {"name": "top_fraction", "fraction": fraction}})


def test_unknown_scope_names_the_accepted_ones():
    with pytest.raises(SpecError, match="TopFraction.scope must be one of 'sequence', 'group', 'batch', got 'rows'"):
        TopFraction(0.2, scope="rows")


def test_score_no_estimator_produces_raises_at_build_time():
    with pytest.raises(SpecError, match="reads score 'visual', which no estimator produces; produced: entropy"):
        rlcredit.build({"estimators": {"entropy": "entropy"},
                        "weighter": {"name": "top_fraction", "fraction": 0.2, "score": "visual"}})
    with pytest.raises(SpecError, match="reads score 'b', which no estimator produces"):
        Strategy(estimators={"a": Signal("a")},
                 weighter=Intersect([TopFraction(0.5, score="a"), Complement(Threshold(1.0, score="b"))]))


@pytest.mark.parametrize("bad, message", [
    ({"name": "threshold", "value": float("inf")}, "Threshold.value must be a finite number"),
    ({"name": "threshold", "value": "high"}, r"Threshold.value must be a number in \(-inf, inf\), got 'high' \(str\)"),
    ({"name": "soft", "temperature": 0.0}, r"SoftWeight.temperature must be a number in \(0.0, inf\)"),
    ({"name": "soft", "normalize": "yes"}, "normalize"),
    ({"name": "stapo", "prob_threshold": 0.0}, r"Stapo.prob_threshold must be a number in \(0.0, 1.0\]"),
    ({"name": "stapo", "entropy_quantile": 1.5}, r"Stapo.entropy_quantile must be a number in \[0.0, 1.0\]"),
    ({"name": "intersect", "parts": []}, "Intersect.parts must hold at least one weighter"),
    ({"name": "union", "parts": "top_fraction"}, "expected a list of weighters"),
    ({"name": "top_fraction", "fraction": 0.2, "score": 3}, "must be a score name"),
    ({"name": "top_fraction", "fraction": 0.2, "k": 3}, "unknown parameter.*'k'.*accepted: fraction, scope, score"),
])
def test_bad_weighter_specs_raise_spec_error(bad, message):
    with pytest.raises(SpecError, match=message):
        rlcredit.registry.build_component("weighter", bad)


def test_unknown_nested_weighter_name_suggests_the_closest():
    # build_component re-wraps errors raised inside a constructor as SpecError (reported to the lead:
    # a nested RegistryError should pass through unchanged); either way the suggestion must reach the user.
    with pytest.raises(rlcredit.RLCreditError, match="unknown weighter 'top_fractoin'; did you mean 'top_fraction'"):
        rlcredit.registry.build_component("weighter", {"name": "complement", "part": "top_fractoin"})


def test_combinators_accept_design_positional_form():
    """DESIGN §5 writes Intersect(TopFraction(...), TopFraction(...)); list and parts= forms are equal."""
    from rlcredit.weighters import Intersect, TopFraction, Union

    a, b = TopFraction(0.4, score="v"), TopFraction(0.2, score="e", scope="batch")
    for op in (Intersect, Union):
        assert op(a, b) == op([a, b]) == op(parts=[a, b])
        with pytest.raises(rlcredit.SpecError, match="not both"):
            op(a, parts=[b])
    s = rlcredit.Strategy(estimators={"v": "uniform", "e": "uniform"}, weighter=Intersect(a, b))
    assert rlcredit.build(s.to_spec()) == s


def test_unknown_name_inside_a_combinator_is_a_registry_error():
    with pytest.raises(rlcredit.RegistryError, match="did you mean 'top_fraction'"):
        rlcredit.build({"weighter": {"name": "complement", "part": "top_fractoin"}})
