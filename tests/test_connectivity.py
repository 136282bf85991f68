"""AT-RL attention connectivity: sdpa capture against an eager ``output_attentions=True`` reference.

The tiny VLMs of ``tests/mm_models.py`` have 2 query heads sharing 1 key/value head (GQA), Qwen's
3-D mRoPE, left-padded prompts (rows with different image counts) and right-padded responses.
"""

from __future__ import annotations

import math

import pytest
import torch

import rlcredit
from rlcredit.requirements import POLICY, Field
from mm_models import IMAGE, make_vlm
from rlcredit_mm import AttentionConnectivity, _attention_maths, connectivity
from rlcredit_mm.connectivity import CAPTURE_IMPLEMENTATION, default_layers

TOL = 1e-4


def _rollout(inputs, mask):
    B = mask.shape[0]
    return rlcredit.Rollout(mask, torch.zeros(B), torch.zeros(B, dtype=torch.long), model_inputs=inputs)


def _eager_attentions(model, inputs):
    """Per-layer attention maps ``[B, H, L, L]`` from eager attention with ``output_attentions=True``."""
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.model(**inputs, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(impl)
    return [a.double() for a in out.attentions]


def _reference(attentions, inputs, mask, layers, *, align="predicting", debias=True, quantile=0.99,
               first_keys=1, measure="mass", bins=None):
    """Plain loops over rows, layers and tokens on the full eager maps (our METHODS.md definition).

    Returns the ``[B, T]`` score, or with ``bins=K`` the ``[B, T, K]`` profile: the kept, renormalised
    image attention summed over groups ``ordinal * K // n_image`` of the row's image tokens.
    """
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    B, T = mask.shape
    L = ids.shape[1]
    out = torch.zeros(B, T, dtype=torch.float64)
    prof = torch.zeros(B, T, bins or 1, dtype=torch.float64)
    for b in range(B):
        first = int(am[b].nonzero()[0])
        sinks0 = set(range(first, first + first_keys)) if debias else set()
        image = [v for v in range(L) if ids[b, v] == IMAGE and am[b, v] and v not in sinks0]
        cols = [(L - T - 1 + t) if align == "predicting" else (L - T + t) for t in range(T)]
        for layer in layers:
            A = attentions[layer][b].mean(0)  # head mean, [L, L]
            sinks = set(sinks0)
            if debias and image:
                rows = [cols[t] for t in range(T) if mask[b, t]]
                means = torch.tensor([sum(float(A[r, v]) for r in rows) / max(1, len(rows)) for v in image])
                tau = float(torch.quantile(means, quantile))
                sinks |= {v for v, m in zip(image, means.tolist()) if m > tau}
            for t in range(T):
                if not mask[b, t]:
                    continue
                q = cols[t]
                kept = [v for v in image if v not in sinks]
                norm = 1.0 - sum(float(A[q, u]) for u in sinks)
                c = sum(float(A[q, v]) for v in kept) / norm
                for ordinal, v in enumerate(image):
                    if bins and v in kept:
                        prof[b, t, ordinal * bins // len(image)] += float(A[q, v]) / norm / len(layers)
                if measure == "density":
                    visible = [j for j in range(q + 1) if am[b, j]]
                    n_ctx = len([j for j in visible if j not in sinks])
                    n_img = len([v for v in kept if v <= q])
                    c = c * n_ctx / n_img if n_img else 0.0
                out[b, t] += c / len(layers)
    return prof if bins else out


@pytest.fixture(scope="module")
def qwen():
    model, make = make_vlm("qwen2_5_vl")
    # rows with 1, 2 and 0 images: prompts left-padded by different amounts; responses right-padded
    inputs, mask = make(B=3, P_text=4, T=6, seed=1, lengths=[6, 3, 2], images=[1, 2, 0])
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2)
    prepared = policy.adapter.prepare_inputs(inputs, model)
    return model, policy, inputs, mask, _eager_attentions(model, prepared), prepared


@pytest.fixture(scope="module")
def qwen3():
    model, make = make_vlm("qwen3_vl")  # 16-px patches, DeepStack, interleaved mRoPE, q/k norms
    inputs, mask = make(B=3, P_text=4, T=6, seed=4, lengths=[6, 4, 1], images=[2, 0, 1])
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2)
    prepared = policy.adapter.prepare_inputs(inputs, model)
    return model, policy, inputs, mask, _eager_attentions(model, prepared), prepared


