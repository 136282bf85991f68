"""cispo, sapo, gmpo, kl_cov and clip_cov against plain loops; padding, extremes, totals, ranks, errors.

The references (tests/losses_reference.py) compute each loss and its gradient by hand with Python
floats; here they meet the vectorised losses on Hypothesis batches (uneven lengths, empty rows,
token weights, [B] and [B, T] advantages, every aggregation).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import rlcredit
from rlcredit.functional import AGGREGATIONS
from rlcredit.losses import CISPO, GMPO, SAPO, ClipCov, KLCov
from tests.losses_reference import covariance_margin, ref_cispo, ref_clip_cov, ref_gmpo, ref_kl_cov, ref_sapo
from tests.strategies import rollout_tensors, run_ranks


def _case(data, *, token_adv: bool, weighted: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = data["response_mask"]
    B, T = mask.shape
    adv = torch.randn(B, T, generator=g) if token_adv else data["advantages"]
    w = (torch.rand(B, T, generator=g) * 2).where(torch.rand(B, T, generator=g) > 0.3, 0.0) if weighted else torch.ones(B, T)
    w = torch.where(mask, w, 0.0)
    rollout = rlcredit.Rollout(mask, data["rewards"], data["group_ids"], old_logprobs=data["old_logprobs"])
    credit = rlcredit.Credit({}, w, adv)
    lists = {
        "logp": data["logprobs"].tolist(), "old": data["old_logprobs"].tolist(), "w": w.tolist(), "mask": mask.tolist(),
        "adv": (adv if token_adv else adv[:, None].expand(B, T)).tolist(),
    }
    return rollout, credit, lists


def _run(loss_fn, data, rollout, credit, **kw):
    logp = data["logprobs"].clone().requires_grad_(True)
    out = loss_fn(logp, rollout, credit, **kw)
    (grad,) = torch.autograd.grad(out.loss, logp, allow_unused=True)
    return out, torch.zeros_like(logp) if grad is None else grad


def _check(out, grad, ref_loss, ref_grad):
    assert math.isclose(out.loss.item(), ref_loss, rel_tol=1e-5, abs_tol=1e-6), (out.loss.item(), ref_loss)
    torch.testing.assert_close(grad, torch.tensor(ref_grad, dtype=torch.float32), rtol=1e-5, atol=1e-6)


@settings(max_examples=40)
@given(data=rollout_tensors(max_B=6, max_T=6), mode=st.sampled_from(AGGREGATIONS), renormalize=st.booleans(),
       clip_low=st.sampled_from([None, 0.2, 0.0]), clip_high=st.sampled_from([0.28, 0.0, 4.0]),
       token_adv=st.booleans(), weighted=st.booleans())
def test_cispo_matches_plain_loop(data, mode, renormalize, clip_low, clip_high, token_adv, weighted):
    renormalize = renormalize and mode in ("token_mean", "seq_mean_token_mean")
    rollout, credit, x = _case(data, token_adv=token_adv, weighted=weighted)
    loss_fn = CISPO(clip_low=clip_low, clip_high=clip_high, aggregation=mode, renormalize=renormalize)
    out, grad = _run(loss_fn, data, rollout, credit)
    _check(out, grad, *ref_cispo(x["logp"], x["old"], x["adv"], x["w"], x["mask"], clip_low=clip_low,
                                  clip_high=clip_high, mode=mode, renormalize=renormalize))


@settings(max_examples=40)
@given(data=rollout_tensors(max_B=6, max_T=6), mode=st.sampled_from(AGGREGATIONS),
       taus=st.sampled_from([(1.0, 1.05), (0.5, 2.0), (3.0, 3.0)]), token_adv=st.booleans(), weighted=st.booleans())
def test_sapo_matches_plain_loop(data, mode, taus, token_adv, weighted):
    rollout, credit, x = _case(data, token_adv=token_adv, weighted=weighted)
    out, grad = _run(SAPO(tau_pos=taus[0], tau_neg=taus[1], aggregation=mode), data, rollout, credit)
    _check(out, grad, *ref_sapo(x["logp"], x["old"], x["adv"], x["w"], x["mask"], tau_pos=taus[0], tau_neg=taus[1],
                                 mode=mode))


@settings(max_examples=40)
@given(data=rollout_tensors(max_B=6, max_T=6), clips=st.sampled_from([(0.4, 0.4), (0.1, 0.3), (0.0, 0.0)]),
       token_adv=st.booleans(), weighted=st.booleans())
def test_gmpo_matches_plain_loop(data, clips, token_adv, weighted):
    rollout, credit, x = _case(data, token_adv=token_adv, weighted=weighted)
    out, grad = _run(GMPO(clip_low=clips[0], clip_high=clips[1]), data, rollout, credit)
    _check(out, grad, *ref_gmpo(x["logp"], x["old"], x["adv"], x["w"], x["mask"], clip_low=clips[0], clip_high=clips[1]))


def test_gmpo_is_the_sequence_objective():
    """With [B] advantages and unit weights: loss = mean_i -A_i exp(mean_t l~_t), and so is its gradient."""
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False], [False] * 4])
    old = -torch.rand(3, 4, generator=g)
    logp = (old + torch.randn(3, 4, generator=g) * 0.6).requires_grad_(True)
    adv = torch.tensor([1.5, -0.7, 2.0])
    r = rlcredit.Rollout(mask, torch.zeros(3), torch.tensor([0, 0, 1]), old_logprobs=old)
    out = GMPO(clip_low=0.3, clip_high=0.2)(logp, r, rlcredit.Credit({}, torch.ones(3, 4), adv))
    lp = logp.detach().clone().requires_grad_(True)
    seq = []
    for i in range(3):
        l = (lp[i] - old[i])[mask[i]]
        s = torch.sign(adv[i])
        kept = s * torch.minimum(s * l, s * l.clamp(-0.3, 0.2))
        seq.append(-adv[i] * torch.exp(kept.mean()) if mask[i].any() else torch.zeros(()))
    expected = torch.stack(seq).mean()
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(torch.autograd.grad(out.loss, logp)[0], torch.autograd.grad(expected, lp)[0])


@settings(max_examples=40)
@given(data=rollout_tensors(max_B=6, max_T=6), mode=st.sampled_from(AGGREGATIONS),
       ratio=st.sampled_from([2e-4, 0.1, 0.5, 1.0]), coef=st.sampled_from([1.0, 0.1]), token_adv=st.booleans(),
       weighted=st.booleans())
def test_kl_cov_matches_plain_loop(data, mode, ratio, coef, token_adv, weighted):
    rollout, credit, x = _case(data, token_adv=token_adv, weighted=weighted)
    assume(covariance_margin(x["logp"], x["adv"], x["mask"], []) > 1e-4)  # no float32 near-tie in the ranking
    out, grad = _run(KLCov(kl_cov_ratio=ratio, ppo_kl_coef=coef, aggregation=mode), data, rollout, credit)
    (loss, g), chosen = ref_kl_cov(x["logp"], x["old"], x["adv"], x["w"], x["mask"], ratio=ratio, coef=coef, mode=mode)
    _check(out, grad, loss, g)
    n = max(sum(map(sum, x["mask"])), 1)
    assert math.isclose(out.metrics["kl_cov_fraction"].item(), len(chosen) / n, rel_tol=1e-6)


@settings(max_examples=40)
@given(data=rollout_tensors(max_B=6, max_T=6), mode=st.sampled_from(AGGREGATIONS),
       ratio=st.sampled_from([2e-4, 0.1, 0.5]), window=st.sampled_from([(1.0, 5.0), (-1.0, 1.0), (0.0, 0.3)]),
       clips=st.sampled_from([(0.2, 0.2), (0.1, 0.5)]), seed=st.integers(0, 2**20), token_adv=st.booleans(),
       weighted=st.booleans())
def test_clip_cov_matches_plain_loop(data, mode, ratio, window, clips, seed, token_adv, weighted):
    rollout, credit, x = _case(data, token_adv=token_adv, weighted=weighted)
    assume(covariance_margin(x["logp"], x["adv"], x["mask"], list(window)) > 1e-4)  # no float32 near-tie
    loss_fn = ClipCov(clip_cov_ratio=ratio, clip_cov_lb=window[0], clip_cov_ub=window[1], clip_low=clips[0],
                      clip_high=clips[1], aggregation=mode, seed=seed)
    out, grad = _run(loss_fn, data, rollout, credit)
    # The keys the docstring promises: a fresh generator seeded with `seed` (rank 0), uniform [B, T].
    keys = torch.rand(rollout.response_mask.shape, generator=torch.Generator().manual_seed(seed * 1_000_003))
    (loss, g), cut = ref_clip_cov(x["logp"], x["old"], x["adv"], x["w"], x["mask"], keys.tolist(), ratio=ratio,
                                  lb=window[0], ub=window[1], clip_low=clips[0], clip_high=clips[1], mode=mode)
    _check(out, grad, loss, g)
    n = max(sum(map(sum, x["mask"])), 1)
    assert math.isclose(out.metrics["cov_clip_fraction"].item(), len(cut) / n, rel_tol=1e-6)


def test_clip_cov_draw_is_uniform_over_candidates():
    """seed=None draws from torch's generator: over many calls each candidate is cut k / |C| of the time."""
    mask = torch.ones(1, 40, dtype=torch.bool)
    logp = torch.linspace(-2.0, 0.0, 40)[None]
    adv = torch.linspace(-1.0, 1.0, 40)[None]  # cov rises at both ends
    r = rlcredit.Rollout(mask, torch.zeros(1), torch.tensor([0]), old_logprobs=logp.clone())
    loss_fn = ClipCov(clip_cov_ratio=0.1, clip_cov_lb=0.1, clip_cov_ub=10.0)  # k = 4 of the candidates
    from rlcredit.losses._common import token_inputs
    from rlcredit.losses.covariance import token_covariance

    credit = rlcredit.Credit({}, torch.ones(1, 40), adv)
    candidates = token_covariance(token_inputs(logp, r, credit, "t"), None) > 0.1
    C = int(candidates.sum())
    assert 8 <= C < 40
    torch.manual_seed(1)
    counts = torch.zeros(1, 40)
    runs = 3000
    for _ in range(runs):
        logp_ = logp.clone().requires_grad_(True)
        out = loss_fn(logp_, r, credit)
        (grad,) = torch.autograd.grad(out.loss, logp_)
        counts += (grad == 0) & candidates
    share = counts[candidates] / runs
    assert torch.allclose(share, torch.full_like(share, 4 / C), atol=0.035), share  # ~4 sigma at 3000 runs
    assert int(counts.sum()) == 4 * runs  # exactly k per call


