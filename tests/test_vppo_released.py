"""``vppo_released`` against the transcription of the released VPPO-RL code (tests/vppo_released_reference.py).

Realistic batches: groups of 8 rollouts, binary rewards, responses of 16 to 400 tokens, 80 % of
tokens with ``|d| ~ 1e-3`` (where ``exp(d) - d - 1`` in float32 is all rounding), ratios up to
past the dual clip, several 128-row mini-batches of 16-row micro-batches, a short last one.
Scores, kept tokens, alpha and shaped advantages must be bit-identical; the loss and gradient
differ only by float summation order (the released code sums per micro-batch).
"""

from __future__ import annotations

import math

import pytest
import torch

import rlcredit
from rlcredit import Rollout, SpecError
from rlcredit.shapers import DependencyScale, GroupNormalize
from rlcredit.weighters import TopFraction
from tests import vppo_released_reference as released


def realistic_batch(seed: int, B: int = 256, T: int = 400, G: int = 8, small: float = 0.8) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, T + 1, (B,), generator=g)
    lengths[torch.rand(B, generator=g) < 0.1] = T  # truncated responses
    mask = torch.arange(T)[None] < lengths[:, None]
    old = -torch.empty(B, T).exponential_(2.0, generator=g)
    is_small = torch.rand(B, T, generator=g) < small
    d = torch.where(is_small, 1e-3 * torch.randn(B, T, generator=g), 0.7 * torch.randn(B, T, generator=g))
    aug = (old + d).clamp_max(0.0)
    logp = old + 0.3 * torch.randn(B, T, generator=g)
    logp = logp + 1.5 * (torch.rand(B, T, generator=g) < 0.03)  # ratios past 3: the dual clip
    zero = torch.zeros(())
    old, aug, logp = (torch.where(mask, x, zero) for x in (old, aug, logp))
    rewards = (torch.rand(B, generator=g) < 0.5).float()
    return {"mask": mask, "old": old, "aug": aug, "logp": logp, "rewards": rewards,
            "group_ids": torch.arange(B) // G}


def run_released(t: dict, **kw) -> dict:
    """The transcription on ``t``: GRPO advantages as the trainer computes them, then ``update_policy``."""
    mask = t["mask"].long()
    B, T = mask.shape
    token_rewards = torch.zeros(B, T)
    token_rewards[torch.arange(B), mask.sum(1) - 1] = t["rewards"]  # the reward sits on the last token
    adv, _ = released.compute_grpo_outcome_advantage(token_rewards, mask, t["group_ids"].tolist())
    logp = t["logp"].clone().requires_grad_()
    out = released.update_policy(t["old"], t["aug"], adv, mask, logp, **kw)
    out["grpo"], out["grad"] = adv[:, 0], logp.grad
    return out


def run_ours(t: dict, strategy=None, mini: int = 128) -> dict:
    strategy = strategy or rlcredit.build("vppo_released")
    r = Rollout(t["mask"], t["rewards"], t["group_ids"], old_logprobs=t["old"], signals={"aug_logprobs": t["aug"]})
    credit = strategy.assign(r)
    x = t["logp"].clone().requires_grad_()
    losses = []
    for m0 in range(0, r.batch_size, mini):  # one loss per mini-batch, as the released optimizer steps
        rows = slice(m0, min(r.batch_size, m0 + mini))
        out = strategy.loss(x[rows], r.select(rows), credit.select(rows))
        out.loss.backward()
        losses.append(out.loss.detach())
    alpha = strategy.shapers[1](torch.ones(r.batch_size), credit.scores, r)
    return {"credit": credit, "alpha": alpha, "losses": losses, "grad": x.grad}


@pytest.mark.parametrize("seed,B", [(0, 256), (1, 200), (2, 384)])
def test_vppo_released_equals_the_released_code_bit_for_bit(seed, B):
    t = realistic_batch(seed, B=B)
    want, got = run_released(t), run_ours(t)
    credit, mask = got["credit"], t["mask"]
    S = credit.scores["visual"]
    assert torch.equal(S[mask], want["low_var_kl"][mask]) and not S[~mask].any()
    assert torch.equal(credit.token_weights, want["top_p_mask"])
    assert torch.equal(got["alpha"], want["scaling_factor"])
    # TAS is bit-exact on the trainer's GRPO advantages; rlcredit's own GRPO is within an ulp of
    # verl's (torch.std accumulates in float64, group_normalize in float32).
    assert torch.equal(want["grpo"] * got["alpha"], want["advantages"][:, 0])
    torch.testing.assert_close(credit.advantages, want["advantages"][:, 0], rtol=3e-7, atol=0)
    assert len(got["losses"]) == len(want["losses"]) == math.ceil(B / 128)
    for ours, theirs in zip(got["losses"], want["losses"]):  # summed per micro-batch there
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-8)
    torch.testing.assert_close(got["grad"], want["grad"], rtol=1e-5, atol=1e-9)
    # the checks have teeth: shaping, filtering and both clips are active
    assert (want["scaling_factor"] != 1).sum() > B // 2 and 0.35 < want["top_p_mask"].sum() / mask.sum() < 0.45
    ratio = (t["logp"] - t["old"]).exp()
    assert (mask & (ratio > 3.0) & (credit.advantages[:, None] < 0)).any()


