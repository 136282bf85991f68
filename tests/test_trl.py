"""CreditGRPOTrainer against real TRL: a tiny random-weight Qwen2, an offline tokenizer, no network.

Parity tests generate the same batch with a plain ``GRPOTrainer`` and a ``CreditGRPOTrainer``
(same weights, same seed), give both the same perturbed old log-probs (so ratios differ from 1 and
clipping is active), and compare TRL's own loss and its gradients.
"""

from __future__ import annotations

import types
import warnings

import attrs
import pytest
import torch

pytest.importorskip("trl")  # the `trl` extra is optional for the core

from accelerate import Accelerator  # noqa: E402
from datasets import Dataset  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

import rlcredit  # noqa: E402
from rlcredit.errors import RegistryError, SpecError  # noqa: E402
from rlcredit.integrations.trl import (  # noqa: E402
    LOSS_TYPES,
    CreditGRPOTrainer,
    check_trl_args,
    loss_type_for,
    trl_config_kwargs,
)
from tests.strategies import spawn_bounded  # noqa: E402
from tests.trl_setup import (  # noqa: E402  (fixtures: tokenizer, base_model, dataset)
    G, PROMPTS, TRL_EPS, VOCAB, base_model, dataset, generate, loss_and_grads, make_args, make_trainer, quiet,
    reward_len, reward_some_none, tokenizer,
)


# --- training runs -------------------------------------------------------------------------------


@pytest.mark.parametrize("credit", ["grpo", "entropy_forks"])
def test_two_step_training_changes_weights(credit, base_model, tokenizer, dataset, tmp_path):
    trainer = quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit=credit,
                    args={"epsilon_high": 0.28 if credit == "entropy_forks" else None})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    quiet(trainer.train)
    after = trainer.model.state_dict()
    assert trainer.state.global_step == 2
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    credit_out = trainer.last_credit
    mask = trainer.last_rollout.response_mask
    kept = ((credit_out.token_weights > 0) & mask).sum() / mask.sum()
    if credit == "entropy_forks":
        assert "entropy" in trainer.last_rollout.signals
        assert 0.0 < float(kept) <= 0.5  # the top 20% of valid tokens, ties kept
    else:
        assert float(kept) == 1.0
    logged = [h for h in trainer.state.log_history if "rlcredit/kept_fraction" in h]
    assert len(logged) == 2


def test_advantages_are_folded_weights(base_model, tokenizer, dataset, tmp_path):
    trainer = quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit="entropy_forks")
    out = generate(trainer)
    credit, rollout = trainer.last_credit, trainer.last_rollout
    assert out["advantages"].shape == out["completion_ids"].shape
    expected = credit.token_weights * credit.advantages.unsqueeze(1)
    torch.testing.assert_close(out["advantages"], expected, rtol=0, atol=0)
    assert bool((out["advantages"][~rollout.response_mask] == 0).all())
    # The entropies are TRL's own, at the sampling temperature, on the same batch.
    _, trl_entropy, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, rollout.model_inputs["input_ids"], rollout.model_inputs["attention_mask"],
        out["completion_ids"].shape[1], compute_entropy=True)
    torch.testing.assert_close(rollout.signals["entropy"], trl_entropy.float() * rollout.response_mask)
    # Group ids follow TRL's grouping: num_generations consecutive completions.
    assert rollout.group_ids.tolist() == [0] * G + [1] * G


def test_entropy_forks_mask_equals_trl_on_the_batch(base_model, tokenizer, dataset, tmp_path):
    trainer = quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit="entropy_forks")
    generate(trainer)
    rollout, credit = trainer.last_rollout, trainer.last_credit
    trl_mask = trainer.get_high_entropy_mask(rollout.signals["entropy"], rollout.response_mask.long(), 1 - 0.2)
    assert torch.equal(credit.token_weights > 0, trl_mask)


def trl_high_entropy_mask(entropies, mask, threshold):
    """TRL's own ``GRPOTrainer.get_high_entropy_mask``, bound to a fresh single-process accelerator.

    (accelerate's state is a process-wide singleton that every new trainer resets, so a trainer
    kept from an earlier test would hold a stale accelerator.)
    """
    owner = types.SimpleNamespace(accelerator=Accelerator(cpu=True))
    return GRPOTrainer.get_high_entropy_mask(owner, entropies, mask, threshold)


