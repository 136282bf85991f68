"""Shared set-up of the TRL tests: a tiny random-weight Qwen2, an offline word-level tokenizer, no network."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

pytest.importorskip("trl")  # the `trl` extra is optional for the core

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from trl import GRPOConfig  # noqa: E402

VOCAB = 64
G = 4  # num_generations
PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10 w11"]
TRL_EPS = 1e-4  # TRL's std epsilon in its group-normalised advantage (ours defaults to 1e-6)


@pytest.fixture(scope="module")
def tokenizer():
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="module")
def base_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0, eos_token_id=1,
                      bos_token_id=None, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg)


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict({"prompt": PROMPTS})


def reward_len(completions, **kwargs):
    """Toy reward: words in the completion, mod 3 (varies within groups)."""
    return [float(len(c.split()) % 3) + 0.1 * len(c) for c in completions]


def reward_some_none(completions, **kwargs):
    """Toy reward that skips (None) every completion with an even number of words."""
    return [None if len(c.split()) % 2 == 0 else float(len(c)) for c in completions]


def make_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), per_device_train_batch_size=G * 2, num_generations=G,
                  max_completion_length=6, max_steps=2, report_to="none", use_cpu=True, save_strategy="no",
                  logging_steps=1, learning_rate=1e-2, seed=0, temperature=1.0)
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def make_trainer(cls, base_model, tokenizer, dataset, tmp_path, reward=reward_len, **kwargs):
    args = make_args(tmp_path, **kwargs.pop("args", {}))
    return cls(model=copy.deepcopy(base_model), reward_funcs=reward, args=args, train_dataset=dataset,
               processing_class=tokenizer, **kwargs)


def batch_inputs(prompts=PROMPTS[:2]):
    return [{"prompt": p} for p in prompts for _ in range(G)]  # what TRL's RepeatSampler yields


def generate(trainer, seed=0):
    trainer.model.train()
    torch.manual_seed(seed)
    return trainer._generate_and_score_completions(batch_inputs())


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def loss_and_grads(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters() if p.grad is not None])
    return loss.detach(), grads
