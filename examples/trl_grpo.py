"""GRPO with TRL and an rlcredit strategy: entropy forks on a text model.

TRL's ``GRPOTrainer`` generates and scores; ``CreditGRPOTrainer`` adds one argument, ``credit=``,
whose strategy computes the token weights (here: the top 20% entropy "forking" tokens of the
batch) that replace TRL's advantages, ``A_{i,t} = w_{i,t} A_i``. TRL's own loss then runs,
configured to match the strategy by ``trl_config_kwargs``.

    python examples/trl_grpo.py --quick                      # offline: a tiny random Qwen2, ~10 s on a CPU
    python examples/trl_grpo.py --model Qwen/Qwen2.5-0.5B-Instruct --steps 200   # a real run (downloads it)
    python examples/trl_grpo.py --quick --credit grpo        # any preset, spec dict/file or Strategy

The block between the "recipe" markers is what docs/integrations/trl.md shows (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import warnings

import torch

# --- recipe (docs/integrations/trl.md) ---
from datasets import Dataset
from trl import GRPOConfig

from rlcredit.integrations.trl import CreditGRPOTrainer, trl_config_kwargs

PROMPTS = ["Count from one to five :", "What is 12 times 12 ?", "List three prime numbers :",
           "Write the year of the first moon landing :"]


def reward_digits(completions, **kwargs):
    """Share of digits among a completion's characters: a toy reward that differs within a group."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c.replace(" ", ""))) for c in completions]


def train(model, tokenizer=None, *, credit="entropy_forks", steps=200, learning_rate=1e-6, output_dir="trl_grpo_out",
          use_cpu=False):
    """GRPO on PROMPTS with the strategy ``credit``; ``model`` is a Hub id (TRL loads it and its tokenizer) or a model."""
    config = GRPOConfig(
        output_dir=output_dir, max_steps=steps, learning_rate=learning_rate, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=16, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=use_cpu, seed=0,
        **trl_config_kwargs(credit),  # loss_type, epsilon, epsilon_high, beta, scale_rewards of the strategy
    )
    trainer = CreditGRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=reward_digits, args=config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}), credit=credit,
    )
    trainer.train()
    return trainer
# --- end of recipe ---


def tiny_qwen2():
    """A random-weight 1-layer Qwen2 and a word-level tokenizer over the prompts' words and digits (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    words = ["<pad>", "<eos>", "<unk>", *"0123456789"]
    words += sorted({w for p in PROMPTS for w in p.split()} - set(words))
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=None))
    return model, tokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps on a tiny random Qwen2, offline")
    parser.add_argument("--model", default=None, help="a Hub model id (default: the tiny offline model)")
    parser.add_argument("--credit", default="entropy_forks", help="a preset name or a spec file")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 2 with --quick, else 200)")
    parser.add_argument("--output-dir", default="trl_grpo_out")
    opts = parser.parse_args(argv)
    model, tokenizer = (opts.model, None) if opts.model else tiny_qwen2()
    steps = opts.steps or (2 if opts.quick else 200)
    use_cpu = opts.model is None or not torch.cuda.is_available()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, not ours
        trainer = train(model, tokenizer, credit=opts.credit, steps=steps, learning_rate=1e-6 if opts.model else 1e-2,
                        output_dir=opts.output_dir, use_cpu=use_cpu)
    print(f"strategy: {trainer.credit_strategy!r}")
    for log in trainer.state.log_history:
        if "rlcredit/kept_tokens" in log:
            print(f"step {log['step']}: reward {log['reward']:.3f}, kept tokens {log['rlcredit/kept_tokens']:.0f} "
                  f"({log['rlcredit/kept_fraction']:.0%} of the valid ones)")
    return trainer


if __name__ == "__main__":
    main()
