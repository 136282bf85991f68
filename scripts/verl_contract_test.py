"""Contract test against the REAL verl (run by scripts/verl_contract.sh in .venv-verl, not by `make test`).

verl needs transformers < 5.11 and ray, so it lives in its own virtual environment. These tests
check what tests/test_verl.py can only check against a fake: that importing
``rlcredit.integrations.verl`` registers in verl's own registries, with verl's own signatures, and
that rlcredit's aggregation, policy loss and advantages equal verl's ``agg_loss``, ``vanilla`` loss
(through verl's own ``ppo_loss``) and ``compute_advantage`` at verl's default actor config; and that
``loss_mode=rlcredit`` with the strategy's cispo, sapo, gmpo, kl_cov or clip_cov equals verl's own loss mode of
the same name (``geo_mean`` for gmpo) at the matching config, through ``ppo_loss``, on micro-batches and dp ranks.
"""

from __future__ import annotations

import importlib
import inspect
import json

import pytest
import torch

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")  # this file runs only where verl is installed

import rlcredit  # noqa: E402
from rlcredit.integrations import verl as ours  # noqa: E402  (import registers "rlcredit" in verl)
from rlcredit.integrations.verl import _actor  # noqa: E402

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


def _batch(seed: int, B: int = 6, T: int = 7):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.rand(B, T, generator=g) - 0.5).requires_grad_(True)
    adv = torch.randn(B, T, generator=g) * mask
    return old, logp, adv, mask


def test_module_registered_both_names():
    assert ours.REGISTERED
    assert verl_core.get_policy_loss_fn("rlcredit") is ours.compute_policy_loss
    assert verl_core.get_adv_estimator_fn("rlcredit") is ours.compute_advantage


def test_verl_use_external_modules_registers_in_a_fresh_process():
    """verl's own loading path: `import verl` imports the modules named in VERL_USE_EXTERNAL_MODULES."""
    import os
    import subprocess
    import sys

    code = ("import verl\nfrom verl.trainer.ppo import core_algos as c\n"
            "print(c.get_policy_loss_fn('rlcredit').__module__, c.get_adv_estimator_fn('rlcredit').__module__)")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="rlcredit.integrations.verl")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    modules = out.stdout.split()
    assert len(modules) == 2 and all(m.startswith("rlcredit.integrations.verl") for m in modules), modules


def test_policy_loss_signature_matches_verls_vanilla():
    theirs = inspect.signature(verl_core.get_policy_loss_fn("vanilla")).parameters
    mine = inspect.signature(verl_core.get_policy_loss_fn("rlcredit")).parameters
    assert list(mine) == list(theirs)
    assert [p.default for p in mine.values()] == [p.default for p in theirs.values()]


def test_reimport_does_not_trip_verls_duplicate_check():
    importlib.reload(ours)
    assert verl_core.get_adv_estimator_fn("rlcredit") is ours.compute_advantage


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(5))
def test_aggregate_equals_verl_agg_loss(mode, seed):
    _, _, loss_mat, mask = _batch(seed)
    torch.testing.assert_close(ours.aggregate(loss_mat, mask, mode),
                               verl_core.agg_loss(loss_mat, mask.float(), mode).float(), rtol=1e-5, atol=1e-6)
    info = dict(dp_size=2, batch_num_tokens=int(mask.sum()) * 2, global_batch_size=mask.shape[0] * 2,
                loss_scale_factor=16)
    torch.testing.assert_close(ours.aggregate(loss_mat, mask, mode, **info),
                               verl_core.agg_loss(loss_mat, mask.float(), mode, **info).float(), rtol=1e-5, atol=1e-6)


# --- loss_mode=rlcredit == vanilla at verl's default actor config (issue 15, item 1) ---------------

