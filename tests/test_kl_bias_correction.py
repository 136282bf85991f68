"""``clipped_surrogate(kl_bias_correction=True)``: the k3 term times the token ratio, by hand.

The equality with TRL's ``use_bias_correction_kl`` (loss and gradient, on- and off-policy) is checked
against TRL's own trainer in tests/test_trl_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlcredit
from rlcredit.errors import SpecError
from rlcredit.losses import ClippedSurrogate


def _one_token(old):
    r = rlcredit.Rollout(torch.tensor([[True, False]]), torch.tensor([0.0]), torch.tensor([0]),
                         old_logprobs=None if old is None else torch.tensor([[old, 0.0]]),
                         ref_logprobs=torch.tensor([[-1.0, 0.0]]))
    credit = rlcredit.Credit({}, torch.ones(1, 2), torch.tensor([0.0]))  # A = 0: only the KL term is left
    return r, credit


@pytest.mark.parametrize("old", [None, -0.7])
def test_value_and_gradient_by_hand(old):
    """logp = -0.5, ref = -1: d = ref - logp = -0.5, k3 = e^d - d - 1; r = e^(logp - old) (1 on-policy)."""
    r, credit = _one_token(old)
    logp = torch.tensor([[-0.5, float("nan")]], requires_grad=True)  # NaN padding gets no gradient
    out = ClippedSurrogate(kl_coef=0.1, kl_bias_correction=True)(logp, r, credit)
    d = -0.5
    k3, dk3 = math.exp(d) - d - 1, -(math.exp(d) - 1)  # dk3/dlogp
    ratio = 1.0 if old is None else math.exp(-0.5 - old)
    assert out.loss.item() == pytest.approx(0.1 * k3 * ratio, rel=1e-6)
    out.loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(0.1 * (dk3 * ratio + k3 * ratio), rel=1e-5)  # product rule
    assert logp.grad[0, 1].item() == 0.0
    plain = ClippedSurrogate(kl_coef=0.1)
    logp2 = torch.tensor([[-0.5, 0.0]], requires_grad=True)
    plain(logp2, r, credit).loss.backward()
    assert logp2.grad[0, 0].item() == pytest.approx(0.1 * dk3, rel=1e-5)  # without: the k3 gradient only


def test_needs_the_kl_term_and_round_trips():
    with pytest.raises(SpecError, match="kl_coef"):
        ClippedSurrogate(kl_bias_correction=True)
    s = rlcredit.build({"policy_loss": {"name": "clipped_surrogate", "kl_coef": 0.1, "kl_bias_correction": True}})
    assert s.policy_loss.kl_bias_correction is True and rlcredit.build(s.to_spec()) == s
