"""entropy_forks, vppo, vppo_paper, at_rl and stapo against plain-loop references of METHODS.md.

Each reference is written with Python lists from the recipe's text (TRL's quantile rule, VPPO's k3
score / TGF / TAS / loss, STAPO's filter), independent of the library's kernels. The multimodal
presets resolve ``visual_kl``, ``attention_connectivity`` and ``anchor_clusters`` from
``rlcredit_mm`` by registry name.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import rlcredit
from rlcredit import Rollout, RolloutError
from rlcredit.estimators import Signal
from rlcredit.shapers import DependencyScale
from rlcredit.weighters import TopFraction
from tests.strategies_credit import (
    clear_advantage_signs, credit_batches, ref_group_normalize, ref_stapo, ref_tas_bounded, ref_tas_code,
    ref_top_batch_trl, ref_top_sequence,
)


def _needs(kind: str, name: str) -> None:
    if name not in rlcredit.available(kind):
        pytest.skip(f"{kind} {name!r} comes from rlcredit_mm, which does not register it in this checkout")


def ref_loss(logp, old, mask, adv, w, *, clip_low, clip_high, dual_clip=None, entropy_penalty=0.0,
             renormalize=False):
    """Token-mean clipped surrogate (+ dual clip, + c * mean(-logp)) and its gradient, by plain loops."""
    B, T = len(mask), len(mask[0])
    n = sum(map(sum, mask))
    den = sum(w[i][t] for i in range(B) for t in range(T) if mask[i][t]) if renormalize else n
    den = den if den > 0 else 1.0
    nn = n if n > 0 else 1
    total, grad = 0.0, [[0.0] * T for _ in range(B)]
    for i in range(B):
        a = adv[i]
        for t in range(T):
            if not mask[i][t]:
                continue
            rho = math.exp(logp[i][t] - old[i][t])
            unclipped, clipped = -rho * a, -min(max(rho, 1 - clip_low), 1 + clip_high) * a
            l, g = (clipped, 0.0) if clipped > unclipped else (unclipped, -rho * a)
            if dual_clip is not None and a < 0 and -dual_clip * a < l:
                l, g = -dual_clip * a, 0.0
            total += w[i][t] * l / den + entropy_penalty * -logp[i][t] / nn
            grad[i][t] = w[i][t] * g / den - entropy_penalty / nn
    return total, grad


def _run(strategy, t, logp, **signals):
    r = Rollout(t["response_mask"], t["rewards"], t["group_ids"], old_logprobs=t["old_logprobs"], signals=signals)
    credit = strategy.assign(r)
    x = logp.clone().requires_grad_()
    out = strategy.loss(x, r, credit)
    out.loss.backward()
    return credit, out, x.grad


def _logp(t, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return (t["old_logprobs"] + scale * torch.randn(t["old_logprobs"].shape, generator=g)).clamp_max(0.0)


def _assert_matches(out, grad, expected_loss, expected_grad):
    assert out.loss.item() == pytest.approx(expected_loss, abs=1e-5, rel=1e-4)
    assert torch.allclose(grad.double(), torch.tensor(expected_grad, dtype=torch.float64), atol=1e-5, rtol=1e-4)


# --- entropy_forks --------------------------------------------------------------------------------


@given(t=credit_batches(), seed=st.integers(0, 10_000))
def test_entropy_forks_matches_trl_rule_on_a_dapo_base(t, seed):
    mask, H = t["response_mask"], t["scores"]  # scores are >= 0 and often tied: a fine entropy
    logp = _logp(t, seed)
    credit, out, grad = _run(rlcredit.build("entropy_forks"), t, logp, entropy=H)
    w = ref_top_batch_trl(H, mask, 0.2).float()  # TRL: quantile(valid H, 1 - 0.2), linear, keep >=
    adv = ref_group_normalize(t["rewards"].tolist(), t["group_ids"].tolist())
    assert torch.equal(credit.token_weights, w)
    assert torch.allclose(credit.advantages, torch.tensor(adv), atol=1e-5)
    loss, g = ref_loss(logp.tolist(), t["old_logprobs"].tolist(), mask.tolist(), adv, w.tolist(),
                       clip_low=0.2, clip_high=0.28)
    _assert_matches(out, grad, loss, g)


def test_entropy_forks_names_its_score_and_needs_entropy():
    s = rlcredit.build("entropy_forks")
    assert set(s.estimators) == {"entropy"}
    assert s.weighter == TopFraction(0.2, scope="batch", score="entropy")
    assert (s.policy_loss.clip_low, s.policy_loss.clip_high, s.policy_loss.aggregation) == (0.2, 0.28, "token_mean")
    r = Rollout(torch.ones(1, 2, dtype=torch.bool), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    with pytest.raises(RolloutError, match=r"estimator 'entropy' needs rollout.signals\['entropy'\] or \(a policy and rollout.model_inputs\)"):
        s.assign(r)


# --- vppo -----------------------------------------------------------------------------------------


def ref_k3(aug, old, mask):
    out = []
    for i in range(len(mask)):
        row = []
        for t in range(len(mask[0])):
            d = max(-20.0, min(20.0, aug[i][t] - old[i][t]))
            row.append(min(max(math.exp(d) - d - 1, 0.0), 10.0) if mask[i][t] else 0.0)
        out.append(row)
    return out


def _vppo_reference(t, logp, S, *, tas):
    """TGF (top 40 % per response) + GRPO advantages times TAS alpha + the released loss."""
    mask = t["response_mask"].tolist()
    w = ref_top_sequence(S, mask, 0.4)
    adv = ref_group_normalize(t["rewards"].tolist(), t["group_ids"].tolist())
    mean_s = [sum(S[i][k] for k in range(len(S[i])) if mask[i][k]) / max(1, sum(mask[i])) for i in range(len(S))]
    alpha = tas(mean_s, [any(m) for m in mask], t["group_ids"].tolist())
    shaped = [a * al for a, al in zip(adv, alpha)]
    loss, grad = ref_loss(logp.tolist(), t["old_logprobs"].tolist(), mask, shaped, w, clip_low=0.2, clip_high=0.28,
                          dual_clip=3.0, entropy_penalty=0.06)
    return w, shaped, loss, grad


@given(t=credit_batches(), seed=st.integers(0, 10_000), spread=st.sampled_from([0.05, 1.0, 30.0]))
def test_vppo_matches_the_released_recipe_from_precomputed_aug_logprobs(t, seed, spread):
    _needs("estimator", "visual_kl")
    g = torch.Generator().manual_seed(seed)
    aug = t["old_logprobs"] + spread * torch.randn(t["old_logprobs"].shape, generator=g)  # spread 30 hits the clamps
    logp = _logp(t, seed + 1)
    credit, out, grad = _run(rlcredit.build("vppo"), t, logp, aug_logprobs=aug)
    S = credit.scores["visual"]
    expected_S = ref_k3(aug.tolist(), t["old_logprobs"].tolist(), t["response_mask"].tolist())
    assert torch.allclose(S.double(), torch.tensor(expected_S, dtype=torch.float64), rtol=1e-4, atol=1e-5)
    # The rest of the reference runs on the library's float32 S, so ulp-level near-ties rank alike.
    w, adv, loss, g = _vppo_reference(t, logp, S.tolist(), tas=lambda s, v, gid: ref_tas_code(s, v, gid, beta_min=0.9))
    assert credit.token_weights.tolist() == w
    assert torch.allclose(credit.advantages, torch.tensor(adv), rtol=1e-4, atol=1e-5)
    _assert_matches(out, grad, loss, g)
    n = max(1, int(t["response_mask"].sum()))
    assert out.metrics["neg_logprob"].item() == pytest.approx(-logp[t["response_mask"]].sum().item() / n, abs=1e-5)


def test_vppo_composition_and_spec():
    _needs("estimator", "visual_kl")
    s = rlcredit.build("vppo")
    assert set(s.estimators) == {"visual"} and type(s.estimators["visual"]).__name__ == "VisualKL"
    assert s.estimators["visual"].estimate == "k3"
    assert s.to_spec() == {
        "estimators": {"visual": "visual_kl"},
        "weighter": {"name": "top_fraction", "fraction": 0.4, "score": "visual"},
        "shapers": ["group_normalize", {"name": "dependency_scale", "score": "visual"}],
        "policy_loss": {"name": "clipped_surrogate", "clip_high": 0.28, "dual_clip": 3.0, "entropy_penalty": 0.06},
    }
    assert rlcredit.build(s.to_spec()) == s


@given(t=credit_batches(), seed=st.integers(0, 10_000))
def test_vppo_paper_matches_bounded_group_shaping(t, seed):
    """The paper's exact KL needs a VLM, so the score comes from a signal; the rest is the preset's."""
    _needs("estimator", "visual_kl")
    s = rlcredit.build("vppo_paper", estimators={"visual": Signal("kl")})
    logp = _logp(t, seed)
    credit, out, grad = _run(s, t, logp, kl=t["scores"])
    tas = lambda m, v, gid: ref_tas_bounded(m, v, gid, beta_min=0.9, beta_max=1.1, scope="group")  # noqa: E731
    w, adv, loss, g = _vppo_reference(t, logp, credit.scores["visual"].tolist(), tas=tas)
    assert credit.token_weights.tolist() == w
    assert torch.allclose(credit.advantages, torch.tensor(adv), rtol=1e-4, atol=1e-5)
    _assert_matches(out, grad, loss, g)


def test_vppo_paper_composition():
    _needs("estimator", "visual_kl")
    s = rlcredit.build("vppo_paper")
    assert s.estimators["visual"].estimate == "exact"
    assert s.shapers[1] == DependencyScale(score="visual", beta_min=0.9, beta_max=1.1, scope="group")
    assert (s.weighter, s.policy_loss) == (rlcredit.build("vppo").weighter, rlcredit.build("vppo").policy_loss)
    assert rlcredit.build(s.to_spec()) == s


def test_multimodal_presets_resolve_estimators_lazily_by_name():
    code = (
        "import sys, rlcredit\n"
        "assert 'rlcredit_mm' not in sys.modules, 'the core imported rlcredit_mm'\n"
        "s = rlcredit.build('vppo')\n"
        "assert 'rlcredit_mm' in sys.modules and type(s.estimators['visual']).__module__.startswith('rlcredit_mm')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- at_rl ----------------------------------------------------------------------------------------


def test_at_rl_composition():
    _needs("estimator", "attention_connectivity")
    _needs("weighter", "anchor_clusters")
    s = rlcredit.build("at_rl")
    assert set(s.estimators) == {"connectivity"}
    assert type(s.estimators["connectivity"]).__name__ == "AttentionConnectivity"
    assert s.to_spec()["weighter"] == {"name": "anchor_clusters", "score": "connectivity"}
    assert s.to_spec()["policy_loss"] == rlcredit.build("dapo").to_spec()["policy_loss"]
    assert rlcredit.build(s.to_spec()) == s


@given(t=credit_batches(max_T=12), seed=st.integers(0, 10_000))
def test_at_rl_is_dapo_with_anchor_weights(t, seed):
    """A_{i,t} = W(C_k) A_i folded as token weights into DAPO's token-mean loss (connectivity from a signal)."""
    _needs("weighter", "anchor_clusters")
    s = rlcredit.build("at_rl", estimators={"connectivity": Signal("c")})
    logp = _logp(t, seed)
    credit, out, grad = _run(s, t, logp, c=t["scores"])
    mask = t["response_mask"]
    w = credit.token_weights
    assert set(w[mask].unique().tolist()) <= {1.0, 1.5} and bool((w[~mask] == 0).all())
    adv = ref_group_normalize(t["rewards"].tolist(), t["group_ids"].tolist())
    loss, g = ref_loss(logp.tolist(), t["old_logprobs"].tolist(), mask.tolist(), adv, w.tolist(),
                       clip_low=0.2, clip_high=0.28)
    _assert_matches(out, grad, loss, g)


