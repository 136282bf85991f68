"""The verl policy loss ``"rlcredit"`` without verl: verl 0.9.1's ``vanilla`` restated (see tests/test_verl.py).

verl's actor config (clip ratios, ``clip_ratio_c``, ``loss_agg_mode``) runs wherever the strategy
leaves a value at its default; explicit values win and warn once; metrics are verl's keys with
verl's formulas. The real verl is checked by ``scripts/verl_contract.sh``.
"""

from __future__ import annotations

import warnings

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcredit
from rlcredit.errors import SpecError
from rlcredit.integrations import verl as V
from tests.test_verl import MODES, verl_agg_loss, verl_mod  # noqa: F401  (verl_mod: a fixture)


def _verl_vanilla(old, logp, adv, mask, clip_low, clip_high, clip_c, mode, weights=None, **info):
    """Re-statement of verl 0.9.1 ``compute_policy_loss_vanilla``: (loss, metrics), same formulas."""
    neg_kl = torch.clamp(logp - old, -20.0, 20.0)
    ratio = torch.exp(neg_kl)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip1 = torch.maximum(pg1, pg2)
    clip2 = torch.min(-adv * clip_c, clip1)
    pg = torch.where(adv < 0, clip2, clip1)
    if weights is not None:
        pg = pg * weights
    m = mask.float()

    def masked_mean(x):
        return (x * m).sum() / (m.sum() + 1e-8)

    metrics = {"actor/pg_clipfrac": masked_mean(torch.gt(pg2, pg1).float()),
               "actor/ppo_kl": masked_mean(-neg_kl.detach()),
               "actor/pg_clipfrac_lower": masked_mean(torch.gt(clip1, -adv * clip_c) * (adv < 0).float())}
    return verl_agg_loss(pg, mask, mode, **info), {k: v.detach() for k, v in metrics.items()}


@st.composite
def loss_inputs(draw, spread=1.0):
    B, T = draw(st.integers(1, 5)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + (torch.rand(B, T, generator=g) - 0.5) * 2 * spread).requires_grad_(True)
    adv = torch.randn(B, T, generator=g)
    lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    weights = torch.rand(B, T, generator=g) * 2 if draw(st.booleans()) else None
    return old, logp, adv * mask, mask, weights


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    """Each test sees the once-per-process warnings afresh."""
    from rlcredit.integrations.verl import _actor

    monkeypatch.setattr(_actor, "_WARNED", set())


def _assert_same(ours, theirs, logp):
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    g_ours, = torch.autograd.grad(ours, logp, retain_graph=True)
    g_theirs, = torch.autograd.grad(theirs, logp, retain_graph=True)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)


PRESET_CONFIGS = [  # each preset with the verl actor config its recipe uses (verl's defaults otherwise)
    ("grpo", "token-mean", {}),
    ("dapo", "token-mean", {"clip_ratio_high": 0.28}),
    ("dr_grpo", "seq-mean-token-sum-norm", {}),
]


@pytest.mark.parametrize("preset,mode,actor", PRESET_CONFIGS)
@given(inputs=loss_inputs(spread=2.0), dp=st.sampled_from([1, 2]))
def test_policy_loss_equals_verl_vanilla_restated(preset, mode, actor, inputs, dp):
    """At verl's default actor config (dual clip 3.0 included, ratios up to e^2), loss, gradient and metrics."""
    old, logp, adv, mask, weights = inputs
    info = {"dp_size": dp, "batch_num_tokens": int(mask.sum()) * dp, "global_batch_size": mask.shape[0] * dp,
            "loss_scale_factor": 12}
    config = {"global_batch_info": info, "rlcredit_strategy": preset, **actor}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe's config agrees with the strategy: no warning
        ours, metrics = V.compute_policy_loss(old, logp, adv, mask, mode, config, weights)
    theirs, their_metrics = _verl_vanilla(old, logp, adv, mask.long(), 0.2, actor.get("clip_ratio_high", 0.2), 3.0,
                                          mode, weights, **info)
    _assert_same(ours, theirs, logp)
    assert set(metrics) == set(their_metrics)  # exactly verl's keys
    for key, value in their_metrics.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-6, atol=1e-7)
    assert all(isinstance(v, torch.Tensor) and v.ndim == 0 and not v.requires_grad for v in metrics.values())


