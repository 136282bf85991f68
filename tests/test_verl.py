"""rlcredit.integrations.verl without verl: a FAKE ``verl.trainer.ppo.core_algos`` stands in for verl.

verl needs transformers < 5.11 and ray, so it is kept out of the main environment. The fake module
below mimics verl 0.9.1's registry API (``register_policy_loss``, ``get_policy_loss_fn``,
``register_adv_est``, ``get_adv_estimator_fn`` and their dicts) and re-states verl 0.9.1's
``agg_loss`` formula line by line. It is a fake, not verl: the real contract (verl's own registry
and ``agg_loss``) is checked by ``scripts/verl_contract.sh`` in a separate virtual environment.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import types
from enum import Enum

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcredit
from rlcredit import functional as F
from rlcredit.errors import RegistryError, RolloutError, SpecError
from rlcredit.integrations import verl as V  # the main environment has no verl: imports, registers nothing

MODULE = "rlcredit.integrations.verl"
VERL_LOSS_PARAMS = ["old_log_prob", "log_prob", "advantages", "response_mask", "loss_agg_mode", "config",
                    "rollout_is_weights"]


# --- the fake verl -------------------------------------------------------------------------------


def _fake_core_algos() -> types.ModuleType:
    """A stand-in for ``verl.trainer.ppo.core_algos`` (verl 0.9.1's registry API and agg_loss)."""
    mod = types.ModuleType("verl.trainer.ppo.core_algos")
    mod.POLICY_LOSS_REGISTRY = {}
    mod.ADV_ESTIMATOR_REGISTRY = {}

    def register_policy_loss(name):
        def decorator(func):
            mod.POLICY_LOSS_REGISTRY[name] = func
            return func
        return decorator

    def get_policy_loss_fn(name):
        if name not in mod.POLICY_LOSS_REGISTRY:
            raise ValueError(f"Unsupported loss mode: {name}. Supported modes are: {list(mod.POLICY_LOSS_REGISTRY)}")
        return mod.POLICY_LOSS_REGISTRY[name]

    def register_adv_est(name_or_enum):
        def decorator(fn):
            name = name_or_enum.value if isinstance(name_or_enum, Enum) else name_or_enum
            if name in mod.ADV_ESTIMATOR_REGISTRY and mod.ADV_ESTIMATOR_REGISTRY[name] != fn:
                raise ValueError(f"Adv estimator {name} has already been registered")
            mod.ADV_ESTIMATOR_REGISTRY[name] = fn
            return fn
        return decorator

    def get_adv_estimator_fn(name_or_enum):
        name = name_or_enum.value if isinstance(name_or_enum, Enum) else name_or_enum
        if name not in mod.ADV_ESTIMATOR_REGISTRY:
            raise ValueError(f"Unknown advantage estimator simply: {name}")
        return mod.ADV_ESTIMATOR_REGISTRY[name]

    mod.register_policy_loss = register_policy_loss
    mod.get_policy_loss_fn = get_policy_loss_fn
    mod.register_adv_est = register_adv_est
    mod.get_adv_estimator_fn = get_adv_estimator_fn
    mod.agg_loss = verl_agg_loss
    return mod


def _masked_sum(values, mask):  # verl_F.masked_sum: NaN outside the mask does not leak
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum()


def verl_agg_loss(loss_mat, loss_mask, loss_agg_mode, dp_size=1, batch_num_tokens=None, global_batch_size=None,
                  loss_scale_factor=None):
    """Re-statement of verl 0.9.1 ``core_algos.agg_loss`` (same branches, same formulas)."""
    loss_mask = loss_mask.float()
    if loss_agg_mode == "token-mean":
        if batch_num_tokens is None:
            if dp_size > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            batch_num_tokens = loss_mask.sum()
        return _masked_sum(loss_mat, loss_mask) / batch_num_tokens * dp_size
    if loss_agg_mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        seq_mask = (torch.sum(loss_mask, dim=-1) > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = seq_mask.sum()
        loss = _masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
        if loss_agg_mode == "seq-mean-token-sum-norm":
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    if loss_agg_mode == "seq-mean-token-mean":
        seq_mask = torch.sum(loss_mask, dim=-1)
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / (seq_mask + 1e-8)
        seq_mask = (seq_mask > 0).float()
        if global_batch_size is None:
            if dp_size > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            global_batch_size = seq_mask.sum()
        return _masked_sum(seq_losses, seq_mask) / global_batch_size * dp_size
    raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")


@pytest.fixture
def fake_verl(monkeypatch):
    """Install the fake verl in sys.modules and import our module fresh against it."""
    core = _fake_core_algos()
    pkgs = {name: types.ModuleType(name) for name in ("verl", "verl.trainer", "verl.trainer.ppo")}
    pkgs["verl"].trainer = pkgs["verl.trainer"]
    pkgs["verl.trainer"].ppo = pkgs["verl.trainer.ppo"]
    pkgs["verl.trainer.ppo"].core_algos = core
    for name, module in {**pkgs, core.__name__: core}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    module = importlib.import_module(MODULE)
    return core, module


@pytest.fixture
def verl_mod(monkeypatch):
    """Our module imported without verl (the normal state of the main environment)."""
    monkeypatch.setitem(sys.modules, "verl", None)  # `import verl` raises ImportError
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    return importlib.import_module(MODULE)


# --- registration --------------------------------------------------------------------------------


def test_imports_cleanly_without_verl(verl_mod):
    assert verl_mod.REGISTERED is False
    assert verl_mod.register() is False


def test_import_registers_both_names_with_verls_signatures(fake_verl):
    core, module = fake_verl
    assert module.REGISTERED is True
    loss_fn = core.get_policy_loss_fn("rlcredit")
    assert loss_fn is module.compute_policy_loss
    params = inspect.signature(loss_fn).parameters
    assert list(params) == VERL_LOSS_PARAMS
    assert params["loss_agg_mode"].default == "token-mean"
    assert params["config"].default is None and params["rollout_is_weights"].default is None
    est = core.get_adv_estimator_fn("rlcredit")
    assert est is module.compute_advantage
    # verl's compute_advantage calls a registered estimator with exactly these keywords.
    adv, returns = est(token_level_rewards=torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
                       response_mask=torch.ones(2, 2), config={"rlcredit_strategy": "grpo"},
                       index=["u", "u"], reward_baselines=torch.zeros(2))
    assert torch.equal(adv, returns)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) * 0.70710677)