@pytest.fixture(scope="module")
def llava():
    model, make = make_vlm("llava")
    inputs, mask = make(B=3, P_text=4, T=5, seed=2, lengths=[5, 1, 3])
    # left-pad row 1's prompt by 2 more positions (LLaVA rows hold the same number of images)
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    P = ids.shape[1] - 5
    ids = torch.cat([torch.zeros(3, 2, dtype=torch.long), ids], 1)
    am = torch.cat([torch.zeros(3, 2, dtype=torch.long), am], 1)
    ids[0, :2] = torch.tensor([5, 6])
    am[0, :2] = 1
    ids[2, :2] = torch.tensor([7, 8])
    am[2, :2] = 1
    inputs = {**inputs, "input_ids": ids, "attention_mask": am}
    assert ids.shape[1] == P + 7
    policy = rlcredit.HFPolicy(model, rows_per_chunk=3)
    return model, policy, inputs, mask, _eager_attentions(model, inputs), inputs


@pytest.mark.parametrize("which", ["qwen", "qwen3", "llava"])
@pytest.mark.parametrize(("align", "debias", "measure"), [
    ("predicting", True, "mass"), ("self", True, "mass"), ("predicting", False, "mass"),
    ("self", False, "density"), ("predicting", True, "density"),
])
def test_sdpa_capture_equals_eager_reference(request, which, align, debias, measure):
    model, policy, inputs, mask, attentions, prepared = request.getfixturevalue(which)
    est = AttentionConnectivity(layers=[0, 1], align=align, debias_sinks=debias, measure=measure, query_chunk=2)
    out = est(_rollout(inputs, mask), policy)
    ref = _reference(attentions, prepared, mask, [0, 1], align=align, debias=debias, measure=measure)
    assert out.score.dtype == torch.float32
    assert torch.allclose(out.score.double(), ref, atol=TOL, rtol=0)
    assert (out.score[~mask] == 0).all() and (out.score[mask] > 0).any()


def test_sink_parameters_match_reference(qwen):
    model, policy, inputs, mask, attentions, prepared = qwen
    est = AttentionConnectivity(layers=[1], sink_quantile=0.5, sink_first_keys=2)
    out = est(_rollout(inputs, mask), policy)
    ref = _reference(attentions, prepared, mask, [1], quantile=0.5, first_keys=2)
    assert torch.allclose(out.score.double(), ref, atol=TOL, rtol=0)


def test_profile_is_the_pooled_debiased_attention(qwen):
    model, policy, inputs, mask, attentions, prepared = qwen
    out = AttentionConnectivity(layers=[0, 1], profile_bins=3)(_rollout(inputs, mask), policy)
    profile = out.extras["profile"]
    assert profile.shape == (3, 6, 3) and (profile >= 0).all()
    ref = _reference(attentions, prepared, mask, [0, 1], bins=3)
    assert torch.allclose(profile.double(), ref, atol=TOL, rtol=0)
    # the bins sum to the (mass) connectivity; the image-free row has a zero profile and score
    assert torch.allclose(profile.sum(-1), out.score, atol=1e-6)
    assert (out.score[2] == 0).all() and (profile[2] == 0).all()
    assert (profile[:2][mask[:2]] > 0).any(-1).all()