def test_clip_cov_seed_reproduces_and_selects_exactly_k():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(4, 50, dtype=torch.bool)
    logp = -torch.rand(4, 50, generator=g) * 4
    adv = torch.randn(4, 50, generator=g) * 3
    r = rlcredit.Rollout(mask, torch.zeros(4), torch.zeros(4, dtype=torch.long), old_logprobs=logp.clone())
    credit = rlcredit.Credit({}, torch.ones(4, 50), adv)
    loss_fn = ClipCov(clip_cov_ratio=0.02, clip_cov_lb=0.0, clip_cov_ub=100.0, seed=7)
    a, b = loss_fn(logp, r, credit), loss_fn(logp, r, credit)
    assert round(a.metrics["cov_clip_fraction"].item() * 200) == round(b.metrics["cov_clip_fraction"].item() * 200) == 4
    assert torch.equal(a.loss, b.loss)
    other = ClipCov(clip_cov_ratio=0.02, clip_cov_lb=0.0, clip_cov_ub=100.0, seed=8)(logp, r, credit)
    assert not torch.equal(other.loss, a.loss)


# --- properties shared by every loss ---------------------------------------------------------------

LOSSES = [CISPO(), CISPO(clip_low=0.2, aggregation="seq_mean_token_sum_norm"), SAPO(), SAPO(aggregation="token_mean"),
          GMPO(), KLCov(kl_cov_ratio=0.3),
          ClipCov(clip_cov_ratio=0.2, clip_cov_lb=-10.0, clip_cov_ub=10.0, clip_low=0.9, clip_high=9.0, seed=0)]


