"""gtpo and entropy_advantage against plain loops and their invariants; token_match on response_ids."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlcredit
from rlcredit.estimators import TokenMatch
from rlcredit.shapers import GTPO, EntropyAdvantage
from tests.strategies import rollout_tensors


def ref_gtpo(adv, H, mask, beta):
    out = []
    for i, row in enumerate(mask):
        valid = [t for t, m in enumerate(row) if m]
        mean = sum(H[i][t] for t in valid) / len(valid) if valid else 0.0
        out.append([(adv[i][t] * (1 + beta * (H[i][t] / mean - 1)) if mean > 0 else adv[i][t]) if m else 0.0
                    for t, m in enumerate(row)])
    return out


def ref_entropy_advantage(adv, H, mask, alpha, kappa):
    return [[adv[i][t] + min(alpha * H[i][t], abs(adv[i][t]) / kappa) if m else 0.0 for t, m in enumerate(row)]
            for i, row in enumerate(mask)]


def _inputs(data, token_adv, seed=0):
    mask = data["response_mask"]
    B, T = mask.shape
    g = torch.Generator().manual_seed(seed)
    H = torch.where(mask, data["scores"], 0.0)
    adv = torch.randn(B, T, generator=g) if token_adv else data["advantages"]
    r = rlcredit.Rollout(mask, data["rewards"], data["group_ids"])
    full = adv if token_adv else adv[:, None].expand(B, T)
    return r, {"entropy": H}, adv, full.tolist(), H.tolist(), mask.tolist()


@settings(max_examples=60)
@given(data=rollout_tensors(max_B=6, max_T=7), beta=st.sampled_from([0.0, 0.1, 0.5, 1.0]), token_adv=st.booleans())
def test_gtpo_matches_plain_loop(data, beta, token_adv):
    r, scores, adv, full, H, mask = _inputs(data, token_adv)
    got = GTPO(beta=beta)(adv, scores, r)
    torch.testing.assert_close(got, torch.tensor(ref_gtpo(full, H, mask, beta)), rtol=1e-5, atol=1e-6)
    assert bool((got * torch.tensor(full) >= 0).all())  # never flips a sign
    if not token_adv:  # a response's advantage is shared out, its mean kept
        counts = r.token_counts.clamp_min(1)
        torch.testing.assert_close(got.sum(-1) / counts, torch.where(r.token_counts > 0, adv, 0.0), rtol=1e-4, atol=1e-5)


@settings(max_examples=60)
@given(data=rollout_tensors(max_B=6, max_T=7), alpha=st.sampled_from([0.0, 0.4, 3.0]),
       kappa=st.sampled_from([1.0, 2.0, 10.0]), token_adv=st.booleans())
def test_entropy_advantage_matches_plain_loop(data, alpha, kappa, token_adv):
    r, scores, adv, full, H, mask = _inputs(data, token_adv)
    got = EntropyAdvantage(alpha=alpha, kappa=kappa)(adv, scores, r)
    torch.testing.assert_close(got, torch.tensor(ref_entropy_advantage(full, H, mask, alpha, kappa)), rtol=1e-5, atol=1e-6)
    a = torch.where(r.response_mask, torch.tensor(full), 0.0)
    assert bool((got - a <= a.abs() / kappa + 1e-6).all())  # the bonus never exceeds |A| / kappa
    assert bool((torch.where(a < 0, got, -1.0) <= 1e-6).all())  # a negative advantage never turns positive


def test_padding_values_never_count_and_entropy_is_detached():
    mask = torch.tensor([[True, True, False]])
    r = rlcredit.Rollout(mask, torch.tensor([1.0]), torch.tensor([0]))
    H = torch.tensor([[0.2, 0.6, 7.0]], requires_grad=True)  # 7.0 sits on padding
    gtpo = GTPO(beta=0.5)(torch.tensor([1.0]), {"entropy": H}, r)
    torch.testing.assert_close(gtpo, torch.tensor([[0.75, 1.25, 0.0]]))  # mean H = 0.4 over the valid tokens
    bonus = EntropyAdvantage()(torch.tensor([1.0]), {"entropy": H}, r)
    assert not bonus.requires_grad  # sg(H), as the paper writes it
    torch.testing.assert_close(bonus, torch.tensor([[1.08, 1.24, 0.0]]))


def test_degenerate_rows():
    mask = torch.tensor([[True, True], [False, False]])
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    H = torch.zeros(2, 2)  # a fully confident row: mean entropy 0
    assert torch.equal(GTPO(beta=1.0)(torch.tensor([2.0, 3.0]), {"entropy": H}, r), torch.tensor([[2.0, 2.0], [0.0, 0.0]]))
    assert torch.equal(EntropyAdvantage()(torch.tensor([0.0, 3.0]), {"entropy": H + 5}, r), torch.zeros(2, 2))


def test_presets_and_strategy_composition():
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(5)[None] < torch.tensor([5, 3, 4, 2])[:, None]
    H = torch.where(mask, torch.rand(4, 5, generator=g) * 2, 0.0)
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1]),
                         old_logprobs=torch.where(mask, -torch.rand(4, 5, generator=g), 0.0), signals={"entropy": H})
    base = rlcredit.build("grpo").assign(r).advantages
    for name, shaper in (("gtpo", GTPO()), ("entropy_advantage", EntropyAdvantage())):
        s = rlcredit.build(name)
        assert rlcredit.build(s.to_spec()) == s
        credit = s.assign(r)
        torch.testing.assert_close(credit.advantages, shaper(base, {"entropy": H}, r))
        logp = torch.where(mask, -torch.rand(4, 5, generator=g), 0.0).requires_grad_(True)
        out = s.loss(logp, r, credit)
        out.loss.backward()
        assert torch.isfinite(logp.grad).all() and bool((logp.grad[mask] != 0).any())


def test_parameters_are_validated():
    for bad in (lambda: GTPO(beta=1.5), lambda: GTPO(beta=-0.1), lambda: EntropyAdvantage(kappa=0.5),
                lambda: EntropyAdvantage(alpha=float("inf")), lambda: GTPO(score="")):
        with pytest.raises(rlcredit.SpecError):
            bad()
    with pytest.raises(rlcredit.SpecError, match="reads score 'entropy'"):
        rlcredit.Strategy(shapers=["group_normalize", "gtpo"])


# --- token_match -----------------------------------------------------------------------------------


@settings(max_examples=40)
@given(data=rollout_tensors(max_B=5, max_T=6), ids=st.lists(st.integers(0, 9), min_size=1, max_size=4))
def test_token_match_matches_plain_loop(data, ids):
    mask = data["response_mask"]
    sampled = torch.randint(0, 10, mask.shape, generator=torch.Generator().manual_seed(1))
    r = rlcredit.Rollout(mask, data["rewards"], data["group_ids"], response_ids=sampled)
    want = [[1.0 if m and sampled[i, t].item() in ids else 0.0 for t, m in enumerate(row)]
            for i, row in enumerate(mask.tolist())]
    assert TokenMatch(ids=ids)(r).tolist() == want


def test_token_match_in_a_strategy_needs_response_ids():
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    ids = torch.tensor([[3, 8, 3, 3], [8, 1, 0, 0]])
    s = rlcredit.Strategy(estimators={"planning": {"name": "token_match", "ids": [8]}},
                          weighter={"name": "threshold", "value": 1.0})
    assert [req.describe() for req in s.requirements] == ["rollout.response_ids"]
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), response_ids=ids)
    assert s.assign(r).token_weights.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    with pytest.raises(rlcredit.RolloutError, match="response_ids"):
        s.assign(rlcredit.Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0])))
    assert rlcredit.build(s.to_spec()) == s and s.to_spec()["estimators"]["planning"]["ids"] == [8]
    assert math.isclose(s.assign(r).metrics["kept_fraction"].item(), 2 / 5, rel_tol=1e-6)


@pytest.mark.parametrize("H", [[0.0, 1e-38, 3e-38], [1e30, 0.0, 1e-30], [1e-30, 1e-30, 1e-30]])
def test_extreme_entropies_stay_finite(H):
    mask = torch.tensor([[True, True, True], [True, False, False]])
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
    scores = {"entropy": torch.tensor([H, [5.0, float("nan"), float("inf")]])}  # garbage on padding
    for shaper in (GTPO(beta=1.0), EntropyAdvantage(alpha=10.0)):
        out = shaper(torch.tensor([1e6, -1e6]), scores, r)
        assert torch.isfinite(out).all() and torch.equal(out[~mask], torch.zeros(2))


def test_available_lists_every_second_wave_component():
    listing = rlcredit.available()
    assert {"cispo", "sapo", "gmpo", "kl_cov", "clip_cov", "papo"} <= set(listing["loss"])
    assert {"gtpo", "entropy_advantage"} <= set(listing["shaper"])
    assert "token_match" in listing["estimator"]
    assert {"cispo", "sapo", "gmpo", "kl_cov", "clip_cov", "papo", "gtpo", "entropy_advantage"} <= set(listing["strategy"])