# --- stapo ----------------------------------------------------------------------------------------


@given(t=credit_batches(), seed=st.integers(0, 10_000))
def test_stapo_preset_masks_spurious_tokens_and_renormalises(t, seed):
    g = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(t["old_logprobs"].shape, generator=g) * 0.004 + 1e-6)  # about half below 0.002
    t = dict(t, old_logprobs=old)
    rewards, groups = t["rewards"].tolist(), t["group_ids"].tolist()
    assume(clear_advantage_signs(rewards, groups))
    logp = (old + 0.3 * torch.randn(old.shape, generator=g)).clamp_max(0.0)
    credit, out, grad = _run(rlcredit.build("stapo"), t, logp, entropy=t["scores2"])
    mask = t["response_mask"].tolist()
    w = ref_stapo(rewards, groups, old.tolist(), t["scores2"].tolist(), mask)
    assert credit.token_weights.tolist() == w
    adv = ref_group_normalize(rewards, groups)
    loss, gr = ref_loss(logp.tolist(), old.tolist(), mask, adv, w, clip_low=0.2, clip_high=0.2, renormalize=True)
    _assert_matches(out, grad, loss, gr)


# --- all presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["entropy_forks", "vppo", "vppo_paper", "at_rl", "stapo"])
def test_presets_round_trip_and_accept_overrides(name):
    s = rlcredit.build(name)
    assert rlcredit.build(s.to_spec()) == s
    patched = rlcredit.build(name, policy_loss={"name": "gspo"})
    assert type(patched.policy_loss).__name__ == "GSPO" and patched.weighter == s.weighter
