"""Named strategies, each an ordinary composition of registered parts (no special code paths).

``rlcredit.build(NAME)`` calls the factory; ``rlcredit.build(NAME, weighter=...)`` patches it.
Presets that need multimodal estimators name them by registry name, so ``rlcredit_mm`` is found
through its plugin entry point only when such a preset is built.
"""

from __future__ import annotations

from typing import Any

from rlcredit.estimators import Entropy
from rlcredit.losses import CISPO, GMPO, PAPO, SAPO, ClipCov, ClippedSurrogate, KLCov
from rlcredit.registry import build_component, register
from rlcredit.shapers import GTPO, DependencyScale, EntropyAdvantage, GroupCenter, GroupNormalize
from rlcredit.strategy import Strategy
from rlcredit.weighters import Stapo, TopFraction

__all__ = ["grpo", "dapo", "dr_grpo", "entropy_forks", "vppo", "vppo_paper", "at_rl", "stapo"]


@register("strategy", "grpo")
def grpo() -> Strategy:
    """GRPO (DeepSeekMath, arXiv 2402.03300): uniform credit, group-normalised advantages.

    ``A_i = (r_i - mean_g r)/(std_g r + 1e-6)``, clipped surrogate with ``eps = 0.2``,
    ``token_mean`` aggregation (verl's default; the paper's own is ``seq_mean_token_mean``), no KL.

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("grpo").to_spec()
        {'estimators': {}, 'weighter': 'uniform', 'shapers': ['group_normalize'], 'policy_loss': 'clipped_surrogate'}
    """
    return Strategy()


@register("strategy", "dapo")
def dapo() -> Strategy:
    """DAPO (arXiv 2503.14476): GRPO with clip-higher ``eps_low = 0.2, eps_high = 0.28`` and token-mean.

    Dynamic sampling (keep groups with ``0 < #correct < G``) and overlong reward shaping are rollout
    helpers (``rlcredit.functional.overlong_penalty``), not parts of the loss.

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("dapo").policy_loss.clip_high
        0.28
    """
    return Strategy(policy_loss=ClippedSurrogate(clip_low=0.2, clip_high=0.28, aggregation="token_mean"))


@register("strategy", "dr_grpo")
def dr_grpo() -> Strategy:
    """Dr. GRPO (arXiv 2503.20783): ``A_i = r_i - mean_g r`` and ``seq_mean_token_sum_norm``.

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("dr_grpo").policy_loss.aggregation
        'seq_mean_token_sum_norm'
    """
    return Strategy(shapers=[GroupCenter()], policy_loss=ClippedSurrogate(aggregation="seq_mean_token_sum_norm"))


def _dapo_loss(**extra: Any) -> ClippedSurrogate:
    return ClippedSurrogate(clip_low=0.2, clip_high=0.28, aggregation="token_mean", **extra)


@register("strategy", "entropy_forks")
def entropy_forks() -> Strategy:
    """High-entropy "forking" tokens on a DAPO base ("Beyond the 80/20 rule", arXiv 2506.01939).

    Score ``"entropy"`` (``H_t``, from ``signals["entropy"]`` or the policy); keep
    ``H_t >= tau``, ``tau = torch.quantile(valid entropies of the batch, 0.8)`` (linear, across
    ranks: TRL's ``top_entropy_quantile=0.2``); GRPO advantages; DAPO loss (clip 0.2/0.28,
    ``token_mean`` over all valid tokens).

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("entropy_forks").to_spec()["weighter"]
        {'name': 'top_fraction', 'fraction': 0.2, 'scope': 'batch', 'score': 'entropy'}
    """
    return Strategy(
        estimators={"entropy": Entropy()},
        weighter=TopFraction(0.2, scope="batch", score="entropy"),
        shapers=[GroupNormalize()],
        policy_loss=_dapo_loss(),
    )


def _vppo(estimator: dict[str, Any], shaper: DependencyScale) -> Strategy:
    # The estimator is resolved by registry name, so rlcredit never imports rlcredit_mm: the
    # plugin entry point loads it on this first lookup.
    return Strategy(
        estimators={"visual": build_component("estimator", estimator)},
        weighter=TopFraction(0.4, scope="sequence", score="visual"),
        shapers=[GroupNormalize(), shaper],
        policy_loss=_dapo_loss(dual_clip=3.0, entropy_penalty=0.06),
    )