@settings(max_examples=40)
@given(
    data=st.data(),
    B=st.integers(1, 6),
    T=st.integers(1, 7),
    ties=st.booleans(),
)
def test_entropy_forks_mask_equals_trl_get_high_entropy_mask(data, B, T, ties):
    if ties:  # few distinct values: the quantile lands on ties
        values = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0]), min_size=B * T, max_size=B * T))
    else:
        values = data.draw(st.lists(st.floats(0.0, 5.0, width=32), min_size=B * T, max_size=B * T))
    entropies = torch.tensor(values, dtype=torch.float32).reshape(B, T)
    lengths = data.draw(st.lists(st.integers(0, T), min_size=B, max_size=B))
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    rollout = rlcredit.Rollout(mask, torch.zeros(B), torch.zeros(B, dtype=torch.long),
                               signals={"entropy": entropies * mask})
    credit = rlcredit.build("entropy_forks").assign(rollout)
    trl_mask = trl_high_entropy_mask(entropies, mask.long(), 1 - 0.2)
    assert torch.equal(credit.token_weights > 0, trl_mask)


# --- loss parity with plain GRPOTrainer ----------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_credit_loss_equals_plain_trl(loss_type, base_model, tokenizer, dataset, tmp_path):
    cfg = {"loss_type": loss_type, "scale_rewards": "group"}
    plain = quiet(make_trainer, GRPOTrainer, base_model, tokenizer, dataset, tmp_path / "p", args=cfg)
    exact = rlcredit.build("grpo", shapers=[{"name": "group_normalize", "eps": TRL_EPS}])
    ours = {name: quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path / name,
                        args=cfg, credit=credit)
            for name, credit in (("preset", "grpo"), ("trl_eps", exact))}
    for trainer in (plain, *ours.values()):
        trainer.current_gradient_accumulation_steps = 1
    out_plain = generate(plain)
    outs = {name: generate(trainer) for name, trainer in ours.items()}
    # Same weights and seed: the very same completions, rewards and TRL advantages.
    old = out_plain["completion_ids"].float()  # any fixed old log-probs off the current policy:
    logps, _, _ = plain._get_per_token_logps_and_entropies(
        plain.model, torch.cat([out_plain["prompt_ids"], out_plain["completion_ids"]], 1),
        torch.cat([out_plain["prompt_mask"], out_plain["completion_mask"]], 1), old.shape[1])
    noise = torch.empty_like(logps).uniform_(-0.4, 0.4, generator=torch.Generator().manual_seed(1))
    old = (logps.detach() + noise) * out_plain["completion_mask"]
    out_plain["old_per_token_logps"] = old
    loss_plain, grads_plain = loss_and_grads(plain, out_plain)
    assert abs(float(loss_plain)) > 1e-3  # ratios off 1 and clipping active: not a trivial 0 loss
    for name, out in outs.items():
        assert torch.equal(out["completion_ids"], out_plain["completion_ids"])
        out["old_per_token_logps"] = old
        loss, grads = loss_and_grads(ours[name], out)
        expected = out_plain["advantages"].unsqueeze(1) * out_plain["completion_mask"]
        if name == "trl_eps":  # the same epsilon as TRL: the same numbers
            torch.testing.assert_close(out["advantages"], expected, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(loss, loss_plain, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(grads, grads_plain, rtol=1e-5, atol=1e-7)
        else:  # TRL divides by std + 1e-4, the grpo preset by std + 1e-6: ~1e-4 / std relative
            torch.testing.assert_close(out["advantages"], expected, rtol=5e-3, atol=1e-5)
            torch.testing.assert_close(loss, loss_plain, rtol=5e-3, atol=1e-5)
            assert float((grads - grads_plain).norm()) <= 5e-3 * float(grads_plain.norm())


@pytest.mark.parametrize("preset,loss_type", [("entropy_forks", "dapo"), ("stapo", "dapo"), ("stapo", "grpo")])
def test_trl_loss_equals_the_strategys_own_loss(preset, loss_type, base_model, tokenizer, dataset, tmp_path):
    """The fold is exact: TRL's loss on folded advantages is the strategy's own loss on its credit."""
    loss_cfg = {"name": "clipped_surrogate", "clip_high": 0.28, "renormalize": preset == "stapo",
                "aggregation": "token_mean" if loss_type == "dapo" else "seq_mean_token_mean"}
    strategy = rlcredit.build(preset, policy_loss=loss_cfg)
    if preset == "stapo":  # keep more than a handful of tokens in a 64-word random model
        strategy = rlcredit.build(strategy.to_spec(), weighter={"name": "stapo", "prob_threshold": 0.05})
    trainer = quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit=strategy,
                    args={"loss_type": loss_type, "epsilon_high": 0.28})
    trainer.current_gradient_accumulation_steps = 1
    out = generate(trainer)
    rollout, credit = trainer.last_rollout, trainer.last_credit
    kept = credit.token_weights[rollout.response_mask]
    assert bool((kept == 0).any()) and bool((kept > 0).any())  # a real selection, not all-or-nothing
    mask = rollout.response_mask
    logps, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, rollout.model_inputs["input_ids"], rollout.model_inputs["attention_mask"], mask.shape[1])
    noise = torch.empty_like(logps).uniform_(-0.4, 0.4, generator=torch.Generator().manual_seed(2))
    old = torch.where(mask, logps.detach() + noise, 0.0)
    out["old_per_token_logps"] = old
    trl_loss = trainer.compute_loss(trainer.model, out)
    ours = strategy.loss(logps, attrs.evolve(rollout, old_logprobs=old), credit).loss
    torch.testing.assert_close(trl_loss, ours, rtol=1e-5, atol=1e-7)
    grads_trl = torch.autograd.grad(trl_loss, list(trainer.model.parameters()), allow_unused=True)
    logps2, _, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, rollout.model_inputs["input_ids"], rollout.model_inputs["attention_mask"], mask.shape[1])
    ours2 = strategy.loss(logps2, attrs.evolve(rollout, old_logprobs=old), credit).loss
    grads_ours = torch.autograd.grad(ours2, list(trainer.model.parameters()), allow_unused=True)
    for a, b in zip(grads_trl, grads_ours):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_unscorable_rows_get_zero_advantage_and_leave_the_baseline(base_model, tokenizer, dataset, tmp_path):
    exact = rlcredit.build("grpo", shapers=[{"name": "group_normalize", "eps": TRL_EPS}])
    plain = quiet(make_trainer, GRPOTrainer, base_model, tokenizer, dataset, tmp_path / "p", reward=reward_some_none)
    ours = quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path / "o",
                 reward=reward_some_none, credit=exact)
    out_plain, out = quiet(generate, plain), quiet(generate, ours)
    assert torch.equal(out["completion_ids"], out_plain["completion_ids"])
    skipped = ours.last_rollout.group_ids < 0
    assert bool(skipped.any()) and not bool(skipped.all())
    assert bool((out["advantages"][skipped] == 0).all())
    expected = out_plain["advantages"].unsqueeze(1) * out_plain["completion_mask"]
    torch.testing.assert_close(out["advantages"], expected, rtol=1e-6, atol=1e-7)