def test_chunking_does_not_change_the_result(qwen):
    model, _, inputs, mask, _, _ = qwen
    r = _rollout(inputs, mask)
    a = AttentionConnectivity(layers=[0, 1], query_chunk=1)(r, rlcredit.HFPolicy(model, rows_per_chunk=1))
    b = AttentionConnectivity(layers=[0, 1], query_chunk=64)(r, rlcredit.HFPolicy(model, rows_per_chunk=3))
    assert torch.allclose(a.score, b.score, atol=1e-6)
    assert torch.allclose(a.extras["profile"], b.extras["profile"], atol=1e-6)


def test_only_the_chosen_layers_are_computed_and_the_model_is_restored(qwen, monkeypatch):
    model, policy, inputs, mask, _, _ = qwen
    calls = []
    real = connectivity._layer_connectivity

    def spy(state, query, *args):
        calls.append(query.shape)
        return real(state, query, *args)

    monkeypatch.setattr(connectivity, "_layer_connectivity", spy)
    AttentionConnectivity(layers=[-1])(_rollout(inputs, mask), policy)
    assert len(calls) == 2  # one chosen layer x two row chunks (rows_per_chunk=2, B=3)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"


def test_eager_model_is_restored_and_gives_the_same_scores(qwen):
    model, policy, inputs, mask, _, _ = qwen
    r = _rollout(inputs, mask)
    est = AttentionConnectivity(layers=[0, 1])
    sdpa = est(r, policy)
    model.set_attn_implementation("eager")
    try:
        eager = est(r, policy)
        assert model.config.text_config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.allclose(sdpa.score, eager.score, atol=1e-6)


def test_failed_forward_restores_the_attention_implementation(qwen, monkeypatch):
    model, policy, inputs, mask, _, _ = qwen

    def broken(state, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(connectivity, "_layer_connectivity", broken)
    with pytest.raises(RuntimeError, match="boom"):
        AttentionConnectivity(layers=[0])(_rollout(inputs, mask), policy)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert connectivity._STATE.get() is None


def test_connectivity_is_a_mass_in_unit_interval_and_density_ratio(qwen):
    model, policy, inputs, mask, _, _ = qwen
    r = _rollout(inputs, mask)
    mass = AttentionConnectivity()(r, policy).score
    density = AttentionConnectivity(measure="density")(r, policy).score
    assert ((mass >= 0) & (mass <= 1)).all()
    assert ((density > 0) == (mass > 0)).all()


def test_bf16_model_gives_float32_scores_close_to_float32(qwen):
    model, policy, inputs, mask, _, _ = qwen
    r = _rollout(inputs, mask)
    ref = AttentionConnectivity(layers=[0, 1])(r, policy).score
    half, _ = make_vlm("qwen2_5_vl", dtype=torch.bfloat16)
    out = AttentionConnectivity(layers=[0, 1])(r, rlcredit.HFPolicy(half))
    assert out.score.dtype == torch.float32 and torch.isfinite(out.score).all()
    assert torch.allclose(out.score, ref, atol=3e-2)


# ------------------------------------------------------------------------ layers and errors


def test_default_layers_are_evenly_spaced_in_the_upper_half():
    assert default_layers(16) == (8, 10, 13, 15)
    assert default_layers(28) == (14, 18, 23, 27)
    assert default_layers(2) == (1,)
    assert default_layers(16, 1) == (15,)
    assert AttentionConnectivity().chosen_layers(32) == (16, 21, 26, 31)
    assert AttentionConnectivity(layers=[-1, 0]).chosen_layers(4) == (0, 3)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"layers": []}, "non-empty list of distinct ints"),
    ({"layers": [1, 1]}, "non-empty list of distinct ints"),
    ({"layers": ["a"]}, "non-empty list of distinct ints"),
    ({"layers": 3}, "None or a list of layer indices"),
    ({"measure": "sum"}, "measure must be one of 'mass', 'density'"),
    ({"align": "next"}, "align must be one of 'predicting', 'self'"),
    ({"sink_quantile": 1.5}, "sink_quantile"),
    ({"profile_bins": 0}, "profile_bins must be an int >= 1"),
    ({"debias_sinks": 1}, "debias_sinks must be True or False"),
])
def test_bad_parameters_raise_spec_error(kwargs, message):
    with pytest.raises(rlcredit.SpecError, match=message):
        AttentionConnectivity(**kwargs)


