"""Register your own estimator and use it from a config, next to the built-in parts.

An estimator scores every response token: ``estimator(rollout, policy=None) -> [B, T]``, 0 on
padding, computed under ``no_grad``. Here, **surprisal**: ``-log pi_old(y_t)``, how unlikely the
sampled token was under the policy that sampled it (tokens where the model "took a chance").
It is a frozen attrs class whose fields are its hyper-parameters, registered under a name, so a
config can refer to it exactly like ``"entropy"`` or ``"visual_kl"``.

Run:  python examples/custom_estimator.py [--quick]
"""

from __future__ import annotations

import argparse

import attrs
import torch

import rlcredit
from rlcredit.validators import in_range
from rlcredit.requirements import Field


@rlcredit.register("estimator", "surprisal")
@attrs.frozen
class Surprisal:
    """Surprisal of each sampled token under the behaviour policy, ``S_t = min(-log pi_old(y_t), cap)``.

    Args:
        cap: upper bound of the score (> 0), so one near-impossible token cannot dominate.

    Returns:
        ``[B, T]`` float32 >= 0, 0 on padding.
    """

    cap: float = attrs.field(default=10.0, validator=in_range(0.0, lo_open=True))

    requires = (Field("old_logprobs"),)  # Strategy.assign checks this before anything runs

    def __call__(self, rollout: rlcredit.Rollout, policy=None) -> torch.Tensor:
        score = (-rollout.old_logprobs.float()).clamp(0.0, self.cap)
        return torch.where(rollout.response_mask, score, torch.zeros((), device=score.device))


# The config: plain data (this dict could come from YAML/JSON/TOML). Keep each response's 50% most
# surprising tokens that are also in the batch's top 30% by entropy; GRPO advantages; DAPO clipping.
CONFIG = {
    "estimators": {"surprise": {"name": "surprisal", "cap": 8.0}, "entropy": "entropy"},
    "weighter": {"name": "intersect", "parts": [
        {"name": "top_fraction", "fraction": 0.5, "score": "surprise"},
        {"name": "top_fraction", "fraction": 0.3, "scope": "batch", "score": "entropy"},
    ]},
    "shapers": ["group_normalize"],
    "policy_loss": {"name": "clipped_surrogate", "clip_high": 0.28},
}


def synthetic_rollout(B: int, T: int, seed: int = 0) -> rlcredit.Rollout:
    """A batch as a trainer would give it: old log-probs and entropies precomputed."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None] < lengths[:, None]
    old = torch.where(mask, -torch.rand(B, T, generator=g) * 4, 0.0)
    entropy = torch.where(mask, torch.rand(B, T, generator=g) * 3, 0.0)
    return rlcredit.Rollout(response_mask=mask, rewards=(torch.rand(B, generator=g) > 0.5).float(),
                            group_ids=torch.arange(B) // 4, old_logprobs=old, signals={"entropy": entropy})


def main(argv: list[str] | None = None) -> rlcredit.Strategy:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller batch (what the test suite runs)")
    args = parser.parse_args(argv)

    assert "surprisal" in rlcredit.available("estimator")
    strategy = rlcredit.build(CONFIG)
    print(strategy)  # prints the spec that rebuilds it
    assert rlcredit.build(strategy.to_spec()) == strategy  # specs round-trip, custom parts included

    rollout = synthetic_rollout(B=8 if args.quick else 64, T=12)
    credit = strategy.assign(rollout)  # no policy needed: everything is precomputed
    logprobs = rollout.old_logprobs.clone().requires_grad_(True)
    out = strategy.loss(logprobs, rollout, credit)
    out.loss.backward()
    print(f"kept {float(credit.metrics['kept_fraction']):.0%} of tokens; mean surprisal "
          f"{float(credit.metrics['score/surprise']):.2f}; loss {float(out.loss.detach()):+.4f}")
    # Tokens with zero weight get no gradient at all.
    assert bool((logprobs.grad[credit.token_weights == 0] == 0).all())

    # A bad hyper-parameter fails at build time, naming the accepted range.
    try:
        rlcredit.build({**CONFIG, "estimators": {"surprise": {"name": "surprisal", "cap": -1}, "entropy": "entropy"}})
    except rlcredit.SpecError as err:
        print(f"SpecError as expected: {err}")
    return strategy


if __name__ == "__main__":
    main()
