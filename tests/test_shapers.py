"""dependency_scale (VPPO's TAS): golden cases, plain-loop reference, Hypothesis invariants, bad specs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import rlcredit
from rlcredit import Rollout, SpecError, Strategy
from rlcredit.shapers import DependencyScale, GroupNormalize
from tests.strategies import run_ranks
from tests.strategies_credit import credit_batches, ref_tas_bounded, ref_tas_code, rollout_of

scopes = st.sampled_from(["batch", "group"]) | st.integers(1, 5)


def _alpha(t, **kw):
    """The factors alpha the shaper applies, read off by shaping all-ones advantages."""
    B = t["response_mask"].shape[0]
    return DependencyScale(**kw)(torch.ones(B), {"s": t["scores"]}, rollout_of(t))


def _mean_scores(t):
    mask = t["response_mask"]
    n = mask.sum(-1)
    s = torch.where(mask, t["scores"], torch.zeros(())).sum(-1) / n.clamp_min(1)
    return s, n > 0


def _units(t, scope):
    """Row-index lists of each unit of ``scope`` (batch, group ids, or consecutive chunks)."""
    B = t["response_mask"].shape[0]
    if scope == "batch":
        return [list(range(B))]
    if scope == "group":
        gids = t["group_ids"].tolist()
        return [[i for i in range(B) if gids[i] == g] for g in dict.fromkeys(gids)]
    return [list(range(a, min(B, a + scope))) for a in range(0, B, scope)]


# --- golden cases -------------------------------------------------------------------------------


def test_code_form_golden_and_rows_without_tokens_are_unshaped():
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]]).bool()
    s = torch.tensor([[0.0, 2.0], [3.0, 0.0], [2.0, 2.0], [0.0, 0.0]])  # S_bar = 1, 3, 2, (none)
    r = Rollout(mask, torch.zeros(4), torch.zeros(4, dtype=torch.long))
    # n = (0, 1, 0.5), mu = 0.5: alpha = 0.9 + n * 0.1 / 0.5 = (0.9, 1.1, 1.0); the empty row keeps 1
    out = DependencyScale(score="v")(torch.tensor([2.0, -1.0, 0.5, 3.0]), {"v": s}, r)
    assert torch.allclose(out, torch.tensor([1.8, -1.1, 0.5, 3.0]))
    # token-level advantages are scaled row-wise
    adv = torch.arange(8.0).reshape(4, 2) - 3
    out = DependencyScale(score="v")(adv, {"v": s}, r)
    assert torch.allclose(out, adv * torch.tensor([0.9, 1.1, 1.0, 1.0])[:, None])


def test_bounded_form_golden_min_max_per_group():
    mask = torch.ones(4, 1, dtype=torch.bool)
    s = torch.tensor([[1.0], [3.0], [5.0], [5.0]])
    r = Rollout(mask, torch.zeros(4), torch.tensor([0, 0, 1, 1]))
    out = DependencyScale(beta_min=0.9, beta_max=1.1, scope="group")(torch.ones(4), {"v": s}, r)
    assert torch.allclose(out, torch.tensor([0.9, 1.1, 1.0, 1.0]))  # group 1 has max - min = 0


def test_chunk_scopes_released_code_min_max_and_mean():
    # min/max over chunks of 4 rows, mean over chunks of 2: S_bar = 0, 1, 2, 3 -> n = 0, 1/3, 2/3, 1
    mask = torch.ones(4, 1, dtype=torch.bool)
    r = Rollout(mask, torch.zeros(4), torch.zeros(4, dtype=torch.long))
    s = {"v": torch.tensor([[0.0], [1.0], [2.0], [3.0]])}
    out = DependencyScale(scope=4, mean_scope=2, beta_min=0.5)(torch.ones(4), s, r)
    # mu = 1/6 for rows 0-1, 5/6 for rows 2-3: alpha = 0.5 + n * 0.5 / mu
    assert torch.allclose(out, torch.tensor([0.5, 1.5, 0.9, 1.1]))


# --- plain-loop references ----------------------------------------------------------------------


@given(t=credit_batches(), beta_min=st.floats(0.0, 1.0), scope=scopes, mean_scope=st.none() | scopes)
def test_code_form_matches_plain_reference(t, beta_min, scope, mean_scope):
    mean_s, valid = _mean_scores(t)
    expected = ref_tas_code(mean_s.tolist(), valid.tolist(), t["group_ids"].tolist(), beta_min=beta_min,
                            scope=scope, mean_scope=mean_scope)
    alpha = _alpha(t, beta_min=beta_min, scope=scope, mean_scope=mean_scope)
    assert torch.allclose(alpha, torch.tensor(expected), rtol=1e-4, atol=1e-5)


@given(t=credit_batches(), beta_min=st.floats(0.0, 2.0), width=st.floats(0.01, 2.0), scope=scopes)
def test_bounded_form_matches_plain_reference_and_stays_in_bounds(t, beta_min, width, scope):
    mean_s, valid = _mean_scores(t)
    beta_max = beta_min + width
    expected = ref_tas_bounded(mean_s.tolist(), valid.tolist(), t["group_ids"].tolist(), beta_min=beta_min,
                               beta_max=beta_max, scope=scope)
    alpha = _alpha(t, beta_min=beta_min, beta_max=beta_max, scope=scope)
    assert torch.allclose(alpha, torch.tensor(expected), rtol=1e-4, atol=1e-5)
    shaped = alpha != 1.0
    assert bool((alpha[shaped] >= beta_min - 1e-6).all()) and bool((alpha[shaped] <= beta_max + 1e-6).all())


# --- invariants ---------------------------------------------------------------------------------


@given(t=credit_batches(), beta_min=st.floats(0.0, 1.0), scope=scopes, mean_scope=st.none() | scopes)
def test_code_form_is_mean_preserving_over_its_mean_scope_and_at_least_beta_min(t, beta_min, scope, mean_scope):
    alpha = _alpha(t, beta_min=beta_min, scope=scope, mean_scope=mean_scope)
    _, valid = _mean_scores(t)
    assert bool((alpha >= beta_min - 1e-6).all())
    assert bool((alpha[~valid] == 1).all()), "rows without tokens are not shaped"
    for rows in _units(t, scope if mean_scope is None else mean_scope):
        rows = [i for i in rows if valid[i]]
        if rows:
            assert alpha[rows].mean().item() == pytest.approx(1.0, abs=1e-5)


@given(t=credit_batches(), beta_min=st.floats(0.0, 1.0), bounded=st.booleans(), scope=scopes)
def test_alpha_is_monotone_in_mean_dependency_within_a_scope(t, beta_min, bounded, scope):
    kw = dict(beta_max=beta_min + 0.5) if bounded else {}
    alpha = _alpha(t, beta_min=beta_min, scope=scope, **kw)
    mean_s, valid = _mean_scores(t)
    # With mean_scope = scope, alpha is one increasing map of S_bar per scope unit.
    for rows in _units(t, scope):
        rows = [i for i in rows if valid[i]]
        for i in rows:
            for j in rows:
                if mean_s[i] >= mean_s[j]:
                    assert alpha[i] >= alpha[j] - 1e-6


@given(t=credit_batches(), eighths=st.integers(0, 80), beta_min=st.floats(0.0, 1.0), scope=scopes,
       bounded=st.booleans())
def test_identity_when_all_dependencies_are_equal(t, eighths, beta_min, scope, bounded):
    level = eighths / 8  # T_i * level and its division by T_i are exact in float32: S_bar is level exactly
    t = dict(t, scores=torch.where(t["response_mask"], torch.full_like(t["scores"], level), torch.zeros(())))
    kw = dict(beta_max=beta_min + 0.2) if bounded else {}
    adv = torch.randn(t["response_mask"].shape[0])
    out = DependencyScale(beta_min=beta_min, scope=scope, **kw)(adv, {"s": t["scores"]}, rollout_of(t))
    assert torch.equal(out, adv)


@given(t=credit_batches(), beta_min=st.just(0.0) | st.floats(1e-3, 1.0), bounded=st.booleans(),
       token_level=st.booleans())
def test_never_changes_the_sign_of_an_advantage(t, beta_min, bounded, token_level):
    B, T = t["response_mask"].shape
    r = rollout_of(t)
    adv = GroupNormalize()(r.rewards, {}, r)
    if token_level:
        adv = adv[:, None] * torch.rand(B, T)
    kw = dict(beta_max=beta_min + 0.3, scope="group") if bounded else {}
    out = DependencyScale(beta_min=beta_min, **kw)(adv, {"s": t["scores"]}, r)
    assert out.shape == adv.shape and bool(torch.isfinite(out).all())
    if beta_min > 0:
        assert torch.equal(torch.sign(out), torch.sign(adv))
    else:  # alpha may be 0 for the least dependent row, never negative
        assert bool((out * adv >= 0).all())


@given(t=credit_batches(max_B=7), data=st.data())
def test_batch_scope_across_ranks_equals_one_process(t, data):
    B = t["response_mask"].shape[0]
    assume(B >= 2)
    cut = data.draw(st.integers(1, B - 1))
    full = _alpha(t)

    def rank_fn(reducer, rank):
        part = {key: v[:cut] if rank == 0 else v[cut:] for key, v in t.items()}
        n = part["response_mask"].shape[0]
        return DependencyScale()(torch.ones(n), {"s": part["scores"]}, rollout_of(part), reducer=reducer)

    assert torch.allclose(torch.cat(run_ranks(rank_fn, 2)), full, atol=1e-6)


def test_in_a_strategy_after_group_normalize():
    s = Strategy(estimators={"visual": {"name": "signal", "key": "v"}},
                 shapers=["group_normalize", {"name": "dependency_scale", "score": "visual"}])
    mask = torch.ones(2, 2, dtype=torch.bool)
    r = Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), signals={"v": torch.tensor([[1.0, 1.0], [0.0, 0.0]])})
    # A = (0.7071, -0.7071); n = (1, 0), mu = 0.5: alpha = (1.1, 0.9)
    assert torch.allclose(s.assign(r).advantages, torch.tensor([0.7071 * 1.1, -0.7071 * 0.9]), atol=1e-4)
    assert rlcredit.build(s.to_spec()) == s


# --- bad specs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, message", [
    (dict(beta_min=-0.1), r"DependencyScale.beta_min must be a number in \[0.0, inf\), got -0.1"),
    (dict(beta_min=1.5), r"beta_min must be in \[0, 1\] in the mean-preserving form"),
    (dict(beta_min=0.9, beta_max=0.9), "beta_max must be greater than beta_min"),
    (dict(beta_max=-1.0), r"beta_max must be a number in \[0.0, inf\)"),
    (dict(scope="rows"), "DependencyScale.scope must be 'batch', 'group' or an int >= 1"),
    (dict(scope=0), "DependencyScale.scope must be 'batch', 'group' or an int >= 1"),
    (dict(scope=True), "DependencyScale.scope must be 'batch', 'group' or an int >= 1"),
    (dict(scope=None), "DependencyScale.scope must be 'batch', 'group' or an int >= 1"),
    (dict(mean_scope="sequence"), r"mean_scope must be 'batch', 'group' or an int >= 1.* or None"),
    (dict(beta_max=1.1, mean_scope=16), "mean_scope only applies to the mean-preserving form"),
])
def test_bad_dependency_scale_specs_raise_at_build_time(kw, message):
    with pytest.raises(SpecError, match=message):
        DependencyScale(**kw)
    with pytest.raises(SpecError, match=message):
        rlcredit.build({"estimators": {"v": "uniform"}, "shapers": [{"name": "dependency_scale", **kw}]})


def test_dependency_scale_score_must_be_produced():
    with pytest.raises(SpecError, match="shaper DependencyScale reads score 'visual', which no estimator produces"):
        rlcredit.build({"estimators": {"entropy": "entropy"},
                        "shapers": ["group_normalize", {"name": "dependency_scale", "score": "visual"}]})


def test_batch_normalize_is_overflow_safe_and_exact_in_range():
    from rlcredit.functional import batch_normalize

    r = torch.tensor([1e30, -1e30, 3e29, 0.0])
    expect = (r.double() - r.double().mean()) / r.double().std()
    torch.testing.assert_close(batch_normalize(r, eps=0.0), expect.float(), rtol=1e-6, atol=0)
    huge = torch.tensor([3e38, -3e38])  # std (4.2e38) exceeds float32, r / std does not
    torch.testing.assert_close(batch_normalize(huge, center=False), torch.tensor([0.7071, -0.7071]), atol=1e-4, rtol=0)
    small = torch.tensor([1.0, 0.0, 0.5, 0.25])  # a power-of-two scale changes no bit
    std = small.std()
    assert torch.equal(batch_normalize(small), (small - small.mean()) / (std + 1e-6))