# Each preset with the actor config its verl recipe uses; everything else at verl 0.9.1's defaults
# (clip_ratio 0.2, clip_ratio_c 3.0: vanilla's dual clip is always on). adv_estimator=grpo, with
# norm_adv_by_std_in_grpo=False for Dr. GRPO.
RECIPES = [
    ("grpo", {}, True),
    ("dapo", {"clip_ratio_high": 0.28}, True),
    ("dr_grpo", {"loss_agg_mode": "seq-mean-token-sum-norm"}, False),
]
# Rows of the 8-row mini-batch per dp rank, per micro-batch.
SPLITS = {
    "whole": [[list(range(8))]],
    "micro": [[[0, 1], [2, 3], [4, 5], [6, 7]]],
    "dp": [[[0, 1], [2, 3]], [[4, 5], [6, 7]]],
}


def _actor_config(loss_mode: str, **overrides):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode), **overrides)


def _rollout_batch(seed: int, B: int = 8, P: int = 3, T: int = 6):
    """A DataProto: rewards on the last valid token, uid groups of 4, IS weights; and current log-probs."""
    import numpy as np
    from verl import DataProto

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = torch.randint(0, 3, (B,), generator=g).float()
    old = -torch.rand(B, T, generator=g) * 3 * mask
    logp = (old + (torch.rand(B, T, generator=g) - 0.5) * 4) * mask  # ratios up to e^2: past the dual clip's 3
    data = DataProto.from_dict(
        tensors={"token_level_rewards": rewards, "response_mask": mask, "old_log_probs": old,
                 "rollout_is_weights": torch.rand(B, T, generator=g) * 2 * mask,
                 "prompts": torch.ones(B, P, dtype=torch.long), "responses": torch.ones(B, T, dtype=torch.long),
                 "attention_mask": torch.cat([torch.ones(B, P), mask], 1).long()},
        non_tensors={"uid": np.array([f"p{i // 4}" for i in range(B)], dtype=object)},
    )
    return data, logp


def _flat_log_probs(logp_rows, attention, P):
    """The (total_nnz,) layout verl's ppo_loss unpads: response log-probs end one token before each sequence end."""
    pieces = []
    for row, att in zip(logp_rows, attention):
        r = int(att[P:].sum())
        pieces += [torch.zeros(P - 1), row[:r], torch.zeros(1)]
    return torch.cat(pieces)


def _ppo_loss(config, data, rows, logp, dp_size, batch_num_tokens, global_batch_size):
    """verl's own ppo_loss (verl/workers/utils/losses.py) on some rows: one micro-batch of one dp rank."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss

    keys = [k for k in ("prompts", "responses", "attention_mask", "response_mask", "old_log_probs", "advantages",
                        "rollout_is_weights") if k in data.batch.keys()]
    td = TensorDict({k: data.batch[k][rows] for k in keys}, batch_size=[len(rows)])
    tu.assign_non_tensor(td, dp_size=dp_size, batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)
    flat = _flat_log_probs(logp[rows], data.batch["attention_mask"][rows], data.batch["prompts"].shape[1])
    loss, metrics = ppo_loss(config, {"log_probs": flat}, td)
    return loss, {k: m.aggregate() for k, m in metrics.items()}


def _run(estimator: str, loss_mode: str, actor: dict, norm_by_std: bool, split: str, seed: int):
    """verl's compute_advantage then ppo_loss over the split: advantages, per-call losses, gradient, metrics."""
    import warnings

    from verl.trainer.ppo.ray_trainer import compute_advantage

    data, logp = _rollout_batch(seed)
    data = compute_advantage(data, adv_estimator=estimator, norm_adv_by_std_in_grpo=norm_by_std)
    config = _actor_config(loss_mode, **actor)
    ranks = SPLITS[split]
    tokens, rows_total = int(data.batch["response_mask"].sum()), logp.shape[0]
    leaf = logp.clone().requires_grad_(True)
    losses, metrics = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the recipe's actor config agrees with the strategy: no warning
        for micro_batches in ranks:
            for rows in micro_batches:
                loss, m = _ppo_loss(config, data, rows, leaf, len(ranks), tokens, rows_total)
                losses.append(loss)
                metrics.append(m)
    total = torch.stack(losses).sum() / len(ranks)  # micro-batch losses add up; DDP averages the ranks
    grad, = torch.autograd.grad(total, leaf)
    return data.batch["advantages"], torch.stack(losses), total, grad, metrics