def test_reimport_is_idempotent(fake_verl, monkeypatch):
    core, _ = fake_verl
    monkeypatch.delitem(sys.modules, MODULE)
    module = importlib.import_module(MODULE)  # a second import must not trip verl's duplicate check
    assert core.ADV_ESTIMATOR_REGISTRY["rlcredit"] is module.compute_advantage
    assert core.POLICY_LOSS_REGISTRY["rlcredit"] is module.compute_policy_loss


# --- aggregation == verl's agg_loss --------------------------------------------------------------

MODES = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]


@st.composite
def loss_batches(draw, max_b=6, max_t=7):
    B = draw(st.integers(1, max_b))
    T = draw(st.integers(1, max_t))
    values = draw(st.lists(st.floats(-5, 5, width=32), min_size=B * T, max_size=B * T))
    lengths = draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    loss = torch.tensor(values, dtype=torch.float32).reshape(B, T)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return loss, mask


@given(batch=loss_batches(), mode=st.sampled_from(MODES), scale=st.sampled_from([None, 16]))
def test_aggregate_equals_verl_agg_loss_single_rank(batch, mode, scale):
    loss, mask = batch
    ours = V.aggregate(loss, mask, mode, loss_scale_factor=scale)
    theirs = verl_agg_loss(loss, mask.long(), mode, loss_scale_factor=scale)
    if not bool(mask.any()):
        theirs = torch.nan_to_num(theirs)  # verl divides 0 by 0 tokens/rows (NaN); rlcredit defines it as 0
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)