@given(inputs=loss_inputs(spread=2.0), mode=st.sampled_from(MODES))
def test_verls_actor_config_runs_where_the_strategy_is_silent(inputs, mode):
    """grpo sets nothing explicitly: verl's clip_ratio_low/high, clip_ratio_c and loss_agg_mode all run."""
    old, logp, adv, mask, weights = inputs
    actor = {"clip_ratio": 0.2, "clip_ratio_low": 0.1, "clip_ratio_high": 0.35, "clip_ratio_c": 2.5}
    config = {"rlcredit_strategy": "grpo", "global_batch_info": {}, **actor}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours, metrics = V.compute_policy_loss(old, logp, adv, mask, mode, config, weights)
    theirs, their_metrics = _verl_vanilla(old, logp, adv, mask.long(), 0.1, 0.35, 2.5, mode, weights)
    _assert_same(ours, theirs, logp)
    for key, value in their_metrics.items():
        torch.testing.assert_close(metrics[key], value, rtol=1e-6, atol=1e-7)
    only_clip = {"rlcredit_strategy": "grpo", "clip_ratio": 0.3}  # clip_ratio_low/high unset: clip_ratio
    assert (V.verl_policy_loss(None, only_clip).clip_low, V.verl_policy_loss(None, only_clip).clip_high) == (0.3, 0.3)


def test_explicit_strategy_values_win_and_warn_once_naming_both():
    """Explicit = differs from the field's attrs default: dapo's clip_high, dr_grpo's aggregation."""
    old, logp, adv = torch.zeros(1, 2), torch.tensor([[0.0, 1.5]], requires_grad=True), -torch.ones(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    spec = {"policy_loss": {"name": "clipped_surrogate", "clip_high": 0.28, "dual_clip": 4.0}}
    config = {"rlcredit_strategy": spec, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0}
    with pytest.warns(UserWarning) as record:
        for _ in range(3):  # micro-batches: one warning per disagreement, not one per call
            ours, _ = V.compute_policy_loss(old, logp, adv, mask, "token-mean", config)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2
    assert "clip_high=0.28" in messages[0] and "clip_ratio_high=0.2" in messages[0]
    assert "dual_clip=4.0" in messages[1] and "clip_ratio_c=3.0" in messages[1]
    theirs, _ = _verl_vanilla(old, logp, adv, mask.long(), 0.2, 0.28, 4.0, "token-mean")  # the strategy's run
    _assert_same(ours, theirs, logp)
    with pytest.warns(UserWarning, match="aggregation='seq_mean_token_sum_norm'.*loss_agg_mode='token-mean'"):
        assert V.verl_policy_loss("dr_grpo", {}, "token-mean").aggregation == "seq_mean_token_sum_norm"
    with pytest.warns(UserWarning, match="max_length=8.*loss_scale_factor=16"):
        V.verl_policy_loss({"policy_loss": {"name": "clipped_surrogate", "aggregation": "seq_mean_token_sum_norm",
                                            "max_length": 8}}, {"loss_scale_factor": 16})
    with pytest.warns(UserWarning, match="clip_low=0.0003"):  # gspo's own clip range counts as explicit
        gspo = V.verl_policy_loss({"policy_loss": "gspo"}, {"clip_ratio": 0.2})
    assert (gspo.clip_low, gspo.clip_high, gspo.aggregation) == (3e-4, 4e-4, "seq_mean_token_mean")
    assert not hasattr(gspo, "dual_clip")  # like verl's loss_mode=gspo: no dual clip


@given(inputs=loss_inputs())
def test_policy_loss_dual_clip_and_entropy_penalty(inputs):
    """VPPO's loss terms: dual clip 3.0 (= verl's) + 0.06 * mean(-logp), reported under actor/rlcredit/."""
    old, logp, adv, mask, _ = inputs
    spec = {"policy_loss": {"name": "clipped_surrogate", "clip_high": 0.28, "dual_clip": 3.0,
                            "entropy_penalty": 0.06}}
    config = {"rlcredit_strategy": spec, "clip_ratio_high": 0.28}
    ours, metrics = V.compute_policy_loss(old, logp, adv, mask, "token-mean", config)
    theirs = _verl_vanilla(old, logp, adv, mask.long(), 0.2, 0.28, 3.0, "token-mean")[0] \
        + 0.06 * verl_agg_loss(-logp, mask.long(), "token-mean")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    assert "actor/rlcredit/neg_logprob" in metrics


def test_policy_loss_rejects_what_verl_cannot_feed(verl_mod):
    args = (torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool))
    kl = {"rlcredit_strategy": {"policy_loss": {"name": "clipped_surrogate", "kl_coef": 0.1}}}
    with pytest.raises(SpecError, match="use_kl_loss"):
        verl_mod.compute_policy_loss(*args, "token-mean", kl)
    renorm = {"rlcredit_strategy": {"policy_loss": {"name": "clipped_surrogate", "renormalize": True}}}
    with pytest.raises(SpecError, match="renormalize=True"):
        verl_mod.compute_policy_loss(*args, "token-mean", renorm)
    with pytest.raises(SpecError, match="loss_agg_mode='token-sum'"):
        verl_mod.compute_policy_loss(*args, "token-sum", {"rlcredit_strategy": "grpo"})
    with pytest.raises(SpecError, match="clip_ratio_c"):
        verl_mod.verl_policy_loss("grpo", {"clip_ratio_c": 0.5})
    with pytest.warns(UserWarning, match="loss_agg_mode='token-sum'"):  # explicit aggregation: it runs, and warns
        verl_mod.compute_policy_loss(*args, "token-sum", {"rlcredit_strategy": "dr_grpo"})


