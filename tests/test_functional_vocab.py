"""The vocabulary kernels' engine: -inf logits, analytic backwards, chunk sizing, compiled path.

- Masked vocabularies (issue #14, item 1): values *and gradients* with ``-inf`` entries equal
  those of the same logits with the entries removed from the vocabulary; all ``-inf`` rows.
- Backwards against float64 autograd references, masks, uneven chunks, bf16.
- The chunk rule (``_chunking``): hand-computed cases, and the temporaries it budgets for
  checked against the live allocations of the eager path.
- The ``torch.compile``-d path on CPU (a few tiny graphs, cached on disk by inductor) against the
  eager path, and the fallback when compilation fails.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from rlcredit.errors import RLCreditError
from rlcredit.functional import _chunking, _compile, _rows, fused_token_kl, selected_logprobs, token_entropy, token_kl
from tests.strategies import right_padded_mask

INF = float("inf")


# ----------------------------------------------------------------------------- float64 references
def _ref_entropy(z):
    """H in float64 with 0 log 0 = 0 (double where: no NaN in autograd at -inf logits)."""
    logp = torch.log_softmax(z.double(), -1)
    p = logp.exp()
    return -torch.where(p > 0, p * torch.where(p > 0, logp, 0.0), 0.0).sum(-1)


def _ref_kl(zp, zq):
    logp, logq = torch.log_softmax(zp.double(), -1), torch.log_softmax(zq.double(), -1)
    p = logp.exp()
    live = p > 0
    return torch.where(live, p * (torch.where(live, logp, 0.0) - torch.where(live, logq, 0.0)), 0.0).sum(-1)


def _ref_logprob(z, y):
    return torch.log_softmax(z.double(), -1).gather(-1, y[..., None])[..., 0]


def _logits(shape, seed, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(dtype)


def _grads(fn, *xs, upstream):
    """Values and gradients of ``(fn(*xs) * upstream).sum()`` w.r.t. every ``x`` (detached copies)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*leaves)
    (out * upstream).sum().backward()
    return out.detach(), [leaf.grad for leaf in leaves]


# ----------------------------------------------------------------------------- -inf logits
@settings(max_examples=30)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(2, 24)), seed=st.integers(0, 2**31 - 1),
       chunk=st.sampled_from([1, 3, None]), temperature=st.sampled_from([1.0, 0.7]),
       bf16=st.booleans(), data=st.data())
def test_masked_vocabulary_equals_the_vocabulary_without_those_entries(shape, seed, chunk, temperature, bf16, data):
    B, T, V = shape
    dtype = torch.bfloat16 if bf16 else torch.float32
    banned = torch.tensor(data.draw(st.lists(st.booleans(), min_size=V, max_size=V)))
    banned[data.draw(st.integers(0, V - 1))] = False  # at least one token stays allowed
    keep = ~banned
    zp, zq = _logits(shape, seed, dtype), _logits(shape, seed + 1, dtype)
    zp[..., banned], zq[..., banned] = -INF, -INF
    tokens = torch.nonzero(keep).squeeze(1)[torch.randint(0, int(keep.sum()), (B, T))]
    upstream = torch.randn(B, T, generator=torch.Generator().manual_seed(seed))
    kw = dict(chunk_size=chunk, temperature=temperature)
    tol = dict(atol=1e-5, rtol=1e-5)
    cases = {
        "entropy": (lambda z: token_entropy(z, **kw), (zp,)),
        "logprob": (lambda z: selected_logprobs(z, tokens, **kw), (zp,)),
        "kl": (lambda a, b: token_kl(a, b, **kw), (zp, zq)),
    }
    # the same tokens, re-indexed in the reduced vocabulary
    reduced_tokens = torch.cumsum(keep.long(), 0)[tokens] - 1
    reduced = {
        "entropy": lambda z: token_entropy(z, **kw),
        "logprob": lambda z: selected_logprobs(z, reduced_tokens, **kw),
        "kl": lambda a, b: token_kl(a, b, **kw),
    }
    for name, (fn, xs) in cases.items():
        out, grads = _grads(fn, *xs, upstream=upstream)
        out_r, grads_r = _grads(reduced[name], *[x[..., keep] for x in xs], upstream=upstream)
        assert torch.isfinite(out).all(), name
        torch.testing.assert_close(out, out_r, **tol)
        for g, g_r in zip(grads, grads_r):
            assert g.dtype == dtype and torch.isfinite(g.float()).all(), name
            assert (g[..., banned] == 0).all(), name
            torch.testing.assert_close(g[..., keep].float(), g_r.float(), **tol)
    # and the reduced vocabulary against float64 autograd
    s = 1.0 / temperature
    refs = {"entropy": lambda z: _ref_entropy(z * s), "logprob": lambda z: _ref_logprob(z * s, reduced_tokens),
            "kl": lambda a, b: _ref_kl(a * s, b * s)}
    for name, (_, xs) in cases.items():
        out_r, grads_r = _grads(reduced[name], *[x[..., keep] for x in xs], upstream=upstream)
        ref, grads_ref = _grads(refs[name], *[x[..., keep].double() for x in xs], upstream=upstream.double())
        torch.testing.assert_close(out_r.double(), ref, atol=1e-5, rtol=1e-5)
        for g, g_ref in zip(grads_r, grads_ref):  # bf16 gradients are rounded to bf16 (8 bits)
            torch.testing.assert_close(g.double(), g_ref, atol=1e-5 if not bf16 else 4e-3, rtol=1e-4 if not bf16 else 8e-3)


