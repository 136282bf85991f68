"""``Credit.metrics["kept_tokens"]``: a composition that keeps no token is visible before it trains nothing.

The case from issue 18: digits AND the top-20% entropy tokens kept 0 tokens, so the loss was 0.0.
"""

from __future__ import annotations

import torch

import rlcredit

DIGITS = [5, 6, 7]


def _rollout():
    """Digits (ids 5-7) only where the entropy is low: the two masks never overlap."""
    ids = torch.tensor([[5, 20, 21, 6], [22, 7, 23, 0]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, False]])
    entropy = torch.tensor([[0.1, 2.0, 1.5, 0.2], [1.8, 0.1, 0.3, 0.0]])
    return rlcredit.Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), response_ids=ids,
                            old_logprobs=torch.full((2, 4), -1.0), signals={"entropy": entropy})


def _strategy(combinator):
    return rlcredit.build({
        "estimators": {"digits": {"name": "token_match", "ids": DIGITS}, "entropy": "entropy"},
        "weighter": {"name": combinator, "parts": [
            {"name": "threshold", "value": 0.5, "score": "digits"},
            {"name": "top_fraction", "fraction": 0.2, "scope": "batch", "score": "entropy"}]},
    })


def test_an_intersect_that_keeps_nothing_shows_zero_kept_tokens_and_trains_nothing():
    strategy, rollout = _strategy("intersect"), _rollout()
    credit = strategy.assign(rollout)
    assert float(credit.metrics["kept_tokens"]) == 0.0 and float(credit.metrics["kept_fraction"]) == 0.0
    logp = torch.full((2, 4), -1.0, requires_grad=True)
    out = strategy.loss(logp, rollout, credit)
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.all(logp.grad == 0)  # the step trains nothing


def test_kept_tokens_counts_valid_tokens_with_positive_weight():
    strategy, rollout = _strategy("union"), _rollout()
    credit = strategy.assign(rollout)
    # digits: (0,0), (0,3), (1,1); top 20% entropy: tau = quantile(7 valid values, 0.8) = 1.62 -> (0,1), (1,0)
    want = torch.tensor([[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    assert torch.equal(credit.token_weights, want)
    assert credit.metrics["kept_tokens"].item() == 5.0 and credit.metrics["kept_tokens"].dtype == torch.float32
    assert abs(credit.metrics["kept_fraction"].item() - 5 / 7) < 1e-7