@register("strategy", "vppo")
def vppo() -> Strategy:
    """VPPO as released (arXiv 2510.09285; code huaixuheqing/VPPO-RL), score named ``"visual"``.

    - ``visual_kl(estimate="k3")``: ``d = clamp(logp_old(y_t | I') - logp_old(y_t | I), -20, 20)``,
      ``S_t = clamp(e^d - d - 1, 0, 10)``; from ``signals["aug_logprobs"]`` when present (no model).
    - TGF: ``top_fraction(0.4, scope="sequence")``, exactly ``ceil(0.4 T_i)`` tokens per response.
    - TAS: ``group_normalize`` then ``dependency_scale(beta_min=0.9)`` (mean-preserving code form,
      min/max and mean over the batch; the released code used 128-row and 16-row chunks, set
      ``scope=128, mean_scope=16`` to replicate).
    - Loss: clip 0.2/0.28, dual clip 3.0, ``token_mean`` over all valid tokens, plus
      ``0.06 * mean(-logp)`` over all valid tokens; no reference KL.

    Examples:
        >>> import torch, rlcredit
        >>> s = rlcredit.build("vppo")  # finds visual_kl in rlcredit_mm through the plugin entry point
        >>> r = rlcredit.Rollout(torch.ones(2, 5, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]),
        ...                      old_logprobs=torch.full((2, 5), -1.0),
        ...                      signals={"aug_logprobs": torch.tensor([[-1.0, -3.0, -1.0, -2.0, -1.0]] * 2)})
        >>> s.assign(r).token_weights  # no model needed: ceil(0.4 * 5) = 2 tokens with the largest k3 score
        tensor([[0., 1., 0., 1., 0.],
                [0., 1., 0., 1., 0.]])
    """
    return _vppo({"name": "visual_kl", "estimate": "k3"}, DependencyScale(score="visual", beta_min=0.9))


@register("strategy", "vppo_paper")
def vppo_paper() -> Strategy:
    """VPPO as the paper writes it (arXiv 2510.09285): exact KL and bounded shaping.

    Same as ``vppo`` except: ``visual_kl(estimate="exact")``, the full-vocabulary
    ``KL(pi(.|s_t, I) || pi(.|s_t, I'))`` (needs the policy), and
    ``dependency_scale(beta_min=0.9, beta_max=1.1, scope="group")``, a min-max map of the mean
    dependency into ``[0.9, 1.1]`` within each group (our choice of betas: the paper's are not
    public).

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("vppo_paper").to_spec()["shapers"][1]
        {'name': 'dependency_scale', 'score': 'visual', 'beta_max': 1.1, 'scope': 'group'}
    """
    return _vppo({"name": "visual_kl", "estimate": "exact"},
                 DependencyScale(score="visual", beta_min=0.9, beta_max=1.1, scope="group"))


@register("strategy", "at_rl")
def at_rl() -> Strategy:
    """AT-RL (arXiv 2602.11455) as rlcredit operationalises it, score named ``"connectivity"``.

    ``attention_connectivity`` (attention mass of each response token on image tokens, sink
    debiased, with its attention profile as ``"connectivity.profile"``), ``anchor_clusters``
    weights (METIS clusters of about 8 tokens, anchors covering ~15 % of tokens get 1.5, others
    1.0), GRPO advantages, DAPO loss. Both parts live in ``rlcredit_mm`` and are resolved by name.

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("at_rl").to_spec()["weighter"]
        {'name': 'anchor_clusters', 'score': 'connectivity'}
    """
    return Strategy(
        estimators={"connectivity": build_component("estimator", "attention_connectivity")},
        weighter=build_component("weighter", {"name": "anchor_clusters", "score": "connectivity"}),
        shapers=[GroupNormalize()],
        policy_loss=_dapo_loss(),
    )


@register("strategy", "stapo")
def stapo() -> Strategy:
    """STAPO (arXiv 2602.15620): silence spurious tokens, renormalise over the kept ones.

    Score ``"entropy"``; weighter ``stapo``: weight 0 where ``A_i > 0`` (reward above the group
    mean), ``pi_old(y_t) < 0.002`` (needs ``rollout.old_logprobs``) and ``H_t`` below the 0.75
    quantile of the entropies of such low-probability tokens in positive-advantage responses;
    GRPO advantages; clipped surrogate (0.2/0.2) with ``renormalize=True``: ``sum w l / sum w``.

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("stapo").policy_loss.renormalize
        True
    """
    return Strategy(
        estimators={"entropy": Entropy()},
        weighter=Stapo(score="entropy"),
        shapers=[GroupNormalize()],
        policy_loss=ClippedSurrogate(renormalize=True),
    )


# ------------------------------------------------------------------------------------------------
# Second wave: the losses and shapers of 2025-26, each on the base its paper trains with.

__all__ += ["cispo", "sapo", "gmpo", "kl_cov", "clip_cov", "papo", "gtpo", "entropy_advantage"]


