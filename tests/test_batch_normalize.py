"""``batch_normalize`` (kernel and shaper): a plain-loop reference, ranks, degenerate batches, errors.

The equality with TRL's own ``scale_rewards="batch"`` and RLOO's ``normalize_advantages`` is checked
against TRL's trainers in tests/test_trl.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcredit
from rlcredit import functional as F
from rlcredit.errors import RLCreditError, RolloutError, SpecError
from rlcredit.shapers import BatchNormalize
from tests.strategies import run_ranks, split_points


def _reference(rewards: list[float], center: bool, eps: float, unbiased: bool) -> list[float]:
    """Plain Python: mean, std and the division, one row at a time (float64)."""
    n = len(rewards)
    mean = sum(rewards) / n if n else 0.0
    dof = (n - 1 if unbiased else n) or 1
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / dof)
    denom = std + eps
    if center and max(rewards, default=0.0) == min(rewards, default=0.0):
        return [0.0] * n
    scale = denom if denom > 0 else 1.0
    return [((r - mean) if center else r) / scale for r in rewards]


rewards_lists = st.lists(st.floats(-10, 10, width=32), min_size=0, max_size=12)


@given(rewards=rewards_lists, center=st.booleans(), eps=st.sampled_from([0.0, 1e-6, 1e-4, 0.5]),
       unbiased=st.booleans())
def test_equals_plain_loop(rewards, center, eps, unbiased):
    got = F.batch_normalize(torch.tensor(rewards, dtype=torch.float32), center=center, eps=eps, unbiased=unbiased)
    want = torch.tensor(_reference(rewards, center, eps, unbiased), dtype=torch.float32)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4 * (1 + max(map(abs, want.tolist()), default=0.0)))


@given(data=st.data(), rewards=st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=12),
       center=st.booleans())
def test_ranks_equal_one_process(data, rewards, center):
    """R ranks each holding contiguous rows (some empty) give what one process holding all gives."""
    r = torch.tensor(rewards, dtype=torch.float32)
    whole = F.batch_normalize(r, center=center, eps=1e-4)
    parts = data.draw(split_points(len(rewards)))
    shards = run_ranks(lambda reducer, rank: F.batch_normalize(r[slice(*parts[rank])], center=center, eps=1e-4,
                                                               reducer=reducer), len(parts))
    torch.testing.assert_close(torch.cat(shards), whole, rtol=1e-5, atol=1e-5 * (1 + float(whole.abs().max())))


def test_hand_computed_and_degenerate_batches():
    r = torch.tensor([3.0, 1.0])  # mean 2, unbiased std sqrt(2), biased std 1
    torch.testing.assert_close(F.batch_normalize(r), torch.tensor([1.0, -1.0]) / (2 ** 0.5 + 1e-6))
    torch.testing.assert_close(F.batch_normalize(r, unbiased=False, eps=0.0), torch.tensor([1.0, -1.0]))
    torch.testing.assert_close(F.batch_normalize(r, center=False, eps=0.0), r / 2 ** 0.5)
    const = torch.full((4,), 0.1)  # r - mean is a few ulps off 0 in float32; the result is exactly 0
    assert torch.equal(F.batch_normalize(const), torch.zeros(4))
    torch.testing.assert_close(F.batch_normalize(const, center=False, eps=1e-4), const / 1e-4)  # TRL's rule
    assert torch.equal(F.batch_normalize(const, center=False, eps=0.0), const)  # std + eps == 0: not divided
    assert torch.equal(F.batch_normalize(torch.tensor([5.0])), torch.zeros(1))  # one row: std 0
    assert F.batch_normalize(torch.zeros(0)).shape == (0,)
    big = torch.tensor([1000.0, 1001.0])  # a large offset: the two-pass variance does not cancel
    torch.testing.assert_close(F.batch_normalize(big, eps=0.0), torch.tensor([-1.0, 1.0]) / 2 ** 0.5)


def test_errors():
    with pytest.raises(RolloutError, match="rewards"):
        F.batch_normalize(torch.zeros(2, 2))
    with pytest.raises(RolloutError, match="real"):
        F.batch_normalize(torch.tensor([True, False]))
    with pytest.raises(RLCreditError, match="eps"):
        F.batch_normalize(torch.zeros(2), eps=-1.0)
    with pytest.raises(SpecError):
        BatchNormalize(eps=float("nan"))
    with pytest.raises(SpecError):
        BatchNormalize(center=1)
    r = rlcredit.Rollout(torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    with pytest.raises(RolloutError, match="trajectory advantages"):
        BatchNormalize()(torch.zeros(2, 2), {}, r)


def test_shaper_registered_spec_round_trip_and_chain():
    s = rlcredit.build({"shapers": ["leave_one_out", {"name": "batch_normalize", "eps": 1e-4}]})
    assert s.shapers[1] == BatchNormalize(eps=1e-4)
    assert rlcredit.build(s.to_spec()) == s
    assert rlcredit.get("shaper", "batch_normalize") is BatchNormalize
    r = rlcredit.Rollout(torch.ones(4, 1, dtype=torch.bool), torch.tensor([1.0, 0.0, 2.0, 0.0]),
                         torch.tensor([0, 0, 1, 1]))
    loo = F.leave_one_out(r.rewards, r.group_ids)
    torch.testing.assert_close(s.assign(r).advantages, F.batch_normalize(loo, eps=1e-4))
