"""Clipped surrogate, aggregation modes, k3 KL and masked means."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcredit.functional import (
    AGGREGATIONS,
    aggregate,
    clipped_surrogate,
    group_normalize,
    k3_kl,
    masked_mean,
)
from tests.strategies import right_padded_mask, rollout_tensors, run_ranks, split_points


# ----------------------------------------------------------------------------- references
def _reference_clipped(lp, old, adv, clip_low, clip_high, dual_clip):
    """Per-element float64 loop: (loss, is_clipped, d loss / d logprob)."""
    B, T = lp.shape
    adv = adv[:, None].expand(B, T) if adv.dim() == 1 else adv
    loss = torch.zeros(B, T, dtype=torch.float64)
    clipped = torch.zeros(B, T, dtype=torch.bool)
    grad = torch.zeros(B, T, dtype=torch.float64)
    for i in range(B):
        for t in range(T):
            a = float(adv[i, t])
            log_ratio = min(max(float(lp[i, t]) - float(old[i, t]), -20.0), 20.0)
            rho = math.exp(log_ratio)
            unclipped = -a * rho
            clip_val = -a * min(max(rho, 1 - clip_low), 1 + clip_high)
            value, is_clip, g = unclipped, False, -a * rho
            if clip_val > unclipped:
                value, is_clip, g = clip_val, True, 0.0
            if dual_clip is not None and a < 0 and -dual_clip * a < value:
                value, is_clip, g = -dual_clip * a, True, 0.0
            loss[i, t], clipped[i, t], grad[i, t] = value, is_clip, g
    return loss, clipped, grad


def _reference_aggregate(per_token, mask, weights, mode, renormalize=False, max_length=None):
    B, T = per_token.shape
    x = [[0.0] * T for _ in range(B)]
    w = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if mask[i, t]:
                w[i][t] = 1.0 if weights is None else float(weights[i, t])
                x[i][t] = w[i][t] * float(per_token[i, t])
    if mode == "token_mean":
        den = sum(w[i][t] for i in range(B) for t in range(T)) if renormalize else float(mask.sum())
        return sum(map(sum, x)) / den if den > 0 else 0.0
    if B == 0:
        return 0.0
    if mode == "seq_mean_token_mean":
        rows = []
        for i in range(B):
            den = sum(w[i]) if renormalize else float(mask[i].sum())
            rows.append(sum(x[i]) / den if den > 0 else 0.0)
        return sum(rows) / B
    if mode == "seq_mean_token_sum":
        return sum(map(sum, x)) / B
    return sum(map(sum, x)) / (B * (max_length or T))


# ----------------------------------------------------------------------------- golden regimes
# (ratio, advantage, clip_low, clip_high, dual_clip, expected loss, clipped, d loss / d logprob)
# with logprob = log(ratio) and old logprob 0, so d loss / d logprob = -A * ratio when unclipped.
GOLDEN = {
    "pos_adv_inside_range": (1.1, 2.0, 0.2, 0.2, None, -2.2, False, -2.2),
    "pos_adv_above_range_clipped": (1.5, 2.0, 0.2, 0.2, None, -2.4, True, 0.0),
    "pos_adv_below_range_unclipped": (0.5, 2.0, 0.2, 0.2, None, -1.0, False, -1.0),
    "neg_adv_inside_range": (0.9, -1.0, 0.2, 0.2, None, 0.9, False, 0.9),
    "neg_adv_below_range_clipped": (0.5, -1.0, 0.2, 0.2, None, 0.8, True, 0.0),
    "neg_adv_above_range_unclipped": (1.5, -1.0, 0.2, 0.2, None, 1.5, False, 1.5),
    "dual_clip_active": (5.0, -1.0, 0.2, 0.2, 3.0, 3.0, True, 0.0),
    "dual_clip_inactive": (2.0, -1.0, 0.2, 0.2, 3.0, 2.0, False, 2.0),
    "dual_clip_ignores_pos_adv": (5.0, 1.0, 0.2, 0.2, 3.0, -1.2, True, 0.0),
    "clip_higher_inside_0.28": (1.25, 1.0, 0.2, 0.28, None, -1.25, False, -1.25),
    "clip_higher_above_0.28": (1.5, 1.0, 0.2, 0.28, None, -1.28, True, 0.0),
    "zero_advantage": (3.0, 0.0, 0.2, 0.2, 3.0, 0.0, False, 0.0),
}


@pytest.mark.parametrize("regime", sorted(GOLDEN))
def test_clipped_surrogate_golden_regimes(regime):
    ratio, adv, lo, hi, dual, expected, exp_clipped, exp_grad = GOLDEN[regime]
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss, clipped = clipped_surrogate(
        lp, torch.zeros(1, 1), torch.tensor([adv]), clip_low=lo, clip_high=hi, dual_clip=dual
    )
    torch.testing.assert_close(loss, torch.tensor([[expected]]))
    assert clipped.item() is exp_clipped
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[exp_grad]]))
    if exp_clipped:
        assert lp.grad.item() == 0.0  # exactly, not approximately


def test_clipped_surrogate_per_token_advantages_and_mask():
    lp = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.tensor([[True, True, False]])
    loss, clipped = clipped_surrogate(lp, torch.zeros(1, 3), adv, mask=mask)
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.2, 0.0]]))
    assert clipped.tolist() == [[False, True, False]]


def test_log_ratio_is_clamped_so_stale_logprobs_stay_finite():
    lp = torch.tensor([[0.0, -1e4, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1e4, 0.0, 0.0]])
    loss, _ = clipped_surrogate(lp, old, torch.tensor([-1.0]))
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(lp.grad).all()


@settings(max_examples=40, deadline=None)
@given(
    data=rollout_tensors(max_B=6, max_T=6, min_B=0),
    per_token_adv=st.booleans(),
    clips=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.5), (0.0, 0.0)]),
    dual=st.sampled_from([None, 1.5, 3.0]),
)
def test_clipped_surrogate_matches_reference(data, per_token_adv, clips, dual):
    lp = data["logprobs"].clone().requires_grad_(True)
    old = data["old_logprobs"]
    B, T = lp.shape
    adv = torch.randn(B, T) if per_token_adv else data["advantages"]
    loss, clipped = clipped_surrogate(lp, old, adv, clip_low=clips[0], clip_high=clips[1], dual_clip=dual)
    ref_loss, ref_clipped, ref_grad = _reference_clipped(lp.detach(), old, adv, *clips, dual)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref_loss, atol=1e-5, rtol=1e-5)
    # Away from the clip boundaries float32 and float64 agree on the branch taken.
    rho = (lp.detach() - old).double().exp()
    far = ((rho - (1 - clips[0])).abs() > 1e-4) & ((rho - (1 + clips[1])).abs() > 1e-4)
    if dual is not None:
        far &= (rho - dual).abs() > 1e-4
    assert torch.equal(clipped[far], ref_clipped[far])
    loss.sum().backward()
    torch.testing.assert_close(lp.grad.double()[far], ref_grad[far], atol=1e-5, rtol=1e-5)
    assert (lp.grad[clipped] == 0).all()


def test_clipped_surrogate_bf16_inputs_give_float32_close_to_float32_path():
    gen = torch.Generator().manual_seed(1)
    lp = -torch.rand(4, 7, generator=gen)
    old = lp + 0.2 * torch.randn(4, 7, generator=gen)
    adv = torch.randn(4, generator=gen)
    loss16, clip16 = clipped_surrogate(lp.bfloat16(), old.bfloat16(), adv.bfloat16(), dual_clip=3.0)
    loss32, _ = clipped_surrogate(lp, old, adv, dual_clip=3.0)
    assert loss16.dtype == torch.float32 and clip16.dtype == torch.bool
    torch.testing.assert_close(loss16, loss32, atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------- aggregate
def test_aggregate_goldens_with_weights():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False], [False, False, False]])
    w = torch.tensor([[1.0, 0.5, 0.0], [2.0, 0.0, 7.0], [1.0, 1.0, 1.0]])
    # x = [[1, 1, 0], [8, 0, 0], [0, 0, 0]]: sum 10, valid tokens 5, sum w on valid 3.5, B 3
    cases = {
        ("token_mean", False): 10 / 5,
        ("token_mean", True): 10 / 3.5,
        ("seq_mean_token_mean", False): (2 / 3 + 8 / 2 + 0) / 3,
        ("seq_mean_token_mean", True): (2 / 1.5 + 8 / 2 + 0) / 3,
        ("seq_mean_token_sum", False): (2 + 8 + 0) / 3,
        ("seq_mean_token_sum_norm", False): 10 / (3 * 3),
    }
    for (mode, renorm), expected in cases.items():
        out = aggregate(loss, mask, w, mode=mode, renormalize=renorm)
        assert out.shape == () and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.tensor(expected), msg=f"{mode} {renorm}")
    out = aggregate(loss, mask, w, mode="seq_mean_token_sum_norm", max_length=10)
    torch.testing.assert_close(out, torch.tensor(10 / 30))


@settings(max_examples=60, deadline=None)
@given(
    data=rollout_tensors(max_B=6, max_T=6, min_B=0),
    mode=st.sampled_from(AGGREGATIONS),
    weighted=st.sampled_from(["none", "random", "sparse"]),
    renormalize=st.booleans(),
    max_length=st.sampled_from([None, 9]),
)
def test_aggregate_matches_reference(data, mode, weighted, renormalize, max_length):
    if mode in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
        renormalize = False
    if mode != "seq_mean_token_sum_norm":
        max_length = None
    mask, per_token = data["response_mask"], data["scores"] - 1.0
    B, T = mask.shape
    gen = torch.Generator().manual_seed(B * 31 + T)
    weights = None
    if weighted == "random":
        weights = torch.rand(B, T, generator=gen)
    elif weighted == "sparse":
        weights = (torch.rand(B, T, generator=gen) < 0.3).float()
    out = aggregate(per_token, mask, weights, mode=mode, renormalize=renormalize, max_length=max_length)
    ref = _reference_aggregate(per_token, mask, weights, mode, renormalize, max_length)
    assert out.shape == () and torch.isfinite(out)
    torch.testing.assert_close(out.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_padding_gets_no_loss_and_exactly_zero_gradient_even_when_nan(mode):
    mask = right_padded_mask([3, 1, 0], 4)
    lp = torch.full((3, 4), -0.5)
    lp[~mask] = float("-inf")  # padding log-probs that would poison a product with the mask
    lp.requires_grad_(True)
    old = torch.where(mask, torch.full((3, 4), -0.7), torch.full((3, 4), float("-inf")))
    per_token, _ = clipped_surrogate(lp, old, torch.tensor([1.0, -1.0, 2.0]))
    assert torch.isnan(per_token[~mask]).all()  # -inf - -inf: the loss itself is NaN on padding
    w = torch.where(mask, torch.rand(3, 4), torch.full((3, 4), float("nan")))
    loss = aggregate(per_token, mask, w, mode=mode)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    assert (lp.grad[~mask] == 0).all()
    assert (lp.grad[mask] != 0).any()


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_all_padding_batch_gives_zero_loss_and_zero_gradient(mode):
    per_token = torch.randn(3, 4, requires_grad=True)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    loss = aggregate(per_token, mask, mode=mode)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert per_token.grad is not None and torch.equal(per_token.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("mode", AGGREGATIONS)
def test_zero_rows_batch_is_finite(mode):
    per_token = torch.zeros(0, 5, requires_grad=True)
    loss = aggregate(per_token, torch.zeros(0, 5, dtype=torch.bool), mode=mode)
    assert loss.item() == 0.0
    loss.backward()
    assert per_token.grad.shape == (0, 5)


def test_renormalize_with_all_zero_weights_is_zero_not_nan():
    per_token = torch.randn(2, 3, requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    for mode in ("token_mean", "seq_mean_token_mean"):
        loss = aggregate(per_token, mask, torch.zeros(2, 3), mode=mode, renormalize=True)
        assert loss.item() == 0.0
        (g,) = torch.autograd.grad(loss, per_token)
        assert torch.equal(g, torch.zeros(2, 3))


def test_all_equal_rewards_give_zero_advantages_and_finite_zero_loss():
    rewards = torch.full((4,), 0.3)
    adv = group_normalize(rewards, torch.tensor([1, 1, 1, 1]))
    assert torch.equal(adv, torch.zeros(4))
    lp = torch.randn(4, 5).clamp_max(0).requires_grad_(True)
    per_token, _ = clipped_surrogate(lp, lp.detach() - 0.1, adv)
    loss = aggregate(per_token, right_padded_mask([5, 3, 0, 1], 5))
    assert torch.isfinite(loss) and loss.item() == 0.0


def test_aggregate_bf16_per_token_gives_float32():
    per_token = torch.randn(3, 4).bfloat16()
    mask = right_padded_mask([4, 2, 1], 4)
    for mode in AGGREGATIONS:
        out = aggregate(per_token, mask, mode=mode)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, aggregate(per_token.float(), mask, mode=mode))


def test_token_weights_fold_exactly_into_the_clipped_loss():
    gen = torch.Generator().manual_seed(3)
    lp = -torch.rand(3, 5, generator=gen)
    old = lp + 0.3 * torch.randn(3, 5, generator=gen)
    adv = torch.randn(3, generator=gen)
    w = torch.rand(3, 5, generator=gen)
    loss, _ = clipped_surrogate(lp, old, adv)
    scaled, _ = clipped_surrogate(lp, old, adv[:, None] * w)  # -min(rho A w, clip(rho) A w)
    torch.testing.assert_close(loss * w, scaled)


# ----------------------------------------------------------------------------- ranks
@settings(max_examples=20, deadline=None)
@given(
    data=rollout_tensors(max_B=8, max_T=5, min_B=0),
    mode=st.sampled_from(AGGREGATIONS),
    renormalize=st.booleans(),
    params=st.data(),
)
def test_rank_mean_of_losses_and_gradients_equals_single_process(data, mode, renormalize, params):
    if mode in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
        renormalize = False
    mask = data["response_mask"]
    B, T = mask.shape
    per_token = (data["scores"] - 1.0).requires_grad_(True)
    weights = torch.rand(B, T, generator=torch.Generator().manual_seed(B))
    single = aggregate(per_token, mask, weights, mode=mode, renormalize=renormalize)
    (single_grad,) = torch.autograd.grad(single, per_token) if B else (torch.zeros(0, T),)
    shards = params.draw(split_points(B))
    R = len(shards)

    def rank_fn(red, rank):
        rows = slice(*shards[rank])
        x = per_token.detach()[rows].clone().requires_grad_(True)
        out = aggregate(x, mask[rows], weights[rows], mode=mode, renormalize=renormalize, reducer=red)
        (g,) = torch.autograd.grad(out, x)
        return out.detach(), g

    results = run_ranks(rank_fn, R)
    torch.testing.assert_close(sum(o for o, _ in results) / R, single.detach(), atol=1e-5, rtol=1e-5)
    # DDP averages gradients over ranks.
    torch.testing.assert_close(torch.cat([g for _, g in results]) / R, single_grad, atol=1e-6, rtol=1e-5)


def test_sum_norm_uses_the_largest_padded_length_across_ranks():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, generator=gen), torch.randn(3, 6, generator=gen)
    ma, mb = right_padded_mask([3, 1], 3), right_padded_mask([6, 2, 0], 6)
    # One process holding both: pad rank 0's rows to T = 6.
    full = torch.cat([torch.nn.functional.pad(a, (0, 3)), b])
    full_mask = torch.cat([torch.nn.functional.pad(ma, (0, 3)), mb])
    single = aggregate(full, full_mask, mode="seq_mean_token_sum_norm")
    outs = run_ranks(
        lambda red, rank: aggregate(*((a, ma) if rank == 0 else (b, mb)), mode="seq_mean_token_sum_norm", reducer=red),
        2,
    )
    torch.testing.assert_close(sum(outs) / 2, single)


# ----------------------------------------------------------------------------- k3, masked mean
def test_k3_kl_golden_and_properties():
    lp = torch.tensor([[0.0, 0.0, -1.0, -30.0]], requires_grad=True)
    ref = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    kl = k3_kl(lp, ref)
    expected = [0.0, math.e - 2.0, math.exp(1.0) - 2.0, math.exp(20.0) - 21.0]  # last: clamped d=20
    torch.testing.assert_close(kl, torch.tensor([expected]))
    kl.sum().backward()
    torch.testing.assert_close(lp.grad[0, :3], torch.tensor([0.0, -(math.e - 1), -(math.e - 1)]))
    masked = k3_kl(lp, ref, torch.tensor([[True, False, True, False]]))
    assert masked[0, 1] == 0 and masked[0, 3] == 0
    x = torch.randn(50, 20)
    assert (k3_kl(x, x + 1e-4 * torch.randn(50, 20)) >= 0).all()
    assert torch.isfinite(k3_kl(torch.tensor([[float("-inf")]]), torch.tensor([[0.0]]))).all()


def test_masked_mean_ignores_non_finite_padding():
    x = torch.tensor([[1.0, 3.0, float("nan")], [float("inf"), 0.0, 0.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[True, True, False], [False, False, False], [True, True, True]])
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor([2.0, 0.0, 2.0]))
    assert masked_mean(x.bfloat16(), mask).dtype == torch.float32
