"""VisualKL: k3 formula, exact/fused against a naive full-softmax KL, invariants, chunking, specs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mm_models import ARCHS, make_vlm, run_rows_alone

import rlcredit
from rlcredit.errors import AdapterError, RolloutError, SpecError
from rlcredit.requirements import POLICY, AllOf, AnyOf, Field, Signal
from rlcredit_mm import VisualKL
from rlcredit_mm import adapters as A
from rlcredit_mm import perturb as P

_MODELS: dict[tuple, tuple] = {}


def vlm(arch: str, **overrides):
    key = (arch, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = make_vlm(arch, **overrides)
    return _MODELS[key]


def batch(arch: str, seed: int = 0, **overrides):
    model, make_inputs = vlm(arch, **overrides)
    images = [1, 1, 1] if arch == "llava" else [1, 2, 0]
    return make_inputs(3, 3, 5, seed, lengths=[5, 2, 4], images=images)


def rollout(mask, inputs=None, **kw):
    B = mask.shape[0]
    return rlcredit.Rollout(mask, torch.zeros(B), torch.zeros(B, dtype=torch.long), model_inputs=inputs, **kw)


def naive(model, inputs, mask, perturbation, temperature=1.0):
    """Full-batch forwards on the original and perturbed inputs; full-softmax KL and sampled log-probs."""
    prepared = A.adapter_for(model).prepare_inputs(inputs, model)
    T = mask.shape[1]
    with torch.no_grad():
        z_p = model(**prepared).logits[:, -T - 1:-1].double() / temperature
        z_q = model(**perturbation(prepared, model)).logits[:, -T - 1:-1].double() / temperature
    lp, lq = torch.log_softmax(z_p, -1), torch.log_softmax(z_q, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    y = prepared["input_ids"][:, -T:, None]
    zero = torch.zeros((), dtype=torch.float64)
    return (torch.where(mask, kl, zero), torch.where(mask, lp.gather(-1, y)[..., 0], zero),
            torch.where(mask, lq.gather(-1, y)[..., 0], zero))


def k3_reference(aug, base, mask):
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                d = min(20.0, max(-20.0, float(aug[b, t]) - float(base[b, t])))
                out[b, t] = min(10.0, max(0.0, math.exp(d) - d - 1))
    return out


# --- k3 ---------------------------------------------------------------------------------------


@given(st.integers(1, 4), st.integers(1, 6), st.data())
def test_k3_from_signals_equals_the_formula(B, T, data):
    floats = st.floats(-60.0, 5.0, allow_nan=False, width=32)
    aug = torch.tensor(data.draw(st.lists(floats, min_size=B * T, max_size=B * T))).view(B, T)
    old = torch.tensor(data.draw(st.lists(floats, min_size=B * T, max_size=B * T))).view(B, T)
    lengths = data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    r = rollout(mask, old_logprobs=old, signals={"aug_logprobs": aug})
    got = VisualKL()(r)  # no policy needed
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), k3_reference(aug, old, mask), atol=1e-5, rtol=1e-5)
    assert torch.all(got[~mask] == 0) and torch.all(got <= 10)


def test_k3_hand_computed_clamps():
    mask = torch.ones(1, 4, dtype=torch.bool)
    old = torch.tensor([[-1.0, -1.0, -30.0, -1.0]])
    aug = torch.tensor([[-1.0, -2.0, -1.0, -100.0]])  # d = 0, -1, 29 -> 20, -99 -> -20
    got = VisualKL()(rollout(mask, old_logprobs=old, signals={"aug_logprobs": aug}))
    # e^-1 + 1 - 1; e^20 - 21 capped at 10; e^-20 + 20 - 1 = 19 capped at 10
    expected = torch.tensor([[0.0, math.exp(-1), 10.0, 10.0]])
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl", "gemma3"])
def test_k3_through_the_policy_equals_the_formula_on_naive_forwards(arch):
    model, _ = vlm(arch)
    inputs, mask = batch(arch)
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2)
    est = VisualKL(perturbation=P.PatchBlackout(p=0.7, seed=1), temperature=0.8)
    _, lp, lq = naive(model, inputs, mask, est.perturbation, temperature=0.8)
    got = est(rollout(mask, inputs), policy)  # neither log-prob given: both from the policy
    torch.testing.assert_close(got.double(), k3_reference(lq, lp, mask), atol=1e-4, rtol=1e-4)
    old = lp.float() - 0.5 * mask  # old_logprobs, when present, are log pi(y | I)
    got = est(rollout(mask, inputs, old_logprobs=old), policy)
    torch.testing.assert_close(got.double(), k3_reference(lq, old, mask), atol=1e-4, rtol=1e-4)
    aug = (lq - 0.25 * mask).float()  # aug_logprobs, when present, are log pi(y | I')
    got = est(rollout(mask, inputs, signals={"aug_logprobs": aug}), policy)
    torch.testing.assert_close(got.double(), k3_reference(aug, lp, mask), atol=1e-4, rtol=1e-4)


# --- exact and fused against the naive full-softmax KL ------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_and_fused_equal_the_naive_kl(arch):
    model, _ = vlm(arch)
    inputs, mask = batch(arch)
    pert = P.PatchBlackout(p=0.6, seed=2)
    kl, _, _ = naive(model, inputs, mask, pert)
    assert float(kl.max()) > 1e-5  # the image matters at least a little, so the check has teeth
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2, tokens_per_chunk=3)
    for estimate in ("exact", "fused"):
        got = VisualKL(estimate=estimate, perturbation=pert)(rollout(mask, inputs), policy)
        torch.testing.assert_close(got.double(), kl, atol=1e-4, rtol=0)
        assert torch.all(got[~mask] == 0) and torch.all(got >= 0) and not got.requires_grad


@pytest.mark.parametrize("arch,pert", [("qwen2_5_vl", P.Drop()), ("idefics3", P.GaussianNoise(std=1.0)),
                                       ("llava", P.Blur(sigma=1.0))])
def test_exact_and_fused_other_perturbations_and_temperature(arch, pert):
    model, _ = vlm(arch)
    inputs, mask = batch(arch)
    kl, _, _ = naive(model, inputs, mask, pert, temperature=0.6)
    policy = rlcredit.HFPolicy(model, rows_per_chunk=1, tokens_per_chunk=2)
    for estimate in ("exact", "fused"):
        got = VisualKL(estimate=estimate, perturbation=pert, temperature=0.6)(rollout(mask, inputs), policy)
        torch.testing.assert_close(got.double(), kl, atol=1e-4, rtol=0)


def test_exact_applies_the_policys_logit_softcapping_and_fused_refuses_it():
    capped, _ = make_vlm("gemma3")
    # Gemma3ForConditionalGeneration ignores text_config's cap in its own forward (transformers 5),
    # so HFPolicy does too; a top-level cap is one the model class applies.
    capped.config.text_config.final_logit_softcapping = 0.5
    assert rlcredit.HFPolicy(capped).logit_softcap is None
    capped.config.final_logit_softcapping = 0.5  # tiny cap: it changes the KL a lot
    inputs, mask = batch("gemma3")
    policy = rlcredit.HFPolicy(capped)
    assert policy.logit_softcap == 0.5
    pert = P.Constant()
    prepared = A.adapter_for(capped).prepare_inputs(inputs, capped)
    with torch.no_grad():  # HFPolicy's logits: z = c tanh(z / c) (Gemma's final soft-capping)
        z = [0.5 * torch.tanh(capped(**x).logits[:, -6:-1].double() / 0.5) for x in (prepared, pert(prepared, capped))]
    lp, lq = (torch.log_softmax(x, -1) for x in z)
    kl = torch.where(mask, (lp.exp() * (lp - lq)).sum(-1), torch.zeros((), dtype=torch.float64))
    got = VisualKL(estimate="exact", perturbation=pert)(rollout(mask, inputs), policy)
    torch.testing.assert_close(got.double(), kl, atol=1e-6, rtol=0)
    uncapped = naive(capped, inputs, mask, pert)[0]
    assert not torch.allclose(got.double(), uncapped, atol=1e-5)
    with pytest.raises(SpecError, match="soft-capping.*estimate='exact'"):
        VisualKL(estimate="fused", perturbation=pert)(rollout(mask, inputs), policy)


# --- invariants -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_perturbation_gives_zero(arch):
    model, _ = vlm(arch)
    inputs, mask = batch(arch)
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2)
    pert = P.PatchBlackout(p=0.0) if ARCHS.index(arch) % 2 else P.GaussianNoise(std=0.0)
    for estimate in ("k3", "exact", "fused"):
        got = VisualKL(estimate=estimate, perturbation=pert)(rollout(mask, inputs), policy)
        assert float(got.abs().max()) <= 1e-6, (pert, estimate)


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padded_batch_equals_rows_one_by_one(arch):
    model, _ = vlm(arch)
    inputs, mask = batch(arch)
    est = VisualKL(estimate="exact", perturbation=P.PatchBlackout(p=0.5, seed=7))
    whole = est(rollout(mask, inputs), rlcredit.HFPolicy(model, rows_per_chunk=3))
    assert torch.all(whole[~mask] == 0)
    for b, row in enumerate(run_rows_alone(inputs, range(3), arch, model.config)):
        one = est(rollout(mask[b:b + 1], row), rlcredit.HFPolicy(model))
        torch.testing.assert_close(whole[b:b + 1], one, atol=1e-6, rtol=0)


def _image_blind(model):
    """Zero the last layer of LLaVA's projector: every image becomes the same features."""
    torch.nn.init.zeros_(model.model.multi_modal_projector.linear_2.weight)
    return model