@pytest.mark.parametrize("preset,actor,norm_by_std", RECIPES)
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("seed", range(2))
def test_rlcredit_equals_vanilla_at_verls_default_actor_config(preset, actor, norm_by_std, split, seed, monkeypatch):
    """verl's own compute_advantage (ray_trainer) and ppo_loss: adv_estimator=rlcredit + loss_mode=rlcredit
    equal adv_estimator=grpo + loss_mode=vanilla in advantages, loss, gradient and metrics, with rollout IS
    weights: the whole mini-batch, 4 micro-batches, 2 dp ranks x 2 micro-batches (global batch info as
    verl's engine sets it)."""
    monkeypatch.setenv("RLCREDIT_STRATEGY", preset)
    monkeypatch.setattr(_actor, "_WARNED", set())
    adv_v, losses_v, total_v, grad_v, m_v = _run("grpo", "vanilla", actor, norm_by_std, split, seed)
    adv_r, losses_r, total_r, grad_r, m_r = _run("rlcredit", "rlcredit", actor, norm_by_std, split, seed)
    assert float(adv_v.abs().max()) > 0.1 and float(grad_v.abs().max()) > 0
    torch.testing.assert_close(adv_r, adv_v.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses_r, losses_v.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_r, grad_v, rtol=1e-5, atol=1e-6)
    assert [set(m) for m in m_r] == [set(m) for m in m_v]  # verl's metric keys, exactly
    for mine, theirs in zip(m_r, m_v):
        for key in theirs:
            assert abs(float(mine[key]) - float(theirs[key])) <= 1e-5 * (1 + abs(float(theirs[key]))), key
    if split == "whole":
        _, _, total_whole, _, _ = _run("grpo", "vanilla", actor, norm_by_std, "whole", seed)
        torch.testing.assert_close(total_r, total_whole.float(), rtol=1e-5, atol=1e-6)
    assert any(float(m["actor/pg_clipfrac_lower"]) > 0 for m in m_v) or split != "whole"  # the dual clip binds


def test_vanilla_policy_loss_fn_itself(monkeypatch):
    """compute_policy_loss_vanilla (not through ppo_loss) at the default ActorConfig, ratios up to e^3."""
    monkeypatch.setenv("RLCREDIT_STRATEGY", "grpo")
    old, logp, adv, mask = _batch(7)
    logp = (old + (logp.detach() - old) * 6).requires_grad_(True)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(3)) * 2
    results = {}
    for mode in ("rlcredit", "vanilla"):
        config = _actor_config(mode)
        config.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0])
        loss, metrics = verl_core.get_policy_loss_fn(mode)(old, logp, adv, mask, "token-mean", config, weights)
        results[mode] = (loss, torch.autograd.grad(loss, logp)[0], metrics)
    (mine, g_mine, m_mine), (theirs, g_theirs, m_theirs) = results["rlcredit"], results["vanilla"]
    torch.testing.assert_close(mine, theirs.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_mine, g_theirs, rtol=1e-5, atol=1e-6)
    assert set(m_mine) == set(m_theirs) and m_theirs["actor/pg_clipfrac_lower"] > 0
    assert all(abs(float(m_mine[k]) - m_theirs[k]) <= 1e-6 for k in m_theirs)


@pytest.mark.parametrize("spec,mode", [('{"policy_loss": "gspo"}', "seq-mean-token-mean"),
                                       ('{"policy_loss": {"name": "gspo", "aggregation": "token_mean"}}', "token-mean")])
