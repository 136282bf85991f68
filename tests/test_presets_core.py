"""grpo, dapo and dr_grpo against a ~30-line plain-loop reference of METHODS.md on random rollouts."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcredit


def reference_loss(logp, old, mask, rewards, groups, *, center_only, eps, clip_low, clip_high, aggregation):
    """Plain Python loops over rows and tokens: GRPO / DAPO / Dr. GRPO as METHODS.md writes them."""
    B, T = len(mask), len(mask[0])
    adv = []
    for i in range(B):
        members = [rewards[j] for j in range(B) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        if len(members) < 2:
            adv.append(0.0)
            continue
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        if center_only:
            adv.append(rewards[i] - mean)
        else:
            adv.append(0.0 if std == 0 else (rewards[i] - mean) / (std + eps))
    total, count, per_seq = 0.0, 0, []
    for i in range(B):
        seq, n = 0.0, 0
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            l = -min(rho * adv[i], min(max(rho, 1 - clip_low), 1 + clip_high) * adv[i])
            seq, n = seq + l, n + 1
        total, count = total + seq, count + n
        per_seq.append((seq, n))
    if aggregation == "token_mean":
        return total / max(count, 1), adv
    if aggregation == "seq_mean_token_sum_norm":
        return total / (B * T), adv
    raise AssertionError(aggregation)


PRESETS = {
    "grpo": dict(center_only=False, eps=1e-6, clip_low=0.2, clip_high=0.2, aggregation="token_mean"),
    "dapo": dict(center_only=False, eps=1e-6, clip_low=0.2, clip_high=0.28, aggregation="token_mean"),
    "dr_grpo": dict(center_only=True, eps=0.0, clip_low=0.2, clip_high=0.2, aggregation="seq_mean_token_sum_norm"),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@given(
    G=st.integers(1, 4), n_groups=st.integers(1, 3), T=st.integers(1, 7), seed=st.integers(0, 2**31 - 1),
    binary=st.booleans(),
)
def test_preset_matches_plain_loop_reference(preset, G, n_groups, T, seed, binary):
    g = torch.Generator().manual_seed(seed)
    B = G * n_groups
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    rewards = torch.randint(0, 2, (B,), generator=g).float() if binary else torch.randn(B, generator=g)
    groups = torch.randperm(B, generator=g) % n_groups  # groups need not be contiguous
    old = -3 * torch.rand(B, T, generator=g, dtype=torch.float64)
    logp = old + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    strategy = rlcredit.build(preset)
    rollout = rlcredit.Rollout(mask, rewards, groups, old_logprobs=old.float())
    credit = strategy.assign(rollout)
    out = strategy.loss(logp.float(), rollout, credit)
    expected, adv = reference_loss(logp.tolist(), old.float().double().tolist(), mask.tolist(), rewards.tolist(),
                                   groups.tolist(), **PRESETS[preset])
    assert torch.allclose(credit.advantages, torch.tensor(adv, dtype=torch.float32), atol=1e-5)
    assert out.loss.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)
    assert torch.isfinite(out.loss)


def test_all_equal_rewards_give_zero_advantages_and_finite_loss():
    for preset in PRESETS:
        s = rlcredit.build(preset)
        r = rlcredit.Rollout(torch.ones(4, 3, dtype=torch.bool), torch.full((4,), 0.1), torch.tensor([0, 0, 1, 1]))
        credit = s.assign(r)
        assert torch.equal(credit.advantages, torch.zeros(4))
        logp = torch.zeros(4, 3, requires_grad=True)
        loss = s.loss(logp, r, credit).loss
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logp.grad).all()


def test_empty_rows_and_all_padding_batch_are_finite():
    for preset in PRESETS:
        s = rlcredit.build(preset)
        mask = torch.tensor([[True, True], [False, False]])
        r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
        logp = torch.zeros(2, 2, requires_grad=True)
        out = s.loss(logp, r, s.assign(r))
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.equal(logp.grad[1], torch.zeros(2))
        empty = rlcredit.Rollout(torch.zeros(2, 3, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
        logp = torch.zeros(2, 3, requires_grad=True)
        out = s.loss(logp, empty, s.assign(empty))
        out.loss.backward()
        assert out.loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(2, 3))


@given(seed=st.integers(0, 10_000), shift=st.floats(-5, 5), scale=st.floats(0.1, 10))
def test_grpo_invariant_to_per_group_shift_and_scale(seed, shift, scale):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(8, generator=g)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    mask = torch.ones(8, 2, dtype=torch.bool)
    s = rlcredit.build("grpo", shapers=[{"name": "group_normalize", "eps": 0.0}])
    a1 = s.assign(rlcredit.Rollout(mask, r, groups)).advantages
    r2 = torch.where(groups == 0, r * scale + shift, r)
    a2 = s.assign(rlcredit.Rollout(mask, r2, groups)).advantages
    assert torch.allclose(a1, a2, atol=1e-4)


@given(seed=st.integers(0, 10_000))
def test_permutation_equivariance_within_a_group(seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(4, generator=g)
    r = torch.randn(4, generator=g)
    mask = torch.ones(4, 3, dtype=torch.bool)
    s = rlcredit.build("dapo")
    a = s.assign(rlcredit.Rollout(mask, r, torch.zeros(4, dtype=torch.long))).advantages
    b = s.assign(rlcredit.Rollout(mask, r[perm], torch.zeros(4, dtype=torch.long))).advantages
    assert torch.allclose(a[perm], b, atol=1e-6)
