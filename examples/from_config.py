"""Build a strategy from a YAML file and run it on a batch whose per-token signals a trainer precomputed.

``rlcredit.build(path)`` reads JSON, YAML or TOML (data only: no code runs from a config), checks
every name and hyper-parameter, and returns a :class:`rlcredit.Strategy`. Overrides patch a part:
``rlcredit.build(path, weighter=...)``. ``strategy.to_spec()`` gives back plain data to save.

Run:  python examples/from_config.py [--spec examples/strategy.yaml] [--quick]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import rlcredit

HERE = Path(__file__).resolve().parent


def precomputed_rollout(B: int, T: int, seed: int = 0) -> rlcredit.Rollout:
    """A rollout as verl/TRL would hand it over: behaviour log-probs, log-probs with a perturbed image
    (``aug_logprobs``) and entropies, all ``[B, T]``; groups of 4 responses per prompt."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    # Image-dependent tokens lose probability when the picture is masked; the rest barely move.
    dependent = torch.rand(B, T, generator=g) < 0.3
    aug = old - torch.where(dependent, torch.rand(B, T, generator=g) * 3, torch.rand(B, T, generator=g) * 0.05)
    entropy = torch.rand(B, T, generator=g) * 2
    zero = torch.zeros(())
    return rlcredit.Rollout(
        response_mask=mask, rewards=(torch.rand(B, generator=g) > 0.5).float(), group_ids=torch.arange(B) // 4,
        old_logprobs=torch.where(mask, old, zero),
        signals={"aug_logprobs": torch.where(mask, aug, zero), "entropy": torch.where(mask, entropy, zero)},
    )


def main(argv: list[str] | None = None) -> rlcredit.Strategy:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(HERE / "strategy.yaml"), help="a JSON/YAML/TOML strategy spec")
    parser.add_argument("--quick", action="store_true", help="a smaller batch (what the test suite runs)")
    args = parser.parse_args(argv)

    strategy = rlcredit.build(args.spec)
    print(f"built from {args.spec}:\n  {strategy!r}")

    rollout = precomputed_rollout(B=8 if args.quick else 256, T=16)
    credit = strategy.assign(rollout)  # the k3 visual dependency comes from the signals: no model
    logprobs = rollout.old_logprobs.clone().requires_grad_(True)
    out = strategy.loss(logprobs, rollout, credit)
    out.loss.backward()
    alpha = credit.advantages / rlcredit.functional.group_normalize(rollout.rewards, rollout.group_ids)
    alpha = alpha[torch.isfinite(alpha)]
    print(f"kept {float(credit.metrics['kept_fraction']):.0%} of tokens; advantage scale alpha in "
          f"[{float(alpha.min()):.2f}, {float(alpha.max()):.2f}]; loss {float(out.loss.detach()):+.4f}")

    # Patch one part of the file's strategy without editing it.
    looser = rlcredit.build(args.spec, weighter={"name": "top_fraction", "fraction": 0.6, "score": "visual"})
    print(f"with the override: kept {float(looser.assign(rollout).metrics['kept_fraction']):.0%} of tokens")
    return strategy


if __name__ == "__main__":
    main()