def test_gspo_equals_verls_gspo_with_the_matching_actor_config(spec, mode, monkeypatch):
    """The gspo loss (GSPO's clip range, explicit) == verl's loss_mode=gspo with the same actor config."""
    import warnings

    monkeypatch.setenv("RLCREDIT_STRATEGY", spec)
    monkeypatch.setattr(_actor, "_WARNED", set())
    old, logp, adv, mask = _batch(11)
    logp = (old + (logp.detach() - old) * 4e-3).requires_grad_(True)  # sequence ratios around 1 +- 1e-3
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(4)) * 2
    results = {}
    for loss_mode in ("rlcredit", "gspo"):
        config = _actor_config(loss_mode, clip_ratio_low=3e-4, clip_ratio_high=4e-4, loss_agg_mode=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the actor config agrees with the loss: no warning
            loss, metrics = verl_core.get_policy_loss_fn(loss_mode)(old, logp, adv, mask, mode, config, weights)
        results[loss_mode] = (loss, torch.autograd.grad(loss, logp)[0], metrics)
    (mine, g_mine, m_mine), (theirs, g_theirs, m_theirs) = results["rlcredit"], results["gspo"]
    torch.testing.assert_close(mine, theirs.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_mine, g_theirs, rtol=1e-5, atol=1e-6)
    assert 0 < m_theirs["actor/pg_clipfrac"] < 1
    assert set(m_mine) == set(m_theirs) and all(abs(float(m_mine[k]) - m_theirs[k]) <= 1e-6 for k in m_theirs)


def test_ray_trainer_imports():
    """verl 0.9.1's ray_trainer needs cachetools, uvicorn and fastapi, which its base install misses."""
    from verl.trainer.ppo import ray_trainer

    assert callable(ray_trainer.compute_advantage)


def test_grpo_advantage_equals_verls_grpo_on_multi_sample_groups():
    rewards = torch.zeros(6, 4)
    rewards[:, -1] = torch.tensor([1.0, 0.0, 1.0, 0.5, 2.0, 0.5])
    mask = torch.ones(6, 4)
    uid = ["a", "a", "a", "b", "b", "b"]
    import numpy as np

    theirs, _ = verl_core.compute_grpo_outcome_advantage(rewards, mask, np.array(uid, dtype=object))
    mine, _ = ours.compute_advantage(rewards, mask, index=np.array(uid, dtype=object),
                                     config={"rlcredit_strategy": "grpo"})
    torch.testing.assert_close(mine, theirs.float(), rtol=1e-5, atol=1e-6)


# --- loss_mode=rlcredit with cispo/sapo/gmpo/kl_cov/clip_cov == verl's own loss modes -----------------------

# (strategy's policy loss, verl's loss_mode, actor config keys, policy_loss config keys, loss_agg_mode).
# The actor config matches the strategy's values; both runs get the same config but for loss_mode.
METHODS = {
    "cispo": ({"name": "cispo", "clip_low": 0.2, "clip_high": 0.28}, "cispo",
              {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}, {}, "token-mean"),
    "cispo_one_sided": ({"name": "cispo", "clip_high": 0.28, "aggregation": "seq_mean_token_sum_norm"}, "cispo",
                        {"clip_ratio_low": 1.0, "clip_ratio_high": 0.28, "loss_scale_factor": 8}, {},
                        "seq-mean-token-sum-norm"),
    "sapo": ({"name": "sapo", "tau_pos": 0.5, "tau_neg": 2.0}, "sapo", {"tau_pos": 0.5, "tau_neg": 2.0}, {},
             "seq-mean-token-mean"),
    "gmpo": ({"name": "gmpo", "clip_low": 0.1, "clip_high": 0.3}, "geo_mean",
             {"clip_ratio_low": 0.1, "clip_ratio_high": 0.3}, {}, "token-mean"),
    "kl_cov": ({"name": "kl_cov", "kl_cov_ratio": 0.2, "ppo_kl_coef": 0.5}, "kl_cov", {},
               {"kl_cov_ratio": 0.2, "ppo_kl_coef": 0.5}, "token-mean"),
    # clip_cov_ratio = 1: every candidate is cut, so verl's randperm draw and rlcredit's agree exactly.
    "clip_cov": ({"name": "clip_cov", "clip_cov_ratio": 1.0, "clip_cov_lb": -0.5, "clip_cov_ub": 0.5,
                  "clip_high": 0.28}, "clip_cov", {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28},
                 {"clip_cov_ratio": 1.0, "clip_cov_lb": -0.5, "clip_cov_ub": 0.5}, "token-mean"),
}


def _method_config(loss_mode, actor, policy_loss, mode):
    from verl.workers.config import ActorConfig, PolicyLossConfig

    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=mode,
                       policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy_loss), **actor)