def test_out_of_range_layers_and_missing_inputs_raise(qwen):
    model, policy, inputs, mask, _, _ = qwen
    with pytest.raises(rlcredit.SpecError, match=r"\[5\] out of range for a model with 2 decoder layers"):
        AttentionConnectivity(layers=[0, 5])(_rollout(inputs, mask), policy)
    with pytest.raises(rlcredit.SpecError, match="name the same layer twice"):
        AttentionConnectivity(layers=[1, -1])(_rollout(inputs, mask), policy)
    bare = rlcredit.Rollout(mask, torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(rlcredit.RolloutError, match="needs a policy"):
        AttentionConnectivity()(bare, policy)
    with pytest.raises(rlcredit.RolloutError, match="needs a policy"):
        AttentionConnectivity()(_rollout(inputs, mask), None)
    short = {**inputs, "input_ids": inputs["input_ids"][:, -6:], "attention_mask": inputs["attention_mask"][:, -6:]}
    with pytest.raises(rlcredit.RolloutError, match="P\\+T >= 7"):
        AttentionConnectivity()(_rollout(short, mask), policy)


def test_model_whose_attention_bypasses_the_interface_raises_adapter_error(qwen, monkeypatch):
    model, policy, inputs, mask, _, _ = qwen
    other, _ = make_vlm("qwen2_5_vl", seed=1)  # modules that never run in this forward
    foreign = [layer.self_attn for layer in policy.adapter.language_model(other).layers]
    monkeypatch.setattr(policy.adapter, "attention_modules", lambda m: foreign)
    with pytest.raises(rlcredit.AdapterError, match="captured 0 of the 1 chosen layers"):
        AttentionConnectivity(layers=[0])(_rollout(inputs, mask), policy)
    assert other.config.text_config._attn_implementation == "sdpa"


def test_registered_with_transformers_and_registry():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert CAPTURE_IMPLEMENTATION in ALL_ATTENTION_FUNCTIONS and CAPTURE_IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS
    est = rlcredit.registry.build_component("estimator", {"name": "attention_connectivity", "layers": [2, -1]})
    assert est == AttentionConnectivity(layers=(2, -1))
    assert rlcredit.registry.component_spec(est) == {"name": "attention_connectivity", "layers": [2, -1]}
    assert est.requires == (POLICY, Field("model_inputs")) and est.extras == ("profile",)


# ------------------------------------------------------------------------ at_rl end to end


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_at_rl_preset_end_to_end_on_a_tiny_vlm(arch):
    model, make = make_vlm(arch)
    inputs, mask = make(B=4, P_text=3, T=24, seed=3, lengths=[24, 17, 9, 3], images=[1, 2, 1, 1])
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2)
    rollout = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1]),
                               model_inputs=inputs)
    strategy = rlcredit.build("at_rl")
    assert rlcredit.build(strategy.to_spec()) == strategy
    credit = strategy.assign(rollout, policy)
    conn, profile = credit.scores["connectivity"], credit.scores["connectivity.profile"]
    assert conn.shape == (4, 24) and profile.shape == (4, 24, 16)
    w = credit.token_weights
    assert set(w[mask].tolist()) <= {1.0, 1.5} and (w[~mask] == 0).all()
    for b in range(4):
        n = int(mask[b].sum())
        anchors = (w[b] == 1.5) & mask[b]
        assert anchors.any()
        # whole clusters within 15%, or a single cluster (METIS parts of about 8 tokens)
        assert int(anchors.sum()) <= max(math.floor(0.15 * n), math.ceil(n / max(2, math.ceil(n / 8))) + 1)
        if (mask[b] & ~anchors).any():
            assert conn[b][anchors].mean() >= conn[b][mask[b] & ~anchors].mean()
    # deterministic given inputs
    again = strategy.assign(rollout, policy)
    assert torch.equal(again.token_weights, w) and torch.equal(again.scores["connectivity"], conn)
    # the loss with current log-probs is finite and differentiable
    logprobs = policy.logprobs(inputs, mask)
    out = strategy.loss(logprobs, rollout, credit)
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(out.loss) and grads and all(torch.isfinite(g).all() for g in grads)