def test_image_dependent_model_scores_higher_than_an_image_blind_control():
    seeing, make_inputs = make_vlm("llava", seed=3)
    with torch.no_grad():  # a projector that makes the image loud in the embedding stream
        seeing.model.multi_modal_projector.linear_2.weight.mul_(8.0)
    blind = _image_blind(make_vlm("llava", seed=3)[0])
    inputs, mask = make_inputs(4, 3, 6, 5, lengths=[6, 3, 5, 1])
    for estimate in ("k3", "exact"):
        est = VisualKL(estimate=estimate, perturbation=P.Constant())
        s_see = est(rollout(mask, inputs), rlcredit.HFPolicy(seeing))
        s_blind = est(rollout(mask, inputs), rlcredit.HFPolicy(blind))
        assert float(s_blind.abs().max()) == 0.0  # the control cannot tell I from I'
        assert torch.all(s_see[mask] > 0)  # every image-conditioned token depends on the image
        assert float(s_see[mask].mean()) > 1e-4


# --- chunking and grads -----------------------------------------------------------------------


class Recording:
    """A perturbation wrapper that records the row count of every call."""

    def __init__(self, inner):
        self.inner, self.rows, self.pixel_rows = inner, [], []

    def __call__(self, inputs, model, *, adapter=None):
        self.rows.append(inputs["input_ids"].shape[0])
        self.pixel_rows.append(inputs["pixel_values"].shape[0] if "pixel_values" in inputs else 0)
        return self.inner(inputs, model, adapter=adapter)