def _method_run(method, loss_mode, split, seed):
    """verl's ppo_loss over the split, with loss_mode (rlcredit or verl's own): per-call losses, metrics, grad."""
    import warnings

    from verl.trainer.ppo.ray_trainer import compute_advantage

    spec, verl_mode, actor, policy_loss, mode = METHODS[method]
    data, logp = _rollout_batch(seed)
    data = compute_advantage(data, adv_estimator="grpo", norm_adv_by_std_in_grpo=True)
    if method == "gmpo":  # verl's geo_mean turns IS weights into a per-row geometric mean: compare without them
        data.batch.pop("rollout_is_weights")
    if method == "kl_cov":  # equal advantages in a micro-batch tie every covariance at 0, and verl's topk breaks
        # ties in no documented order (rlcredit: the earliest token): a per-token jitter makes the top-k unique
        jitter = torch.rand(data.batch["advantages"].shape, generator=torch.Generator().manual_seed(seed)) * 0.1
        data.batch["advantages"] = data.batch["advantages"] + jitter * data.batch["response_mask"]
    config = _method_config("rlcredit" if loss_mode == "rlcredit" else verl_mode, actor, policy_loss, mode)
    ranks = SPLITS[split]
    tokens, rows_total = int(data.batch["response_mask"].sum()), logp.shape[0]
    leaf = logp.clone().requires_grad_(True)
    losses, metrics = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the actor config agrees with the strategy: no warning
        for micro_batches in ranks:
            for rows in micro_batches:
                loss, m = _ppo_loss(config, data, rows, leaf, len(ranks), tokens, rows_total)
                losses.append(loss.float())
                metrics.append(m)
    total = torch.stack(losses).sum() / len(ranks)
    grad, = torch.autograd.grad(total, leaf)
    return torch.stack(losses), total, grad, metrics


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("seed", range(2))
def test_rlcredit_loss_mode_equals_verls_own_loss_modes(method, split, seed, monkeypatch):
    """verl's own ppo_loss: loss_mode=rlcredit with the strategy's cispo/sapo/gmpo/kl_cov/clip_cov equals verl's
    cispo/sapo/geo_mean/kl_cov/clip_cov at the matching actor config, with IS weights, on the whole mini-batch,
    4 micro-batches and 2 dp ranks x 2 micro-batches (verl's global batch info = rlcredit's Totals): each call's
    loss and metrics, and the gradient. verl's geo_mean ignores the global batch info (a mean over the call's
    rows), so rlcredit's gmpo equals it on the whole batch and, split, adds up to it where verl's would not."""
    monkeypatch.setenv("RLCREDIT_STRATEGY", json.dumps({"policy_loss": METHODS[method][0]}))
    monkeypatch.setattr(_actor, "_WARNED", set())
    losses_r, total_r, grad_r, m_r = _method_run(method, "rlcredit", split, seed)
    losses_v, total_v, grad_v, m_v = _method_run(method, "verl", split, seed)
    assert float(grad_v.abs().max()) > 0
    if method == "gmpo" and split != "whole":
        sizes = torch.tensor([len(rows) for micro in SPLITS[split] for rows in micro], dtype=torch.float32)
        torch.testing.assert_close(losses_r, losses_v * sizes / 8 * len(SPLITS[split]), rtol=1e-5, atol=1e-6)
        _, total_v, grad_v, _ = _method_run(method, "verl", "whole", seed)
    else:
        torch.testing.assert_close(losses_r, losses_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(total_r, total_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_r, grad_v, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(m_r, m_v):
        assert set(theirs) <= set(mine)  # verl's keys (kl_cov returns only actor/ppo_kl; ours has all three)
        for key in theirs:
            if key == "actor/pg_loss" and method == "gmpo" and split != "whole":
                continue  # the per-call loss value, compared (scaled) above
            assert abs(float(mine[key]) - float(theirs[key])) <= 1e-5 * (1 + abs(float(theirs[key]))), key
    if method == "clip_cov":
        assert any(float(m["actor/pg_clipfrac"]) > 0 for m in m_v)  # tokens were cut
    if method == "kl_cov":
        assert float(grad_r.abs().max()) > 0
