"""top_fraction_mask in its three scopes, and the batch quantile beyond torch.quantile's limit."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcredit.errors import RLCreditError
from rlcredit.functional import top_fraction_mask
from rlcredit.functional._select import masked_quantile
from tests.strategies import right_padded_mask, rollout_tensors, run_ranks, split_points

fractions = st.sampled_from([0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.9, 1.0]) | st.floats(0.01, 1.0)


# ----------------------------------------------------------------------------- references
def _k(fraction, n):
    if n == 0:
        return 0
    return max(1, math.ceil(Fraction(fraction).limit_denominator(10**6) * n))


def _reference_sequence(scores, mask, fraction):
    B, T = scores.shape
    keep = torch.zeros(B, T, dtype=torch.bool)
    for i in range(B):
        valid = [t for t in range(T) if mask[i, t]]
        ranked = sorted(valid, key=lambda t: (-float(scores[i, t]), t))
        for t in ranked[: _k(fraction, len(valid))]:
            keep[i, t] = True
    return keep


def _reference_group(scores, mask, fraction, group_ids):
    B, T = scores.shape
    keep = torch.zeros(B, T, dtype=torch.bool)
    for gid in set(group_ids.tolist()):
        tokens = [(i, t) for i in range(B) if group_ids[i] == gid for t in range(T) if mask[i, t]]
        ranked = sorted(tokens, key=lambda it: (-float(scores[it]), it[0], it[1]))
        for it in ranked[: _k(fraction, len(tokens))]:
            keep[it] = True
    return keep


def _trl_high_entropy_mask(entropies, mask, top_entropy_quantile):
    """TRL's GRPOTrainer.get_high_entropy_mask on one process, with threshold 1 - rho."""
    local = entropies[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(entropies, dtype=torch.bool)
    entropy_threshold = torch.quantile(local, 1 - top_entropy_quantile)
    masked_entropies = entropies * mask.float()
    return (masked_entropies >= entropy_threshold) & mask.bool()


# ----------------------------------------------------------------------------- goldens
def test_exact_rational_ceil_not_float():
    # 0.7 * 10 = 7.000000000000001 in float64 and 0.4 * 5 = 2.0000000298 in float32: a float
    # ceil keeps 8 and 3 tokens; the exact ceil keeps 7 and 2.
    scores = torch.arange(10.0).repeat(2, 1)
    mask = right_padded_mask([10, 5], 10)
    assert top_fraction_mask(scores, mask, 0.7).sum(-1).tolist() == [7, 4]
    assert top_fraction_mask(scores, mask, 0.4).sum(-1).tolist() == [4, 2]


def test_sequence_ties_go_to_the_earlier_token_and_at_least_one_is_kept():
    scores = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 0.0, 0.0]])
    mask = right_padded_mask([5, 3], 5)
    keep = top_fraction_mask(scores, mask, 0.4)
    assert keep.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    keep = top_fraction_mask(scores, mask, 0.01)
    assert keep.sum(-1).tolist() == [1, 1]


def test_group_scope_ties_go_to_the_earlier_row_then_token():
    scores = torch.tensor([[1.0, 3.0], [3.0, 3.0], [9.0, 9.0]])
    mask = torch.tensor([[True, True], [True, True], [True, False]])
    group_ids = torch.tensor([4, 4, 2])
    keep = top_fraction_mask(scores, mask, 0.5, "group", group_ids=group_ids)
    # group 4 has 4 valid tokens -> keep 2 of the three 3.0s: row 0 first, then row 1 token 0
    assert keep.tolist() == [[False, True], [True, False], [True, False]]


def test_batch_scope_keeps_ties_at_the_threshold():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    keep = top_fraction_mask(scores, torch.ones(1, 4, dtype=torch.bool), 0.25, "batch")
    assert keep.all()  # every score >= the 0.75-quantile (1.0): TRL's rule, not an exact count