def _rollout(B=3, T=5, seed=0, *, old=True):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None] < torch.tensor([T, 2, 0][:B] + [1] * max(0, B - 3))[:, None]
    old_lp = torch.where(mask, -torch.rand(B, T, generator=g) * 3, 0.0)
    r = rlcredit.Rollout(mask, torch.rand(B, generator=g), torch.arange(B) // 2, old_logprobs=old_lp if old else None)
    return r, rlcredit.Credit({}, torch.where(mask, torch.rand(B, T, generator=g) + 0.5, 0.0), torch.randn(B, generator=g))


@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: type(f).__name__)
def test_padding_gets_no_gradient_even_when_nan(loss_fn):
    r, credit = _rollout()
    logp = torch.where(r.response_mask, -torch.rand(r.response_mask.shape), float("nan")).requires_grad_(True)
    logp.data[1, 3] = float("inf")
    out = loss_fn(logp, r, credit)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(out.loss)
    assert torch.equal(grad[~r.response_mask], torch.zeros(int((~r.response_mask).sum())))
    assert torch.isfinite(grad).all() and bool((grad[r.response_mask] != 0).any())
    assert all(torch.isfinite(out.metrics[k]).all() for k in out.metrics)


@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: type(f).__name__)
@pytest.mark.parametrize("scale", [1e-3, 1e3, 1e4])
def test_finite_on_extreme_inputs(loss_fn, scale):
    r, credit = _rollout(B=4, T=6, seed=1)
    g = torch.Generator().manual_seed(2)
    logp = torch.where(r.response_mask, -torch.rand(r.response_mask.shape, generator=g) * scale, 0.0)
    old = torch.where(r.response_mask, -torch.rand(r.response_mask.shape, generator=g) * scale, 0.0)
    r = rlcredit.Rollout(r.response_mask, r.rewards, r.group_ids, old_logprobs=old)
    credit = rlcredit.Credit({}, credit.token_weights, credit.advantages * scale)
    logp.requires_grad_(True)
    out = loss_fn(logp, r, credit)
    (grad,) = torch.autograd.grad(out.loss, logp)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: type(f).__name__)
