"""HFPolicy on a tiny random-weight Qwen2 against a naive full-logits reference."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import rlcredit
from rlcredit import AdapterError, HFPolicy, RolloutError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).eval()


def _batch(B=3, P=4, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 101, (B, P + T), generator=g)
    lengths = torch.tensor([T, 2, 0][:B])
    mask = torch.arange(T)[None] < lengths[:, None]
    return ids, mask


def _naive(model, ids, mask, temperature=1.0):
    T = mask.shape[1]
    logits = model(input_ids=ids).logits[:, -T - 1:-1].float() / temperature
    logp = logits.log_softmax(-1)
    lp = logp.gather(-1, ids[:, -T:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp * mask, ent * mask


@pytest.mark.parametrize("rows_per_chunk, tokens_per_chunk", [(1, 1), (2, 3), (8, 64)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_naive_logits(model, rows_per_chunk, tokens_per_chunk, temperature):
    ids, mask = _batch()
    policy = HFPolicy(model, rows_per_chunk=rows_per_chunk, tokens_per_chunk=tokens_per_chunk)
    stats = policy.response_stats({"input_ids": ids}, mask, temperature=temperature, entropy=True, hidden=True)
    lp, ent = _naive(model, ids, mask, temperature)
    assert torch.allclose(stats.logprobs, lp, atol=1e-5)
    assert torch.allclose(stats.entropy, ent, atol=1e-5)
    assert stats.hidden.shape == (3, 5, 32) and torch.all(stats.hidden[~mask] == 0)
    hidden_full = model.model(input_ids=ids).last_hidden_state[:, -6:-1]
    assert torch.allclose(stats.hidden[mask], hidden_full[mask], atol=1e-5)


def test_logprobs_are_differentiable_and_padding_has_no_gradient(model):
    ids, mask = _batch()
    policy = HFPolicy(model, rows_per_chunk=2)
    lp = policy.logprobs({"input_ids": ids}, mask)
    assert lp.requires_grad
    s = rlcredit.build("grpo")
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 0]), old_logprobs=lp.detach())
    loss = s.loss(lp, r, s.assign(r)).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    model.zero_grad()


def test_entropy_estimator_uses_the_policy(model):
    ids, mask = _batch()
    policy = HFPolicy(model)
    r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 0]), model_inputs={"input_ids": ids})
    s = rlcredit.build("grpo", estimators={"entropy": "entropy"})
    credit = s.assign(r, policy)
    _, ent = _naive(model, ids, mask)
    assert torch.allclose(credit.scores["entropy"], ent, atol=1e-5)


def test_bad_inputs(model):
    ids, mask = _batch()
    policy = HFPolicy(model)
    with pytest.raises(RolloutError, match="input_ids"):
        policy.response_stats({"attention_mask": torch.ones_like(ids)}, mask)
    with pytest.raises(RolloutError, match="at least one prompt token"):
        policy.response_stats({"input_ids": ids[:, -5:]}, mask)
    with pytest.raises(RolloutError, match="bool"):
        policy.response_stats({"input_ids": ids}, mask.float())
    with pytest.raises(AdapterError, match="leading dim"):
        policy.response_stats({"input_ids": ids, "pixel_values": torch.zeros(7, 3)}, mask)
    with pytest.raises(AdapterError, match="LM head"):
        HFPolicy(torch.nn.Linear(2, 2))
    with pytest.raises(rlcredit.SpecError, match="rows_per_chunk"):
        HFPolicy(model, rows_per_chunk=0)


def test_import_rlcredit_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, rlcredit; print('transformers' in sys.modules, 'rlcredit_mm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
