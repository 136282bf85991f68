"""Group baselines (GRPO, Dr. GRPO, RLOO) and DAPO's overlong penalty."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcredit.functional import group_center, group_normalize, leave_one_out, overlong_penalty
from tests.strategies import rollout_tensors, run_ranks, split_points


# ----------------------------------------------------------------------------- references
def _members(ids: list[int], i: int) -> list[int]:
    return [j for j in range(len(ids)) if ids[j] == ids[i]]


def _reference_group_stat(rewards, group_ids, kind, eps=1e-6, unbiased=True):
    """Plain-loop float64 reference of group_normalize / group_center / leave_one_out."""
    r = [float(x) for x in rewards.double()]
    ids = group_ids.tolist()
    out = []
    for i in range(len(r)):
        g = [r[j] for j in _members(ids, i)]
        n = len(g)
        if n == 1 or max(g) == min(g):
            out.append(0.0)
            continue
        mean = sum(g) / n
        if kind == "center":
            out.append(r[i] - mean)
        elif kind == "loo":
            out.append(r[i] - (sum(g) - r[i]) / (n - 1))
        else:
            var = sum((x - mean) ** 2 for x in g) / ((n - 1) if unbiased else n)
            out.append((r[i] - mean) / (math.sqrt(var) + eps))
    return torch.tensor(out, dtype=torch.float64)


def _tolerance(rewards, group_ids, kind, eps=1e-6):
    """float32 rounding of the group mean (~ulp of the largest |r|), amplified by 1/(std + eps)."""
    r = rewards.double()
    tol = torch.empty_like(r)
    ids = group_ids.tolist()
    for i in range(len(ids)):
        g = r[_members(ids, i)]
        scale = g.abs().max().item() * 1e-6 + 1e-6
        if kind == "normalize" and len(g) > 1:
            scale /= g.std().item() + eps
        tol[i] = scale
    return tol


FNS = {"normalize": group_normalize, "center": group_center, "loo": leave_one_out}


# ----------------------------------------------------------------------------- goldens
def test_group_normalize_golden_unbiased_and_biased():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0])
    g = torch.tensor([5, 5, 5, 5])
    # mean 2.5; unbiased std sqrt(5/3) = 1.290994; biased std sqrt(1.25) = 1.118034
    torch.testing.assert_close(
        group_normalize(r, g, eps=0.0), torch.tensor([-1.161895, -0.387298, 0.387298, 1.161895])
    )
    torch.testing.assert_close(
        group_normalize(r, g, eps=0.0, unbiased=False),
        torch.tensor([-1.341641, -0.447214, 0.447214, 1.341641]),
    )


def test_group_center_and_leave_one_out_golden():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 7.0])
    g = torch.tensor([3, 3, 3, 3, -1])
    # group {1, 0, 0, 0}: mean 0.25; leave-one-out means 0, 1/3, 1/3, 1/3; {7} alone -> 0
    torch.testing.assert_close(group_center(r, g), torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0]))
    torch.testing.assert_close(
        leave_one_out(r, g), torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3, 0.0])
    )


@pytest.mark.parametrize("kind", sorted(FNS))
def test_all_equal_and_one_sample_groups_are_exactly_zero(kind):
    # 0.1 is not representable: a float mean of three 0.1s need not equal 0.1 exactly.
    r = torch.tensor([0.1, 0.1, 0.1, 3.7, 1e6, 1e6 + 64.0, 1e6 + 64.0])
    g = torch.tensor([9, 9, 9, 10, 11, 12, 12])
    out = FNS[kind](r, g)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.zeros(7))


@pytest.mark.parametrize("kind", sorted(FNS))
def test_empty_batch(kind):
    out = FNS[kind](torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.dtype == torch.float32


def test_group_ids_need_not_be_contiguous_or_sorted():
    r = torch.tensor([1.0, 5.0, 0.0, 3.0])
    g = torch.tensor([10**12, -7, 10**12, -7])  # interleaved, huge and negative ids
    torch.testing.assert_close(group_center(r, g), torch.tensor([0.5, 1.0, -0.5, -1.0]))


def test_integer_and_bf16_rewards_give_float32():
    g = torch.tensor([0, 0, 1, 1])
    ints = group_normalize(torch.tensor([1, 0, 2, 2]), g)
    assert ints.dtype == torch.float32
    torch.testing.assert_close(ints, group_normalize(torch.tensor([1.0, 0.0, 2.0, 2.0]), g))
    r = torch.tensor([0.3, -1.7, 2.2, 0.9]).bfloat16()
    out = group_normalize(r, g)
    assert out.dtype == torch.float32
    assert torch.equal(out, group_normalize(r.float(), g))


def test_eps_zero_with_underflowing_variance_stays_finite():
    r = torch.tensor([1e-30, 2e-30])  # squared deviations underflow to 0 in float32
    out = group_normalize(r, torch.tensor([0, 0]), eps=0.0)
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(data=rollout_tensors(max_B=10, max_G=5, min_B=0), unbiased=st.booleans())
def test_group_stats_match_reference(data, unbiased):
    r, g = data["rewards"], data["group_ids"]
    for kind, fn in FNS.items():
        out = fn(r, g, unbiased=unbiased) if kind == "normalize" else fn(r, g)
        ref = _reference_group_stat(r, g, kind, unbiased=unbiased)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        tol = _tolerance(r, g, kind)
        assert ((out.double() - ref).abs() <= tol).all(), (kind, out, ref)


@settings(max_examples=40, deadline=None)
@given(data=rollout_tensors(max_B=10, max_G=5), params=st.data())
def test_group_normalize_invariant_to_per_group_shift_and_positive_scale(data, params):
    # Quarter steps keep every non-constant group's std >= ~0.1, far above eps.
    r = torch.round(data["rewards"] * 4) / 4
    g = data["group_ids"]
    out = group_normalize(r, g)
    shifted = r.clone()
    for gid in g.unique().tolist():
        a = params.draw(st.sampled_from([0.5, 2.0, 3.0]))
        b = params.draw(st.integers(-100, 100))
        shifted[g == gid] = r[g == gid] * a + b
    torch.testing.assert_close(group_normalize(shifted, g), out, atol=2e-4, rtol=1e-4)


@settings(max_examples=40, deadline=None)
@given(data=rollout_tensors(max_B=10, max_G=5), params=st.data())
def test_permutation_equivariance_and_relabelling(data, params):
    r, g = data["rewards"], data["group_ids"]
    B = r.shape[0]
    perm = torch.tensor(params.draw(st.permutations(range(B))))
    # New ids in the reverse order of the old ones: group statistics must not depend on id values.
    relabel = {gid: 1000 - 3 * i for i, gid in enumerate(g.unique().tolist())}
    g2 = torch.tensor([relabel[x] for x in g.tolist()])
    for kind, fn in FNS.items():
        out = fn(r, g)
        torch.testing.assert_close(fn(r[perm], g[perm]), out[perm], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fn(r, g2), out, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(data=rollout_tensors(max_B=10, max_G=5, min_B=0), params=st.data())
def test_reducer_path_equals_single_process(data, params):
    r, g = data["rewards"], data["group_ids"]
    shards = params.draw(split_points(r.shape[0]))
    for kind, fn in FNS.items():
        single = fn(r, g)
        outs = run_ranks(
            lambda red, rank: fn(r[slice(*shards[rank])], g[slice(*shards[rank])], reducer=red),
            len(shards),
        )
        # Gathering reproduces the full batch, so the result is bit-identical.
        assert torch.equal(torch.cat(outs), single), kind


# ----------------------------------------------------------------------------- overlong
def test_overlong_penalty_dapo_numbers():
    lengths = torch.tensor([0, 16384, 16385, 18432, 20480, 20481, 30000])
    out = overlong_penalty(lengths, max_length=20480, cache_length=4096)
    expected = torch.tensor([0.0, 0.0, -1 / 4096, -0.5, -1.0, -1.0, -1.0])
    torch.testing.assert_close(out, expected)
    assert out.dtype == torch.float32


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 100), max_size=12),
    max_length=st.integers(1, 80),
    frac=st.floats(0.01, 1.0),
)
def test_overlong_penalty_matches_reference(lengths, max_length, frac):
    cache = max(1, min(max_length, int(frac * max_length)))
    out = overlong_penalty(torch.tensor(lengths, dtype=torch.long), max_length=max_length, cache_length=cache)
    ref = []
    for y in lengths:
        if y <= max_length - cache:
            ref.append(0.0)
        elif y <= max_length:
            ref.append(((max_length - cache) - y) / cache)
        else:
            ref.append(-1.0)
    torch.testing.assert_close(out, torch.tensor(ref, dtype=torch.float32).reshape(out.shape))