def test_on_policy_without_old_logprobs(loss_fn):
    r, credit = _rollout(old=False)
    logp = torch.where(r.response_mask, -torch.rand(r.response_mask.shape), 0.0).requires_grad_(True)
    with_old = rlcredit.Rollout(r.response_mask, r.rewards, r.group_ids, old_logprobs=logp.detach().clone())
    a, b = loss_fn(logp, r, credit), loss_fn(logp, with_old, credit)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(torch.autograd.grad(a.loss, logp)[0], torch.autograd.grad(b.loss, logp)[0])


@pytest.mark.parametrize("loss_fn", [CISPO(), CISPO(aggregation="seq_mean_token_mean", renormalize=True), SAPO(),
                                     SAPO(aggregation="seq_mean_token_sum_norm"), GMPO()], ids=repr)
def test_micro_batches_with_totals_add_up(loss_fn):
    """Micro-batches aggregated under the whole batch's totals add up to the whole loss (and gradient)."""
    r, credit = _rollout(B=5, T=6, seed=4)
    logp = torch.where(r.response_mask, -torch.rand(r.response_mask.shape), 0.0).requires_grad_(True)
    whole = loss_fn(logp, r, credit).loss
    totals = loss_fn.totals(r, credit)
    parts = sum(loss_fn(logp[rows], r.select(rows), credit.select(rows), totals=totals).loss
                for rows in ([0, 1], [2], [3, 4]))
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(torch.autograd.grad(parts, logp)[0], torch.autograd.grad(whole, logp)[0])


