"""Issue #14's cases for the full-vocabulary kernels: masked (-inf) and NaN logits, token ids out of range.

``token_entropy``, ``token_kl``, ``selected_logprobs`` and ``fused_token_kl``
(``rlcredit/functional/_logits.py``, on the chunked kernels of ``_vocab.py``).

The rules these tests hold the kernels to (docs/troubleshooting.md):

- vocabulary entries at ``-inf`` (masked or padded vocabularies) contribute 0 to the value and
  get gradient 0, and every other gradient stays finite (item 1);
- a NaN logit gives NaN for its row, never a plausible-looking 0 (item 7: a NaN entropy or KL is
  then refused by ``rlcredit.Credit`` with the estimator named, instead of silently ranking the
  token lowest);
- token ids outside ``[0, V)`` raise a ``RolloutError`` naming the range (item 6).
"""

from __future__ import annotations

import math

import pytest
import torch

from rlcredit import RolloutError
from rlcredit import functional as F

INF, NAN = math.inf, math.nan


def _masked_logits() -> torch.Tensor:
    """Two positions over V = 4; the last two entries of the first are masked out (-inf)."""
    return torch.tensor([[[0.5, 1.5, -INF, -INF], [0.0, 1.0, 2.0, 3.0]]], requires_grad=True)


def test_entropy_of_a_masked_vocabulary_has_finite_gradients():
    logits = _masked_logits()
    h = F.token_entropy(logits)
    h.sum().backward()
    p = torch.softmax(torch.tensor([0.5, 1.5]), -1)
    assert torch.allclose(h[0, 0], -(p * p.log()).sum())
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[0, 0, 2:], torch.zeros(2))  # masked entries get no gradient


def test_kl_over_a_shared_masked_vocabulary_has_finite_gradients():
    p = _masked_logits()
    q = torch.tensor([[[1.5, 0.5, -INF, -INF], [3.0, 2.0, 1.0, 0.0]]])
    kl = F.token_kl(p, q)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(p.grad).all()
    assert torch.equal(p.grad[0, 0, 2:], torch.zeros(2))


def test_logprob_of_a_token_next_to_masked_entries_has_finite_gradients():
    logits = _masked_logits()
    lp = F.selected_logprobs(logits, torch.tensor([[1, 3]]))
    lp.sum().backward()
    assert torch.allclose(lp[0, 0], torch.log_softmax(torch.tensor([0.5, 1.5]), -1)[1])
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[0, 0, 2:], torch.zeros(2))


def test_logprob_of_a_masked_token_is_minus_inf_with_a_finite_gradient():
    logits = _masked_logits()
    lp = F.selected_logprobs(logits, torch.tensor([[2, 0]]))
    lp.sum().backward()
    assert lp[0, 0] == -INF and torch.isfinite(lp[0, 1])
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("token", [4, -1])
def test_token_ids_outside_the_vocabulary_raise(token):
    with pytest.raises(RolloutError, match=r"\[0, 4\)"):
        F.selected_logprobs(torch.zeros(1, 2, 4), torch.tensor([[0, token]]))


def test_nan_logits_give_nan_entropy_not_zero():
    h = F.token_entropy(torch.tensor([[[0.0, NAN, 1.0], [0.0, 0.0, 0.0]]]))
    assert torch.isnan(h[0, 0]) and h[0, 1] == pytest.approx(math.log(3))


def test_nan_logits_give_nan_kl_not_zero():
    kl = F.token_kl(torch.tensor([[[0.0, NAN, 1.0], [0.0, 1.0, 2.0]]]), torch.zeros(1, 2, 3))
    assert torch.isnan(kl[0, 0]) and torch.isfinite(kl[0, 1])


def test_nan_hidden_states_give_nan_fused_kl_not_zero():
    kl = F.fused_token_kl(torch.tensor([[[NAN, 1.0], [1.0, 0.0]]]), torch.zeros(1, 2, 2), torch.eye(2))
    assert torch.isnan(kl[0, 0]) and torch.isfinite(kl[0, 1])
