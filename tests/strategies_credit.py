"""Hypothesis strategies for credit-assignment tests: rollouts with named scores, and plain references.

Built on :func:`tests.strategies.rollout_tensors` (right-padded masks, shuffled arbitrary group
ids, empty rows, one-sample and all-equal groups, tied scores). The plain-loop references here
are written from METHODS.md with Python lists, independent of the library's kernels.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from hypothesis import strategies as st

import rlcredit
from tests.strategies import rollout_tensors

__all__ = [
    "clear_advantage_signs",
    "credit_batches",
    "fractions",
    "ref_group_normalize",
    "ref_stapo",
    "ref_tas_code",
    "ref_tas_bounded",
    "ref_top_sequence",
    "ref_top_batch_trl",
    "rollout_of",
]

#: Fractions that exercise the exact rational ceiling (0.4 * 5 is 2, not 3) and the edges.
fractions = st.sampled_from([0.05, 0.1, 0.2, 0.25, 1 / 3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.999, 1.0]) | st.floats(
    0.01, 1.0, allow_subnormal=False
)


def rollout_of(t: dict[str, torch.Tensor], **signals: torch.Tensor) -> rlcredit.Rollout:
    """A :class:`rlcredit.Rollout` from a :func:`rollout_tensors` dict (old log-probs included)."""
    return rlcredit.Rollout(
        t["response_mask"], t["rewards"], t["group_ids"], old_logprobs=t["old_logprobs"], signals=signals,
    )


@st.composite
def credit_batches(draw: st.DrawFn, max_B: int = 8, max_G: int = 4, max_T: int = 8, *,
                   distinct: bool = False) -> dict[str, torch.Tensor]:
    """A :func:`rollout_tensors` batch (``B >= 1``); with ``distinct=True`` valid scores have no ties.

    Also adds ``scores2`` (an independent second score, same conventions) for combinator tests.
    """
    t = draw(rollout_tensors(max_B=max_B, max_G=max_G, max_T=max_T))
    mask = t["response_mask"]
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    if distinct:
        # A random permutation of 0..B*T-1: distinct everywhere, so no tie-break is ever exercised.
        t["scores"] = torch.randperm(B * T, generator=gen).reshape(B, T).float() / (B * T)
        t["scores"] = torch.where(mask, t["scores"], torch.zeros(()))
    second = torch.randint(0, 4, (B, T), generator=gen).float() if draw(st.booleans()) else torch.rand(B, T, generator=gen)
    t["scores2"] = torch.where(mask, second, torch.zeros(()))
    return t


# --- plain-loop references (METHODS.md) ---------------------------------------------------------


def ref_group_normalize(rewards: list[float], groups: list[int], eps: float = 1e-6) -> list[float]:
    """GRPO: (r - mean_g) / (std_g + eps), unbiased std; all-equal and one-sample groups give 0."""
    out = []
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        if len(members) < 2 or max(members) == min(members):
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        out.append((r - mean) / (std + eps))
    return out


def ref_top_sequence(scores: list[list[float]], mask: list[list[bool]], fraction: float) -> list[list[float]]:
    """TGF: per row keep exactly ceil(k * T_i) highest scores (exact rational ceil), earlier token on ties."""
    k = Fraction(fraction).limit_denominator(10**6)
    out = []
    for row, valid in zip(scores, mask):
        idx = [t for t, v in enumerate(valid) if v]
        n_keep = max(1, math.ceil(k * len(idx))) if idx else 0
        ranked = sorted(idx, key=lambda t: (-row[t], t))
        keep = set(ranked[:n_keep])
        out.append([1.0 if t in keep else 0.0 for t in range(len(row))])
    return out


def ref_top_batch_trl(scores: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """TRL's ``get_high_entropy_mask`` on one process, with ``threshold = 1 - top_entropy_quantile``."""
    local = scores[mask.bool()].float()
    if local.numel() == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    tau = torch.quantile(local, 1 - fraction)
    return ((scores * mask.float()) >= tau) & mask.bool()


