"""Chunked full-vocabulary kernels: entropy, selected log-probs, exact and fused KL."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rlcredit.functional import fused_token_kl, selected_logprobs, token_entropy, token_kl
from rlcredit.errors import RolloutError
from tests.strategies import right_padded_mask


# ----------------------------------------------------------------------------- references
def _naive_entropy(logits, temperature=1.0):
    logp = torch.log_softmax(logits.double() / temperature, -1)
    return -(logp.exp() * logp).nan_to_num().sum(-1)


def _naive_kl(lp, lq, mask=None, temperature=1.0):
    """Full [B, T, V] float64 log_softmax KL: the reference the chunked kernels must match."""
    logp = torch.log_softmax(lp.double() / temperature, -1)
    logq = torch.log_softmax(lq.double() / temperature, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl if mask is None else torch.where(mask, kl, torch.zeros(()))


class _LargestAllocation(TorchDispatchMode):
    """Records the largest freshly allocated (non-view) tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        # A view shares its input's storage: only new storage counts as an allocation.
        seen = {t.untyped_storage().data_ptr() for t in inputs}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, t.numel())
        return out


def _logits(B, T, V, seed, scale=3.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(B, T, V, generator=gen)).to(dtype)


shapes = st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 40))


# ----------------------------------------------------------------------------- entropy
def test_token_entropy_golden():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("-inf"), float("-inf")]]])
    torch.testing.assert_close(token_entropy(logits), torch.tensor([[1.386294, 0.693147]]))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), chunk=st.sampled_from([1, 3, 32]),
       temperature=st.sampled_from([1.0, 0.6, 1.7]))
def test_token_entropy_matches_naive(shape, seed, chunk, temperature):
    logits = _logits(*shape, seed)
    out = token_entropy(logits, temperature=temperature, chunk_size=chunk)
    assert out.shape == shape[:2] and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _naive_entropy(logits, temperature), atol=1e-5, rtol=1e-5)
    assert (out >= 0).all()


def test_token_entropy_bf16_and_any_leading_shape():
    logits = _logits(2, 3, 50, 0, dtype=torch.bfloat16)
    out = token_entropy(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _naive_entropy(logits.float()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(token_entropy(logits[0, 0]), out[0, 0])  # [V] -> []
    assert token_entropy(torch.zeros(0, 4, 7)).shape == (0, 4)


def test_token_entropy_is_differentiable():
    logits = _logits(2, 3, 11, 1).requires_grad_(True)
    token_entropy(logits, chunk_size=2).sum().backward()
    ref = logits.detach().clone().requires_grad_(True)
    _naive_entropy(ref).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad.float(), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- selected log-probs
@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), chunk=st.sampled_from([1, 4, 32]),
       temperature=st.sampled_from([1.0, 0.7]))
def test_selected_logprobs_values_and_gradients_match_log_softmax(shape, seed, chunk, temperature):
    B, T, V = shape
    logits = _logits(B, T, V, seed).requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    out = selected_logprobs(logits, tokens, temperature=temperature, chunk_size=chunk)
    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = torch.log_softmax(ref_logits / temperature, -1).gather(-1, tokens[..., None])[..., 0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(seed + 1))
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, atol=1e-5, rtol=1e-5)


def test_selected_logprobs_bf16_grad_dtype_and_empty():
    logits = _logits(2, 3, 9, 0, dtype=torch.bfloat16).requires_grad_(True)
    tokens = torch.tensor([[0, 1, 2], [8, 7, 6]])
    out = selected_logprobs(logits, tokens)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()
    ref = torch.log_softmax(logits.detach().float(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    empty = torch.zeros(0, 3, 9, requires_grad=True)
    assert selected_logprobs(empty, torch.zeros(0, 3, dtype=torch.long)).shape == (0, 3)


# ----------------------------------------------------------------------------- exact KL
@settings(max_examples=25, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), chunk=st.sampled_from([1, 5, 32]),
       masked=st.booleans(), temperature=st.sampled_from([1.0, 0.8]))
def test_token_kl_matches_naive_full_kl(shape, seed, chunk, masked, temperature):
    B, T, V = shape
    lp, lq = _logits(B, T, V, seed), _logits(B, T, V, seed + 1)
    mask = None
    if masked:
        lengths = torch.randint(0, T + 1, (B,), generator=torch.Generator().manual_seed(seed))
        mask = right_padded_mask(lengths, T)
    out = token_kl(lp, lq, mask, chunk_size=chunk, temperature=temperature)
    assert out.shape == (B, T) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _naive_kl(lp, lq, mask, temperature), atol=1e-5, rtol=1e-5)
    assert (out >= 0).all()
    if mask is not None:
        assert (out[~mask] == 0).all()