@pytest.mark.parametrize("estimate", ["k3", "exact", "fused"])
def test_perturbation_sees_one_row_chunk_at_a_time(estimate):
    model, make_inputs = vlm("llava")
    inputs, mask = make_inputs(5, 3, 4, 0, lengths=[4, 1, 2, 3, 4])
    rec = Recording(P.PatchBlackout())
    VisualKL(estimate=estimate, perturbation=rec)(rollout(mask, inputs), rlcredit.HFPolicy(model, rows_per_chunk=2))
    assert rec.rows == [2, 2, 1] and rec.pixel_rows == [2, 2, 1]


def test_scores_are_detached_even_with_grad_enabled():
    model, _ = vlm("qwen2_vl")
    inputs, mask = batch("qwen2_vl")
    with torch.enable_grad():
        for estimate in ("k3", "exact", "fused"):
            got = VisualKL(estimate=estimate)(rollout(mask, inputs), rlcredit.HFPolicy(model))
            assert not got.requires_grad and got.grad_fn is None
    assert all(p.grad is None for p in model.parameters())


# --- requirements, errors, specs ----------------------------------------------------------------


def test_requires():
    model = AllOf(POLICY, Field("model_inputs"))
    assert VisualKL().requires == (AnyOf(AllOf(Signal("aug_logprobs"), Field("old_logprobs")), model),)
    assert VisualKL(estimate="exact").requires == (model,)
    assert VisualKL(estimate="fused").requires == (model,)


