"""The gspo loss: GSPO's sequence objective (value and gradient), token weights, degenerate inputs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcredit
from rlcredit import Credit, Rollout, SpecError
from rlcredit.losses import GSPO, ClippedSurrogate
from rlcredit.requirements import Field
from tests.strategies import run_ranks
from tests.strategies_credit import credit_batches


def _batch(t, scale=1e-3, seed=0):
    """Current log-probs near the old ones (GSPO's ratios live within ~1e-3 of 1)."""
    g = torch.Generator().manual_seed(seed)
    old = t["old_logprobs"].double()
    logp = old + scale * torch.randn(old.shape, generator=g, dtype=torch.float64)
    return logp, old


def ref_gspo(logp, old, mask, adv, w, clip_low, clip_high):
    """Plain loops: s_i = exp(mean_t log rho), l = -min(s A, clip(s) A), mean_i (1/T_i) sum_t w l; and dL/dlogp."""
    B, T = len(mask), len(mask[0])
    loss, grad = 0.0, [[0.0] * T for _ in range(B)]
    for i in range(B):
        idx = [t for t in range(T) if mask[i][t]]
        if not idx:
            continue
        s = math.exp(sum(max(-20.0, min(20.0, logp[i][t] - old[i][t])) for t in idx) / len(idx))
        for t in idx:
            a = adv[i][t] if isinstance(adv[i], list) else adv[i]
            unclipped, clipped = -s * a, -min(max(s, 1 - clip_low), 1 + clip_high) * a
            loss += w[i][t] * max(unclipped, clipped) / len(idx) / B
            if not clipped > unclipped:
                grad[i][t] = w[i][t] * (-s * a) / len(idx) / B
    return loss, grad


@given(t=credit_batches(), token_adv=st.booleans(), weighted=st.booleans(), seed=st.integers(0, 1000),
       scale=st.sampled_from([1e-4, 1e-3, 0.5]))
def test_gspo_matches_plain_loop_reference(t, token_adv, weighted, seed, scale):
    mask = t["response_mask"]
    B, T = mask.shape
    logp64, old64 = _batch(t, scale, seed)
    g = torch.Generator().manual_seed(seed + 1)
    adv = torch.randn(B, T, generator=g) if token_adv else t["advantages"]
    w = torch.where(mask, torch.rand(B, T, generator=g) * 2, torch.zeros(())) if weighted else mask.float()
    r = Rollout(mask, t["rewards"], t["group_ids"], old_logprobs=old64.float())
    logp = logp64.float().requires_grad_()
    out = GSPO()(logp, r, Credit({}, w, adv))
    out.loss.backward()
    ref_loss, ref_grad = ref_gspo(logp64.float().double().tolist(), old64.float().double().tolist(), mask.tolist(),
                                  adv.tolist(), w.tolist(), 3e-4, 4e-4)
    assert out.loss.item() == pytest.approx(ref_loss, abs=1e-5, rel=1e-4)
    assert torch.allclose(logp.grad.double(), torch.tensor(ref_grad, dtype=torch.float64), atol=1e-5, rtol=1e-4)


@given(t=credit_batches(), seed=st.integers(0, 1000))
def test_token_form_equals_the_sequence_objective_in_value_and_gradient(t, seed):
    """GSPO's Eq. 5 by autograd through exp(mean log rho): the library's token form must agree."""
    mask = t["response_mask"]
    logp64, old64 = _batch(t, 1e-3, seed)
    adv = t["advantages"].double()
    x = logp64.clone().requires_grad_()
    n = mask.sum(-1)
    s = torch.exp(torch.where(mask, x - old64, torch.zeros((), dtype=torch.float64)).sum(-1) / n.clamp_min(1))
    seq_loss = -torch.minimum(s * adv, s.clamp(1 - 3e-4, 1 + 4e-4) * adv)
    expected = torch.where(n > 0, seq_loss, torch.zeros_like(seq_loss)).mean()
    expected.backward()
    r = Rollout(mask, t["rewards"], t["group_ids"], old_logprobs=old64.float())
    logp = logp64.float().requires_grad_()
    out = GSPO()(logp, r, Credit({}, mask.float(), t["advantages"]))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5, rel=1e-4)
    assert torch.allclose(logp.grad.double(), x.grad, atol=1e-5, rtol=1e-4)


def test_one_token_responses_equal_the_clipped_surrogate():
    # With T_i = 1 the sequence ratio is the token ratio: gspo is the clipped surrogate with its clips.
    mask = torch.ones(4, 1, dtype=torch.bool)
    old = torch.tensor([[-1.0], [-0.5], [-2.0], [-0.1]])
    logp = (old + torch.tensor([[1e-4], [-1e-3], [2e-3], [0.0]])).requires_grad_()
    r = Rollout(mask, torch.zeros(4), torch.zeros(4, dtype=torch.long), old_logprobs=old)
    credit = Credit({}, torch.ones(4, 1), torch.tensor([1.0, -1.0, 1.0, -2.0]))
    a = GSPO()(logp, r, credit)
    logp2 = logp.detach().clone().requires_grad_()
    b = ClippedSurrogate(clip_low=3e-4, clip_high=4e-4, aggregation="seq_mean_token_mean")(logp2, r, credit)
    a.loss.backward()
    b.loss.backward()
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-7)
    assert torch.allclose(logp.grad, logp2.grad)
    assert a.metrics["clip_fraction"].item() == b.metrics["clip_fraction"].item() == 0.5