def test_all_minus_inf_rows_have_no_distribution_zero_values_and_zero_gradients():
    z = _logits((2, 3, 6), 0)
    z[0, 1] = -INF
    z[1, 2, :] = -INF
    q = _logits((2, 3, 6), 1)
    y = torch.zeros(2, 3, dtype=torch.long)
    for fn in (lambda a: token_entropy(a, chunk_size=2), lambda a: token_kl(a, q, chunk_size=2),
               lambda a: token_kl(q, a, chunk_size=2) * 0 + token_kl(a, a.detach(), chunk_size=2),
               lambda a: selected_logprobs(a, y, chunk_size=2)):
        x = z.clone().requires_grad_(True)
        out = fn(x)
        out.sum().backward()
        assert torch.isfinite(x.grad).all()
        assert (x.grad[0, 1] == 0).all() and (x.grad[1, 2] == 0).all()
    assert token_entropy(z)[0, 1] == 0 and token_kl(z, q)[1, 2] == 0
    assert selected_logprobs(z, y)[0, 1] == -INF
    assert torch.isfinite(selected_logprobs(z, y)[0, 0])


def test_kl_is_infinite_where_q_rules_out_a_token_p_allows():
    p = torch.tensor([[0.0, 1.0, -INF]])
    q = torch.tensor([[0.0, -INF, -INF]])
    assert token_kl(p, q).item() == INF
    assert token_kl(q, p).item() == pytest.approx(torch.log1p(torch.e ** torch.tensor(1.0)).item(), abs=1e-6)


def test_selected_logprob_of_a_minus_inf_token_is_minus_inf_with_a_finite_gradient():
    z = torch.tensor([[0.0, 1.0, -INF]], requires_grad=True)
    out = selected_logprobs(z, torch.tensor([2]))
    assert out.item() == -INF
    out.sum().backward()
    p = torch.softmax(z.detach(), -1)
    torch.testing.assert_close(z.grad, torch.tensor([[0.0, 0.0, 1.0]]) - p)


# ----------------------------------------------------------------------------- backwards
@settings(max_examples=25)
@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 30)), seed=st.integers(0, 2**31 - 1),
       chunk=st.sampled_from([1, 4, None]), masked=st.booleans(), temperature=st.sampled_from([1.0, 1.3]),
       needs=st.sampled_from(["p", "q", "both"]))