def test_empty_rows_and_empty_batches():
    mask = torch.zeros(3, 4, dtype=torch.bool)
    for scope in ("sequence", "group", "batch"):
        keep = top_fraction_mask(torch.rand(3, 4), mask, 0.5, scope, group_ids=torch.tensor([1, 1, 2]))
        assert not keep.any()
        empty = top_fraction_mask(torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.bool), 0.5, scope,
                                  group_ids=torch.zeros(0, dtype=torch.long))
        assert empty.shape == (0, 4)


def test_non_finite_scores_never_select_padding():
    scores = torch.tensor([[float("nan"), float("-inf"), 5.0, 7.0]])
    mask = torch.tensor([[True, True, False, False]])
    for scope in ("sequence", "group", "batch"):
        keep = top_fraction_mask(scores, mask, 0.5, scope, group_ids=torch.tensor([0]))
        assert not keep[~mask].any() and keep[mask].sum() >= 1


# ----------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(data=rollout_tensors(max_B=8, max_G=4, max_T=8, min_B=0), fraction=fractions)
def test_sequence_and_group_scopes_match_reference(data, fraction):
    scores, mask, g = data["scores"], data["response_mask"], data["group_ids"]
    keep = top_fraction_mask(scores, mask, fraction)
    assert torch.equal(keep, _reference_sequence(scores, mask, fraction))
    assert keep.sum(-1).tolist() == [_k(fraction, int(n)) for n in mask.sum(-1)]
    keep_g = top_fraction_mask(scores, mask, fraction, "group", group_ids=g)
    assert torch.equal(keep_g, _reference_group(scores, mask, fraction, g))
    for gid in set(g.tolist()):
        rows = g == gid
        assert int(keep_g[rows].sum()) == _k(fraction, int(mask[rows].sum()))


@settings(max_examples=60, deadline=None)
@given(data=rollout_tensors(max_B=8, max_T=8, min_B=0), fraction=fractions)
def test_batch_scope_matches_trl_rule_exactly(data, fraction):
    scores, mask = data["scores"], data["response_mask"]
    keep = top_fraction_mask(scores, mask, fraction, "batch")
    assert torch.equal(keep, _trl_high_entropy_mask(scores, mask, fraction))


@settings(max_examples=40, deadline=None)
@given(data=rollout_tensors(max_B=8, max_T=8), scope=st.sampled_from(["sequence", "group", "batch"]))
def test_fraction_one_returns_the_mask(data, scope):
    mask = data["response_mask"]
    keep = top_fraction_mask(data["scores"], mask, 1.0, scope, group_ids=data["group_ids"])
    assert torch.equal(keep, mask) and keep is not mask


@settings(max_examples=40, deadline=None)
@given(data=rollout_tensors(max_B=6, max_T=8), fraction=fractions,
       scope=st.sampled_from(["sequence", "group", "batch"]), params=st.data())
def test_raising_a_kept_tokens_score_keeps_it(data, fraction, scope, params):
    scores, mask, g = data["scores"], data["response_mask"], data["group_ids"]
    keep = top_fraction_mask(scores, mask, fraction, scope, group_ids=g)
    kept = keep.nonzero().tolist()
    if not kept:
        return
    i, t = params.draw(st.sampled_from(kept))
    raised = scores.clone()
    raised[i, t] += params.draw(st.sampled_from([0.5, 1.0, 10.0]))
    assert top_fraction_mask(raised, mask, fraction, scope, group_ids=g)[i, t]


@settings(max_examples=40, deadline=None)
@given(data=rollout_tensors(max_B=6, max_T=8), fraction=fractions)
def test_kept_tokens_are_a_subset_of_valid_and_outrank_dropped_ones(data, fraction):
    scores, mask = data["scores"], data["response_mask"]
    keep = top_fraction_mask(scores, mask, fraction)
    assert not (keep & ~mask).any()
    for i in range(scores.shape[0]):
        if keep[i].any() and (mask[i] & ~keep[i]).any():
            assert scores[i][keep[i]].min() >= scores[i][mask[i] & ~keep[i]].max()