def test_a_micro_batch_at_the_minimum_gets_beta_min():
    """``mu = 0`` in one micro-batch: the released ``mu + 1e-8`` gives every row alpha = beta_min."""
    t = realistic_batch(3, B=128)
    t["aug"][:16] = t["old"][:16]  # d = 0: S = 0 on every token of rows 0-15, the mini-batch minimum
    want, got = run_released(t), run_ours(t)
    assert torch.equal(got["alpha"], want["scaling_factor"])
    assert torch.equal(got["alpha"][:16], torch.full((16,), 0.9))
    vppo = rlcredit.build("vppo", shapers=["group_normalize", {"name": "dependency_scale", "score": "visual",
                                                                "scope": 128, "mean_scope": 16}])
    assert torch.equal(run_ours(t, vppo)["alpha"][:16], torch.ones(16))  # the exact form leaves them at 1


def test_the_float32_count_is_the_released_ceil_for_any_fraction():
    """0.6 of 25 tokens: float32 gives 16, the exact ceil 15; the released ``torch.ceil(n * top_p)`` keeps 16."""
    t = realistic_batch(4, B=128, T=60)
    t["mask"][:, 25:] = False
    t["mask"][0, 25:40] = True  # a longer row
    for k in ("old", "aug", "logp"):
        t[k] = torch.where(t["mask"], t[k], torch.zeros(()))
    want = run_released(t, top_p=0.6)
    s = rlcredit.build("vppo_released", weighter={"name": "top_fraction", "fraction": 0.6, "score": "visual",
                                                  "count": "float32"})
    kept = run_ours(t, s)["credit"].token_weights
    assert torch.equal(kept, want["top_p_mask"])
    assert int(kept[1].sum()) == 16
    exact = rlcredit.build("vppo_released", weighter={"name": "top_fraction", "fraction": 0.6, "score": "visual"})
    assert int(run_ours(t, exact)["credit"].token_weights[1].sum()) == 15


def test_vppo_differs_from_the_release_where_documented():
    """The figures docs/methods/vppo.md quotes (seed 0, 256 rows of 16-400 tokens, 80 % tiny d)."""
    t = realistic_batch(0, B=256)
    want, ours = run_released(t), run_ours(t, rlcredit.build("vppo"))
    mask = t["mask"]
    kept = ours["credit"].token_weights.bool()
    rows = (kept != want["top_p_mask"].bool()).any(1)
    assert int(rows.sum()) >= 200  # expm1 vs exp: most rows keep different low-score tokens
    assert 0 < int((kept != want["top_p_mask"].bool()).sum()) < 0.05 * int(mask.sum())
    gap = (ours["alpha"] - want["scaling_factor"]).abs().max()
    assert 1e-3 < float(gap) < 0.5  # batch-wide min/max and mean vs 128-row and 16-row chunks


def test_vppo_released_composition_and_spec():
    s = rlcredit.build("vppo_released")
    est = s.estimators["visual"]
    assert (est.estimate, est.k3_form, est.stage, type(est.perturbation).__name__) == ("k3", "exp", "image",
                                                                                     "PatchBlackout")
    assert (est.perturbation.p, est.perturbation.patch_size) == (0.5, None)  # 14-px squares on PIL images
    assert s.weighter == TopFraction(0.4, scope="sequence", score="visual", count="float32")
    assert s.shapers == (GroupNormalize(), DependencyScale(score="visual", beta_min=0.9, scope=128, mean_scope=16,
                                                           mean_eps=1e-8))
    assert s.policy_loss == rlcredit.build("vppo").policy_loss
    assert rlcredit.build(s.to_spec()) == s


@pytest.mark.parametrize("build,message", [
    (lambda: TopFraction(0.4, scope="batch", count="float32"), "sequence scope's rounding rule"),
    (lambda: TopFraction(0.4, count="float64"), "count"),
    (lambda: DependencyScale(beta_max=1.1, mean_eps=1e-8), "mean_eps only applies"),
    (lambda: DependencyScale(mean_eps=0.0), "mean_eps"),
    (lambda: rlcredit.build({"estimators": {"v": {"name": "visual_kl", "estimate": "exact", "k3_form": "exp"}}}),
     "k3_form='exp' sets how the k3 estimate is rounded"),
    (lambda: rlcredit.build({"estimators": {"v": {"name": "visual_kl", "stage": "image", "perturbation": "drop"}}}),
     "no apply_pil form"),
    (lambda: rlcredit.build({"estimators": {"v": {"name": "visual_kl", "stage": "processor"}}}), "stage"),
])
def test_combinations_that_make_no_sense_raise_at_construction(build, message):
    with pytest.raises(SpecError, match=message):
        build()


def test_the_kernel_refuses_float32_counts_outside_the_sequence_scope():
    from rlcredit.functional import top_fraction_mask

    with pytest.raises(rlcredit.RLCreditError, match="sequence scope's rounding rule"):
        top_fraction_mask(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), 0.4, "batch", count="float32")