def test_weights_scale_token_shares_but_not_the_sequence_ratio():
    # Row: tokens with log-ratios (+0.01, -0.01): s = 1 (inside the clip) although token 0 alone is
    # far outside; a mask on token 1 must not change that decision, only the token's share.
    mask = torch.ones(1, 2, dtype=torch.bool)
    r = Rollout(mask, torch.zeros(1), torch.zeros(1, dtype=torch.long), old_logprobs=torch.zeros(1, 2))
    logp = torch.tensor([[0.01, -0.01]], requires_grad=True)
    out = GSPO()(logp, r, Credit({}, torch.tensor([[1.0, 0.0]]), torch.tensor([1.0])))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-0.5, abs=1e-6)  # (1/T_i) * w_0 * (-s A)
    assert torch.allclose(logp.grad, torch.tensor([[-0.5, 0.0]]))
    assert out.metrics["clip_fraction"].item() == 0.0
    renorm = GSPO(renormalize=True)(logp, r, Credit({}, torch.tensor([[1.0, 0.0]]), torch.tensor([1.0])))
    assert renorm.loss.item() == pytest.approx(-1.0, abs=1e-6)  # divided by sum w = 1 instead of T_i = 2


def test_on_policy_padding_nan_and_empty_rows_are_finite():
    mask = torch.tensor([[True, True, False], [False, False, False]])
    r = Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))  # no old_logprobs: s_i = 1
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [float("-inf"), 0.0, 0.0]], requires_grad=True)
    out = GSPO()(logp, r, Credit({}, mask.float(), torch.tensor([2.0, -1.0])))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-1.0)  # (-2 + 0) / 2 rows
    assert torch.equal(logp.grad, torch.tensor([[-0.5, -0.5, 0.0], [0.0, 0.0, 0.0]]))


def test_kl_and_entropy_terms_are_shared_with_clipped_surrogate():
    mask = torch.tensor([[True, True, False]])
    r = Rollout(mask, torch.zeros(1), torch.zeros(1, dtype=torch.long), old_logprobs=torch.tensor([[-1.0, -2.0, 0.0]]),
                ref_logprobs=torch.tensor([[-1.5, -2.0, 0.0]]))
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    out = GSPO(kl_coef=0.1, entropy_penalty=0.06)(logp, r, Credit({}, mask.float(), torch.tensor([0.0])))
    kl = (math.exp(-0.5) + 0.5 - 1) / 2  # k3 at token 0, 0 at token 1, seq_mean_token_mean
    assert out.metrics["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out.metrics["neg_logprob"].item() == pytest.approx(1.5)
    assert out.loss.item() == pytest.approx(0.1 * kl + 0.06 * 1.5, rel=1e-5)
    assert GSPO(kl_coef=0.1).requires == (Field("ref_logprobs"),) and GSPO().requires == ()


@given(t=credit_batches(max_B=7), data=st.data())
def test_mean_of_rank_losses_equals_one_process(t, data):
    mask = t["response_mask"]
    B = mask.shape[0]
    cut = data.draw(st.integers(0, B))
    logp64, old64 = _batch(t, 1e-3)
    full = GSPO()(logp64.float(), Rollout(mask, t["rewards"], t["group_ids"], old_logprobs=old64.float()),
                  Credit({}, mask.float(), t["advantages"])).loss

    def rank_fn(reducer, rank):
        rows = slice(0, cut) if rank == 0 else slice(cut, B)
        if rows.start == rows.stop:
            return None
        r = Rollout(mask[rows], t["rewards"][rows], t["group_ids"][rows], old_logprobs=old64.float()[rows])
        return GSPO()(logp64.float()[rows], r, Credit({}, mask[rows].float(), t["advantages"][rows]),
                      reducer=reducer).loss

    if cut in (0, B):  # one rank would hold nothing; Rollout refuses B = 0, so run one rank only
        return
    losses = run_ranks(rank_fn, 2)
    assert (losses[0] + losses[1]).item() / 2 == pytest.approx(full.item(), abs=1e-6)


def test_registered_defaults_and_spec_round_trip():
    assert rlcredit.get("loss", "gspo") is GSPO
    loss = GSPO()
    assert (loss.clip_low, loss.clip_high, loss.aggregation) == (3e-4, 4e-4, "seq_mean_token_mean")
    s = rlcredit.build({"policy_loss": {"name": "gspo", "clip_high": 5e-4}})
    assert s.policy_loss == GSPO(clip_high=5e-4)
    assert rlcredit.build(s.to_spec()) == s


@pytest.mark.parametrize("kw, message", [
    (dict(clip_low=1.0), r"GSPO.clip_low must be a number in \[0.0, 1.0\)"),
    (dict(clip_high=-1e-4), r"GSPO.clip_high must be a number in \[0.0, inf\)"),
    (dict(aggregation="sum"), "GSPO.aggregation must be one of 'token_mean', 'seq_mean_token_mean'"),
    (dict(renormalize=True, aggregation="seq_mean_token_sum"), "renormalize=True needs a token-count denominator"),
    (dict(max_length=100), "max_length is only used by aggregation 'seq_mean_token_sum_norm'"),
])
def test_bad_gspo_specs_raise(kw, message):
    with pytest.raises(SpecError, match=message):
        rlcredit.build({"policy_loss": {"name": "gspo", **kw}})
