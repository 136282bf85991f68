r"""VPPO's variance-reduction claim, checked by Monte Carlo with rlcredit's own mask and shaping factors.

The claim (VPPO, arXiv 2510.09285): ``Var(g_VPPO) ~= k * E[alpha^2] * Var(g_GRPO)``.

Setting. A batch of rollouts ``i`` with ``T_i`` valid tokens, ``N = sum_i T_i``, GRPO advantages
``A_i``, VPPO shaping factors ``alpha_i`` (``dependency_scale``), a TGF mask ``w_{i,t}``
(``top_fraction(k, scope="sequence")``) and per-token gradient terms ``h_{i,t}``::

    g_GRPO = (1/N) sum_{i,t} A_i h_{i,t}
    g_VPPO = (1/N) sum_{i,t} w_{i,t} alpha_i A_i h_{i,t}

Assumptions (each test states which ones it keeps or breaks):

1. zero mean: ``E[h | w, alpha, A] = 0``;
2. uncorrelated: ``E[h_{i,t} h_{j,s} | w, alpha, A] = 0`` for ``(i,t) != (j,s)``;
3. equal variance: ``E[h_{i,t}^2 | w, alpha, A] = sigma^2``;
4. ``h`` independent of the mask ``w`` and of ``alpha`` (and ``A``);
5. exact fraction: ``w`` is 0/1 and ``sum_t w_{i,t} = k T_i`` (here: ``k T_i`` is an integer, so
   TGF's ``ceil`` is exact);
6. both estimators divide by the same ``N``, all valid tokens (the library's default).

Derivation. By 1, ``Var(g) = E[g^2]``. Expanding the square and conditioning on ``(w, alpha, A)``,
2 and 3 leave only the diagonal::

    E[g_VPPO^2] = (sigma^2 / N^2) sum_i alpha_i^2 A_i^2 sum_t w_{i,t}^2
                = (sigma^2 / N^2) k sum_i T_i alpha_i^2 A_i^2        (w^2 = w and 5)
    E[g_GRPO^2] = (sigma^2 / N^2) sum_i T_i A_i^2                     (w = alpha = 1)

so, ``N`` cancelling by 6::

    Var(g_VPPO) / Var(g_GRPO) = k * E_w[alpha^2],   E_w[alpha^2] = sum_i T_i A_i^2 alpha_i^2 / sum_i T_i A_i^2

which is the paper's ``k E[alpha^2]`` when ``alpha^2`` is uncorrelated with ``T A^2`` (the paper's
"~="). The tests compare against the exact weighted form.

Counter-case 1 (breaks 6): dividing by the kept tokens ``N_k = sum w = k N`` multiplies ``g_VPPO``
by ``1/k`` and its variance by ``1/k^2``: the ratio becomes ``E_w[alpha^2] / k`` (> 1 for k < 1).

Counter-case 2 (breaks 4): a mask keeping the ``k T_i`` tokens of largest ``|h|`` (per draw) makes
the diagonal ``E[w h^2] > k sigma^2``; for Gaussian ``h`` and ``k <= 0.4`` the kept tokens hold at
least twice their share ``k`` of ``E[h^2]`` at every ``T_i`` (2.0x for k = 0.4, T = 5; 2.16x as
T grows; more for smaller k), so the ratio exceeds ``k E_w[alpha^2]`` by ``>= 2x``: the reduction
is lost.

Monte-Carlo tolerance. ``h`` is standard normal, drawn with fixed seeds, independent of the scores
that make ``w`` and ``alpha`` (1-4 hold by construction; 5 by the choice of ``T_i``). With the
mean known to be 0, ``V_j = mean over M draws of g_j^2`` and ``M V_j / Var(g_j) ~ chi^2_M``, so
``Var(V_j) = 2 Var(g_j)^2 / M``. Both estimators use the same draws; as jointly Gaussian scalars
with correlation ``r``, ``Cov(V_1, V_2) = 2 r^2 Var(g_1) Var(g_2) / M``, and by the delta method
``Var(log V_1 - log V_2) = 4 (1 - r^2) / M``. The test accepts
``|log(ratio) - log(predicted)| <= 5 * sqrt(4 (1 - r^2) / M)``, a 5-sigma band (two-sided
probability ~6e-7 per check), computed from the exact ``r`` of the two coefficient vectors.
Seeds are fixed (Hypothesis runs derandomised), so the suite is deterministic.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlcredit import Rollout, Strategy
from rlcredit import functional as F
from rlcredit.estimators import Signal
from rlcredit.shapers import DependencyScale, GroupNormalize
from rlcredit.weighters import TopFraction

DRAWS = 20_000
BAD_DRAWS = 4_000  # counter-case 2 only needs a 2x effect to stand out from a ~5 % error
CHUNK = 1_000
Z = 5.0


def _batch(k: float, n_groups: int, G: int, seed: int):
    """A rollout whose ``k T_i`` are integers, scores independent of everything else, and its credit."""
    g = torch.Generator().manual_seed(seed)
    q = Fraction(k).limit_denominator(10**6).denominator
    B = n_groups * G
    lengths = q * torch.randint(1, max(2, 40 // q) + 1, (B,), generator=g)
    T = int(lengths.max())
    mask = torch.arange(T)[None] < lengths[:, None]
    rewards = torch.randn(B, generator=g)
    groups = torch.arange(B) // G
    # Per-row scales spread the mean dependency, so alpha really varies.
    scores = torch.rand(B, T, generator=g) * torch.rand(B, 1, generator=g).pow(2) * 5
    rollout = Rollout(mask, rewards, groups, signals={"s": scores})
    strategy = Strategy(estimators={"visual": Signal("s")}, weighter=TopFraction(k, score="visual"),
                        shapers=[GroupNormalize(), DependencyScale(score="visual")])
    credit = strategy.assign(rollout)
    A = GroupNormalize()(rewards, {}, rollout)
    alpha = DependencyScale(score="visual")(torch.ones(B), credit.scores, rollout)
    return mask, lengths, A.double(), alpha.double(), credit.token_weights.double()


def _second_moments(coefs: list[torch.Tensor], mask: torch.Tensor, seed: int, *, draws: int = DRAWS,
                    top_k: float | None = None) -> list[float]:
    """Mean of ``g^2`` over ``draws`` draws of standard-normal h [B, T], for each ``g = sum coef * h``.

    With ``top_k``, every ``g`` uses ``coef * keep * h`` where ``keep`` keeps the ``ceil(top_k T_i)``
    tokens of largest ``|h|`` of each row, chosen per draw by the library's ``top_fraction_mask``.
    """
    g = torch.Generator().manual_seed(seed)
    B, T = mask.shape
    C = torch.stack([c.reshape(-1) for c in coefs], dim=1)  # [B*T, J]
    total = torch.zeros(len(coefs), dtype=torch.float64)
    for _ in range(draws // CHUNK):
        h = torch.randn(CHUNK, B, T, generator=g, dtype=torch.float64)
        if top_k is not None:
            keep = F.top_fraction_mask(h.abs().reshape(-1, T), mask.repeat(CHUNK, 1), top_k)
            h = h * keep.reshape(CHUNK, B, T)
        total += (h.reshape(CHUNK, B * T) @ C).square().sum(0)
    return (total / draws).tolist()


def _band(c1: torch.Tensor, c2: torch.Tensor) -> float:
    """5-sigma half-width of log(V1 / V2) for paired estimators with coefficient vectors c1, c2."""
    r = float((c1 * c2).sum() / ((c1 * c1).sum() * (c2 * c2).sum()).sqrt())
    return Z * math.sqrt(4 * (1 - r * r) / DRAWS)


settings_mc = settings(max_examples=6)


@settings_mc
@given(k=st.sampled_from([0.2, 0.25, 0.4, 0.5]), n_groups=st.integers(2, 4), G=st.integers(2, 6),
       seed=st.integers(0, 2**20))
def test_vppo_variance_is_k_times_mean_alpha_squared_of_grpo(k, n_groups, G, seed):
    mask, lengths, A, alpha, w = _batch(k, n_groups, G, seed)
    N = float(lengths.sum())
    assert torch.equal(w.sum(-1), k * lengths.double()), "assumption 5: TGF keeps exactly k T_i tokens"
    c_grpo = mask * A[:, None] / N
    c_vppo = w * (alpha * A)[:, None] / N
    v_grpo, v_vppo = _second_moments([c_grpo, c_vppo], mask, seed)
    T_A2 = lengths.double() * A.square()
    predicted = k * float((T_A2 * alpha.square()).sum() / T_A2.sum())
    assert bool((alpha >= 0.9 - 1e-6).all())
    assert abs(math.log(v_vppo / v_grpo) - math.log(predicted)) <= _band(c_vppo, c_grpo), (v_vppo / v_grpo, predicted)


@settings_mc
@given(k=st.sampled_from([0.2, 0.25, 0.4, 0.5]), n_groups=st.integers(2, 4), G=st.integers(2, 6),
       seed=st.integers(0, 2**20))
def test_counter_case_kept_token_denominator_gives_mean_alpha_squared_over_k(k, n_groups, G, seed):
    mask, lengths, A, alpha, w = _batch(k, n_groups, G, seed)
    n_kept = float(w.sum())
    c_grpo = mask * A[:, None] / float(lengths.sum())
    c_kept = w * (alpha * A)[:, None] / n_kept  # renormalize=True: divide by the kept tokens
    v_grpo, v_kept = _second_moments([c_grpo, c_kept], mask, seed)
    T_A2 = lengths.double() * A.square()
    predicted = float((T_A2 * alpha.square()).sum() / T_A2.sum()) / k
    assert predicted > 1.0, "E[alpha^2] >= 1 and k < 1: the variance grows instead of shrinking"
    assert abs(math.log(v_kept / v_grpo) - math.log(predicted)) <= _band(c_kept, c_grpo), (v_kept / v_grpo, predicted)


@settings_mc
@given(k=st.sampled_from([0.2, 0.25, 0.4]), n_groups=st.integers(2, 4), G=st.integers(2, 6),
       seed=st.integers(0, 2**20))
def test_counter_case_mask_on_largest_gradients_loses_the_reduction(k, n_groups, G, seed):
    mask, lengths, A, alpha, _ = _batch(k, n_groups, G, seed)
    N = float(lengths.sum())
    c_grpo = mask * A[:, None] / N
    c_bad = mask * (alpha * A)[:, None] / N  # times a per-draw mask on the largest |h|
    v_grpo = _second_moments([c_grpo], mask, seed, draws=BAD_DRAWS)[0]
    v_bad = _second_moments([c_bad], mask, seed, draws=BAD_DRAWS, top_k=k)[0]
    T_A2 = lengths.double() * A.square()
    predicted = k * float((T_A2 * alpha.square()).sum() / T_A2.sum())
    # >= 2x in expectation (module docstring); 1.6x leaves far more than the Monte-Carlo error.
    assert v_bad / v_grpo > 1.6 * predicted, (v_bad / v_grpo, predicted)