@register("strategy", "cispo")
def cispo() -> Strategy:
    """CISPO (MiniMax-M1, arXiv 2506.13585): GRPO advantages, the clipped-weight REINFORCE loss.

    ``cispo``: ``-sg(min(rho, 1.28)) A logp`` (one-sided cap, the paper's and TRL's form),
    ``token_mean``, no KL.

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("cispo").to_spec()["policy_loss"]
        'cispo'
    """
    return Strategy(shapers=[GroupNormalize()], policy_loss=CISPO())


@register("strategy", "sapo")
def sapo() -> Strategy:
    """SAPO (arXiv 2511.20347): GRPO advantages, the soft gate ``(4/tau) sigmoid(tau (rho - 1))``.

    Temperatures 1.0 (``A > 0``) and 1.05 (``A <= 0``), ``seq_mean_token_mean``.

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("sapo").policy_loss.tau_neg
        1.05
    """
    return Strategy(shapers=[GroupNormalize()], policy_loss=SAPO())


@register("strategy", "gmpo")
def gmpo() -> Strategy:
    """GMPO (arXiv 2507.20673): GRPO advantages, the geometric mean of token ratios clipped in ``(e^-0.4, e^0.4)``.

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("gmpo").policy_loss.clip_high
        0.4
    """
    return Strategy(shapers=[GroupNormalize()], policy_loss=GMPO())


@register("strategy", "kl_cov")
def kl_cov() -> Strategy:
    """KL-Cov (arXiv 2505.22617): GRPO advantages; ``|logp - logp_old|`` on the 0.02 % highest-covariance tokens.

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("kl_cov").policy_loss.kl_cov_ratio
        0.0002
    """
    return Strategy(shapers=[GroupNormalize()], policy_loss=KLCov())


@register("strategy", "clip_cov")
def clip_cov() -> Strategy:
    """Clip-Cov (arXiv 2505.22617): GRPO advantages; PPO's loss with 0.02 % of the tokens whose covariance
    lies in ``(1, 5)`` cut from the gradient.

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("clip_cov").policy_loss.clip_cov_ub
        5.0
    """
    return Strategy(shapers=[GroupNormalize()], policy_loss=ClipCov())


@register("strategy", "papo")
def papo() -> Strategy:
    """PAPO-D (arXiv 2507.06448; the released DAPO recipe): DAPO plus PAPO's perception and entropy terms.

    GRPO advantages; ``papo`` loss over DAPO's clipped surrogate (0.2/0.28, ``token_mean``), with
    ``-0.01 * token_mean(k3(m - logp))`` (``m`` the current policy's log-probs with the image
    masked, p = 0.6 patches shared by a prompt's rollouts, passed as
    ``Strategy.loss(..., aux={"masked_logprobs": m})``) and the double entropy term
    ``0.03 * (token_mean(-logp) + token_mean(-m))``. PAPO-G (GRPO base, reference KL 0.01, no
    entropy term): ``build("papo", policy_loss={"name": "papo", "surrogate": {"name":
    "clipped_surrogate", "kl_coef": 0.01}})``.

    Examples:
        >>> import rlcredit
        >>> [r.describe() for r in rlcredit.build("papo").requirements]
        ["aux['masked_logprobs'] (a differentiable [B, T] tensor: Strategy.loss(..., aux={'masked_logprobs': ...}))"]
    """
    return Strategy(shapers=[GroupNormalize()], policy_loss=PAPO(surrogate=_dapo_loss(), gamma=0.01, eta=0.03))


@register("strategy", "gtpo")
def gtpo() -> Strategy:
    """GTPO (arXiv 2508.04349) on a DAPO base: GRPO advantages shared out by token entropy.

    Score ``"entropy"``; ``group_normalize`` then ``gtpo(beta=0.1)``:
    ``A_t = A (1 + 0.1 (H_t / mean H - 1))``; DAPO loss (0.2/0.28, ``token_mean``).

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("gtpo").to_spec()["shapers"]
        ['group_normalize', 'gtpo']
    """
    return Strategy(estimators={"entropy": Entropy()}, shapers=[GroupNormalize(), GTPO()], policy_loss=_dapo_loss())


@register("strategy", "entropy_advantage")
def entropy_advantage() -> Strategy:
    """The entropy-based advantage (arXiv 2506.14758) on GRPO: ``A_t = A + min(0.4 H_t, |A| / 2)``.

    Score ``"entropy"``; ``group_normalize`` then ``entropy_advantage``; GRPO's clipped
    surrogate (0.2/0.2, ``token_mean``).

    Examples:
        >>> import rlcredit
        >>> rlcredit.build("entropy_advantage").to_spec()["shapers"]
        ['group_normalize', 'entropy_advantage']
    """
    return Strategy(estimators={"entropy": Entropy()}, shapers=[GroupNormalize(), EntropyAdvantage()])