# --- configuration checks ------------------------------------------------------------------------


def test_use_liger_kernel_raises(base_model, tokenizer, dataset, tmp_path):
    with pytest.raises(SpecError, match="use_liger_kernel=True"):
        quiet(make_trainer, CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path,
              args={"use_liger_kernel": True}, credit="grpo")


def test_renormalize_raises_where_it_cannot_be_folded():
    strategy = rlcredit.build("grpo", policy_loss={"name": "clipped_surrogate", "renormalize": True})
    for loss_type in ("bnpo", "dr_grpo", "luspo"):
        with pytest.raises(SpecError, match=f"renormalize=True with loss_type='{loss_type}'"):
            check_trl_args(strategy, types.SimpleNamespace(loss_type=loss_type))
    check_trl_args(strategy, types.SimpleNamespace(loss_type="dapo"))  # folds exactly: no error


def test_bad_credit_raises(base_model, tokenizer, dataset, tmp_path):
    with pytest.raises(SpecError, match="credit= takes a preset name"):
        make_trainer(CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit=3)
    with pytest.raises(RegistryError, match="entropy_forks"):
        make_trainer(CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit="entropy_fork")


def test_inconsistent_loss_type_warns(base_model, tokenizer, dataset, tmp_path):
    with pytest.warns(UserWarning, match="aggregation: the strategy aggregates with 'token_mean'"):
        make_trainer(CreditGRPOTrainer, base_model, tokenizer, dataset, tmp_path, credit="dapo",
                     args={"loss_type": "grpo"})