def _scope_rows(i: int, B: int, scope, groups: list[int]) -> list[int]:
    if scope == "batch":
        return list(range(B))
    if scope == "group":
        return [j for j in range(B) if groups[j] == groups[i]]
    start = (i // scope) * scope
    return list(range(start, min(B, start + scope)))


def ref_tas_code(mean_scores: list[float], valid: list[bool], groups: list[int], *, beta_min: float,
                 scope="batch", mean_scope=None) -> list[float]:
    """VPPO's released TAS: n = clamp((S - min)/(max - min), 0, 1), alpha = beta_min + n (1 - beta_min) / mean(n).

    alpha = 1 for invalid rows, for scopes with <= 1 valid row or max - min <= 1e-6, and where mean(n) = 0.
    """
    B = len(mean_scores)
    mean_scope = scope if mean_scope is None else mean_scope
    shaped, n = [False] * B, [0.0] * B
    for i in range(B):
        rows = [j for j in _scope_rows(i, B, scope, groups) if valid[j]]
        if not valid[i] or len(rows) < 2:
            continue
        lo, hi = min(mean_scores[j] for j in rows), max(mean_scores[j] for j in rows)
        if hi - lo <= 1e-6:
            continue
        shaped[i] = True
        n[i] = min(max((mean_scores[i] - lo) / (hi - lo), 0.0), 1.0)
    alpha = [1.0] * B
    for i in range(B):
        if not shaped[i]:
            continue
        rows = [j for j in _scope_rows(i, B, mean_scope, groups) if shaped[j]]
        mu = sum(n[j] for j in rows) / len(rows)
        if mu > 0:
            alpha[i] = beta_min + n[i] * (1 - beta_min) / mu
    return alpha


def ref_tas_bounded(mean_scores: list[float], valid: list[bool], groups: list[int], *, beta_min: float,
                    beta_max: float, scope="group") -> list[float]:
    """The paper's bounded TAS: alpha = beta_min + (beta_max - beta_min) * min-max(S) over the scope."""
    B = len(mean_scores)
    alpha = [1.0] * B
    for i in range(B):
        rows = [j for j in _scope_rows(i, B, scope, groups) if valid[j]]
        if not valid[i] or len(rows) < 2:
            continue
        lo, hi = min(mean_scores[j] for j in rows), max(mean_scores[j] for j in rows)
        if hi - lo > 1e-6:
            alpha[i] = beta_min + (beta_max - beta_min) * (mean_scores[i] - lo) / (hi - lo)
    return alpha


def clear_advantage_signs(rewards: list[float], groups: list[int]) -> bool:
    """Whether every reward is equal to its group mean or clearly away from it.

    ``A_i > 0`` is decided on float32 group means by the library and on float64 ones by the
    references; rewards within rounding of their mean could be read differently.
    """
    for i, r in enumerate(rewards):
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i]]
        gap = abs(r - sum(members) / len(members))
        if not (gap == 0 or gap > 1e-5 * (1 + max(map(abs, members)))):
            return False
    return True


def ref_stapo(rewards, groups, old_logprobs, entropy, mask, *, p=0.002, q=0.75):
    """STAPO as METHODS.md states it, with A > 0 read as r_i > mean of its group."""
    B, T = len(mask), len(mask[0])
    positive = []
    for i in range(B):
        members = [rewards[j] for j in range(B) if groups[j] == groups[i]]
        positive.append(rewards[i] > sum(members) / len(members) and max(members) != min(members))
    cand = [[mask[i][t] and positive[i] and math.exp(old_logprobs[i][t]) < p for t in range(T)] for i in range(B)]
    pool = [entropy[i][t] for i in range(B) for t in range(T) if cand[i][t]]
    if not pool:
        return [[1.0 if mask[i][t] else 0.0 for t in range(T)] for i in range(B)]
    tau = torch.quantile(torch.tensor(pool, dtype=torch.float32), q).item()
    return [[1.0 if mask[i][t] and not (cand[i][t] and entropy[i][t] < tau) else 0.0 for t in range(T)]
            for i in range(B)]