@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: type(f).__name__)
@pytest.mark.parametrize("world", [2, 3])
def test_ranks_average_to_the_single_process_loss(loss_fn, world):
    """Rows split over ranks: the mean of the per-rank losses (what DDP averages) is the one-process loss.

    Covariance statistics, the selected count and the top tokens are global, so KL-Cov is exact;
    Clip-Cov here cuts every candidate (a wide ratio), which makes its random draw irrelevant.
    """
    B, T = 6, 5
    g = torch.Generator().manual_seed(5)
    mask = torch.arange(T)[None] < torch.tensor([5, 1, 3, 0, 4, 2])[:, None]
    old = torch.where(mask, -torch.rand(B, T, generator=g) * 2, 0.0)
    logp = torch.where(mask, old + torch.randn(B, T, generator=g) * 0.5, 0.0)
    adv, w = torch.randn(B, generator=g), torch.where(mask, torch.rand(B, T, generator=g), 0.0)
    r = rlcredit.Rollout(mask, torch.zeros(B), torch.arange(B), old_logprobs=old)
    credit = rlcredit.Credit({}, w, adv)
    if isinstance(loss_fn, ClipCov):
        loss_fn = ClipCov(clip_cov_ratio=1.0, clip_cov_lb=-100.0, clip_cov_ub=100.0)
    lp = logp.clone().requires_grad_(True)
    whole = loss_fn(lp, r, credit).loss
    (g_whole,) = torch.autograd.grad(whole, lp)
    bounds = [0, 2, 6] if world == 2 else [0, 1, 4, 6]

    def rank_fn(reducer, rank):
        rows = list(range(bounds[rank], bounds[rank + 1]))
        part = logp[rows].clone().requires_grad_(True)
        out = loss_fn(part, r.select(rows), credit.select(rows), reducer=reducer)
        return out.loss.detach(), torch.autograd.grad(out.loss, part)[0]

    results = run_ranks(rank_fn, world)
    torch.testing.assert_close(sum(x for x, _ in results) / world, whole.detach())
    torch.testing.assert_close(torch.cat([gr for _, gr in results]) / world, g_whole)


def test_clip_cov_across_ranks_cuts_exactly_k_candidates():
    B, T, world = 6, 8, 3
    g = torch.Generator().manual_seed(9)
    mask = torch.ones(B, T, dtype=torch.bool)
    logp, adv = -torch.rand(B, T, generator=g) * 4, torch.randn(B, T, generator=g) * 3
    r = rlcredit.Rollout(mask, torch.zeros(B), torch.arange(B), old_logprobs=logp.clone())
    credit = rlcredit.Credit({}, torch.ones(B, T), adv)
    loss_fn = ClipCov(clip_cov_ratio=0.1, clip_cov_lb=0.0, clip_cov_ub=100.0, seed=3)  # k = floor(4.8) = 4

    def rank_fn(reducer, rank):
        rows = [2 * rank, 2 * rank + 1]
        return loss_fn(logp[rows], r.select(rows), credit.select(rows), reducer=reducer).metrics["cov_clip_fraction"]

    cut = sum(f.item() * 2 * T for f in run_ranks(rank_fn, world))
    assert round(cut) == 4


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [
    lambda: CISPO(clip_high=-0.1), lambda: CISPO(clip_low=1.0), lambda: CISPO(renormalize=True, aggregation="seq_mean_token_sum"),
    lambda: SAPO(tau_pos=0.0), lambda: SAPO(aggregation="mean"), lambda: GMPO(clip_low=-1.0),
    lambda: KLCov(kl_cov_ratio=0.0), lambda: KLCov(ppo_kl_coef=float("nan")), lambda: ClipCov(clip_cov_lb=5.0),
    lambda: ClipCov(seed=-1), lambda: ClipCov(seed=1.5), lambda: ClipCov(clip_cov_ratio=2.0),
])
def test_bad_parameters_raise_spec_errors(build):
    with pytest.raises(rlcredit.SpecError):
        build()


@pytest.mark.parametrize("loss_fn", LOSSES, ids=lambda f: type(f).__name__)
def test_bad_inputs_raise_rollout_errors(loss_fn):
    r, credit = _rollout()
    with pytest.raises(rlcredit.RolloutError, match="logprobs must be"):
        loss_fn(torch.zeros(3, 4), r, credit)
    with pytest.raises(rlcredit.RolloutError, match="credit"):
        loss_fn(torch.zeros(3, 5), r, credit.select([0, 1]))


def test_registered_and_built_from_specs():
    for name in ("cispo", "sapo", "gmpo", "kl_cov", "clip_cov", "papo"):
        assert name in rlcredit.available("loss")
        s = rlcredit.build("grpo", policy_loss=name)
        assert rlcredit.build(s.to_spec()) == s
    s = rlcredit.build("grpo", policy_loss={"name": "clip_cov", "seed": 3, "clip_low": 0.1})
    assert s.policy_loss == ClipCov(seed=3, clip_low=0.1)
    with pytest.raises(rlcredit.SpecError, match="accepted"):
        rlcredit.build("grpo", policy_loss={"name": "sapo", "clip_high": 0.2})
