"""PAPO: the loss terms against a plain loop, the aux API, and the masked inputs on tiny real VLMs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlcredit
from mm_models import make_vlm
from rlcredit.losses import CISPO, GMPO, PAPO, SAPO, ClippedSurrogate
from rlcredit.requirements import Aux, Signal, leaves
from rlcredit_mm.papo import group_keys, papo_masked_image, papo_masked_inputs, papo_masked_logprobs
from tests.losses_reference import ref_papo_terms
from tests.strategies import rollout_tensors


def _grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True)


@settings(max_examples=50)
@given(data=rollout_tensors(max_B=6, max_T=6), gamma=st.sampled_from([0.01, 1.0]), eta=st.sampled_from([0.0, 0.03, 0.5]),
       kl_clip=st.sampled_from([None, 10.0, 0.05]), spread=st.sampled_from([0.5, 30.0]),
       surrogate=st.sampled_from(["clipped_surrogate", "cispo", "sapo"]))
def test_papo_terms_match_plain_loop(data, gamma, eta, kl_clip, spread, surrogate):
    """loss - surrogate's loss = -gamma token_mean(min(k3, clip)) + eta (token_mean(-logp) + token_mean(-m)), both gradients."""
    mask = data["response_mask"]
    g = torch.Generator().manual_seed(0)
    masked_values = torch.where(mask, data["logprobs"] + spread * torch.randn(mask.shape, generator=g), float("nan"))
    r = rlcredit.Rollout(mask, data["rewards"], data["group_ids"], old_logprobs=data["old_logprobs"])
    credit = rlcredit.Credit({}, torch.where(mask, torch.rand(mask.shape, generator=g), 0.0), data["advantages"])
    loss_fn = PAPO(surrogate=surrogate, gamma=gamma, eta=eta, kl_clip=kl_clip)
    logp = data["logprobs"].clone().requires_grad_(True)
    masked = masked_values.clone().requires_grad_(True)
    out = loss_fn(logp, r, credit, aux={"masked_logprobs": masked})
    g_lp, g_m = _grads(out.loss, logp, masked)
    lp2 = data["logprobs"].clone().requires_grad_(True)
    base = loss_fn.surrogate(lp2, r, credit).loss
    (g_base,) = _grads(base, lp2)
    g_base = torch.zeros_like(lp2) if g_base is None else g_base
    loss, ref_lp, ref_m = ref_papo_terms(data["logprobs"].tolist(), masked_values.nan_to_num().tolist(), mask.tolist(),
                                         gamma=gamma, eta=eta, kl_clip=kl_clip)
    assert math.isclose(out.loss.item() - base.item(), loss, rel_tol=1e-4, abs_tol=1e-5)
    torch.testing.assert_close(g_lp - g_base, torch.tensor(ref_lp), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_m, torch.tensor(ref_m), rtol=1e-4, atol=1e-6)  # padding (NaN there): exactly 0
    assert torch.equal(g_m[~mask], torch.zeros(int((~mask).sum())))


def _batch(B=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None] < torch.tensor([5, 3, 1, 4][:B])[:, None]
    old = torch.where(mask, -torch.rand(B, T, generator=g) * 2, 0.0)
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 1.0, 0.5][:B]), torch.tensor([0, 0, 1, 1][:B]), old_logprobs=old,
                         signals={"aug_logprobs": torch.where(mask, old - torch.rand(B, T, generator=g), 0.0)})
    logp = torch.where(mask, old + 0.2 * torch.randn(B, T, generator=g), 0.0)
    masked = torch.where(mask, logp - torch.rand(B, T, generator=g), 0.0)
    return r, logp, masked


def test_signal_form_is_the_released_code():
    """masked='signal' reads rollout.signals['aug_logprobs'] without gradient: the aux form with that tensor detached."""
    r, logp, _ = _batch()
    strategy = rlcredit.build("papo")
    credit = strategy.assign(r)
    code = PAPO(surrogate=strategy.policy_loss.surrogate, gamma=0.01, eta=0.03, masked="signal")
    assert code.requires == (Signal("aug_logprobs"),)
    lp = logp.clone().requires_grad_(True)
    a = code(lp, r, credit)
    lp2 = logp.clone().requires_grad_(True)
    b = strategy.loss(lp2, r, credit, aux={"masked_logprobs": r.signals["aug_logprobs"].clone()})
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(_grads(a.loss, lp)[0], _grads(b.loss, lp2)[0])
    with pytest.raises(rlcredit.RolloutError, match="aug_logprobs"):
        code(lp, rlcredit.Rollout(r.response_mask, r.rewards, r.group_ids), credit)