@pytest.mark.parametrize("name", ["cispo", "sapo", "kl_cov", "gmpo", "clip_cov"])
def test_other_losses_run_their_own_values_with_verls_metric_keys(name):
    """Losses verl's actor config does not describe run the strategy's values; the three keys are there,
    with the formulas of the verl loss mode each equals (kl_cov's ppo_kl is mean |log rho|)."""
    mask = torch.tensor([[True, True, True], [True, True, False]])
    logp = torch.full((2, 3), 0.5, requires_grad=True)
    config = {"rlcredit_strategy": {"policy_loss": name}, "clip_ratio": 0.1, "clip_ratio_c": 2.0}
    mode = {"sapo": "seq-mean-token-mean", "gmpo": "seq-mean-token-mean"}.get(name, "token-mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the aggregation agrees: nothing to warn about
        loss, metrics = V.compute_policy_loss(torch.zeros(2, 3), logp, torch.ones(2, 3), mask, mode, config)
    assert V.verl_policy_loss(None, config, mode) == V.resolve_strategy(config).policy_loss  # unchanged
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"} <= set(metrics)
    torch.testing.assert_close(metrics["actor/ppo_kl"], torch.tensor(0.5 if name == "kl_cov" else -0.5))
    if name == "gmpo":  # log rho = 0.5 > clip_high 0.4 on every token with A > 0: all clipped (geo_mean's formula)
        assert float(metrics["actor/pg_clipfrac"]) == 1.0
    assert torch.isfinite(loss) and float(metrics["actor/pg_clipfrac_lower"]) == 0.0
    loss.backward()
    assert torch.isfinite(logp.grad).all()


SPLITS = {"micro": [[[0, 1], [2], [3, 4]]], "dp": [[[0], [1, 2]], [[3], [4]]]}  # rows per rank, per micro-batch


@pytest.mark.parametrize("name", ["clipped_surrogate", "gspo", "cispo", "sapo", "gmpo"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_every_loss_adds_up_over_micro_batches_and_ranks_with_global_batch_info(name, split):
    """verl's global batch info = rlcredit's Totals: the per-call losses (times 1/R, DDP's mean over ranks) add
    up to the strategy's own loss on the whole mini-batch, gradients included. (kl_cov and clip_cov select tokens
    per call, in verl as here, so they do not add up; scripts/verl_contract_test.py checks them per call.)"""
    g = torch.Generator().manual_seed(5)
    B, T = 5, 4
    mask = torch.arange(T)[None] < torch.tensor([4, 2, 3, 1, 4])[:, None]
    old = torch.where(mask, -torch.rand(B, T, generator=g) * 2, 0.0)
    logp = torch.where(mask, old + torch.randn(B, T, generator=g) * 0.3, 0.0).requires_grad_(True)
    adv = torch.where(mask, torch.randn(B, T, generator=g), 0.0)
    weights = torch.where(mask, torch.rand(B, T, generator=g) * 2, 0.0)
    spec = {"policy_loss": name}
    strategy = V.resolve_strategy({"rlcredit_strategy": spec})
    r = rlcredit.Rollout(mask, torch.zeros(B), torch.arange(B), old_logprobs=old)
    credit = rlcredit.Credit({}, weights, adv)
    whole = strategy.loss(logp, r, credit).loss
    ranks = SPLITS[split]
    info = {"dp_size": len(ranks), "batch_num_tokens": int(mask.sum()), "global_batch_size": B}
    agg = {"gspo": "seq-mean-token-mean", "sapo": "seq-mean-token-mean", "gmpo": "seq-mean-token-mean"}
    config = {"rlcredit_strategy": spec, "global_batch_info": info, "clip_ratio_c": 10.0,
              **({"clip_ratio_low": 3e-4, "clip_ratio_high": 4e-4} if name == "gspo" else {})}
    total = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the config agrees with the strategy
        for micro_batches in ranks:
            for rows in micro_batches:
                loss, _ = V.compute_policy_loss(old[rows], logp[rows], adv[rows], mask[rows],
                                                agg.get(name, "token-mean"), config, weights[rows])
                total = total + loss / len(ranks)
    if name == "clipped_surrogate":  # verl's dual clip (clip_ratio_c=10) runs: the whole-batch reference has it too
        whole = rlcredit.build({"policy_loss": {"name": name, "dual_clip": 10.0}}).loss(logp, r, credit).loss
    _assert_same(total, whole, logp)


def test_papo_and_losses_verl_cannot_feed_raise_at_resolution():
    """papo reads aux (with any surrogate: a seq-mean one too), masked='signal' a signal: a SpecError saying what to do,
    from verl_policy_loss, before anything runs."""
    for spec in ("papo", {"policy_loss": {"name": "papo", "surrogate": {"name": "clipped_surrogate",
                                                                     "aggregation": "seq_mean_token_mean"}}}):
        with pytest.raises(SpecError, match=r"aux\['masked_logprobs'\].*ppo_loss.*strategy.loss\(\.\.\., aux=\.\.\.\)"):
            V.verl_policy_loss(spec, {})
    with pytest.raises(SpecError, match=r"rollout.signals\['aug_logprobs'\]"):
        V.verl_policy_loss({"policy_loss": {"name": "papo", "masked": "signal"}}, {})
    with pytest.raises(SpecError, match="does not take"):
        V.verl_policy_loss(rlcredit.Strategy(policy_loss=_NoTotals()), {})


@attrs.frozen
class _NoTotals:
    """A plugin loss that aggregates its own rows only (no ``totals=``)."""

    requires = ()

    def __call__(self, logprobs, rollout, credit, *, reducer=None):
        return rlcredit.LossOutput(-(credit.token_advantages() * logprobs).sum(), {})
