"""dependency_scale: VPPO's trajectory-level advantage shaping, code and paper forms."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcredit.functional import dependency_scale, masked_mean
from tests.strategies import rollout_tensors, run_ranks, split_points

scopes = st.sampled_from(["batch", "group", 1, 2, 3, 16])


# ----------------------------------------------------------------------------- reference
def _reference_dependency_scale(S, valid, beta_min, beta_max, scope, mean_scope, group_ids, *, with_shaped=False):
    """Plain-loop alpha (and, with ``with_shaped``, the bool mask of the rows actually shaped)."""
    B = len(S)
    S = [float(x) for x in S.double()]
    valid = valid.tolist()
    ids = None if group_ids is None else group_ids.tolist()
    mean_scope = scope if mean_scope is None else mean_scope

    def members(i, sc):
        if sc == "batch":
            return range(B)
        if sc == "group":
            return [j for j in range(B) if ids[j] == ids[i]]
        return [j for j in range(B) if j // sc == i // sc]

    def normalised(i):
        """n_i, or None when row i is not shaped (invalid or degenerate min-max scope)."""
        if not valid[i]:
            return None
        vals = [S[j] for j in members(i, scope) if valid[j]]
        if len(vals) <= 1 or max(vals) - min(vals) <= 1e-6:
            return None
        return min(max((S[i] - min(vals)) / (max(vals) - min(vals)), 0.0), 1.0)

    n = [normalised(i) for i in range(B)]
    alpha, shaped = [], []
    for i in range(B):
        if n[i] is None:
            alpha.append(1.0)
        elif beta_max is not None:
            alpha.append(beta_min + n[i] * (beta_max - beta_min))
        else:
            peers = [n[j] for j in members(i, mean_scope) if n[j] is not None]
            mu = sum(peers) / len(peers)
            alpha.append(1.0 if mu == 0 else beta_min + n[i] * (1 - beta_min) / mu)
        shaped.append(n[i] is not None and (beta_max is not None or mu != 0))
    alpha = torch.tensor(alpha, dtype=torch.float64)
    return (alpha, torch.tensor(shaped, dtype=torch.bool)) if with_shaped else alpha


def _grid_scores(data):
    """Per-row mean scores on a 1/8 grid (exact ranges and exact mu == 0 cases) and validity."""
    mean = masked_mean(data["scores"], data["response_mask"])
    return torch.round(mean * 8) / 8, data["response_mask"].any(-1)


# ----------------------------------------------------------------------------- goldens
def test_code_form_golden():
    s = torch.tensor([0.0, 2.0, 1.0, 0.5])
    alpha = dependency_scale(s, torch.ones(4, dtype=torch.bool), beta_min=0.9)
    # n = (0, 1, .5, .25), mu = 0.4375, alpha = 0.9 + n * 0.1 / 0.4375
    torch.testing.assert_close(alpha, torch.tensor([0.9, 0.9 + 0.1 / 0.4375, 0.9 + 0.05 / 0.4375, 0.9 + 0.025 / 0.4375]))
    torch.testing.assert_close(alpha.mean(), torch.tensor(1.0))


def test_released_code_chunking_128_minmax_16_mean():
    s = torch.linspace(0, 1, 40)
    alpha = dependency_scale(s, torch.ones(40, dtype=torch.bool), scope=128, mean_scope=16)
    for start in range(0, 40, 16):  # every 16-row micro-batch has mean alpha 1
        torch.testing.assert_close(alpha[start : start + 16].mean(), torch.tensor(1.0))


def test_degenerate_scopes_give_one():
    ones = torch.ones(3)
    valid = torch.ones(3, dtype=torch.bool)
    # all equal (range 0), range <= 1e-6, a single valid row, no valid row
    assert torch.equal(dependency_scale(torch.tensor([0.3, 0.3, 0.3]), valid), ones)
    assert torch.equal(dependency_scale(torch.tensor([0.3, 0.3 + 5e-7, 0.3]), valid), ones)
    assert torch.equal(dependency_scale(torch.tensor([0.1, 5.0, 9.0]), torch.tensor([False, True, False])), ones)
    assert torch.equal(dependency_scale(torch.tensor([0.1, 5.0, 9.0]), torch.zeros(3, dtype=torch.bool)), ones)
    assert dependency_scale(torch.zeros(0), torch.zeros(0, dtype=torch.bool)).shape == (0,)


def test_mu_zero_in_a_mean_scope_gives_one():
    # min-max over the batch, mean over pairs: the first pair sits at the minimum (mu = 0).
    s = torch.tensor([0.0, 0.0, 0.5, 1.0])
    alpha = dependency_scale(s, torch.ones(4, dtype=torch.bool), scope="batch", mean_scope=2)
    torch.testing.assert_close(alpha, torch.tensor([1.0, 1.0, 0.9 + 0.5 * 0.1 / 0.75, 0.9 + 0.1 / 0.75]))


def test_invalid_rows_get_one_and_do_not_enter_statistics():
    s = torch.tensor([0.0, 1.0, 100.0, -100.0])
    valid = torch.tensor([True, True, False, False])
    alpha = dependency_scale(s, valid, beta_max=1.1)
    torch.testing.assert_close(alpha, torch.tensor([0.9, 1.1, 1.0, 1.0]))


def test_paper_form_bounded_in_group_scope():
    s = torch.tensor([1.0, 3.0, 2.0, 7.0, 7.0])
    g = torch.tensor([5, 5, 5, 8, 8])
    alpha = dependency_scale(s, torch.ones(5, dtype=torch.bool), beta_min=0.8, beta_max=1.2, scope="group", group_ids=g)
    torch.testing.assert_close(alpha, torch.tensor([0.8, 1.2, 1.0, 1.0, 1.0]))


def test_bf16_scores_give_float32():
    s = torch.tensor([0.0, 2.0, 1.0, 0.5])
    valid = torch.ones(4, dtype=torch.bool)
    out = dependency_scale(s.bfloat16(), valid)
    assert out.dtype == torch.float32
    assert torch.equal(out, dependency_scale(s, valid))


# ----------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(data=rollout_tensors(max_B=10, max_G=4, max_T=5, min_B=0), scope=scopes,
       mean_scope=st.none() | scopes, beta_min=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       bounded=st.booleans())
def test_matches_reference(data, scope, mean_scope, beta_min, bounded):
    s, valid = _grid_scores(data)
    beta_max = beta_min + 0.3 if bounded else None
    if bounded:
        mean_scope = None
    g = data["group_ids"]
    alpha = dependency_scale(s, valid, beta_min=beta_min, beta_max=beta_max, scope=scope,
                             mean_scope=mean_scope, group_ids=g)
    ref = _reference_dependency_scale(s, valid, beta_min, beta_max, scope, mean_scope, g)
    assert alpha.dtype == torch.float32 and torch.isfinite(alpha).all()
    torch.testing.assert_close(alpha.double(), ref, atol=1e-5, rtol=1e-5)
    unshaped = alpha == 1.0  # invalid rows and degenerate scopes, whatever the beta range
    assert (unshaped | (alpha >= beta_min - 1e-6)).all()
    if bounded:
        assert (unshaped | (alpha <= beta_max + 1e-6)).all()


@settings(max_examples=40, deadline=None)
@given(data=rollout_tensors(max_B=10, max_G=4, max_T=5), scope=scopes)
def test_code_form_preserves_the_mean_over_shaped_rows(data, scope):
    s, valid = _grid_scores(data)
    g = data["group_ids"]
    alpha = dependency_scale(s, valid, scope=scope, mean_scope="batch", group_ids=g)
    _, shaped = _reference_dependency_scale(s, valid, 0.9, None, scope, "batch", g, with_shaped=True)
    if shaped.any():
        # Over the rows that entered mu (one batch-wide mean scope), alpha averages to exactly 1.
        assert torch.isclose(alpha[shaped].mean(), torch.tensor(1.0), atol=1e-5)
    assert (alpha[~shaped] == 1.0).all()


@settings(max_examples=20, deadline=None)
@given(data=rollout_tensors(max_B=10, max_G=4, max_T=5, min_B=0),
       scope=st.sampled_from(["batch", "group"]), mean_scope=st.sampled_from([None, "batch", "group"]),
       bounded=st.booleans(), params=st.data())
def test_reducer_path_equals_single_process(data, scope, mean_scope, bounded, params):
    s, valid = _grid_scores(data)
    g = data["group_ids"]
    kwargs = dict(beta_max=1.2 if bounded else None, scope=scope, mean_scope=None if bounded else mean_scope)
    single = dependency_scale(s, valid, group_ids=g, **kwargs)
    shards = params.draw(split_points(s.shape[0]))

    def rank_fn(red, rank):
        rows = slice(*shards[rank])
        return dependency_scale(s[rows], valid[rows], group_ids=g[rows], reducer=red, **kwargs)

    torch.testing.assert_close(torch.cat(run_ranks(rank_fn, len(shards))), single, atol=1e-6, rtol=1e-6)


def test_integer_scopes_are_per_rank_chunks():
    s = torch.linspace(0, 1, 12)
    valid = torch.ones(12, dtype=torch.bool)
    outs = run_ranks(lambda red, rank: dependency_scale(s[rank * 6 : rank * 6 + 6], valid[:6], scope=4, reducer=red), 2)
    expected = torch.cat([dependency_scale(s[:6], valid[:6], scope=4), dependency_scale(s[6:], valid[:6], scope=4)])
    assert torch.equal(torch.cat(outs), expected)


@pytest.mark.parametrize("beta_min", [0.0, 0.5, 0.9])
def test_alpha_bounds_of_code_form(beta_min):
    s = torch.rand(64, generator=torch.Generator().manual_seed(0))
    alpha = dependency_scale(s, torch.ones(64, dtype=torch.bool), beta_min=beta_min)
    assert (alpha >= beta_min - 1e-6).all()
    assert (alpha <= beta_min + (1 - beta_min) * 64 + 1e-4).all()
    torch.testing.assert_close(alpha.mean(), torch.tensor(1.0))
