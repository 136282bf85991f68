"""Contract test against the REAL verl (run by scripts/verl_contract.sh in .venv-verl, not by `make test`).

verl needs transformers < 5.11 and ray, so it lives in its own virtual environment. These tests
check what tests/test_verl.py can only check against a fake: that importing
``rlcredit.integrations.verl`` registers in verl's own registries, with verl's own signatures, and
that rlcredit's aggregation and policy loss equal verl's ``agg_loss`` and ``vanilla`` loss.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

verl_core = pytest.importorskip("verl.trainer.ppo.core_algos")  # this file runs only where verl is installed

import rlcredit  # noqa: E402
from rlcredit.integrations import verl as ours  # noqa: E402  (import registers "rlcredit" in verl)

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


def _actor_config(clip_low: float, clip_high: float, clip_c: float, info: dict):
    from verl.workers.config import ActorConfig

    fields = {f.name for f in ActorConfig.__dataclass_fields__.values()}
    kwargs = dict(strategy="fsdp", rollout_n=1, clip_ratio=clip_low, clip_ratio_low=clip_low, clip_ratio_high=clip_high,
                  clip_ratio_c=clip_c, ppo_micro_batch_size_per_gpu=1)
    config = ActorConfig(**{k: v for k, v in kwargs.items() if k in fields})
    config.global_batch_info.update(info)
    return config


@pytest.mark.parametrize("preset,mode", [("dapo", "token-mean"), ("grpo", "token-mean"),
                                         ("dr_grpo", "seq-mean-token-sum-norm")])
@pytest.mark.parametrize("seed", range(3))
def test_policy_loss_equals_verl_vanilla(preset, mode, seed, monkeypatch):
    """Our registered loss with the strategy's clip range == verl's vanilla loss, dual clip disabled."""
    monkeypatch.setenv("RLCREDIT_STRATEGY", preset)
    old, logp, adv, mask = _batch(seed)
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed + 100)) * 2
    loss_cfg = rlcredit.build(preset).policy_loss
    info = dict(dp_size=2, batch_num_tokens=int(mask.sum()) * 2, global_batch_size=mask.shape[0] * 2,
                loss_scale_factor=12)
    config = _actor_config(loss_cfg.clip_low, loss_cfg.clip_high, 1e9, info)  # c = 1e9: dual clip never binds
    mine, _ = verl_core.get_policy_loss_fn("rlcredit")(old, logp, adv, mask, mode, config, weights)
    theirs, _ = verl_core.get_policy_loss_fn("vanilla")(old, logp, adv, mask, mode, config, weights)
    torch.testing.assert_close(mine, theirs.float(), rtol=1e-5, atol=1e-6)
    g_mine, = torch.autograd.grad(mine, logp)
    g_theirs, = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(g_mine, g_theirs, rtol=1e-5, atol=1e-6)


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
