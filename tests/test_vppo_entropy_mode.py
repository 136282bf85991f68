"""VPPO's released ``use_vppo_on_entropy`` mode as a composition (docs/mixing.md) == the released mask code.

The reference is a transcription of huaixuheqing/VPPO-RL at a23c54b, ``verl/workers/actor/dp_actor.py``
(``DataParallelPPOActor.update_policy``, the ``use_vppo_on_entropy`` and ``use_vppo_on_perception``
blocks, masks only; logging left out), which ``compute_policy_loss`` then multiplies into the
per-token loss before averaging over ``response_mask``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rlcredit
from tests.vppo_released_reference import perception_top_p_mask

yaml = pytest.importorskip("yaml")

MIXING = Path(__file__).resolve().parents[1] / "docs" / "mixing.md"
SECTION = "## VPPO's released entropy mode"


def released_loss_token_mask(entropy, aug_log_probs, old_log_probs, response_mask, top_p_entropy_tokens=0.2,
                             top_p_perception_tokens=0.4):
    """The released code's ``loss_token_mask`` with both flags on (variable names as released)."""
    # if self.config.use_vppo_on_entropy:
    top_p = top_p_entropy_tokens
    num_valid_tokens = response_mask.sum(dim=1)
    k = torch.ceil(num_valid_tokens * top_p).int()
    masked_entropy = entropy.clone()
    masked_entropy[~response_mask.bool()] = -float("inf")
    sorted_entropy_vals, sorted_indices = torch.sort(masked_entropy, dim=1, descending=True)
    range_tensor = torch.arange(entropy.size(1), device=entropy.device).expand_as(entropy)
    rank_mask = range_tensor < k.unsqueeze(1)
    top_p_mask = torch.zeros_like(entropy, dtype=torch.bool)
    top_p_mask.scatter_(1, sorted_indices, rank_mask)
    loss_token_mask = top_p_mask.to(entropy.dtype)
    # if self.config.use_vppo_on_perception: (the same block as the VPPO reference transcribes)
    _, top_p_mask = perception_top_p_mask(aug_log_probs, old_log_probs, response_mask, top_p_perception_tokens,
                                          stable=False)
    top_p_mask = top_p_mask.to(old_log_probs.dtype)
    if loss_token_mask is not None:
        loss_token_mask = (loss_token_mask.bool() | top_p_mask.bool()).to(old_log_probs.dtype)
    else:
        loss_token_mask = top_p_mask
    return loss_token_mask


def _doc_blocks() -> tuple[str, str]:
    """The recipe's python and yaml blocks, as docs/mixing.md shows them."""
    text = MIXING.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", 1)]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    spec = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return python, spec


def test_the_documented_python_and_yaml_are_the_same_strategy():
    python, spec = _doc_blocks()
    namespace = {"rlcredit": rlcredit}
    exec(python, namespace)  # the cookbook's own code
    assert namespace["strategy"] == rlcredit.build(yaml.safe_load(spec))
    weighter = namespace["strategy"].weighter
    assert type(weighter).__name__ == "Union" and len(weighter.parts) == 2


@settings(max_examples=60)
@given(B=st.integers(1, 6), T=st.integers(1, 40), seed=st.integers(0, 2**31 - 1), empty_row=st.booleans())
def test_composition_equals_the_released_mask(B, T, seed, empty_row):
    _, spec = _doc_blocks()
    strategy = rlcredit.build(yaml.safe_load(spec))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    if empty_row:
        lengths[0] = 0
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    # Continuous values: no ties (the released torch.sort is not stable); |d| <= 2 keeps k3 below the clamp at 10.
    entropy = torch.rand(B, T, generator=g) * 3
    old = -torch.rand(B, T, generator=g) * 4
    aug = old + (torch.rand(B, T, generator=g) * 4 - 2)
    rollout = rlcredit.Rollout(mask, torch.rand(B, generator=g), torch.zeros(B, dtype=torch.long),
                               old_logprobs=old * mask,
                               signals={"entropy": entropy * mask, "aug_logprobs": aug * mask})
    credit = strategy.assign(rollout)
    released = released_loss_token_mask(entropy, aug, old, mask.long())
    assert torch.equal(credit.token_weights, released.float() * mask)
    kept = credit.token_weights.sum(1)
    n = mask.sum(1)
    assert bool(((kept >= torch.ceil(0.4 * n)) & (kept <= torch.ceil(0.4 * n) + torch.ceil(0.2 * n))).all())


def test_each_part_alone_is_one_released_flag():
    """Sanity of the transcription: the perception part alone is the vppo preset's TGF mask."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 9
    mask = torch.arange(T).unsqueeze(0) < torch.tensor([9, 5, 1, 7]).unsqueeze(1)
    old = -torch.rand(B, T, generator=g) * 4
    aug = old + torch.rand(B, T, generator=g) * 4 - 2
    rollout = rlcredit.Rollout(mask, torch.zeros(B), torch.zeros(B, dtype=torch.long), old_logprobs=old * mask,
                               signals={"aug_logprobs": aug * mask})
    perception_only = released_loss_token_mask(torch.zeros(B, T), aug, old, mask.long(), top_p_entropy_tokens=0.0)
    assert torch.equal(rlcredit.build("vppo").assign(rollout).token_weights, perception_only.float() * mask)
