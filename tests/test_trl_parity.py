"""rlcredit against TRL 1.16's own code: every loss type, GSPO, delta, the KL term, reward scaling, RLOO.

Each test runs TRL's own trainer code (``_compute_loss``, ``_generate_and_score_completions``) on a
tiny random Qwen2 and compares it with what ``CreditGRPOTrainer`` hands TRL or with rlcredit's
own loss on the same log-probs; old (and reference) log-probs are perturbed so ratios are off 1.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")  # the `trl` extra is optional for the core

from trl import GRPOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

import rlcredit  # noqa: E402
import rlcredit.losses  # noqa: E402
from rlcredit import functional as F  # noqa: E402
from rlcredit.integrations.trl import CreditGRPOTrainer, check_trl_args, scale_rewards_for  # noqa: E402
from rlcredit.integrations.trl import trl_config_kwargs  # noqa: E402
from tests.trl_setup import (  # noqa: E402  (fixtures: tokenizer, base_model, dataset)
    G, base_model, batch_inputs, dataset, generate, loss_and_grads, make_args, make_trainer, quiet, reward_len,
    tokenizer,
)

__all__ = ["base_model", "dataset", "tokenizer"]  # fixtures used by name

ALL_LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo"]
LOSS_TYPE_ARGS = {"luspo": {"importance_sampling_level": "sequence"}, "cispo": {"epsilon_high": 5.0}}


def _trainer(base_model, tokenizer, dataset, tmp_path, cls=GRPOTrainer, **args):
    trainer = quiet(make_trainer, cls, base_model, tokenizer, dataset, tmp_path, args=args)
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training loop; compute_loss reads it
    return trainer


def _policy_logps(trainer, out):
    """TRL's own per-token log-probs of the batch under the current model (with grad)."""
    input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attention = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention,
                                                            out["completion_ids"].shape[1])
    return logps


def _perturbed(trainer, out, scale, seed):
    """Log-probs of the batch plus uniform noise in [-scale, scale], 0 on padding (old or reference log-probs)."""
    with torch.no_grad():
        logps = _policy_logps(trainer, out)
    noise = torch.empty_like(logps).uniform_(-scale, scale, generator=torch.Generator().manual_seed(seed))
    return (logps + noise) * out["completion_mask"]


def _token_weights(mask, seed, binary):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(mask.shape, generator=g) < 0.6).float()
    if not binary:
        w = w * torch.rand(mask.shape, generator=g) * 2
    return w * mask


def _rlcredit_loss_and_grads(trainer, out, policy_loss, weights, ref=None):
    """rlcredit's loss on TRL's log-probs, TRL's [B] advantages and the given token weights."""
    trainer.model.zero_grad()
    mask = out["completion_mask"].bool()
    rollout = rlcredit.Rollout(mask, torch.zeros(mask.shape[0]), torch.zeros(mask.shape[0], dtype=torch.long),
                               old_logprobs=out.get("old_per_token_logps"), ref_logprobs=ref)
    credit = rlcredit.Credit({}, weights, out["advantages"].float())
    loss = policy_loss(_policy_logps(trainer, out), rollout, credit).loss
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grads


# --- the fold, for every loss type ---------------------------------------------------------------


# vespo's Gamma weight reads TRL's importance_sampling_ratio itself: soft weights there are not a token weighting.
FOLD_CASES = [(t, b) for t in ALL_LOSS_TYPES for b in (True, False) if b or t != "vespo"]