def test_preset_requires_aux_and_strategy_passes_it():
    r, logp, masked = _batch()
    s = rlcredit.build("papo")
    assert Aux("masked_logprobs") in [leaf for req in s.requirements for leaf in leaves(req)]
    assert rlcredit.build(s.to_spec()) == s
    assert s.to_spec()["policy_loss"] == {"name": "papo", "surrogate": {"name": "clipped_surrogate", "clip_high": 0.28},
                                          "eta": 0.03}
    credit = s.assign(r)  # no aux at assign time
    with pytest.raises(rlcredit.RolloutError, match=r"needs aux\['masked_logprobs'\]"):
        s.loss(logp, r, credit)
    with pytest.raises(rlcredit.RolloutError, match="must be a floating"):
        s.loss(logp, r, credit, aux={"masked_logprobs": masked[:, :3]})
    with pytest.raises(rlcredit.RolloutError, match="not read by the policy loss"):
        s.loss(logp, r, credit, aux={"masked_logprobs": masked, "typo": masked})
    with pytest.raises(rlcredit.RolloutError, match="reads no aux"):
        rlcredit.build("dapo").loss(logp, r, credit, aux={"masked_logprobs": masked})
    lp, m = logp.clone().requires_grad_(True), masked.clone().requires_grad_(True)
    out = s.loss(lp, r, credit, aux={"masked_logprobs": m})
    g_lp, g_m = _grads(out.loss, lp, m)
    assert bool((g_m[r.response_mask] != 0).all())  # the gradient reaches the masked run
    assert set(out.metrics) >= {"pg_loss", "clip_fraction", "perception_kl", "entropy", "masked_entropy"}
    assert out.metrics["perception_kl"] > 0


def test_micro_batches_with_totals_and_aux_add_up():
    r, logp, masked = _batch()
    s = rlcredit.build("papo", policy_loss={"name": "papo", "surrogate": "sapo", "eta": 0.1})
    credit = s.assign(r)
    lp, m = logp.clone().requires_grad_(True), masked.clone().requires_grad_(True)
    whole = s.loss(lp, r, credit, aux={"masked_logprobs": m}).loss
    totals = s.policy_loss.totals(r, credit)
    assert totals.tokens is not None and totals.rows is not None  # the terms' and the surrogate's statistics
    parts = sum(s.loss(lp[rows], r.select(rows), credit.select(rows), totals=totals,
                       aux={"masked_logprobs": m[rows]}).loss for rows in ([0], [1, 2], [3]))
    torch.testing.assert_close(parts, whole)
    for a, b in zip(_grads(parts, lp, m), _grads(whole, lp, m)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("surrogate", [ClippedSurrogate(kl_coef=0.1), CISPO(), SAPO(), GMPO(), "kl_cov",
                                       {"name": "papo", "gamma": 0.5}])
def test_composes_with_any_surrogate(surrogate):
    r, logp, masked = _batch()
    r = rlcredit.Rollout(r.response_mask, r.rewards, r.group_ids, old_logprobs=r.old_logprobs,
                         ref_logprobs=r.old_logprobs, signals=r.signals)
    loss_fn = PAPO(surrogate=surrogate, gamma=0.02, eta=0.03)
    s = rlcredit.Strategy(policy_loss=loss_fn)
    credit = s.assign(r)
    lp, m = logp.clone().requires_grad_(True), masked.clone().requires_grad_(True)
    out = s.loss(lp, r, credit, aux={"masked_logprobs": m})
    lp2, m2 = logp.clone().requires_grad_(True), masked.clone().requires_grad_(True)
    inner = loss_fn.surrogate
    extra = {"aux": {"masked_logprobs": m2}} if isinstance(inner, PAPO) else {}
    base = inner(lp2, r, credit, **extra).loss
    loss, ref_lp, ref_m = ref_papo_terms(logp.tolist(), masked.tolist(), r.response_mask.tolist(), gamma=0.02, eta=0.03,
                                         kl_clip=10.0)
    assert math.isclose(out.loss.item(), base.item() + loss, rel_tol=1e-5, abs_tol=1e-6)
    g_base = _grads(base, lp2, m2)
    g = _grads(out.loss, lp, m)
    torch.testing.assert_close(g[0], g_base[0] + torch.tensor(ref_lp), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g[1], (0 if g_base[1] is None else g_base[1]) + torch.tensor(ref_m), rtol=1e-5, atol=1e-6)


def test_bad_parameters():
    for bad in (dict(gamma=-1.0), dict(eta=float("nan")), dict(kl_clip=0.0), dict(masked="both"),
                dict(aggregation="sum"), dict(surrogate="no_such_loss")):
        with pytest.raises((rlcredit.SpecError, rlcredit.RegistryError)):
            PAPO(**bad)


# --- masked inputs on tiny real VLMs ----------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen():
    return make_vlm("qwen2_vl")


def test_masked_inputs_on_qwen_flattened_patches(qwen):
    """Qwen2-VL's pixels are flattened patches of images of different sizes: whole patches are blackened."""
    model, make_inputs = qwen
    inputs, mask = make_inputs(B=4, P_text=3, T=4, seed=0, images=[1, 1, 1, 1])
    px, thw = inputs["pixel_values"], inputs["image_grid_thw"]
    assert len({tuple(x) for x in thw.tolist()}) > 1
    out = papo_masked_inputs(inputs, model, torch.tensor([5, 5, 9, 9]))["pixel_values"]
    assert out.shape == px.shape and not torch.equal(out, px)
    black = rlcredit.get("adapter", "qwen2_vl")().black(model.config)
    hit = torch.isclose(out.view(out.shape[0], 3, -1), black.view(1, 3, 1)).all(-1).all(-1)  # blackened patches
    assert 0.3 < hit.float().mean() < 0.9  # p = 0.6 per square
    again = papo_masked_inputs(inputs, model, torch.tensor([5, 5, 9, 9]))["pixel_values"]
    assert torch.equal(again, out)  # a pure function of (seed, group id)
    seeded = papo_masked_inputs(inputs, model, torch.tensor([5, 5, 9, 9]), seed=1)["pixel_values"]
    assert not torch.equal(seeded, out)


def test_masked_inputs_rows_of_a_group_get_identical_images():
    model, make_inputs = make_vlm("llava")
    inputs, _ = make_inputs(B=4, P_text=2, T=3, seed=1)
    inputs["pixel_values"] = inputs["pixel_values"][:1].expand(4, -1, -1, -1).clone()
    out = papo_masked_inputs(inputs, model, torch.tensor([2, 2, 2, 7]))["pixel_values"]
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2]) and not torch.equal(out[0], out[3])
    # Square-aligned: each patch is either untouched or entirely black.
    patch = model.config.vision_config.patch_size
    black = rlcredit.get("adapter", "llava")().black(model.config)
    original = inputs["pixel_values"][0].unfold(1, patch, patch).unfold(2, patch, patch)  # [C, h, w, p, p]
    blackened = 0
    for row in (0, 3):
        cells = out[row].unfold(1, patch, patch).unfold(2, patch, patch)
        is_black = torch.isclose(cells, black.view(3, 1, 1, 1, 1)).all(-1).all(-1).all(0)
        untouched = (cells == original).all(-1).all(-1).all(0)
        assert bool((is_black | untouched).all())
        blackened += int(is_black.sum())
    assert blackened > 0


