"""The cookbook's second-wave recipes (docs/mixing.md) build from Python and YAML alike, and run assign + loss.

Each recipe's Python block is executed as written and its YAML block loaded with ``yaml.safe_load``
and built; both must give the same strategy, which then assigns credit and computes a finite,
differentiable loss on a rollout carrying whatever the recipe reads.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import rlcredit
from rlcredit.requirements import Aux, leaves

yaml = pytest.importorskip("yaml")

MIXING = Path(__file__).resolve().parents[1] / "docs" / "mixing.md"
RECIPES = ["VPPO's mask with a CISPO loss", "Entropy forks with GTPO shaping", "PAPO with VPPO's shaping",
           "Entropy forks ∪ planning words under KL-Cov"]


def _blocks(title: str) -> tuple[str, str]:
    text = MIXING.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    section = text[start: end if end >= 0 else len(text)]
    python = re.findall(r"```python\n(.*?)```", section, re.S)
    spec = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(python) == 1 and len(spec) == 1, title
    return python[0], spec[0]


def _rollout(B: int = 8, T: int = 7, seed: int = 0) -> rlcredit.Rollout:
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    old = torch.where(mask, -torch.rand(B, T, generator=g) * 3, 0.0)
    return rlcredit.Rollout(
        mask, torch.randint(0, 2, (B,), generator=g).float(), torch.arange(B) // 4, old_logprobs=old,
        signals={"entropy": torch.where(mask, torch.rand(B, T, generator=g) * 2, 0.0),
                 "aug_logprobs": torch.where(mask, old - torch.rand(B, T, generator=g), 0.0)},
        response_ids=torch.where(mask, torch.tensor([14190, 7, 3983, 9, 54815, 11, 12])[:T].expand(B, T), 0),
    )


@pytest.mark.parametrize("title", RECIPES)
def test_recipe_builds_from_python_and_yaml_and_runs(title):
    python, spec = _blocks(title)
    namespace: dict = {}
    exec(compile(python, f"docs/mixing.md: {title}", "exec"), namespace)
    strategy = namespace["strategy"]
    assert rlcredit.build(yaml.safe_load(spec)) == strategy
    assert rlcredit.build(strategy.to_spec()) == strategy

    r = _rollout()
    credit = strategy.assign(r)
    kept = credit.token_weights[r.response_mask]
    assert bool((kept > 0).any())
    g = torch.Generator().manual_seed(1)
    logp = torch.where(r.response_mask, r.old_logprobs + 0.3 * torch.randn(r.response_mask.shape, generator=g), 0.0)
    logp.requires_grad_(True)
    aux = {}
    if Aux("masked_logprobs") in [leaf for req in strategy.requirements for leaf in leaves(req)]:
        masked = torch.where(r.response_mask, logp.detach() - 0.5, 0.0).requires_grad_(True)
        aux = {"aux": {"masked_logprobs": masked}}
    out = strategy.loss(logp, r, credit, **aux)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(logp.grad).all()
    assert bool((logp.grad[r.response_mask] != 0).any())
    assert torch.equal(logp.grad[~r.response_mask], torch.zeros(int((~r.response_mask).sum())))
    if aux:
        assert bool((aux["aux"]["masked_logprobs"].grad[r.response_mask] != 0).all())


def test_recipes_differ_from_their_base_presets():
    """Each mix changes what it says it changes (a recipe equal to its preset would test nothing)."""
    r = _rollout(seed=3)
    ns: dict = {}
    exec(_blocks("Entropy forks with GTPO shaping")[0], ns)
    forks = rlcredit.build("entropy_forks").assign(r)
    mixed = ns["strategy"].assign(r)
    assert torch.equal(forks.token_weights, mixed.token_weights)
    assert mixed.advantages.shape == r.response_mask.shape and not torch.allclose(
        mixed.token_advantages(), forks.token_advantages())
    ns = {}
    exec(_blocks("Entropy forks ∪ planning words under KL-Cov")[0], ns)
    union = ns["strategy"].assign(r).token_weights
    planning = (r.response_ids == 14190) | (r.response_ids == 3983) | (r.response_ids == 54815)
    assert bool((union[planning & r.response_mask] == 1).all())
    assert bool((union >= forks.token_weights).all()) and bool((union > forks.token_weights).any())