@pytest.mark.parametrize("loss_type,binary", FOLD_CASES)
def test_folded_advantages_equal_trls_own_token_weighting(loss_type, binary, base_model, tokenizer, dataset, tmp_path):
    """TRL's loss on ``[B, T]`` advantages ``w * A`` (what CreditGRPOTrainer hands it) equals TRL's own
    per-token weighting of its ``[B]``-advantage loss: its entropy mask multiplies each token's loss
    by a 0/1 weight, its vLLM importance-sampling correction by any weight >= 0 (not for vespo, whose
    Gamma weight reads that ratio instead). Loss and gradient, every loss type."""
    trainer = _trainer(base_model, tokenizer, dataset, tmp_path, loss_type=loss_type, **LOSS_TYPE_ARGS.get(loss_type, {}))
    out = generate(trainer)
    out["old_per_token_logps"] = _perturbed(trainer, out, 0.4, seed=1)
    mask = out["completion_mask"]
    w = _token_weights(mask, seed=2, binary=binary)
    folded = dict(out, advantages=w * out["advantages"].unsqueeze(1))
    loss_fold, grads_fold = loss_and_grads(trainer, folded)
    if binary:  # TRL's own entropy-mask path, handed the mask w
        trainer.top_entropy_quantile = 0.5
        trainer.get_high_entropy_mask = lambda entropies, m, threshold: w.bool()
        loss_trl, grads_trl = loss_and_grads(trainer, out)
    else:  # TRL's own importance-sampling correction, handed the weights w
        trainer.use_vllm, trainer.vllm_importance_sampling_correction = True, True
        loss_trl, grads_trl = loss_and_grads(trainer, dict(out, importance_sampling_ratio=w))
    assert abs(float(loss_trl)) > 1e-4 and bool((w[mask.bool()] == 0).any())
    torch.testing.assert_close(loss_fold, loss_trl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads_fold, grads_trl, rtol=1e-5, atol=1e-7)


# --- sequence-level importance sampling vs GSPO ------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "luspo", "dapo"])
def test_sequence_level_importance_sampling_equals_gspo(loss_type, base_model, tokenizer, dataset, tmp_path):
    """TRL's importance_sampling_level="sequence" with GSPO's clip range == rlcredit's ``gspo`` loss
    (the aggregation of the loss type), loss and gradient; with token weights folded in, TRL sees
    them only through each row's mean (its gradient goes through the mean log-ratio): TRL on
    ``w * A`` == ``gspo`` with the row-mean weights, the documented difference."""
    spec = {"policy_loss": {"name": "gspo", "aggregation": rlcredit.integrations.trl.LOSS_TYPES[loss_type]}}
    kwargs = trl_config_kwargs(spec)
    assert (kwargs["loss_type"] == loss_type or loss_type == "dapo") and kwargs["importance_sampling_level"] == "sequence"
    trainer = _trainer(base_model, tokenizer, dataset, tmp_path, **dict(kwargs, loss_type=loss_type))
    gspo = rlcredit.build(spec).policy_loss
    out = generate(trainer)
    out["old_per_token_logps"] = _perturbed(trainer, out, 1e-3, seed=3)  # some rows past 1 + 4e-4, some not
    mask = out["completion_mask"]
    log_s = F.sequence_log_ratio(_policy_logps(trainer, out).detach(), out["old_per_token_logps"], mask.bool())[:, 0]
    clipped = (log_s.exp() > 1 + 4e-4) | (log_s.exp() < 1 - 3e-4)
    assert bool(clipped.any()) and not bool(clipped.all())
    for w in (mask.float(), _token_weights(mask, seed=4, binary=False)):
        loss_trl, grads_trl = loss_and_grads(trainer, dict(out, advantages=w * out["advantages"].unsqueeze(1)))
        row_mean = (w.sum(1) / mask.sum(1).clamp_min(1)).unsqueeze(1) * mask
        loss_ours, grads_ours = _rlcredit_loss_and_grads(trainer, out, gspo, row_mean)
        torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-7)
        # luspo's gradient sums T_i copies of s A / T_i where GSPO-token has one s A: float rounding only
        assert float((grads_ours - grads_trl).norm()) <= 1e-4 * float(grads_trl.norm())
    _, grads_token = _rlcredit_loss_and_grads(trainer, out, gspo, w)  # rlcredit keeps the weights per token
    assert float((grads_token - grads_trl).norm()) > 1e-3 * float(grads_trl.norm())


# --- delta is TRL's dual clip --------------------------------------------------------------------


