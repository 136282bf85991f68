"""A minimal RL loop of your own with rlcredit: sample, score, assign credit, update.

The policy is a tiny randomly initialised Qwen2 language model; the task is to repeat the digit in
the prompt (``"copy 7 ="`` -> ``"7"``), rewarded 1/0. Everything credit-related is two calls::

    credit = strategy.assign(rollout, policy)                  # once per rollout batch, no grad
    out = strategy.loss(logprobs, rollout.select(rows), credit.select(rows))   # per mini-batch

Run:  python examples/own_training_loop.py [--strategy dapo|entropy_forks|FILE.yaml] [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import rlcredit  # noqa: E402

# Token ids: 0 pad, 1 eos, 2 "copy", 3 "=", 4..13 the digits 0..9.
PAD, EOS, COPY, EQ, DIGIT0 = 0, 1, 2, 3, 4
VOCAB = DIGIT0 + 10


def make_prompts(n: int, group_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` prompts ``[copy, d, =]``, each repeated ``group_size`` times: ``(input_ids [n*G, 3], digits [n*G])``."""
    digits = torch.randint(0, 10, (n,), generator=gen).repeat_interleave(group_size)
    ids = torch.stack([torch.full_like(digits, COPY), DIGIT0 + digits, torch.full_like(digits, EQ)], dim=1)
    return ids, digits


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled responses ``[B, T]`` (right-padded after eos) and their mask (eos included)."""
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=True, top_k=0,
                         max_new_tokens=max_new_tokens, pad_token_id=PAD, eos_token_id=EOS, suppress_tokens=[PAD])
    resp = out[:, prompt_ids.shape[1]:]
    eos = resp == EOS
    mask = (eos.long().cumsum(1) - eos.long()) == 0  # up to and including the first eos
    return torch.where(mask, resp, PAD), mask


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="dapo", help="a preset name or a spec file (default dapo)")
    parser.add_argument("--steps", type=int, default=150, help="RL steps (reward ~1.0 after ~120 with dapo)")
    parser.add_argument("--quick", action="store_true", help="3 steps (what the test suite runs)")
    args = parser.parse_args(argv)
    steps = 3 if args.quick else args.steps

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=EOS)
    model = Qwen2ForCausalLM(config).eval()

    strategy = rlcredit.build(args.strategy)          # e.g. DAPO: group-normalised advantages, clip 0.2/0.28
    policy = rlcredit.HFPolicy(model, rows_per_chunk=64)  # chunked log-probs / entropy, never [B, T, V] at once
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prompts_per_step, group_size, minibatches = 16, 8, 2
    print(f"strategy: {strategy!r}")

    history = []
    for step in range(1, steps + 1):
        # 1. Rollouts: G samples per prompt, the 0/1 reward of each.
        prompt_ids, digits = make_prompts(prompts_per_step, group_size, gen)
        responses, mask = sample(model, prompt_ids, max_new_tokens=3)
        rewards = ((responses[:, 0] == DIGIT0 + digits) & (responses[:, 1] == EOS)).float()
        group_ids = torch.arange(prompts_per_step).repeat_interleave(group_size)
        # TRL/verl layout: input_ids = [prompt | response], the response in the last T columns.
        inputs = {"input_ids": torch.cat([prompt_ids, responses], 1),
                  "attention_mask": torch.cat([torch.ones_like(prompt_ids), mask.long()], 1)}

        # 2. Behaviour log-probs (and entropies, which entropy-based strategies read as a signal).
        stats = policy.response_stats(inputs, mask, entropy=True)
        rollout = rlcredit.Rollout(response_mask=mask, rewards=rewards, group_ids=group_ids,
                                   old_logprobs=stats.logprobs, signals={"entropy": stats.entropy},
                                   model_inputs=inputs)

        # 3. Credit: scores -> token weights, rewards -> advantages. Once per batch, no grad.
        credit = strategy.assign(rollout, policy)

        # 4. Updates: one optimiser step per mini-batch of whole groups.
        model.train()
        rows_per_mb = rollout.batch_size // minibatches
        for mb in range(minibatches):
            rows = slice(mb * rows_per_mb, (mb + 1) * rows_per_mb)
            logprobs = policy.logprobs({k: v[rows] for k, v in inputs.items()}, mask[rows])
            out = strategy.loss(logprobs, rollout.select(rows), credit.select(rows))
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
        model.eval()

        history.append(float(rewards.mean()))
        if step % 10 == 0 or step == steps or args.quick:
            kept = float(credit.metrics["kept_fraction"])
            print(f"step {step:4d}  reward {history[-1]:.2f}  kept tokens {kept:.0%}  "
                  f"clip fraction {float(out.metrics['clip_fraction']):.3f}")
    return history


if __name__ == "__main__":
    main()
