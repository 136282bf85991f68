"""No NaN or inf ever leaves rlcredit: a Hypothesis search over every preset and loss, at the extremes.

Every registered preset that runs without a model (decided by its own ``requirements`` on a rollout
that carries every signal a preset may read) and every registered loss (built from its defaults,
plus the options of ``clipped_surrogate`` that take other code paths) runs ``assign``, ``loss``
and ``backward`` on drawn rollouts with extreme but legal values: log-probs down to -1e4 (log
ratios far beyond the +-20 clamp), rewards up to +-1e30, one-token and empty rows, one-sample and
all-equal groups, and log-probs in float32, bfloat16 and float16. Advantages, weights, scores,
every metric, the loss and the gradient w.r.t. the log-probs (in their own dtype) must be finite.
New presets and losses are covered as soon as they are registered.

The CI profile is derandomized and takes seconds. The long profile explores fresh examples:

    make fuzz        # RLCREDIT_FUZZ=long pytest tests/test_robustness_property.py
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rlcredit
from rlcredit.losses import ClippedSurrogate
from rlcredit.losses._common import aux_names

LONG = os.environ.get("RLCREDIT_FUZZ") == "long"
PROFILE = settings(
    max_examples=1500 if LONG else 25,
    derandomize=not LONG,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Log-probs: ordinary values, a near-certain token, and the extremes whose log-ratios the losses clamp.
LOGPROB = st.one_of(st.sampled_from([0.0, -1e-6, -0.7, -12.0, -30.0, -1e3, -1e4]), st.floats(-1e4, 0.0))
REWARD = st.one_of(st.sampled_from([0.0, 1.0, -1.0, 1e30, -1e30, 3e29, 1e-30, 0.5]), st.floats(-1e30, 1e30))
ENTROPY = st.one_of(st.sampled_from([0.0, 1e-7, 2.0, 12.0]), st.floats(0.0, 20.0))


@st.composite
def extreme_rollouts(draw: st.DrawFn) -> dict:
    """Plain tensors of a rollout at the extremes, the log-probs' dtype, and the group layout."""
    T = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
    B = sum(sizes)
    group_ids = torch.tensor([g for g, n in enumerate(sizes) for _ in range(n)])
    lengths = draw(st.lists(st.sampled_from([0, 1, T]) | st.integers(0, T), min_size=B, max_size=B))
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]

    def table(elements: st.SearchStrategy) -> torch.Tensor:
        return torch.tensor(draw(st.lists(st.lists(elements, min_size=T, max_size=T), min_size=B, max_size=B)))

    rewards = torch.tensor(draw(st.lists(REWARD, min_size=B, max_size=B)), dtype=torch.float32)
    if draw(st.booleans()):  # an all-equal first group
        rewards[: sizes[0]] = rewards[0]
    return {
        "mask": mask,
        "rewards": rewards,
        "group_ids": group_ids,
        "logprobs": table(LOGPROB),
        "old_logprobs": table(LOGPROB),
        "ref_logprobs": table(LOGPROB),
        "aug_logprobs": table(LOGPROB),
        "entropy": table(ENTROPY),
        "dtype": draw(st.sampled_from(DTYPES)),
        "old_dtype": draw(st.sampled_from(DTYPES)),
    }


def _rollout(t: dict) -> rlcredit.Rollout:
    mask = t["mask"]
    zero = torch.zeros(())

    def pad(x: torch.Tensor) -> torch.Tensor:  # finite garbage on padding is legal; keep it 0 here
        return torch.where(mask, x, zero)

    return rlcredit.Rollout(
        mask, t["rewards"], t["group_ids"],
        old_logprobs=pad(t["old_logprobs"]).to(t["old_dtype"]), ref_logprobs=pad(t["ref_logprobs"]),
        signals={"entropy": pad(t["entropy"]), "aug_logprobs": pad(t["aug_logprobs"]).to(t["old_dtype"])},
        response_ids=torch.zeros(mask.shape, dtype=torch.long),
    )


def _model_free_presets() -> list[str]:
    """Presets whose every requirement a rollout with all signals meets without a policy."""
    probe = _rollout({
        "mask": torch.ones(2, 2, dtype=torch.bool), "rewards": torch.tensor([1.0, 0.0]),
        "group_ids": torch.tensor([0, 0]), **{k: torch.zeros(2, 2) for k in
                                              ("logprobs", "old_logprobs", "ref_logprobs", "aug_logprobs", "entropy")},
        "dtype": torch.float32, "old_dtype": torch.float32,
    })
    names = []
    for name in rlcredit.available("strategy"):
        strategy = rlcredit.build(name)
        if all(req.met(probe, None) for req in strategy.requirements):
            names.append(name)
    return names