def test_delta_is_the_dual_clip(base_model, tokenizer, dataset, tmp_path):
    """Capping the ratio at delta (TRL) equals min(l, -c A) with c = delta (rlcredit's dual clip, as verl's
    clip_ratio_c): loss and gradient, with ratios past c on negative advantages."""
    spec = {"policy_loss": {"name": "clipped_surrogate", "clip_high": 0.28, "dual_clip": 3.0}}
    kwargs = trl_config_kwargs(spec)
    assert kwargs["delta"] == 3.0
    trainer = _trainer(base_model, tokenizer, dataset, tmp_path, **kwargs)
    out = generate(trainer)
    out["old_per_token_logps"] = _perturbed(trainer, out, 2.0, seed=5)
    mask = out["completion_mask"].bool()
    ratio = (_policy_logps(trainer, out).detach() - out["old_per_token_logps"]).exp()
    assert bool(((ratio > 3.0) & (out["advantages"].unsqueeze(1) < 0) & mask).any())  # the dual clip binds
    loss_trl, grads_trl = loss_and_grads(trainer, out)
    loss_ours, grads_ours = _rlcredit_loss_and_grads(trainer, out, rlcredit.build(spec).policy_loss, mask.float())
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads_ours, grads_trl, rtol=1e-4, atol=1e-7)
    trainer.args.delta = None  # without delta TRL's loss is another number: the comparison above is not vacuous
    loss_plain, _ = loss_and_grads(trainer, out)
    assert abs(float(loss_plain - loss_trl)) > 1e-3


def test_a_small_delta_is_another_clip(base_model, tokenizer, dataset, tmp_path):
    """delta <= 1 + epsilon_high (warned by check_trl_args): TRL then equals rlcredit's clip_high = delta - 1
    with dual_clip = 1 + epsilon_high, the documented difference."""
    trainer = _trainer(base_model, tokenizer, dataset, tmp_path, loss_type="dapo", epsilon_high=0.28, delta=1.1)
    out = generate(trainer)
    out["old_per_token_logps"] = _perturbed(trainer, out, 1.0, seed=8)
    loss_trl, grads_trl = loss_and_grads(trainer, out)
    swapped = rlcredit.losses.ClippedSurrogate(clip_high=0.1, dual_clip=1.28)
    loss_ours, grads_ours = _rlcredit_loss_and_grads(trainer, out, swapped, out["completion_mask"].float())
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads_ours, grads_trl, rtol=1e-4, atol=1e-7)
    spec = rlcredit.build({"policy_loss": {"name": "clipped_surrogate", "clip_high": 0.28, "dual_clip": 1.1}})
    assert [m.split(":")[0] for m in check_trl_args(spec, trainer.args)] == ["dual clip"]


# --- the KL term, with and without TRL's bias correction ------------------------------------------


@pytest.mark.parametrize("correction", [True, False])
@pytest.mark.parametrize("on_policy", [True, False])
def test_beta_with_and_without_bias_correction(correction, on_policy, base_model, tokenizer, dataset, tmp_path):
    """TRL's beta * k3 (times the token ratio with use_bias_correction_kl, gradient through both) ==
    rlcredit's kl_coef / kl_bias_correction; on-policy the ratio is 1 but its gradient is not 0."""
    spec = {"policy_loss": {"name": "clipped_surrogate", "kl_coef": 0.5, "kl_bias_correction": correction}}
    base_model.save_pretrained(tmp_path / "model")  # TRL loads its reference model from the policy's path
    trainer = quiet(GRPOTrainer, model=str(tmp_path / "model"), reward_funcs=reward_len, train_dataset=dataset,
                    args=make_args(tmp_path, **trl_config_kwargs(spec)), processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1
    assert trainer.args.use_bias_correction_kl is correction and trainer.beta == 0.5
    out = generate(trainer)
    out["ref_per_token_logps"] = _perturbed(trainer, out, 1.0, seed=6)
    if on_policy:
        out.pop("old_per_token_logps", None)  # TRL then uses per_token_logps.detach(), as rlcredit does
    else:
        out["old_per_token_logps"] = _perturbed(trainer, out, 0.4, seed=7)
    loss_trl, grads_trl = loss_and_grads(trainer, out)
    mask = out["completion_mask"]
    loss_ours, grads_ours = _rlcredit_loss_and_grads(trainer, out, rlcredit.build(spec).policy_loss, mask.float(),
                                                     ref=out["ref_per_token_logps"])
    torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_ours, grads_trl, rtol=1e-4, atol=1e-6)
    other = rlcredit.build(spec, policy_loss=dict(spec["policy_loss"], kl_bias_correction=not correction))
    _, grads_other = _rlcredit_loss_and_grads(trainer, out, other.policy_loss, mask.float(),
                                              ref=out["ref_per_token_logps"])
    assert float((grads_other - grads_trl).norm()) > 1e-3 * float(grads_trl.norm())  # the flag matters