def test_kl_and_entropy_gradients_match_float64_autograd(shape, seed, chunk, masked, temperature, needs):
    B, T, V = shape
    zp, zq = _logits(shape, seed), _logits(shape, seed + 1)
    gen = torch.Generator().manual_seed(seed)
    mask = right_padded_mask(torch.randint(0, T + 1, (B,), generator=gen), T) if masked else None
    upstream = torch.randn(B, T, generator=gen)
    s = 1.0 / temperature
    zero = torch.zeros(())

    def ref_kl(a, b):
        kl = _ref_kl(a * s, b * s)
        return kl if mask is None else torch.where(mask, kl, zero.double())

    leaves = {"p": zp.clone().requires_grad_(needs != "q"), "q": zq.clone().requires_grad_(needs != "p")}
    out = token_kl(leaves["p"], leaves["q"], mask, chunk_size=chunk, temperature=temperature)
    (out * upstream).sum().backward()
    ref, grads = _grads(ref_kl, zp.double(), zq.double(), upstream=upstream.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    for key, g_ref in zip("pq", grads):
        if leaves[key].requires_grad:
            torch.testing.assert_close(leaves[key].grad.double(), g_ref, atol=1e-5, rtol=1e-4)
            if mask is not None:
                assert (leaves[key].grad[~mask] == 0).all()
        else:
            assert leaves[key].grad is None

    def ref_ent(a):
        h = _ref_entropy(a * s)
        return h if mask is None else torch.where(mask, h, zero.double())

    out, (g,) = _grads(lambda a: token_entropy(a, mask, chunk_size=chunk, temperature=temperature), zp,
                       upstream=upstream)
    ref, (g_ref,) = _grads(ref_ent, zp.double(), upstream=upstream.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-4)


def test_bf16_gradients_come_back_in_bf16_close_to_float32():
    z = _logits((2, 5, 40), 3, torch.bfloat16)
    q = _logits((2, 5, 40), 4, torch.bfloat16)
    up = torch.randn(2, 5)
    for fn in (lambda a: token_entropy(a, chunk_size=3), lambda a: token_kl(a, q.float() if a.dtype == torch.float32
                                                                             else q, chunk_size=3)):
        _, (g16,) = _grads(fn, z, upstream=up)
        _, (g32,) = _grads(fn, z.float(), upstream=up)
        assert g16.dtype == torch.bfloat16
        torch.testing.assert_close(g16.float(), g32, atol=2e-3, rtol=1e-2)


def test_fused_token_kl_gradients_match_the_materialised_logits():
    gen = torch.Generator().manual_seed(0)
    hp, hq = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    weight, bias = torch.randn(30, 8, generator=gen) / 2, torch.randn(30, generator=gen)
    bias[:4] = -INF  # a padded vocabulary: four tokens the head can never emit
    mask = right_padded_mask([5, 2], 5)
    up = torch.randn(2, 5, generator=gen)

    def fused(a, b, w):
        return fused_token_kl(a, b, w, mask, bias=bias, chunk_size=3)

    def ref(a, b, w):
        kl = _ref_kl(F.linear(a, w, bias.double()), F.linear(b, w, bias.double()))
        return torch.where(mask, kl, torch.zeros((), dtype=torch.float64))

    out, grads = _grads(fused, hp, hq, weight, upstream=up)
    out_ref, grads_ref = _grads(ref, hp.double(), hq.double(), weight.double(), upstream=up.double())
    torch.testing.assert_close(out.double(), out_ref, atol=1e-5, rtol=1e-5)
    for g, g_ref in zip(grads, grads_ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- chunk sizing
def test_rows_for_budget_hand_computed():
    # 256 MiB over V = 151936 at 13 bytes per entry (eager KL): 268435456 // 1975168 = 135
    assert _chunking.rows_for_budget(151936, 13, 256.0) == 135
    # compiled KL in bf16 with masked rows: 4 + 2 * 2 * 2 = 12 bytes per entry; 512 MiB -> 294
    assert _chunking.temporaries("kl", compiled=True, masked=True, itemsize=2) == 12
    assert _chunking.rows_for_budget(151936, 12, 512.0) == 294
    # 16 MiB on CPU over V = 32000, eager entropy (two float32 blocks): 16777216 // 256000 = 65
    assert _chunking.temporaries("entropy", compiled=False, masked=False, itemsize=4) == 8
    assert _chunking.rows_for_budget(32000, 8, 16.0) == 65
    # the fused KL's matmul chunk on a GPU: two bf16 logit blocks, 512 MiB / (152064 * 4) = 882 rows
    assert _chunking.temporaries("lm_head", itemsize=2) == 4
    assert _chunking.rows_for_budget(152064, 4, 512.0) == 882
    assert _chunking.rows_for_budget(10, 4, 0.5) == 13107  # fractional MiB: 524288 // 40
    assert _chunking.rows_for_budget(2**30, 4, 1.0) == 1  # never below one row


def test_chunk_rows_validation_and_defaults():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert _chunking.default_budget_mib(cpu) == 16.0 and _chunking.default_budget_mib(gpu) == 512.0
    kw = dict(width=1000, bytes_per_entry=8)
    assert _chunking.chunk_rows("f", None, None, device=cpu, **kw) == 16 * 2**20 // 8000
    assert _chunking.chunk_rows("f", None, None, device=gpu, **kw) == 512 * 2**20 // 8000
    assert _chunking.chunk_rows("f", 7, None, device=gpu, **kw) == 7
    assert _chunking.chunk_rows("f", None, 1, device=cpu, **kw) == 131
    with pytest.raises(RLCreditError, match="not both"):
        token_kl(torch.zeros(2, 3), torch.zeros(2, 3), chunk_size=4, budget_mib=64)
    with pytest.raises(RLCreditError, match="budget_mib"):
        token_entropy(torch.zeros(2, 3), budget_mib=0)
    with pytest.raises(RLCreditError, match="budget_mib"):
        selected_logprobs(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), budget_mib=float("nan"))
    with pytest.raises(RLCreditError, match="chunk_size"):
        token_entropy(torch.zeros(2, 3), chunk_size=2.5)


@pytest.mark.parametrize("kernel", ["entropy", "logprob", "kl", "fused"])
def test_chunks_follow_chunk_size_exactly_and_the_budget(kernel, monkeypatch):
    N, V, H = 23, 50, 6
    z, q = _logits((N, V), 0), _logits((N, V), 1)
    y = torch.randint(0, V, (N,))
    hidden, weight = torch.randn(N, H), torch.randn(V, H)
    calls = {
        "entropy": lambda **kw: token_entropy(z, **kw),
        "logprob": lambda **kw: selected_logprobs(z, y, **kw),
        "kl": lambda **kw: token_kl(z, q, **kw),
        "fused": lambda **kw: fused_token_kl(hidden, hidden + 1, weight, **kw),
    }
    sizes: list[int] = []
    real = _compile.run
    monkeypatch.setattr(_compile, "run", lambda fn, device, x, *a: sizes.append(x.shape[0]) or real(fn, device, x, *a))
    calls[kernel](chunk_size=5)
    assert sizes == [5, 5, 5, 5, 3]  # uneven: the last chunk is short
    sizes.clear()
    # 0.01 MiB = 10485 bytes; eager bytes per entry from the table (fp32 input, unmasked); the
    # fused KL's chunk is its two float32 logit blocks (the KL over each runs in one block: its
    # own default budget holds far more rows)
    per = _chunking.temporaries("lm_head" if kernel == "fused" else kernel, compiled=False, masked=False, itemsize=4)
    rows = 10485 // (V * per)
    calls[kernel](budget_mib=0.01)
    assert rows >= 1 and sizes == [rows] * (N // rows) + ([N % rows] if N % rows else [])


class _LivePeak(TorchDispatchMode):
    """Peak bytes of live storages allocated inside the block (freed ones leave, via weakrefs)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen: set[int] = set()

    def _free(self, ptr, n):
        self.live -= n
        self.seen.discard(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr, n = storage.data_ptr(), storage.nbytes()
                if n and ptr not in inputs and ptr not in self.seen:
                    self.seen.add(ptr)
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, ptr, n)
        return out


@pytest.mark.parametrize("kernel, masked", [("entropy", False), ("entropy", True), ("logprob", False), ("kl", False),
                                            ("kl", True)])  # selected_logprobs takes no mask
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_temporaries_stay_within_what_the_budget_counts(kernel, masked, dtype):
    """Forward and backward peaks (the gradient itself excluded) against ``_chunking.temporaries``."""
    N, V, C = 48, 500, 8
    z, q = _logits((N, V), 0, dtype).requires_grad_(True), _logits((N, V), 1, dtype).requires_grad_(True)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(0)) > 0.3 if masked else None
    y = torch.randint(0, V, (N,))
    fn = {"entropy": lambda: token_entropy(z, mask, chunk_size=C),
          "logprob": lambda: selected_logprobs(z, y, chunk_size=C),
          "kl": lambda: token_kl(z, q, mask, chunk_size=C)}[kernel]
    allowed = C * V * _chunking.temporaries(kernel, compiled=False, masked=masked, itemsize=z.element_size())
    slack = 64 * N  # the [N] outputs and statistics
    with torch.no_grad(), _LivePeak() as fwd:
        fn()
    out = fn()
    with _LivePeak() as bwd:
        out.backward(torch.ones_like(out))
    grads = (2 if kernel == "kl" else 1) * N * V * z.element_size()
    assert fwd.peak <= allowed + slack, (fwd.peak, allowed)
    assert bwd.peak - grads <= allowed + slack, (bwd.peak - grads, allowed)
    # ... and the table is not loose by more than one float32 block
    assert max(fwd.peak, bwd.peak - grads) >= allowed - 4 * C * V - slack


# ----------------------------------------------------------------------------- compiled path
@pytest.fixture
def compiled_on_cpu(monkeypatch):
    """Route the CPU through torch.compile (inductor's C++ backend) as CUDA is routed in production."""
    monkeypatch.setattr(_compile, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(_compile, "_failure", [])
    yield
    assert not _compile._failure, _compile._failure


def _all_kernels(z, q, mask, tokens, hidden_p, hidden_q, weight, bias):
    """Values and gradients of the four kernels at temperature 0.7 (one compiled graph per row function)."""
    kw = dict(chunk_size=3, temperature=0.7)
    up = torch.linspace(-1, 1, mask.numel()).reshape(mask.shape)
    return {
        "kl": _grads(lambda a, b: token_kl(a, b, mask, **kw), z, q, upstream=up),
        "entropy": _grads(lambda a: token_entropy(a, mask, **kw), z, upstream=up),
        "logprob": _grads(lambda a: selected_logprobs(a, tokens, **kw), z, upstream=up),
        "fused": (fused_token_kl(hidden_p, hidden_q, weight, mask, bias=bias, **kw), []),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_rows_give_the_eager_numbers(dtype, compiled_on_cpu, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    B, T, V, H = 2, 6, 37, 8
    z, q = _logits((B, T, V), 0, dtype), _logits((B, T, V), 1, dtype)
    z[..., :3], q[..., :3] = -INF, -INF  # masked vocabulary entries
    z[0, 1] = -INF  # and one row with no distribution
    mask = right_padded_mask([6, 2], T)  # 8 valid rows: chunks of 3, 3, 2
    tokens = torch.randint(3, V, (B, T), generator=gen)
    hp, hq, weight = torch.randn(B, T, H, generator=gen), torch.randn(B, T, H, generator=gen), torch.randn(V, H)
    bias = torch.zeros(V)
    bias[:3] = -INF
    args = (z, q, mask, tokens, hp.to(dtype), hq.to(dtype), weight.to(dtype), bias.to(dtype))
    compiled = _all_kernels(*args)
    assert {_rows.kl_fwd, _rows.kl_bwd, _rows.entropy_fwd, _rows.entropy_bwd, _rows.logprob_fwd,
            _rows.logprob_bwd} <= set(_compile._compiled)
    monkeypatch.setattr(_compile, "COMPILE_DEVICES", ())
    eager = _all_kernels(*args)
    for name in compiled:
        (out_c, grads_c), (out_e, grads_e) = compiled[name], eager[name]
        assert not out_c.isnan().any() and out_c.dtype == torch.float32, name  # -inf: log-prob of row [0, 1]
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        for g_c, g_e in zip(grads_c, grads_e):
            assert g_c.dtype == dtype and torch.isfinite(g_c.float()).all(), name
            torch.testing.assert_close(g_c.float(), g_e.float(), atol=1e-5 if dtype == torch.float32 else 8e-3,
                                       rtol=1e-5 if dtype == torch.float32 else 1e-2)


def test_a_failed_compilation_warns_once_and_falls_back_to_eager(monkeypatch):
    def no_compiler(gm, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setattr(_compile, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(_compile, "_failure", [])
    monkeypatch.setattr(_compile, "_compiled", {})
    monkeypatch.setattr(_compile, "_compile", lambda fn: torch.compile(fn, fullgraph=True, backend=no_compiler))
    z, q = _logits((3, 4, 9), 0), _logits((3, 4, 9), 1)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler.*run eagerly"):
        first = token_kl(z, q, chunk_size=5)
    assert _compile._failure and not _compile.compiles_on(z.device)
    monkeypatch.setattr(_compile, "COMPILE_DEVICES", ())
    torch.testing.assert_close(first, token_kl(z, q, chunk_size=5), rtol=0, atol=0)


def test_only_listed_devices_compile(monkeypatch):
    monkeypatch.setattr(_compile, "_failure", [])
    assert _compile.COMPILE_DEVICES == ("cuda",)
    assert not _compile.compiles_on(torch.device("cpu"))
    monkeypatch.setattr(_compile, "_failure", ["BackendCompilerFailed: earlier"])
    monkeypatch.setattr(_compile, "COMPILE_DEVICES", ("cpu",))
    assert not _compile.compiles_on(torch.device("cpu"))  # given up after a failure
