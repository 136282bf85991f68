"""Mixing credit methods: parts of different papers composed into one strategy.

1. VPPO's visual mask intersected with entropy forks: train only tokens that are both among the
   40% most image-dependent of their response (VPPO's TGF) *and* in the batch's top 20% by entropy
   (the 80/20 paper), with VPPO's trajectory-level advantage shaping (TAS) on top.
2. AT-RL's anchor clusters with VPPO's advantage shaping: anchor tokens (high attention to the
   picture, clustered with METIS) weighted 1.5x, and each response's advantage scaled by its mean
   visual dependency.

Both run on one rollout batch of the demo's tiny Qwen2.5-VL (random init, no download) and print
what each token got. Each score is named, so a weighter or shaper says which one it reads.

Run:  python examples/mix_methods.py [--quick]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import rlcredit  # noqa: E402
from rlcredit.estimators import Entropy  # noqa: E402
from rlcredit.losses import ClippedSurrogate  # noqa: E402
from rlcredit.shapers import DependencyScale, GroupNormalize  # noqa: E402
from rlcredit.weighters import Intersect, TopFraction  # noqa: E402
from rlcredit_mm import AnchorClusters, AttentionConnectivity, VisualKL  # noqa: E402
from rlcredit_mm.demo import model as M  # noqa: E402
from rlcredit_mm.demo import task as T  # noqa: E402
from rlcredit_mm.demo.train import sample  # noqa: E402

# 1. VPPO x entropy forks, composed in Python.
visual_and_forking = rlcredit.Strategy(
    estimators={"visual": VisualKL(estimate="k3"), "entropy": Entropy()},
    weighter=Intersect([TopFraction(0.4, scope="sequence", score="visual"),
                        TopFraction(0.2, scope="batch", score="entropy")]),
    shapers=[GroupNormalize(), DependencyScale(score="visual", beta_min=0.9)],
    policy_loss=ClippedSurrogate(clip_low=0.2, clip_high=0.28, dual_clip=3.0),
)

# 2. AT-RL anchors x VPPO shaping, the same thing written as a spec (what a config file holds).
anchors_with_tas = rlcredit.build({
    "estimators": {"connectivity": "attention_connectivity", "visual": {"name": "visual_kl", "estimate": "k3"}},
    "weighter": {"name": "anchor_clusters", "score": "connectivity", "anchor_share": 0.15, "w_anchor": 1.5},
    "shapers": ["group_normalize", {"name": "dependency_scale", "score": "visual", "beta_min": 0.9}],
    "policy_loss": {"name": "clipped_surrogate", "clip_high": 0.28},
})
assert isinstance(anchors_with_tas.weighter, AnchorClusters)
assert isinstance(anchors_with_tas.estimators["connectivity"], AttentionConnectivity)


def rollout_batch(prompts: int, group_size: int, seed: int = 0):
    """One batch from the demo's tiny VLM: ``(rollout, policy, kit)``."""
    kit = M.ModelKit()
    model = M.build_model(kit.tokenizer, seed=seed)
    M.warmup(model, kit, steps=15, seed=seed)  # a few steps so responses have the task's format
    torch.manual_seed(seed)
    examples = T.make_examples(prompts, seed)
    prompt = M.encode_prompts(kit, examples, repeat=group_size)
    out = sample(model, kit, prompt, max_new_tokens=14)
    rewards = torch.tensor([T.reward(examples[i // group_size], kit.words(out.responses[i]), bool(out.finished[i]))
                            for i in range(prompts * group_size)])
    if rewards.sum() == 0:
        rewards[0] = 1.0  # make sure there is a learning signal to look at in this illustration
    inputs = M.join_responses(prompt, out.responses, out.mask)
    policy = rlcredit.HFPolicy(model, rows_per_chunk=16)
    stats = policy.response_stats(inputs, out.mask, entropy=True)
    rollout = rlcredit.Rollout(out.mask, rewards, torch.arange(prompts).repeat_interleave(group_size),
                               old_logprobs=stats.logprobs, signals={"entropy": stats.entropy}, model_inputs=inputs)
    return rollout, policy, kit


def show(name: str, strategy: rlcredit.Strategy, rollout: rlcredit.Rollout, policy, kit) -> None:
    credit = strategy.assign(rollout, policy)
    logprobs = policy.logprobs(rollout.model_inputs, rollout.response_mask)
    out = strategy.loss(logprobs, rollout, credit)
    out.loss.backward()  # differentiable through the log-probs only; credit is detached
    print(f"\n== {name}\n{strategy!r}")
    print(f"kept tokens {float(credit.metrics['kept_fraction']):.0%}, loss {float(out.loss.detach()):+.4f}, "
          f"advantages {[round(a, 2) for a in credit.advantages[:4].tolist()]} ...")
    row = int(torch.argmax(rollout.response_mask.sum(1)))  # the longest response
    mask = rollout.response_mask[row]
    words = [kit.vocab[i] for i in rollout.model_inputs["input_ids"][row, -mask.shape[0]:][mask].tolist()]
    for score in credit.scores:
        if "." in score:
            continue  # estimator extras, e.g. "connectivity.profile" [B, T, K]
        values = credit.scores[score][row][mask].tolist()
        print(f"  {score:>12}: " + " ".join(f"{w}:{v:.2g}" for w, v in zip(words, values)))
    weights = credit.token_weights[row][mask].tolist()
    print(f"  {'weight':>12}: " + " ".join(f"{w}:{v:g}" for w, v in zip(words, weights)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller batch (what the test suite runs)")
    args = parser.parse_args(argv)
    rollout, policy, kit = rollout_batch(prompts=2 if args.quick else 4, group_size=4)
    show("VPPO visual mask x entropy forks, VPPO shaping", visual_and_forking, rollout, policy, kit)
    show("AT-RL anchors x VPPO shaping", anchors_with_tas, rollout, policy, kit)


if __name__ == "__main__":
    main()