def _loss_strategies() -> dict[str, rlcredit.Strategy]:
    """Every registered loss from its defaults, and the clipped surrogate's other code paths."""
    out = {}
    for name in rlcredit.available("loss"):
        out[name] = rlcredit.Strategy(estimators={"entropy": "entropy"}, policy_loss=name)
    variants = {
        "dual_clip+entropy": {"dual_clip": 3.0, "entropy_penalty": 0.06},
        "kl+seq_mean_token_mean": {"kl_coef": 0.1, "aggregation": "seq_mean_token_mean"},
        "renormalize": {"renormalize": True},
        "seq_mean_token_sum": {"aggregation": "seq_mean_token_sum"},
        "dr_grpo_L": {"aggregation": "seq_mean_token_sum_norm", "max_length": 3},
        "sequence_ratio+kl": {"ratio": "sequence", "kl_coef": 1.0},
    }
    for label, params in variants.items():
        out[f"clipped_surrogate[{label}]"] = rlcredit.Strategy(
            estimators={"entropy": "entropy"}, weighter={"name": "top_fraction", "fraction": 0.5, "score": "entropy"},
            shapers=["group_center"], policy_loss={"name": "clipped_surrogate", **params})
    return out


PRESETS = _model_free_presets()
LOSSES = _loss_strategies()


def test_the_search_covers_the_model_free_presets_and_every_loss():
    assert {"grpo", "dapo", "dr_grpo", "entropy_forks", "vppo", "stapo"} <= set(PRESETS)
    assert {"at_rl", "vppo_paper"}.isdisjoint(PRESETS)  # these need a model
    assert {"clipped_surrogate", "gspo"} <= set(LOSSES)


def _assert_finite(label: str, name: str, x: torch.Tensor) -> None:
    assert isinstance(x, torch.Tensor), f"{label}: {name} is {type(x).__name__}"
    assert torch.isfinite(x.float()).all(), f"{label}: {name} is not finite: {x}"


def _check(label: str, strategy: rlcredit.Strategy, t: dict) -> None:
    rollout = _rollout(t)
    credit = strategy.assign(rollout)
    _assert_finite(label, "advantages", credit.advantages)
    _assert_finite(label, "token_weights", credit.token_weights)
    for key, score in credit.scores.items():
        _assert_finite(label, f"scores[{key!r}]", score)
    for key in credit.metrics:
        _assert_finite(label, f"credit metric {key}", credit.metrics[key])
    zero = torch.zeros(())
    logprobs = torch.where(t["mask"], t["logprobs"], zero).to(t["dtype"]).requires_grad_()
    # Auxiliary log-probs a loss reads (PAPO's masked-image run) come from the training step too.
    aux = {name: torch.where(t["mask"], t["aug_logprobs"], zero).to(t["dtype"]).requires_grad_()
           for name in aux_names(strategy.policy_loss)}
    out = strategy.loss(logprobs, rollout, credit, **({"aux": aux} if aux else {}))
    _assert_finite(label, "loss", out.loss)
    for key in out.metrics:
        _assert_finite(label, f"loss metric {key}", out.metrics[key])
    out.loss.backward()
    for name, x in {"logprobs": logprobs, **aux}.items():
        assert x.grad is not None and x.grad.dtype == t["dtype"], (label, name)
        _assert_finite(label, f"gradient of {name}", x.grad)
        # Padding never gets gradient, whatever the magnitudes.
        assert not x.grad[~t["mask"]].any(), f"{label}: gradient of {name} on padding"


@PROFILE
@given(t=extreme_rollouts())
def test_every_model_free_preset_stays_finite_at_the_extremes(t):
    for name in PRESETS:
        _check(f"preset {name}", rlcredit.build(name), t)


@PROFILE
@given(t=extreme_rollouts())
def test_every_registered_loss_stays_finite_at_the_extremes(t):
    for label, strategy in LOSSES.items():
        _check(f"loss {label}", strategy, t)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_worst_case_of_the_issue_is_finite_in_every_dtype(dtype):
    """One valid token, old log-prob -12, new 0, A < 0: the float32 gradient e^12 exceeds float16's 65504."""
    r = rlcredit.Rollout(torch.ones(1, 1, dtype=torch.bool), torch.tensor([0.0]), torch.tensor([0]),
                         old_logprobs=torch.full((1, 1), -12.0))
    credit = rlcredit.Credit({}, torch.ones(1, 1), torch.tensor([-1.0]))
    checked = 0
    for name in PRESETS:
        loss = rlcredit.build(name).policy_loss
        logp = torch.zeros(1, 1, dtype=dtype, requires_grad=True)
        aux = {k: torch.zeros(1, 1, dtype=dtype, requires_grad=True) for k in aux_names(loss)}
        out = rlcredit.Strategy(policy_loss=loss).loss(logp, r, credit, **({"aux": aux} if aux else {}))
        out.loss.backward()
        assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all(), (name, dtype)
        if type(loss) is not ClippedSurrogate:
            continue
        checked += 1
        penalty = loss.entropy_penalty  # its gradient is -penalty per token
        if loss.dual_clip is None:
            # -c A rho = e^12 = 162755 in float32: a float16 gradient saturates at 65504.
            expected = min(math.exp(12.0) - penalty, torch.finfo(dtype).max)
        else:  # the dual clip caps the loss: the surrogate's gradient is 0
            expected = -penalty
        assert logp.grad.item() == pytest.approx(expected, rel=1e-2), (name, dtype)
    assert checked >= 4  # grpo, dapo, dr_grpo, entropy_forks, vppo, stapo