BATCH_SCALED = {"shapers": [{"name": "batch_normalize", "center": False, "eps": 1e-4}, "group_center"]}
GSPO_KL = {"policy_loss": {"name": "gspo", "kl_coef": 0.04}}
DUAL_KL = {"policy_loss": {"name": "clipped_surrogate", "clip_high": 0.28, "dual_clip": 3.0, "kl_coef": 0.04,
                           "kl_bias_correction": True}}


@pytest.mark.parametrize("credit", ["grpo", "dapo", "dr_grpo", "entropy_forks", "stapo", BATCH_SCALED, GSPO_KL,
                                    DUAL_KL])
def test_trl_config_kwargs_are_consistent(credit, tmp_path):
    """GRPOConfig(**trl_config_kwargs(credit)) is a config check_trl_args finds consistent (dr_grpo included)."""
    strategy = rlcredit.build(credit)
    kwargs = trl_config_kwargs(credit)
    assert LOSS_TYPES[kwargs["loss_type"]] == strategy.policy_loss.aggregation
    args = quiet(make_args, tmp_path, **kwargs)
    assert check_trl_args(strategy, args) == []


def test_trl_config_kwargs_maps_each_field():
    assert trl_config_kwargs("dr_grpo")["scale_rewards"] == "none"
    assert trl_config_kwargs(BATCH_SCALED)["scale_rewards"] == "batch"
    assert trl_config_kwargs(GSPO_KL) == {"loss_type": "grpo", "epsilon": 3e-4, "epsilon_high": 4e-4, "beta": 0.04,
                                          "importance_sampling_level": "sequence", "use_bias_correction_kl": False,
                                          "scale_rewards": "group"}
    kw = trl_config_kwargs(DUAL_KL)
    assert (kw["delta"], kw["use_bias_correction_kl"], kw["epsilon_high"]) == (3.0, True, 0.28)
    assert "scale_rewards" not in trl_config_kwargs({"shapers": ["leave_one_out"]})  # no TRL equivalent
    with pytest.raises(SpecError, match="'clipped_surrogate'"):
        trl_config_kwargs(rlcredit.Strategy(policy_loss=_PlainPG()))


@attrs.frozen
class _PlainPG:
    """A policy loss that is not a clipped surrogate (-A logp, summed)."""

    requires = ()

    def __call__(self, logprobs, rollout, credit, *, reducer=None, totals=None):
        return rlcredit.LossOutput(-(credit.token_advantages() * logprobs).sum(), {})


def test_check_trl_args_lists_each_inconsistency():
    strategy = rlcredit.build("entropy_forks", policy_loss={
        "name": "clipped_surrogate", "dual_clip": 3.0, "kl_coef": 0.1, "entropy_penalty": 0.06,
        "aggregation": "seq_mean_token_sum_norm", "max_length": 10, "ratio": "sequence"})
    args = types.SimpleNamespace(loss_type="dr_grpo", epsilon=0.2, epsilon_high=0.3, beta=0.1, max_completion_length=6,
                                 top_entropy_quantile=0.2, scale_rewards="none", importance_sampling_level="token",
                                 multi_objective_aggregation="normalize_then_sum")
    heads = [m.split(":")[0] for m in check_trl_args(strategy, args)]
    assert heads == ["clip range", "dual clip", "importance sampling", "kl bias correction", "entropy penalty",
                     "max length", "entropy mask", "reward scaling", "rewards"]
    sequence = types.SimpleNamespace(loss_type="dapo", epsilon_high=0.28, delta=1.2, importance_sampling_level="sequence",
                                     beta=0.0)
    dual = rlcredit.build("entropy_forks", policy_loss={"name": "clipped_surrogate", "clip_high": 0.28,
                                                        "dual_clip": 1.2, "ratio": "sequence"})
    heads = [m.split(":")[0] for m in check_trl_args(dual, sequence)]
    assert heads == ["dual clip", "token weights"]  # delta <= 1 + epsilon_high; weights under a sequence ratio
    cispo = types.SimpleNamespace(loss_type="cispo")
    assert [m.split(":")[0] for m in check_trl_args(rlcredit.build("dapo"), cispo)] == ["loss form"]