def test_token_kl_identical_runs_and_shared_vocab_masking():
    lp = _logits(2, 3, 10, 0)
    assert torch.equal(token_kl(lp, lp.clone()), torch.zeros(2, 3))
    banned = lp.clone()
    banned[..., :4] = float("-inf")  # both runs mask the same vocabulary entries
    other = _logits(2, 3, 10, 1)
    other[..., :4] = float("-inf")
    out = token_kl(banned, other)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _naive_kl(banned[..., 4:], other[..., 4:]), atol=1e-5, rtol=1e-5)


def test_token_kl_bf16_and_grad_enabled():
    lp, lq = _logits(2, 4, 30, 0, dtype=torch.bfloat16), _logits(2, 4, 30, 1, dtype=torch.bfloat16)
    out = token_kl(lp, lq)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _naive_kl(lp.float(), lq.float()), atol=1e-5, rtol=1e-5)
    lp32 = lp.float().requires_grad_(True)
    token_kl(lp32, lq.float(), right_padded_mask([4, 1], 4)).sum().backward()
    assert torch.isfinite(lp32.grad).all()


# ----------------------------------------------------------------------------- fused KL
@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 12), st.integers(1, 40)),
       seed=st.integers(0, 2**31 - 1), chunk=st.sampled_from([1, 3, 32]), masked=st.booleans(),
       with_bias=st.booleans(), temperature=st.sampled_from([1.0, 1.3]))
def test_fused_token_kl_matches_naive_full_kl(shape, seed, chunk, masked, with_bias, temperature):
    B, T, H, V = shape
    gen = torch.Generator().manual_seed(seed)
    hp, hq = torch.randn(B, T, H, generator=gen), torch.randn(B, T, H, generator=gen)
    weight = torch.randn(V, H, generator=gen) / H**0.5 * 2
    bias = torch.randn(V, generator=gen) if with_bias else None
    mask = right_padded_mask(torch.randint(0, T + 1, (B,), generator=gen), T) if masked else None
    out = fused_token_kl(hp, hq, weight, mask, bias=bias, chunk_size=chunk, temperature=temperature)
    lp, lq = F.linear(hp.double(), weight.double(), None if bias is None else bias.double()), F.linear(
        hq.double(), weight.double(), None if bias is None else bias.double()
    )
    assert out.shape == (B, T) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), _naive_kl(lp, lq, mask, temperature), atol=1e-5, rtol=1e-5)
    if mask is not None:
        assert (out[~mask] == 0).all()


def test_fused_token_kl_bf16_matmul_close_to_float32():
    gen = torch.Generator().manual_seed(0)
    hp, hq = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    weight = torch.randn(64, 16, generator=gen) / 4
    out16 = fused_token_kl(hp.bfloat16(), hq.bfloat16(), weight.bfloat16(), chunk_size=3)
    out32 = fused_token_kl(hp, hq, weight)
    assert out16.dtype == torch.float32
    torch.testing.assert_close(out16, out32, atol=0.03, rtol=0.05)


@pytest.mark.parametrize("kernel", ["token_kl", "fused_token_kl", "token_entropy", "selected_logprobs"])
def test_no_full_batch_vocabulary_temporary(kernel):
    """Nothing of [B, T, V] size is ever allocated: only [chunk, V] blocks."""
    B, T, H, V, chunk = 4, 16, 8, 64, 8
    gen = torch.Generator().manual_seed(0)
    mask = right_padded_mask([16, 9, 3, 0], T)
    weight = torch.randn(V, H, generator=gen)
    hp, hq = torch.randn(B, T, H, generator=gen), torch.randn(B, T, H, generator=gen)
    lp, lq = torch.randn(B, T, V, generator=gen), torch.randn(B, T, V, generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    calls = {
        "token_kl": lambda: token_kl(lp, lq, mask, chunk_size=chunk),
        "fused_token_kl": lambda: fused_token_kl(hp, hq, weight, mask, chunk_size=chunk),
        "token_entropy": lambda: token_entropy(lp, chunk_size=chunk),
        "selected_logprobs": lambda: selected_logprobs(lp, tokens, chunk_size=chunk),
    }
    with torch.no_grad(), _LargestAllocation() as probe:
        calls[kernel]()
    assert probe.largest <= chunk * V, probe.largest
    with torch.no_grad(), _LargestAllocation() as naive:  # the probe does see a full temporary
        torch.log_softmax(lp, -1)
    assert naive.largest == B * T * V


def test_token_entropy_mask_computes_valid_positions_only():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 11, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    full = token_entropy(logits)
    masked = token_entropy(logits, mask, chunk_size=2)
    torch.testing.assert_close(masked, torch.where(mask, full, torch.zeros(())))
    logits[~mask] = float("nan")  # never read: padding logits may be garbage
    torch.testing.assert_close(token_entropy(logits, mask), torch.where(mask, full, torch.zeros(())))
    with pytest.raises(RolloutError, match="`mask` must be a bool tensor of shape \\[3, 5\\]"):
        token_entropy(logits, mask.float())