@given(batch=loss_batches(max_b=8), mode=st.sampled_from(MODES), ranks=st.integers(1, 4), scale=st.sampled_from([None, 9]))
def test_aggregate_equals_verl_agg_loss_across_ranks(batch, mode, ranks, scale):
    """Each dp rank's loss matches verl's with global statistics, and their mean is the 1-rank loss."""
    loss, mask = batch
    shards = [(loss[r::ranks], mask[r::ranks]) for r in range(ranks) if loss[r::ranks].shape[0] > 0]
    R = len(shards)
    info = dict(dp_size=R, batch_num_tokens=int(mask.sum()), global_batch_size=loss.shape[0],
                loss_scale_factor=scale if scale is not None else loss.shape[1])
    per_rank = []
    for x, m in shards:
        ours = V.aggregate(x, m, mode, **info)
        theirs = verl_agg_loss(x, m.long(), mode, **info)
        if info["batch_num_tokens"] == 0:
            theirs = torch.nan_to_num(theirs)
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-6)
        per_rank.append(ours)
    single = V.aggregate(loss, mask, mode, batch_num_tokens=info["batch_num_tokens"],
                                global_batch_size=loss.shape[0], loss_scale_factor=info["loss_scale_factor"])
    torch.testing.assert_close(torch.stack(per_rank).mean(), single, rtol=1e-5, atol=1e-6)


def test_aggregate_rejects_what_rlcredit_does_not_aggregate(verl_mod):
    x, m = torch.ones(2, 3), torch.ones(2, 3)
    with pytest.raises(SpecError, match="unsupported loss_agg_mode 'token-sum'"):
        verl_mod.aggregate(x, m, "token-sum")
    with pytest.raises(SpecError, match="without batch_num_tokens"):
        verl_mod.aggregate(x, m, "token-mean", dp_size=2)
    with pytest.raises(SpecError, match="without global_batch_size"):
        verl_mod.aggregate(x, m, "seq-mean-token-mean", dp_size=2)


# --- strategy resolution -------------------------------------------------------------------------


def test_strategy_from_env_config_and_json(verl_mod, monkeypatch):
    monkeypatch.setenv("RLCREDIT_STRATEGY", "dr_grpo")
    assert verl_mod.resolve_strategy() == rlcredit.build("dr_grpo")
    assert verl_mod.resolve_strategy({"rlcredit_strategy": "dapo"}) == rlcredit.build("dapo")  # config wins
    nested = {"policy_loss": {"loss_mode": "rlcredit", "rlcredit_strategy": "entropy_forks"}}
    assert verl_mod.resolve_strategy(nested) == rlcredit.build("entropy_forks")
    spec = {"shapers": ["group_center"], "policy_loss": {"name": "clipped_surrogate", "clip_high": 0.3}}
    monkeypatch.setenv("RLCREDIT_STRATEGY", json.dumps(spec))
    assert verl_mod.resolve_strategy() == rlcredit.build(spec)
    assert verl_mod.resolve_strategy() is verl_mod.resolve_strategy()  # cached: no rebuild per micro-batch


def test_strategy_errors(verl_mod, monkeypatch):
    monkeypatch.delenv("RLCREDIT_STRATEGY", raising=False)
    with pytest.raises(SpecError, match="RLCREDIT_STRATEGY"):
        verl_mod.resolve_strategy(None)
    monkeypatch.setenv("RLCREDIT_STRATEGY", "{not json")
    with pytest.raises(SpecError, match="does not parse"):
        verl_mod.resolve_strategy()
    monkeypatch.setenv("RLCREDIT_STRATEGY", "entropy_fork")
    with pytest.raises(RegistryError, match="entropy_forks"):
        verl_mod.resolve_strategy()


@pytest.mark.parametrize("preset,where", [("grpo", "advantage_estimator"), ("dapo", "advantage_estimator"),
                                          ("dr_grpo", "advantage_estimator"), ("entropy_forks", "batch"),
                                          ("stapo", "batch"), ("vppo", "worker"), ("vppo_paper", "worker"),
                                          ("at_rl", "worker")])
def test_credit_location_of_presets(verl_mod, preset, where):
    assert verl_mod.credit_location(preset) == where


# --- the advantage estimator and the worker extension --------------------------------------------


