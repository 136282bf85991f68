"""Strategy composition, the clipped loss by regime (hand-computed), requirements and invariants."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcredit
from rlcredit import Credit, Rollout, RolloutError, SpecError, Strategy
from rlcredit.estimators import Entropy, Signal
from rlcredit.losses import ClippedSurrogate


def _one_token(old, new, adv, **loss_kw):
    """Loss and gradient of a single valid token (hand-checkable)."""
    r = Rollout(torch.tensor([[True]]), torch.tensor([0.0]), torch.tensor([0]), old_logprobs=torch.tensor([[old]]))
    credit = Credit({}, torch.ones(1, 1), torch.tensor([adv]))
    logp = torch.tensor([[new]], requires_grad=True)
    out = ClippedSurrogate(**loss_kw)(logp, r, credit)
    out.loss.backward()
    return out.loss.item(), logp.grad.item(), out.metrics["clip_fraction"].item()


# Golden cases: rho = exp(new - old); l = -min(rho A, clip(rho, 1-0.2, 1+0.28) A); dl/dlogp = -rho A if unclipped.
@pytest.mark.parametrize(
    "regime, old, new, adv, expected_loss, expected_grad, clipped",
    [
        ("A>0 inside", 0.0, math.log(1.1), 2.0, -2.2, -2.2, 0.0),
        ("A>0 above clip", 0.0, math.log(1.5), 2.0, -2.56, 0.0, 1.0),  # clip at 1.28
        ("A>0 below clip (min keeps rho)", 0.0, math.log(0.5), 2.0, -1.0, -1.0, 0.0),
        ("A<0 inside", 0.0, math.log(0.9), -1.0, 0.9, 0.9, 0.0),
        ("A<0 below clip", 0.0, math.log(0.5), -1.0, 0.8, 0.0, 1.0),  # clip at 0.8
        ("A<0 above clip (max keeps rho)", 0.0, math.log(2.0), -1.0, 2.0, 2.0, 0.0),
        ("A=0", 0.0, math.log(3.0), 0.0, 0.0, 0.0, 0.0),
    ],
)
def test_clipped_surrogate_golden_regimes(regime, old, new, adv, expected_loss, expected_grad, clipped):
    loss, grad, clip_fraction = _one_token(old, new, adv, clip_low=0.2, clip_high=0.28)
    assert loss == pytest.approx(expected_loss, abs=1e-6), regime
    assert grad == pytest.approx(expected_grad, abs=1e-6), regime
    assert clip_fraction == clipped, regime


def test_dual_clip_caps_negative_advantage_loss():
    # A = -1, rho = 5: plain loss = 5; dual clip c = 3 caps it at -c*A = 3 with zero gradient.
    loss, grad, _ = _one_token(0.0, math.log(5.0), -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and grad == 0.0
    # inactive when rho is small: rho = 2 -> loss 2 < 3, gradient -rho*A = 2
    loss, grad, _ = _one_token(0.0, math.log(2.0), -1.0, dual_clip=3.0)
    assert loss == pytest.approx(2.0) and grad == pytest.approx(2.0)
    # never applies to positive advantages
    loss, _, _ = _one_token(0.0, math.log(5.0), 1.0, dual_clip=3.0)
    assert loss == pytest.approx(-1.2)


def test_kl_and_entropy_terms_hand_computed():
    r = Rollout(torch.tensor([[True, True, False]]), torch.tensor([0.0]), torch.tensor([0]),
                old_logprobs=torch.tensor([[-1.0, -2.0, 0.0]]), ref_logprobs=torch.tensor([[-1.5, -2.0, 0.0]]))
    credit = Credit({}, torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([0.0]))  # A = 0: only the extra terms
    logp = torch.tensor([[-1.0, -2.0, 0.0]], requires_grad=True)
    out = ClippedSurrogate(kl_coef=0.1, entropy_penalty=0.06)(logp, r, credit)
    k3 = math.exp(-0.5) + 0.5 - 1  # first token: ref - logp = -0.5; second: 0
    expected = 0.1 * (k3 + 0.0) / 2 + 0.06 * (1.0 + 2.0) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.metrics["kl"].item() == pytest.approx(k3 / 2, abs=1e-6)
    with pytest.raises(RolloutError, match="ref_logprobs"):
        rlcredit.build("grpo", policy_loss={"name": "clipped_surrogate", "kl_coef": 0.1}).loss(
            logp, Rollout(r.response_mask, r.rewards, r.group_ids), credit)


def test_on_policy_without_old_logprobs_uses_detached_current():
    r = Rollout(torch.tensor([[True, True]]), torch.tensor([0.0]), torch.tensor([0]))
    credit = Credit({}, torch.ones(1, 2), torch.tensor([2.0]))
    logp = torch.tensor([[-0.3, -2.0]], requires_grad=True)
    out = ClippedSurrogate()(logp, r, credit)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-2.0)  # rho = 1 everywhere
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))  # d(-rho A)/dlogp / 2 tokens


def test_padding_gets_no_loss_and_no_gradient():
    s = rlcredit.build("dapo")
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    r = Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), old_logprobs=torch.randn(2, 4))
    credit = s.assign(r)
    assert torch.equal(credit.token_weights, mask.float())
    logp = torch.randn(2, 4).requires_grad_()
    s.loss(logp, r, credit).loss.backward()
    assert torch.all(logp.grad[~mask] == 0)
    # garbage at padding positions changes nothing
    logp2 = torch.where(mask, logp.detach(), torch.full_like(logp, 50.0))
    assert torch.allclose(s.loss(logp2, r, credit).loss, s.loss(logp.detach(), r, credit).loss)


def test_assign_checks_requirements_and_lists_all_missing():
    s = Strategy(estimators={"h": Entropy(), "prm": Signal("prm")})
    r = Rollout(torch.ones(1, 2, dtype=torch.bool), torch.tensor([1.0]), torch.tensor([0]))
    with pytest.raises(RolloutError) as err:
        s.assign(r)
    msg = str(err.value)
    assert "estimator 'h' needs rollout.signals['entropy'] or (a policy and rollout.model_inputs)" in msg
    assert "estimator 'prm' needs rollout.signals['prm']" in msg
    with pytest.raises(RolloutError, match="takes a rlcredit.Rollout"):
        s.assign({"response_mask": None})


def test_construction_checks_score_names():
    with pytest.raises(SpecError, match="score names must be non-empty strings"):
        Strategy(estimators={"a.b": "uniform"})
    with pytest.raises(SpecError, match="mapping score-name -> estimator"):
        Strategy(estimators=["uniform"])


def test_estimator_outputs_are_masked_and_checked():
    s = Strategy(estimators={"prm": Signal("prm")})
    mask = torch.tensor([[True, False]])
    r = Rollout(mask, torch.tensor([1.0]), torch.tensor([0]), signals={"prm": torch.tensor([[0.3, 9.0]])})
    credit = s.assign(r)
    assert torch.equal(credit.scores["prm"], torch.tensor([[0.3, 0.0]]))
    assert credit.metrics["score/prm"].item() == pytest.approx(0.3)
    bad = Rollout(mask, torch.tensor([1.0]), torch.tensor([0]), signals={"prm": torch.zeros(1, 2, 3)})
    with pytest.raises(RolloutError, match="must be \\[B, T\\] to serve as a score"):
        s.assign(bad)


def test_loss_shape_mismatch_is_clear():
    s = rlcredit.build("grpo")
    r = Rollout(torch.ones(2, 3, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    credit = s.assign(r)
    with pytest.raises(RolloutError, match="logprobs must be \\[B, T\\] = \\[2, 3\\]"):
        s.loss(torch.zeros(2, 4), r, credit)
    with pytest.raises(RolloutError, match="select the same rows"):
        s.loss(torch.zeros(1, 3), r.select([0]), credit)


@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 10_000))
def test_micro_batches_sum_to_the_full_loss_for_seq_means(G, T, seed):
    """seq_mean_token_sum with per-micro-batch B: the row-weighted mean of micro losses equals the full loss."""
    g = torch.Generator().manual_seed(seed)
    B = 2 * G
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    r = Rollout(mask, torch.randint(0, 2, (B,), generator=g).float(), torch.arange(B) // G,
                old_logprobs=-torch.rand(B, T, generator=g))
    s = rlcredit.build("grpo", policy_loss={"name": "clipped_surrogate", "aggregation": "seq_mean_token_sum"})
    credit = s.assign(r)
    logp = -torch.rand(B, T, generator=g)
    full = s.loss(logp, r, credit).loss
    halves = [s.loss(logp[rows], r.select(rows), credit.select(rows)).loss for rows in (slice(0, G), slice(G, B))]
    assert torch.allclose(full, sum(halves) / 2, atol=1e-6)


def test_bf16_logprobs_give_fp32_loss_close_to_fp32():
    s = rlcredit.build("dapo")
    mask = torch.ones(4, 6, dtype=torch.bool)
    r = Rollout(mask, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1]), old_logprobs=-torch.rand(4, 6))
    credit = s.assign(r)
    logp = -torch.rand(4, 6)
    out32 = s.loss(logp, r, credit).loss
    out16 = s.loss(logp.bfloat16(), r, credit).loss
    assert out16.dtype == torch.float32
    assert torch.allclose(out16, out32, atol=2e-2)


def test_component_outputs_are_checked_and_zeroed_on_padding():
    """Every component's output is validated alike (finite, weights >= 0, zeroed on padding), naming its source."""
    import attrs

    @attrs.frozen
    class NaNScore:
        requires = ()

        def __call__(self, rollout, policy=None):
            return torch.full(rollout.response_mask.shape, float("nan"))

    @attrs.frozen
    class Negative:
        requires = ()

        def __call__(self, scores, rollout, *, reducer=None):
            return -rollout.response_mask.float()

    @attrs.frozen
    class Inf:
        requires = ()

        def __call__(self, advantages, scores, rollout, *, reducer=None):
            return advantages / 0.0

    @attrs.frozen
    class Padded:
        requires = ()

        def __call__(self, rollout, policy=None):
            return torch.ones(rollout.response_mask.shape)

    r = Rollout(torch.tensor([[True, False]]), torch.tensor([1.0]), torch.tensor([0]))
    with pytest.raises(RolloutError, match=r"scores\['x'\] contains 1 non-finite.*from the estimators"):
        Strategy(estimators={"x": NaNScore()}).assign(r)
    with pytest.raises(RolloutError, match="token_weights holds 1 negative.*from the weighter Negative"):
        Strategy(weighter=Negative()).assign(r)
    with pytest.raises(RolloutError, match=r"advantages contains 1 non-finite.*shapers \['Inf'\]"):
        Strategy(shapers=[Inf()]).assign(r)
    assert torch.equal(Strategy(estimators={"x": Padded()}).assign(r).scores["x"], torch.tensor([[1.0, 0.0]]))


def test_metrics_are_lazy_detached_and_correct():
    s = rlcredit.build("grpo", estimators={"prm": Signal("prm")},
                       weighter={"name": "threshold", "value": 0.5, "score": "prm"})
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    r = Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]),
                signals={"prm": torch.tensor([[0.9, 0.1, 0.6, 7.0], [0.2, 0.0, 0.0, 0.0]])})
    credit = s.assign(r)
    assert repr(credit.metrics).startswith("LazyMetrics(")
    assert credit.metrics["kept_fraction"].item() == pytest.approx(2 / 4)
    assert credit.metrics["score/prm"].item() == pytest.approx((0.9 + 0.1 + 0.6 + 0.2) / 4)
    out = s.loss(torch.zeros(2, 4, requires_grad=True), r, credit)
    assert set(out.metrics) == {"pg_loss", "clip_fraction", "kept_fraction"}
    assert out.metrics["kept_fraction"].item() == pytest.approx(0.5)
    assert out.metrics["clip_fraction"].item() == 0.0 and not out.metrics["pg_loss"].requires_grad