def test_bf16_and_integer_scores():
    scores = torch.tensor([[0.5, 2.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    for scope in ("sequence", "batch"):
        ref = top_fraction_mask(scores, mask, 0.5, scope)
        assert torch.equal(top_fraction_mask(scores.bfloat16(), mask, 0.5, scope), ref)
        assert torch.equal(top_fraction_mask((scores * 2).long(), mask, 0.5, scope), ref)


# ----------------------------------------------------------------------------- ranks
@settings(max_examples=20, deadline=None)
@given(data=rollout_tensors(max_B=8, max_G=4, max_T=6, min_B=0), fraction=fractions,
       scope=st.sampled_from(["group", "batch", "sequence"]), params=st.data())
def test_reducer_path_equals_single_process(data, fraction, scope, params):
    scores, mask, g = data["scores"], data["response_mask"], data["group_ids"]
    single = top_fraction_mask(scores, mask, fraction, scope, group_ids=g)
    shards = params.draw(split_points(scores.shape[0]))

    def rank_fn(red, rank):
        rows = slice(*shards[rank])
        return top_fraction_mask(scores[rows], mask[rows], fraction, scope, group_ids=g[rows], reducer=red)

    assert torch.equal(torch.cat(run_ranks(rank_fn, len(shards))), single)


def test_group_scope_across_ranks_needs_the_reducer_rank():
    class NoRank:
        world_size = 2

        def gather(self, x):  # pragma: no cover - never reached
            return torch.cat([x, x])

    with pytest.raises(RLCreditError, match="rank"):
        top_fraction_mask(torch.rand(2, 3), torch.ones(2, 3, dtype=torch.bool), 0.5, "group",
                          group_ids=torch.tensor([0, 0]), reducer=NoRank())


# ----------------------------------------------------------------------------- quantile
@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 3000), pad=st.integers(0, 50), q=st.floats(0.0, 1.0) | st.sampled_from([0.0, 0.2, 0.5, 0.8, 0.95, 1.0]),
       seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_masked_quantile_is_bit_equal_to_torch_quantile(n, pad, q, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 5, (n,), generator=gen).float() if ties else torch.randn(n, generator=gen) * 3
    padded = torch.cat([x, torch.full((pad,), 123.0)])[torch.randperm(n + pad, generator=gen)]
    valid = padded != 123.0
    assert torch.equal(masked_quantile(padded, valid, q), torch.quantile(x, q))
    assert torch.equal(masked_quantile(padded.reshape(1, -1), valid.reshape(1, -1), q), torch.quantile(x, q))


def test_masked_quantile_of_nothing_is_inf():
    x = torch.rand(2, 3)
    assert masked_quantile(x, torch.zeros(2, 3, dtype=torch.bool), 0.5) == float("inf")
    assert masked_quantile(x[:0], torch.zeros(0, 3, dtype=torch.bool), 0.5) == float("inf")


def test_batch_scope_beyond_torch_quantile_limit():
    n_rows, T = 4097, 4096  # 16_781_312 valid scores > 2**24
    scores = torch.rand(n_rows, T, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(n_rows, T, dtype=torch.bool)
    keep = top_fraction_mask(scores, mask, 0.2, "batch")  # a sort has no element limit
    values = scores.reshape(-1)
    n = values.numel()
    rank = torch.tensor(0.8, dtype=torch.float32) * (n - 1)
    lo, hi = int(rank.long()), int(torch.ceil(rank).long())
    tau = torch.lerp(values.kthvalue(lo + 1).values, values.kthvalue(hi + 1).values, rank - lo)
    assert int(keep.sum()) == int((values >= tau).sum())
    assert abs(int(keep.sum()) - 0.2 * n) < 2