def test_advantage_estimator_matches_group_shapers(verl_mod):
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1], [1, 1, 0]]).bool()
    rewards = torch.zeros(5, 3)
    rewards[torch.arange(5), mask.sum(1) - 1] = torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0])
    uid = ["a", "b", "a", "b", "c"]
    ids = torch.tensor([0, 1, 0, 1, 2])
    for preset, fn in (("grpo", F.group_normalize), ("dr_grpo", F.group_center)):
        adv, _ = verl_mod.compute_advantage(rewards, mask.long(), index=uid, config={"rlcredit_strategy": preset})
        expected = fn(rewards.sum(1), ids).unsqueeze(1) * mask
        torch.testing.assert_close(adv, expected)


def test_advantage_estimator_points_to_apply_credit(verl_mod):
    with pytest.raises(RolloutError, match="apply_credit"):
        verl_mod.compute_advantage(torch.ones(2, 2), torch.ones(2, 2), index=["a", "a"],
                                   config={"rlcredit_strategy": "entropy_forks"})
    with pytest.raises(RolloutError, match="uid"):
        verl_mod.compute_advantage(torch.ones(2, 2), torch.ones(2, 2), index=None,
                                   config={"rlcredit_strategy": "grpo"})


def _tiny_batch():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = Qwen2ForCausalLM(cfg).eval()
    B, P, T = 4, 3, 5
    ids = torch.randint(0, 32, (B, P + T))
    response_mask = torch.arange(T).unsqueeze(0) < torch.tensor([5, 3, 4, 1]).unsqueeze(1)
    attention = torch.cat([torch.ones(B, P, dtype=torch.long), response_mask.long()], dim=1)
    rewards = torch.zeros(B, T)
    rewards[:, 0] = torch.tensor([1.0, 0.0, 0.0, 1.0])
    batch = {"input_ids": ids, "attention_mask": attention, "responses": ids[:, P:],
             "response_mask": response_mask, "token_level_rewards": rewards, "uid": ["x", "x", "y", "y"]}
    return model, batch


def test_apply_credit_through_the_model_equals_precomputed_entropy(verl_mod):
    """The worker path (entropy from the model) and the batch path (verl's entropys) agree."""
    model, batch = _tiny_batch()
    with_model = dict(batch)
    credit_model = verl_mod.apply_credit(with_model, model=model, credit="entropy_forks")
    stats = rlcredit.HFPolicy(model).response_stats(
        {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, batch["response_mask"],
        entropy=True, logprobs=False)
    with_batch = dict(batch, entropys=stats.entropy)
    credit_batch = verl_mod.apply_credit(with_batch, credit="entropy_forks")
    torch.testing.assert_close(with_model["advantages"], with_batch["advantages"])
    assert torch.equal(with_model["advantages"], with_model["returns"])
    expected = credit_batch.token_weights * credit_batch.advantages.unsqueeze(1)
    torch.testing.assert_close(with_batch["advantages"], expected)
    torch.testing.assert_close(credit_model.scores["entropy"], credit_batch.scores["entropy"])
    v1_batch = dict(batch, entropy=stats.entropy)  # verl's v1 trainer names it "entropy"
    verl_mod.apply_credit(v1_batch, credit="entropy_forks")
    torch.testing.assert_close(v1_batch["advantages"], with_batch["advantages"])
    kept = credit_batch.token_weights[batch["response_mask"]]
    assert 0 < int((kept > 0).sum()) < int(batch["response_mask"].sum())


def test_apply_credit_reads_a_dataproto_like_object(verl_mod):
    _, batch = _tiny_batch()
    uid = batch.pop("uid")
    data = types.SimpleNamespace(batch=batch, non_tensor_batch={"uid": uid})
    credit = verl_mod.apply_credit(data, credit="dr_grpo")
    expected = F.group_center(batch["token_level_rewards"].sum(1), torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(credit.advantages, expected)
    assert data.batch["advantages"].shape == batch["response_mask"].shape


def test_apply_credit_names_what_is_missing(verl_mod):
    _, batch = _tiny_batch()
    with pytest.raises(RolloutError, match=r"signals\['entropy'\]"):
        verl_mod.apply_credit(batch, credit="entropy_forks")  # no entropys, no model
    del batch["token_level_rewards"]
    with pytest.raises(RolloutError, match="token_level_rewards"):
        verl_mod.apply_credit(batch, credit="grpo")
