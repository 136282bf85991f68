"""cispo and sapo against TRL's own GRPOTrainer loss (``loss_type="cispo"`` / ``"sapo"``) on a tiny real model.

A plain ``GRPOTrainer`` generates a batch (uneven completion lengths), the old log-probs are
perturbed so that ratios leave 1 and the clips/gates act, and TRL's ``compute_loss`` (whole batch,
then two micro-batches as gradient accumulation would run them) is compared with rlcredit's loss on
the same log-probs: value and gradient of every model parameter.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import rlcredit  # noqa: E402
from rlcredit.integrations.trl import check_trl_args, trl_config_kwargs  # noqa: E402
from rlcredit.losses import CISPO, SAPO  # noqa: E402

VOCAB, G = 64, 4


@pytest.fixture(scope="module")
def parts():
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1,
                                         bos_token_id=None, max_position_embeddings=64))
    return tokenizer, model


def _reward(completions, **kwargs):
    return [float(len(c.split()) % 3) + 0.1 * len(c) for c in completions]


def _trainer(parts, tmp_path, **overrides):
    tokenizer, model = parts
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=G * 2, num_generations=G,
                      max_completion_length=8, max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                      seed=0, temperature=1.0, scale_rewards="group", **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GRPOTrainer(model=copy.deepcopy(model), reward_funcs=_reward, args=args, processing_class=tokenizer,
                           train_dataset=Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5"]}))


def _batch(trainer):
    trainer.model.train()
    torch.manual_seed(3)
    out = trainer._generate_and_score_completions([{"prompt": p} for p in ("w1 w2 w3", "w4 w5") for _ in range(G)])
    mask = out["completion_mask"].bool()
    assert len(set(mask.sum(1).tolist())) > 1  # uneven lengths
    logps = _logps(trainer, out)
    noise = torch.empty_like(logps).uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(1))
    out["old_per_token_logps"] = torch.where(mask, logps.detach() + noise, 0.0)
    return out


def _logps(trainer, out):
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    attn = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, out["completion_ids"].shape[1])
    return logps


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def _rows(out, rows):
    return {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 2 * G else v)
            for k, v in out.items()}


def _ours(loss_fn, trainer, out, rows=None, totals=None):
    part = out if rows is None else _rows(out, rows)
    mask = part["completion_mask"].bool()
    r = rlcredit.Rollout(mask, torch.zeros(mask.shape[0]), torch.zeros(mask.shape[0], dtype=torch.long),
                         old_logprobs=part["old_per_token_logps"])
    credit = rlcredit.Credit({}, mask.float(), part["advantages"])
    extra = {} if totals is None else {"totals": totals}
    return loss_fn(_logps(trainer, part), r, credit, **extra).loss, r, credit


@pytest.mark.parametrize("loss_fn", [
    CISPO(clip_high=0.28),  # TRL's epsilon_high is the absolute cap 1 + clip_high
    CISPO(clip_high=4.0),   # ScaleRL's recommended cap
    SAPO(),
    SAPO(tau_pos=0.5, tau_neg=2.0),
])
def test_loss_and_gradients_equal_trl(loss_fn, parts, tmp_path):
    """The GRPOConfig that trl_config_kwargs gives makes TRL's own loss equal the strategy's (and check_trl_args
    finds it consistent)."""
    strategy = rlcredit.Strategy(policy_loss=loss_fn)
    overrides = trl_config_kwargs(strategy)
    overrides.pop("scale_rewards", None)  # _trainer sets scale_rewards="group", the default shaper's
    trainer = _trainer(parts, tmp_path, **overrides)
    assert trainer.loss_type == ("cispo" if isinstance(loss_fn, CISPO) else "sapo")
    assert check_trl_args(strategy, trainer.args) == []
    trainer.current_gradient_accumulation_steps = 1
    out = _batch(trainer)
    trl_loss = trainer.compute_loss(trainer.model, out)
    assert abs(trl_loss.item()) > 1e-4
    ours, r, credit = _ours(loss_fn, trainer, out)
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_grads(trainer.model, ours), _grads(trainer.model, trainer.compute_loss(trainer.model, out)),
                               rtol=1e-5, atol=1e-7)
    metrics = loss_fn(_logps(trainer, out).detach(), r, credit).metrics
    if loss_fn == CISPO(clip_high=0.28):
        assert metrics["clip_fraction"] > 0  # the cap acts on this batch
    if isinstance(loss_fn, SAPO):
        assert abs(float(metrics["gate_mean"]) - 2.0) > 1e-3  # ratios off 1: the gates differ from 4 sigmoid(0)

    # Gradient accumulation over two micro-batches of 4 rows: TRL divides by the generation batch's tokens
    # (cispo) or by the number of accumulation steps (sapo); rlcredit by the whole batch's totals.
    trainer.current_gradient_accumulation_steps = 2
    trainer.args.steps_per_generation = 2  # as TRL sets it for 2 accumulation steps
    totals = loss_fn.totals(r, credit)
    halves = ([0, 2, 4, 6], [1, 3, 5, 7])
    trl_parts = [trainer.compute_loss(trainer.model, _rows(out, rows)) for rows in halves]
    our_parts = [_ours(loss_fn, trainer, out, rows, totals)[0] for rows in halves]
    torch.testing.assert_close(sum(our_parts), sum(trl_parts), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(sum(our_parts), ours, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(_grads(trainer.model, sum(our_parts)), _grads(trainer.model, sum(trl_parts)),
                               rtol=1e-5, atol=1e-7)