def test_loss_type_for_maps_every_aggregation():
    for agg in rlcredit.functional.AGGREGATIONS:
        assert LOSS_TYPES[loss_type_for(agg)] == agg
    with pytest.raises(SpecError, match="unknown aggregation 'mean'"):
        loss_type_for("mean")


# --- two processes -------------------------------------------------------------------------------


def _two_process_worker(rank, world, port, queue):
    """One rank of a 2-process CPU (gloo) TRL run; groups of 4 straddle the ranks' rows of 6."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), HF_HUB_OFFLINE="1")
    warnings.simplefilter("ignore")
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None, max_position_embeddings=64)
    strategy = rlcredit.build("entropy_forks", shapers=[{"name": "group_normalize", "eps": TRL_EPS}])

    class Recording(CreditGRPOTrainer):
        def _credit_advantages(self, output, rewards_per_func):
            trl_advantages = output["advantages"].clone()
            folded = super()._credit_advantages(output, rewards_per_func)
            rollout = self.last_rollout
            # TRL's own rule on the same entropies, gathered across the two processes (a collective).
            trl_mask = self.get_high_entropy_mask(rollout.signals["entropy"], rollout.response_mask.long(), 0.8)
            # TRL's scale_rewards="batch" divisor (its nanstd of the gathered rewards) vs batch_normalize across
            # the two processes through the trainer's reducer.
            gathered = (rewards_per_func * self.reward_weights.unsqueeze(0)).nansum(dim=1)
            trl_batch = (gathered / (nanstd(gathered) + 1e-4))[rank * 6:(rank + 1) * 6]
            ours_batch = rlcredit.functional.batch_normalize(rollout.rewards, center=False, eps=1e-4,
                                                            reducer=self._credit_reducer_handle())
            queue.put((rank, rollout.group_ids.tolist(), trl_advantages.tolist(), folded.tolist(),
                       trl_mask.tolist(), (self.last_credit.token_weights > 0).tolist(), trl_batch.tolist(),
                       ours_batch.tolist()))
            return folded

    args = GRPOConfig(output_dir=f"{os.environ.get('TMPDIR', '/tmp')}/rlcredit-trl-mp{rank}",
                      per_device_train_batch_size=6, num_generations=G, max_completion_length=6, max_steps=1,
                      report_to="none", use_cpu=True, save_strategy="no", seed=0, epsilon_high=0.28,
                      ddp_timeout=120)  # a rank whose peer is gone fails in 2 min, not gloo's 30
    trainer = Recording(model=Qwen2ForCausalLM(cfg), reward_funcs=reward_len, args=args, processing_class=tokenizer,
                        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), credit=strategy)
    trainer.train()
    # Tear the gloo group down before exit: left to interpreter shutdown, its threads can abort
    # the process ("terminate called without an active exception").
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()
    # Results are already in the queue (a synchronous pipe write). Skip interpreter teardown: the
    # gloo group's C++ destructors can block on a peer that has already exited.
    os._exit(0)


@pytest.mark.slow
def test_two_processes_split_groups_and_batch_quantile():
    """With 2 processes (gloo), a group split across them is normalised whole, as TRL does, the
    batch-scope entropy quantile spans both, as TRL's get_high_entropy_mask does, and batch_normalize's
    std spans both, as TRL's scale_rewards="batch"."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    spawn_bounded(_two_process_worker, (2, port, queue), 2, timeout_s=240)
    results = {}
    while not queue.empty():
        rank, *rest = queue.get()
        results[rank] = [torch.tensor(x) for x in rest[1:]] + [rest[0]]
    assert sorted(results) == [0, 1], f"expected one record per rank, got ranks {sorted(results)}"
    assert results[0][-1] == [0, 0, 0, 0, 1, 1] and results[1][-1] == [1, 1, 2, 2, 2, 2]  # group 1 is split
    for trl_advantages, folded, trl_mask, kept, trl_batch, ours_batch, _ in results.values():
        assert torch.equal(kept, trl_mask)
        torch.testing.assert_close(ours_batch, trl_batch, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(folded, trl_advantages.unsqueeze(1) * trl_mask, rtol=1e-6, atol=1e-7)