# --- reward scaling ------------------------------------------------------------------------------

SCALINGS = {
    "group": {"shapers": [{"name": "group_normalize", "eps": 1e-4}]},
    "none": "dr_grpo",
    "batch": {"shapers": [{"name": "batch_normalize", "center": False, "eps": 1e-4}, "group_center"]},
}


@pytest.mark.parametrize("scale", ["none", "group", "batch"])
def test_scale_rewards_equals_trl(scale, base_model, tokenizer, dataset, tmp_path):
    """TRL's scale_rewards none / group / batch == group_center / group_normalize(1e-4) /
    [batch_normalize(center=False, eps=1e-4), group_center], on TRL's own generation batch."""
    strategy = rlcredit.build(SCALINGS[scale])
    assert scale_rewards_for(strategy) == scale == trl_config_kwargs(strategy)["scale_rewards"]
    args = dict(trl_config_kwargs(strategy), per_device_train_batch_size=3 * G)  # three groups: batch != group
    plain = _trainer(base_model, tokenizer, dataset, tmp_path / "p", **args)
    ours = quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path / "o", args=args,
                 credit=strategy)
    assert check_trl_args(strategy, ours.args) == []
    prompts = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]
    torch.manual_seed(0)
    out_plain = plain._generate_and_score_completions(batch_inputs(prompts))
    torch.manual_seed(0)
    out = ours._generate_and_score_completions(batch_inputs(prompts))
    assert torch.equal(out["completion_ids"], out_plain["completion_ids"])
    assert float(out_plain["advantages"].abs().max()) > 0.1
    expected = out_plain["advantages"].unsqueeze(1) * out_plain["completion_mask"]
    torch.testing.assert_close(out["advantages"], expected, rtol=1e-5, atol=1e-6)


# --- RLOO ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_advantages_equal_leave_one_out(normalize, base_model, tokenizer, dataset, tmp_path):
    """RLOOTrainer's advantages (beta=0) == leave_one_out; with normalize_advantages == [leave_one_out,
    batch_normalize(eps=1e-4)]."""
    args = RLOOConfig(output_dir=str(tmp_path), per_device_train_batch_size=2 * G, num_generations=G,
                      max_completion_length=6, report_to="none", use_cpu=True, save_strategy="no", seed=0,
                      beta=0.0, normalize_advantages=normalize)
    trainer = quiet(RLOOTrainer, model=base_model, reward_funcs=reward_len, args=args, train_dataset=dataset,
                    processing_class=tokenizer)
    recorded = {}
    calculate = trainer._calculate_rewards

    def record(*a, **k):
        recorded["rewards"] = calculate(*a, **k)
        return recorded["rewards"]

    trainer._calculate_rewards = record
    trainer.model.train()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(batch_inputs())
    rewards = recorded["rewards"].sum(1)
    assert float(rewards.std()) > 0
    shapers = ["leave_one_out"] + ([{"name": "batch_normalize", "eps": 1e-4}] if normalize else [])
    mask = out["completion_mask"].bool()
    rollout = rlcredit.Rollout(mask, rewards, torch.arange(2 * G) // G)
    ours = rlcredit.Strategy(shapers=shapers).assign(rollout).advantages
    torch.testing.assert_close(ours, out["advantages"].float(), rtol=1e-5, atol=1e-6)