def test_strategy_reports_what_is_missing():
    strategy = rlcredit.Strategy(estimators={"visual": VisualKL(estimate="exact")})
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(RolloutError, match="policy") as err:
        strategy.assign(rollout(mask))
    assert "model_inputs" in str(err.value)
    k3 = rlcredit.Strategy(estimators={"visual": VisualKL()})
    with pytest.raises(RolloutError, match=r"rollout.old_logprobs\) or \(a policy and rollout.model_inputs\)"):
        k3.assign(rollout(mask, signals={"aug_logprobs": torch.zeros(2, 3)}))  # no old_logprobs, no policy
    with pytest.raises(RolloutError, match=r"aug_logprobs.*or \(a policy"):
        k3.assign(rollout(mask, old_logprobs=torch.zeros(2, 3)))


def test_direct_call_errors():
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(RolloutError, match="needs a policy"):
        VisualKL(estimate="exact")(rollout(mask))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text = Qwen2ForCausalLM(Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()
    inputs = {"input_ids": torch.randint(0, 32, (2, 5))}
    with pytest.raises(AdapterError, match="text-only model has no image"):
        VisualKL(estimate="exact")(rollout(mask, inputs), rlcredit.HFPolicy(text))


@pytest.mark.parametrize("kwargs,message", [
    ({"estimate": "kl"}, "VisualKL.estimate must be one of 'k3', 'exact', 'fused'"),
    ({"temperature": 0.0}, "VisualKL.temperature must be a number"),
    ({"perturbation": 3}, "expected a perturbation"),
    ({"perturbation": {"name": "patch_blackout", "p": 2.0}}, "PatchBlackout.p"),
])
def test_bad_parameters(kwargs, message):
    with pytest.raises(SpecError, match=message):
        VisualKL(**kwargs)


def test_specs_round_trip_and_accept_names_dicts_objects():
    assert VisualKL(perturbation="patch_blackout") == VisualKL()
    assert VisualKL(perturbation={"name": "gaussian_noise", "std": 0.2}).perturbation == P.GaussianNoise(std=0.2)
    assert VisualKL(perturbation=P.Drop()).perturbation == P.Drop()
    spec = {"estimators": {"visual": {"name": "visual_kl", "estimate": "fused",
                                      "perturbation": {"name": "patch_blackout", "p": 0.6, "seed": 4}}},
            "weighter": {"name": "top_fraction", "fraction": 0.4, "score": "visual"}}
    strategy = rlcredit.build(spec)
    assert strategy.estimators["visual"] == VisualKL(estimate="fused", perturbation=P.PatchBlackout(p=0.6, seed=4))
    assert rlcredit.build(strategy.to_spec()) == strategy
    assert rlcredit.get("estimator", "visual_kl") is VisualKL


@pytest.mark.parametrize("preset", ["vppo", "vppo_paper"])
def test_presets_run_on_a_real_vlm(preset):
    model, _ = vlm("qwen2_vl")
    inputs, mask = batch("qwen2_vl")
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 0]), model_inputs=inputs)
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2)
    credit = rlcredit.build(preset).assign(r, policy)
    est = rlcredit.build(preset).estimators["visual"]
    torch.testing.assert_close(credit.scores["visual"], est(r, policy))
    assert torch.all(credit.token_weights[~mask] == 0)