def test_blackout_probability_is_p():
    keys = group_keys(torch.arange(400))
    from rlcredit_mm.perturb import PatchBlackout

    out = PatchBlackout(p=0.6).perturb_images(torch.ones(400, 1, 40, 40), keys, black=torch.zeros(1), patch_size=4)
    share = (out == 0).float().mean().item()
    assert abs(share - 0.6) < 0.01  # 40 000 squares


def test_masked_image_pil_is_seeded_by_group():
    from PIL import Image

    img = Image.new("RGB", (70, 42), (200, 100, 50))
    a = papo_masked_image(img, 3)
    assert a.size == img.size and a.tobytes() == papo_masked_image(img, 3).tobytes()
    assert a.tobytes() != papo_masked_image(img, 4).tobytes()


def test_masked_logprobs_have_gradient_and_drive_the_papo_preset(qwen):
    model, make_inputs = qwen
    model = model.train()
    inputs, mask = make_inputs(B=4, P_text=3, T=4, seed=2, lengths=[4, 2, 3, 1])
    policy = rlcredit.HFPolicy(model, rows_per_chunk=3)
    groups = torch.tensor([0, 0, 1, 1])
    masked = papo_masked_logprobs(policy, inputs, mask, groups)
    assert masked.requires_grad and masked.shape == mask.shape
    with torch.no_grad():  # the same numbers as a plain forward on the masked inputs
        manual = policy.response_stats(papo_masked_inputs(inputs, model, groups), mask).logprobs
    torch.testing.assert_close(masked.detach(), manual, rtol=1e-5, atol=1e-5)
    logp = policy.logprobs(inputs, mask)
    assert not torch.allclose(masked.detach(), logp.detach())  # the image matters in this model
    ids = inputs["input_ids"][:, -mask.shape[1]:]
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 0.0, 1.0]), groups,
                         old_logprobs=(logp.detach() - 0.05).where(mask, 0.0), response_ids=ids * mask)
    s = rlcredit.build("papo")
    out = s.loss(logp, r, s.assign(r), aux={"masked_logprobs": masked})
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    vision = [p.grad for n, p in model.named_parameters() if "visual" in n and p.grad is not None]
    assert vision and any(bool((g != 0).any()) for g in vision)  # the perception term reaches the vision tower
    model.zero_grad()
    model.eval()


def test_padding_gets_no_gradient_and_extremes_stay_finite():
    r, logp, masked = _batch()
    pad = ~r.response_mask
    credit = rlcredit.build("papo").assign(r)
    for gap in (0.0, 1e4, -1e4):  # masked - logp far beyond the clamp and the cap
        lp = torch.where(pad, float("nan"), logp).requires_grad_(True)
        m = torch.where(pad, float("inf"), logp + gap).requires_grad_(True)
        out = PAPO(surrogate="cispo", gamma=1.0, eta=0.5)(lp, r, credit, aux={"masked_logprobs": m})
        g_lp, g_m = _grads(out.loss, lp, m)
        assert torch.isfinite(out.loss) and torch.isfinite(g_lp).all() and torch.isfinite(g_m).all()
        assert not bool(g_lp[pad].any()) and not bool(g_m[pad].any())