def test_compiled_capture_gives_the_eager_scores(qwen, monkeypatch):
    """The capture's block function through torch.compile (on CPU here; CUDA in production)."""
    from rlcredit.functional import _compile

    model, policy, inputs, mask, attentions, prepared = qwen
    est = AttentionConnectivity(layers=[0, 1], query_chunk=3, measure="density")
    eager = est(_rollout(inputs, mask), policy)
    monkeypatch.setattr(_compile, "COMPILE_DEVICES", ("cpu",))
    monkeypatch.setattr(_compile, "_failure", [])
    compiled = est(_rollout(inputs, mask), policy)
    assert _attention_maths._picked_probs in _compile._compiled and not _compile._failure
    torch.testing.assert_close(compiled.score, eager.score, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(compiled.extras["profile"], eager.extras["profile"], atol=1e-6, rtol=1e-5)


def test_automatic_query_blocks_follow_the_memory_budget(qwen, monkeypatch):
    """query_chunk=None: rows from the budget rule; the scores equal those of explicit blocks."""
    from rlcredit.functional import _chunking

    model, policy, inputs, mask, attentions, prepared = qwen
    ref = AttentionConnectivity(layers=[1], query_chunk=1)(_rollout(inputs, mask), policy).score
    seen = []
    real = _attention_maths._query_rows
    monkeypatch.setattr(_attention_maths, "_query_rows", lambda *a: seen.append(real(*a)) or seen[-1])
    monkeypatch.setattr(_chunking, "CPU_BUDGET_MIB", 1e-3)  # ~1 KiB: a few rows per block
    auto = AttentionConnectivity(layers=[1])(_rollout(inputs, mask), policy).score
    torch.testing.assert_close(auto, ref, atol=1e-6, rtol=1e-5)
    L = prepared["input_ids"].shape[1]
    Hq = model.config.get_text_config().num_attention_heads
    # row chunks of 2 and 1 rows (B = 3, rows_per_chunk = 2); float32 model, bool mask: 4 + 4 + 1 bytes
    expected = {_chunking.rows_for_budget(b * Hq * L, 9, 1e-3) for b in (2, 1)}
    assert set(seen) == expected and max(expected) < mask.shape[1], (seen, expected)


def test_unpadded_rows_take_sdpas_plain_causal_mask_and_match_the_reference():
    """No padding at all: sdpa gets no mask (None) and the capture builds the causal one itself."""
    model, make = make_vlm("qwen2_5_vl")
    inputs, mask = make(B=2, P_text=4, T=6, seed=3)  # full-length responses, one image per row
    assert bool(inputs["attention_mask"].all())
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2)
    prepared = policy.adapter.prepare_inputs(inputs, model)
    seen = []
    real = _attention_maths._picked_probs
    # the block function is called with mask_rows=None on this batch
    import unittest.mock as mock
    with mock.patch.object(_attention_maths, "_picked_probs", lambda *a: seen.append(a[1] is None) or real(*a)):
        out = AttentionConnectivity(layers=[0, 1], query_chunk=4, measure="density")(_rollout(inputs, mask), policy)
    assert seen and all(seen)
    ref = _reference(_eager_attentions(model, prepared), prepared, mask, [0, 1], measure="density")
    assert torch.allclose(out.score.double(), ref, atol=TOL, rtol=0)
