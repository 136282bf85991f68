"""ClippedSurrogate's one surrogate path against the composition it replaces; totals; selection.

``ClippedSurrogate`` computes its loss and gradient in a custom autograd function
(``rlcredit.functional._loss.surrogate_loss``) for the token and the sequence (GSPO) ratio alike;
the reference here is the plain autograd composition ``aggregate(clipped_surrogate(...)) +
kl_coef * aggregate(k3) + entropy_penalty * aggregate(-logp)`` that it must equal in value and
gradient. Micro-batches aggregated under the whole batch's ``Totals`` add up to the whole loss.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlcredit
from rlcredit import functional as F
from rlcredit.functional import loss_coefficients
from rlcredit.functional._loss import surrogate_loss
from rlcredit.losses import AGGREGATIONS, ClippedSurrogate
from tests.strategies import right_padded_mask, rollout_tensors


def _reference(lp, rollout, credit, loss_fn):
    """The unfused composition, with autograd; also returns the per-token is_clipped."""
    mask = rollout.response_mask
    old = rollout.old_logprobs if rollout.old_logprobs is not None else lp.detach()
    per_token, clipped = F.clipped_surrogate(lp, old, credit.advantages, clip_low=loss_fn.clip_low,
                                             clip_high=loss_fn.clip_high, dual_clip=loss_fn.dual_clip)
    kw = {"mode": loss_fn.aggregation, "max_length": loss_fn.max_length}
    pg = F.aggregate(per_token, mask, credit.token_weights, renormalize=loss_fn.renormalize, **kw)
    loss = pg
    if loss_fn.kl_coef > 0:
        loss = loss + loss_fn.kl_coef * F.aggregate(F.k3_kl(lp, rollout.ref_logprobs), mask, **kw)
    neg = F.aggregate(-lp.float(), mask, **kw)
    if loss_fn.entropy_penalty > 0:
        loss = loss + loss_fn.entropy_penalty * neg
    return loss, pg, neg, clipped & mask


def _boundary(lp, old, loss_fn, adv):
    """Tokens whose ratio sits within 1e-4 of a clip bound (float32 and the reference may differ)."""
    rho = (lp.detach().double() - old.double()).clamp(-20, 20).exp()
    near = ((rho - (1 - loss_fn.clip_low)).abs() < 1e-4) | ((rho - (1 + loss_fn.clip_high)).abs() < 1e-4)
    if loss_fn.dual_clip is not None:
        near |= (rho - loss_fn.dual_clip).abs() < 1e-4
    return near


@settings(max_examples=60, deadline=None)
@given(
    data=rollout_tensors(max_B=7, max_T=7),
    mode=st.sampled_from(AGGREGATIONS),
    renormalize=st.booleans(),
    clips=st.sampled_from([(0.2, 0.2), (0.2, 0.28), (0.1, 0.5), (0.0, 0.0)]),
    dual=st.sampled_from([None, 1.5, 3.0]),
    entropy=st.sampled_from([0.0, 0.06]),
    kl=st.sampled_from([0.0, 0.1]),
    per_token_adv=st.booleans(),
    weights=st.sampled_from(["ones", "binary", "soft", "padding_not_zero"]),
    padding=st.sampled_from(["finite", "nan", "-inf"]),
    on_policy=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    credit_dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_clipped_surrogate_equals_the_unfused_composition(data, mode, renormalize, clips, dual, entropy, kl,
                                                          per_token_adv, weights, padding, on_policy, dtype,
                                                          credit_dtype):
    if renormalize and mode in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
        renormalize = False
    mask = data["response_mask"]
    B, T = mask.shape
    g = torch.Generator().manual_seed(B * 31 + T)
    old = data["old_logprobs"]
    lp0 = (old + 0.4 * torch.randn(B, T, generator=g)).to(dtype)
    if padding != "finite":
        lp0 = torch.where(mask, lp0, torch.full((), float(padding), dtype=dtype))
    ref_lp = torch.where(mask, old - 0.3, torch.zeros(()))
    rollout = rlcredit.Rollout(mask, data["rewards"], data["group_ids"], old_logprobs=None if on_policy else old,
                               ref_logprobs=ref_lp)
    w = {"ones": torch.ones(B, T), "binary": (torch.rand(B, T, generator=g) < 0.6).float(),
         "soft": torch.rand(B, T, generator=g), "padding_not_zero": 1 + torch.rand(B, T, generator=g)}[weights]
    if weights != "padding_not_zero":  # a hand-made Credit may break the 0-on-padding contract: ignored
        w = w * mask
    adv = torch.randn(B, T, generator=g) if per_token_adv else data["advantages"]
    w, adv = w.to(credit_dtype), adv.to(credit_dtype)  # any float dtype: maths in float32
    credit = rlcredit.Credit({}, w, adv)
    loss_fn = ClippedSurrogate(clip_low=clips[0], clip_high=clips[1], dual_clip=dual, aggregation=mode,
                               renormalize=renormalize, kl_coef=kl, entropy_penalty=entropy)

    lp = lp0.clone().requires_grad_(True)
    out = loss_fn(lp, rollout, credit)
    lp_ref = lp0.clone().requires_grad_(True)
    ref, ref_pg, ref_neg, ref_clipped = _reference(lp_ref, rollout, credit, loss_fn)

    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.metrics["pg_loss"], ref_pg.detach(), atol=1e-5, rtol=1e-5)
    if entropy > 0:
        torch.testing.assert_close(out.metrics["neg_logprob"], ref_neg.detach(), atol=1e-5, rtol=1e-5)
    grad, = torch.autograd.grad(out.loss, lp)
    ref_grad, = torch.autograd.grad(ref, lp_ref)
    assert grad.dtype == dtype
    assert (grad[~mask] == 0).all(), "padding gets exactly zero gradient, even when its log-prob is NaN"
    eval_old = old if not on_policy else lp0.float()
    far = ~_boundary(lp0.float(), eval_old, loss_fn, adv) & mask
    tol = 1e-2 if torch.bfloat16 in (dtype, credit_dtype) else 1e-5
    torch.testing.assert_close(grad[far].float(), ref_grad[far].float(), atol=tol, rtol=tol)
    if not _boundary(lp0.float(), eval_old, loss_fn, adv)[mask].any():
        n = mask.sum().clamp_min(1)
        torch.testing.assert_close(out.metrics["clip_fraction"], ref_clipped.sum() / n, atol=1e-6, rtol=0)


def test_a_nan_log_prob_on_a_valid_token_gives_a_nan_loss():
    mask = right_padded_mask([3, 2], 3)
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), old_logprobs=torch.full((2, 3), -1.0))
    lp = torch.tensor([[-1.0, float("nan"), -1.0], [-1.0, -1.0, float("nan")]], requires_grad=True)
    out = ClippedSurrogate()(lp, r, rlcredit.Credit({}, mask.float(), torch.tensor([1.0, -1.0])))
    assert torch.isnan(out.loss)  # the NaN at [1, 2] is padding; the one at [0, 1] is not


def test_surrogate_gradient_golden_and_no_grad_call():
    mask = right_padded_mask([2, 2], 2)
    m = mask.float()
    old = torch.zeros(2, 2)
    lp = torch.log(torch.tensor([[1.1, 1.5], [0.5, 5.0]]))
    adv = torch.tensor([2.0, -1.0])
    c = m / 4  # token_mean over 4 tokens
    kw = dict(clip_low=0.2, clip_high=0.2, dual_clip=3.0, entropy_penalty=2.0, entropy_coefficients=c)
    x = lp.clone().requires_grad_(True)
    loss, pg, neg_logp, active = surrogate_loss(x, lp - old, adv, c, mask, **kw)
    # A = 2: rho 1.1 kept (-2.2), 1.5 clipped at 1.2 (-2.4); A = -1: rho 0.5 clipped at 0.8 (0.8), 5 dual-capped (3).
    torch.testing.assert_close(pg, torch.tensor((-2.2 - 2.4 + 0.8 + 3.0) / 4))
    torch.testing.assert_close(neg_logp, -lp.sum() / 4)
    torch.testing.assert_close(loss, pg + 2.0 * neg_logp)
    assert torch.equal(active, torch.tensor([[True, False], [False, False]]))
    assert not pg.requires_grad and not neg_logp.requires_grad and loss.requires_grad
    loss.backward()
    torch.testing.assert_close(x.grad, torch.tensor([[-2.2 / 4, 0.0], [0.0, 0.0]]) - 2.0 * m / 4)
    with torch.no_grad():  # no graph: the gradient buffer is never built, same value
        loss2, _, _, _ = surrogate_loss(lp, lp - old, adv, c, mask, **kw)
    torch.testing.assert_close(loss2, loss.detach())
    z = lp.clone().requires_grad_(True)  # retain_graph, twice, and a scaled loss: the saved gradient is reused intact
    out, _, _, _ = surrogate_loss(z, lp - old, adv, c, mask, **kw)
    (g1,) = torch.autograd.grad(out, z, retain_graph=True)
    (g2,) = torch.autograd.grad(out, z, retain_graph=True)
    (g3,) = torch.autograd.grad(-0.5 * out, z, retain_graph=True)
    out.backward(retain_graph=True)
    out.backward()
    for g in (g1, g2, -2 * g3, z.grad / 2):
        torch.testing.assert_close(g, x.grad)
    with pytest.raises(RuntimeError):  # differentiable once: a second derivative raises, not a silent 0
        y = lp.clone().requires_grad_(True)
        out, _, _, _ = surrogate_loss(y, lp - old, adv, c, mask, clip_low=0.2, clip_high=0.2)
        (g,) = torch.autograd.grad(out, y, create_graph=True)
        g.sum().backward()


@settings(max_examples=40, deadline=None)
@given(data=rollout_tensors(max_B=8, max_T=6), preset=st.sampled_from(["grpo", "dr_grpo", "vppo", "stapo", "gspo"]),
       mode=st.sampled_from(AGGREGATIONS), cut=st.integers(1, 7))
def test_micro_batches_under_the_batch_totals_add_up_to_the_batch_loss(data, preset, mode, cut):
    mask = data["response_mask"]
    B, T = mask.shape
    g = torch.Generator().manual_seed(B * 13 + T)
    signals = {"entropy": 2 * torch.rand(B, T, generator=g), "aug_logprobs": data["old_logprobs"] - 0.5 * torch.rand(B, T, generator=g)}
    r = rlcredit.Rollout(mask, data["rewards"], data["group_ids"], old_logprobs=data["old_logprobs"], signals=signals)
    renormalize = preset == "stapo" and mode in ("token_mean", "seq_mean_token_mean")
    loss_spec = {"name": "gspo" if preset == "gspo" else "clipped_surrogate", "aggregation": mode,
                 "renormalize": renormalize, "entropy_penalty": 0.06 if preset == "vppo" else 0.0}
    s = rlcredit.build("grpo" if preset == "gspo" else preset, policy_loss=loss_spec)
    credit = s.assign(r)
    lp = data["logprobs"].clone().requires_grad_(True)
    whole = s.loss(lp, r, credit).loss
    (whole_grad,) = torch.autograd.grad(whole, lp)
    totals = s.policy_loss.totals(r, credit)
    lp2 = data["logprobs"].clone().requires_grad_(True)
    parts = []
    for rows in (torch.arange(0, min(cut, B)), torch.arange(min(cut, B), B)):
        if rows.numel():
            parts.append(s.loss(lp2[rows], r.select(rows), credit.select(rows), totals=totals).loss)
    total = sum(parts)
    total.backward()
    torch.testing.assert_close(total, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lp2.grad, whole_grad, atol=1e-6, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(data=rollout_tensors(max_B=6, max_T=6, min_B=0), mode=st.sampled_from(AGGREGATIONS), weighted=st.booleans(),
       renormalize=st.booleans())
def test_loss_coefficients_are_the_linear_form_of_aggregate(data, mode, weighted, renormalize):
    if renormalize and mode in ("seq_mean_token_sum", "seq_mean_token_sum_norm"):
        renormalize = False
    mask = data["response_mask"]
    x = data["logprobs"]
    w = data["scores"] * mask if weighted else None
    c = loss_coefficients(mask, w, mode=mode, renormalize=renormalize)
    assert (c[~mask] == 0).all()
    torch.testing.assert_close((c * x).sum(), F.aggregate(x, mask, w, mode=mode, renormalize=renormalize),
                               atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ selection


@pytest.mark.parametrize("tied", [False, True])
def test_sequence_top_fast_path_and_tie_path_agree_with_a_stable_sort(tied):
    g = torch.Generator().manual_seed(3)
    mask = right_padded_mask([7, 5, 1, 0, 7], 7)
    scores = torch.randint(0, 3, (5, 7), generator=g).float() if tied else torch.rand(5, 7, generator=g)
    scores = scores * mask
    keep = F.top_fraction_mask(scores, mask, 0.4)
    for i in range(5):
        n = int(mask[i].sum())
        k = -(-2 * n // 5) if n else 0
        order = torch.sort(scores[i, :n], descending=True, stable=True).indices[:k]
        expect = torch.zeros(7, dtype=torch.bool)
        expect[order] = True
        assert torch.equal(keep[i], expect), (i, scores[i], keep[i])


def test_sequence_top_ranks_float64_scores_by_their_float32_keys():
    # 1 - 1e-11 and 1 are one float32 value: a tie, which goes to the earlier token.
    scores = torch.tensor([[1.0 - 1e-11, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert F.top_fraction_mask(scores, mask, 1 / 3).tolist() == [[True, False, False]]
    # +inf ranks as the largest finite float32; NaN and -inf as the lowest (a tie: the earlier wins)
    scores = torch.tensor([[float("nan"), float("inf"), float("-inf"), 0.5, 2.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    assert F.top_fraction_mask(scores, mask, 0.5).tolist() == [[False, True, False, True, False]]
    assert F.top_fraction_mask(scores, mask, 0.75).tolist() == [[True, True, False, True, False]]


def test_the_loss_masks_hand_made_weights_on_padding():
    mask = right_padded_mask([3, 1], 3)
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), old_logprobs=torch.zeros(2, 3))
    credit = rlcredit.build("grpo").assign(r)
    assert (credit.token_weights[~mask] == 0).all()
    lp = torch.full((2, 3), -0.1, requires_grad=True)
    from_assign = ClippedSurrogate()(lp, r, credit)
    by_hand = ClippedSurrogate()(lp, r, rlcredit.Credit({}, torch.ones(2, 3), credit.advantages))
    torch.testing.assert_close(from_assign.loss, by_hand.loss)  # the hand-made Credit's padding weights are ignored
    assert float(by_hand.metrics["kept_fraction"]) == 1.0  # not 6 / 4: padding weight is not "kept"
