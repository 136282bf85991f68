"""AT-RL anchor tokens: METIS clusters of response tokens, the most image-connected ones weighted up.

AT-RL (Jiao et al., arXiv 2602.11455) states that about 15% of the response tokens are "visual
anchors" with high cross-modal attention connectivity, that tokens are clustered with METIS on
attention-pattern similarity, and that the advantage is multiplied by a cluster weight,
``A_{i,t} = W(C_k) A_i``. The edge rule, cluster count and weights are not published; what this
module does is **our operationalisation** (METHODS.md, AT-RL), every choice a parameter:

1. per response, a graph over its valid tokens: each token linked to its ``knn`` most similar tokens
   (cosine similarity of the pooled attention profiles ``connectivity.profile``; without profiles,
   closeness of the connectivity values) plus edges between neighbouring tokens;
2. METIS (pymetis) cuts it into ``max(2, ceil(T_i / cluster_size))`` parts;
3. clusters sorted by mean connectivity are taken whole while the covered share stays within
   ``anchor_share`` (at least one cluster): those tokens are the anchors.

Graph partitioning is a host algorithm: the kNN search runs batched on the scores' device, then
one device-to-host copy of the neighbour lists feeds the METIS calls of all responses at once,
spread over worker processes (``rlcredit_mm._metis``). Selection and weighting are vectorised again.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import attrs
import numpy as np
import torch
from torch import Tensor

from rlcredit.requirements import Requirement, Score
from rlcredit.validators import in_range, int_at_least, is_bool, one_of, optional_str, to_number, token_weight
from rlcredit.distributed import Reducer
from rlcredit.errors import RolloutError, SpecError
from rlcredit.registry import register
from rlcredit.rollout import Rollout
from rlcredit_mm._metis import partition_all

__all__ = ["AnchorClusters", "cluster_tokens", "select_anchor_clusters", "top_share_anchors"]

_WARNED_NO_METIS = False
# Pairwise-similarity blocks hold at most this many float32 entries ([R, T, T], R rows at a time).
_SIM_BUDGET = 1 << 23


def _load_pymetis() -> Any | None:
    """The ``pymetis`` module, or None when it is not installed (the ``mm`` extra provides it)."""
    try:
        import pymetis
    except ImportError:
        return None
    return pymetis


def _warn_no_metis() -> None:
    global _WARNED_NO_METIS
    if not _WARNED_NO_METIS:
        _WARNED_NO_METIS = True
        warnings.warn(
            "pymetis is not installed, so anchor_clusters falls back to the top anchor_share of tokens by "
            "connectivity, without clustering (METHODS.md, AT-RL). Install it with pip install 'rlcredit[mm]'.",
            RuntimeWarning,
            stacklevel=3,
        )


def _share_budget(share: float, n: Tensor) -> Tensor:
    """``floor(share * n)`` computed exactly from the decimal ``share`` (int64, same shape as ``n``).

    ``0.29 * 100`` is ``28.999...`` in floats; the rational form gives 29.
    """
    frac = Fraction(repr(float(share)))
    return (n.long() * frac.numerator) // frac.denominator


def _check_inputs(fn: str, connectivity: Tensor, mask: Tensor, profile: Tensor | None) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.ndim != 2:
        raise RolloutError(f"{fn}: mask must be a [B, T] bool tensor, got {getattr(mask, 'shape', type(mask))}.")
    if not isinstance(connectivity, Tensor) or tuple(connectivity.shape) != tuple(mask.shape):
        raise RolloutError(
            f"{fn}: connectivity must be a [B, T] = {list(mask.shape)} float tensor, "
            f"got {list(getattr(connectivity, 'shape', [])) or type(connectivity).__name__}."
        )
    if profile is not None and (
        not isinstance(profile, Tensor) or profile.ndim != 3 or tuple(profile.shape[:2]) != tuple(mask.shape)
    ):
        raise RolloutError(
            f"{fn}: profile must be [B, T, K] with [B, T] = {list(mask.shape)}, "
            f"got {list(getattr(profile, 'shape', [])) or type(profile).__name__}."
        )


def _knn(connectivity: Tensor, mask: Tensor, profile: Tensor | None, k: int) -> tuple[Tensor, Tensor]:
    """Each valid token's ``k`` most similar valid tokens of its own response (batched, on the scores' device).

    Similarity: cosine of the profile rows (a zero profile has similarity 0 to everything), else
    ``-|c_s - c_t|``. Exact ties are broken by ``torch.topk`` (deterministic for a given input and
    device).

    Returns:
        ``(index [B, T, k] int64, ok [B, T, k] bool)``; ``ok`` is False where a response has fewer
        than ``k + 1`` valid tokens.
    """
    B, T = mask.shape
    device = mask.device
    eye = torch.eye(T, dtype=torch.bool, device=device)
    rows = max(1, _SIM_BUDGET // max(1, T * T))
    idx_parts, ok_parts = [], []
    for start in range(0, B, rows):
        sl = slice(start, min(B, start + rows))
        m = mask[sl]
        if profile is not None:
            p = profile[sl].float()
            p = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            sim = torch.bmm(p, p.transpose(1, 2))
        else:
            c = connectivity[sl].float()
            sim = -(c[:, :, None] - c[:, None, :]).abs()
        sim.masked_fill_(~m[:, None, :] | eye, float("-inf"))
        val, idx = sim.topk(k, dim=-1)
        idx_parts.append(idx)
        ok_parts.append(torch.isfinite(val) & m[:, :, None])
    return torch.cat(idx_parts), torch.cat(ok_parts)


def cluster_tokens(
    connectivity: Tensor,
    mask: Tensor,
    profile: Tensor | None = None,
    *,
    cluster_size: int = 8,
    knn: int = 10,
    seed: int = 0,
) -> Tensor:
    """METIS clusters of each response's valid tokens (AT-RL, arXiv 2602.11455; our graph rule).

    Graph per response ``i``: nodes are its ``T_i`` valid tokens; edges link each token to its
    ``knn`` most similar tokens (cosine similarity of ``profile`` rows, else ``-|c_s - c_t|``) and
    consecutive valid tokens; unweighted, symmetrised. METIS (recursive bisection) cuts it into
    ``n_parts = max(2, ceil(T_i / cluster_size))`` balanced parts. A response with ``T_i <= n_parts``
    (shorter than the cluster count) gets one cluster per token.

    Args:
        connectivity: ``[B, T]`` float, per-token connectivity ``c_t``.
        mask: ``[B, T]`` bool, valid response tokens.
        profile: ``[B, T, K]`` float attention profiles over pooled image tokens, or None.
        cluster_size: target tokens per cluster (>= 1).
        knn: neighbours per token in the similarity graph (0: neighbour edges only).
        seed: METIS random seed (the partition is deterministic given inputs and seed).

    Returns:
        ``[B, T]`` int64 cluster labels ``0..n_parts-1`` per row (numbered per response), -1 on padding.

    Raises:
        ImportError: pymetis is not installed (``AnchorClusters`` falls back instead).

    Examples:
        >>> import torch
        >>> c = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.0]])
        >>> labels = cluster_tokens(c, torch.tensor([[True, True, True, True, False]]), cluster_size=2, knn=1)
        >>> labels[0, 0] == labels[0, 1], labels[0, 2] == labels[0, 3], labels[0, 1] != labels[0, 2], labels[0, 4]
        (tensor(True), tensor(True), tensor(True), tensor(-1))
    """
    _check_inputs("cluster_tokens", connectivity, mask, profile)
    if _load_pymetis() is None:
        raise ImportError("cluster_tokens needs pymetis: pip install 'rlcredit[mm]'.")
    B, T = mask.shape
    device = mask.device
    labels = torch.full((B, T), -1, dtype=torch.int64)
    if B == 0 or T == 0:
        return labels.to(device)
    k = min(int(knn), T - 1)
    nbr_np = ok_np = None
    if k > 0:
        nbr, ok = _knn(connectivity.detach(), mask, None if profile is None else profile.detach(), k)
        nbr_np, ok_np = nbr.cpu().numpy(), ok.cpu().numpy()  # the one device-to-host copy
    mask_np = mask.cpu().numpy()
    jobs, rows = [], []
    for b in range(B):
        pos = np.flatnonzero(mask_np[b])
        n = pos.size
        if n == 0:
            continue
        local = None
        if k > 0:
            node = np.full(T, -1, dtype=np.int64)
            node[pos] = np.arange(n)
            local = np.where(ok_np[b, pos], node[nbr_np[b, pos]], -1)  # [n, k] neighbours as node ids
        jobs.append((n, max(2, math.ceil(n / cluster_size)), local, int(seed)))
        rows.append((b, pos))
    # All responses' graphs at once, across worker processes (rlcredit_mm._metis): METIS holds the GIL.
    for (b, pos), part in zip(rows, partition_all(jobs)):
        labels[b, torch.from_numpy(pos)] = torch.from_numpy(part)
    return labels.to(device)


def select_anchor_clusters(labels: Tensor, connectivity: Tensor, mask: Tensor, *, anchor_share: float = 0.15) -> Tensor:
    """Anchors: whole clusters by mean connectivity while the covered share stays within ``anchor_share``.

    Per response ``i`` (AT-RL, arXiv 2602.11455; our rule): clusters are sorted by mean ``c_t``
    (descending; ties: the cluster whose first token comes first) and the longest prefix with
    ``sum |C_k| <= floor(anchor_share * T_i)`` is taken, but always at least the first cluster.
    The floor is exact (rational), so ``0.29 * 100`` gives 29.

    Args:
        labels: ``[B, T]`` int64 cluster labels (``>= 0``), -1 on padding (from ``cluster_tokens``).
        connectivity: ``[B, T]`` float.
        mask: ``[B, T]`` bool, valid tokens.
        anchor_share: the share of valid tokens the anchors may cover, in ``(0, 1]``.

    Returns:
        ``[B, T]`` bool, True on anchor tokens (never on padding; at least one per non-empty response).

    Examples:
        >>> import torch
        >>> labels = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 2, 2, 2]])
        >>> c = torch.tensor([[0.1, 0.1, 0.9, 0.7, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]])
        >>> select_anchor_clusters(labels, c, torch.ones(1, 10, dtype=torch.bool), anchor_share=0.4).int()
        tensor([[0, 0, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    """
    _check_inputs("select_anchor_clusters", connectivity, mask, None)
    if tuple(labels.shape) != tuple(mask.shape):
        raise RolloutError(f"select_anchor_clusters: labels must be [B, T] = {list(mask.shape)}, got {list(labels.shape)}.")
    B, T = mask.shape
    if B == 0 or T == 0:
        return torch.zeros_like(mask)
    device = mask.device
    valid = mask & (labels >= 0)
    lab = torch.where(valid, labels, 0).long()
    M = T  # labels are < T per row (at most one cluster per token)
    c = torch.where(valid, connectivity.float(), 0.0)
    ones = valid.float()
    sums = torch.zeros(B, M, device=device).scatter_add_(1, lab, c)
    sizes = torch.zeros(B, M, device=device).scatter_add_(1, lab, ones)
    pos = torch.arange(T, device=device).expand(B, T)
    first = torch.full((B, M), T, dtype=torch.long, device=device).scatter_reduce_(
        1, lab, torch.where(valid, pos, T), reduce="amin"
    )
    present = sizes > 0
    mean = torch.where(present, sums / sizes.clamp_min(1.0), float("-inf"))
    # Order: mean descending, then first token ascending; empty clusters (mean -inf) last.
    order = torch.argsort(first, dim=1, stable=True)
    order = order.gather(1, torch.argsort(-mean.gather(1, order), dim=1, stable=True))
    covered = sizes.gather(1, order).cumsum(1)
    budget = _share_budget(anchor_share, valid.sum(1))
    take_sorted = (covered <= budget[:, None].float()) & present.gather(1, order)
    take_sorted[:, 0] |= present.gather(1, order)[:, 0]
    take = torch.zeros(B, M, dtype=torch.bool, device=device).scatter_(1, order, take_sorted)
    return take.gather(1, lab) & valid


def top_share_anchors(connectivity: Tensor, mask: Tensor, *, anchor_share: float = 0.15) -> Tensor:
    """The METIS-free fallback: the ``max(1, floor(anchor_share * T_i))`` valid tokens with the highest ``c_t``.

    Ties go to the earlier token. Used by ``AnchorClusters`` when pymetis is missing.

    Args:
        connectivity: ``[B, T]`` float.
        mask: ``[B, T]`` bool.
        anchor_share: share of valid tokens kept, in ``(0, 1]``.

    Returns:
        ``[B, T]`` bool.

    Examples:
        >>> import torch
        >>> top_share_anchors(torch.tensor([[0.2, 0.9, 0.9, 0.1]]), torch.ones(1, 4, dtype=torch.bool),
        ...                   anchor_share=0.5).int()
        tensor([[0, 1, 1, 0]], dtype=torch.int32)
    """
    _check_inputs("top_share_anchors", connectivity, mask, None)
    if mask.numel() == 0:
        return torch.zeros_like(mask)
    c = torch.where(mask, connectivity.float(), float("-inf"))
    order = torch.argsort(-c, dim=1, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(mask.shape[1], device=mask.device).expand_as(order))
    n = mask.sum(1)
    k = torch.where(n > 0, _share_budget(anchor_share, n).clamp_min(1), 0)
    return (rank < k[:, None]) & mask


@register("weighter", "anchor_clusters")
@attrs.frozen
class AnchorClusters:
    """AT-RL anchor weighting: METIS clusters of tokens, the most image-connected clusters weighted up.

    AT-RL (Jiao et al., "Credit Where It is Due", arXiv 2602.11455) multiplies the advantage by a
    cluster weight, ``A_{i,t} = W(C_k) A_i``; here that weight is the token weight (folded exactly
    into the clipped loss):

    ``w_t = w_anchor`` if ``t`` is in an anchor cluster, ``w_other`` otherwise, 0 on padding;
    with ``rescale=True``, ``w_t / mean_{valid s} w_s`` per response (mean one).

    Anchors (our operationalisation, see ``cluster_tokens`` and
    ``select_anchor_clusters``): a kNN graph on the cosine similarity of the attention profiles
    ``scores[NAME + ".profile"]`` (``[B, T, K]``, produced by ``attention_connectivity``; when the
    score has no profile, closeness of the connectivity values) plus neighbour edges, cut by METIS
    into ``max(2, ceil(T_i / cluster_size))`` parts; clusters sorted by mean connectivity are taken
    whole while they cover at most ``anchor_share`` of the valid tokens, at least one cluster.
    Without pymetis: the top ``anchor_share`` tokens by connectivity (one-time ``RuntimeWarning``).

    Modes reproduce the paper's ablation: ``"anchors_only"`` gives 1 on anchors and 0 elsewhere,
    ``"non_anchors_only"`` 1 on the other valid tokens (the two partition the valid tokens).
    ``w_anchor``, ``w_other`` and ``rescale`` only apply to ``"weights"``; setting them with another
    mode raises.

    Args:
        anchor_share: largest share of valid tokens covered by anchors, in ``(0, 1]``.
        cluster_size: target tokens per METIS part (int >= 1).
        w_anchor: weight of anchor tokens (in ``[0, 1e20]``, the range of token weights).
        w_other: weight of the other valid tokens (in ``[0, 1e20]``).
        mode: ``"weights"``, ``"anchors_only"`` or ``"non_anchors_only"``.
        score: the connectivity score's name (None: the strategy's single score).
        rescale: rescale the weights to mean one over each response's valid tokens.
        knn: neighbours per token in the similarity graph (int >= 0).
        seed: METIS seed (results are deterministic given inputs and seed).

    Returns:
        ``[B, T]`` float32 weights, 0 on padding.

    Examples:
        >>> import torch, rlcredit
        >>> from rlcredit_mm import AnchorClusters
        >>> r = rlcredit.Rollout(torch.ones(1, 8, dtype=torch.bool), torch.tensor([1.0]), torch.tensor([0]))
        >>> c = torch.tensor([[0.1, 0.2, 0.9, 0.8, 0.1, 0.0, 0.1, 0.2]])
        >>> AnchorClusters(anchor_share=0.25, cluster_size=2, knn=1)({"connectivity": c}, r)
        tensor([[1.0000, 1.0000, 1.5000, 1.5000, 1.0000, 1.0000, 1.0000, 1.0000]])
    """

    anchor_share: float = attrs.field(default=0.15, converter=to_number, validator=in_range(0.0, 1.0, lo_open=True))
    cluster_size: int = attrs.field(default=8, converter=to_number, validator=int_at_least(1))
    w_anchor: float = attrs.field(default=1.5, converter=to_number, validator=token_weight)
    w_other: float = attrs.field(default=1.0, converter=to_number, validator=token_weight)
    mode: str = attrs.field(default="weights", validator=one_of("weights", "anchors_only", "non_anchors_only"))
    score: str | None = attrs.field(default=None, validator=optional_str)
    rescale: bool = attrs.field(default=False, validator=is_bool)
    knn: int = attrs.field(default=10, converter=to_number, validator=int_at_least(0))
    seed: int = attrs.field(default=0, converter=to_number, validator=int_at_least(0))

    def __attrs_post_init__(self) -> None:
        if self.mode != "weights":
            changed = [
                f"{a.name}={getattr(self, a.name)!r}"
                for a in attrs.fields(type(self))
                if a.name in ("w_anchor", "w_other", "rescale") and getattr(self, a.name) != a.default
            ]
            if changed:
                raise SpecError(
                    f"AnchorClusters: {', '.join(changed)} only apply to mode='weights', but mode={self.mode!r} "
                    f"gives 0/1 masks; drop them or use mode='weights'."
                )
        if self.mode == "weights" and self.rescale and self.w_anchor == 0 and self.w_other == 0:
            raise SpecError("AnchorClusters: rescale=True needs w_anchor or w_other > 0 (all-zero weights have no mean).")

    @property
    def requires(self) -> tuple[Requirement, ...]:
        return (Score(self.score),)

    def anchors(self, scores: Mapping[str, Tensor], rollout: Rollout) -> Tensor:
        """The ``[B, T]`` bool anchor mask (what the weights are built from), for inspection and plots."""
        who = "weighter AnchorClusters"
        name = Score(self.score).resolve(scores, who)
        conn = scores[name].float()
        profile = scores.get(f"{name}.profile")
        mask = rollout.response_mask
        if profile is not None and (profile.ndim != 3 or tuple(profile.shape[:2]) != tuple(mask.shape)):
            raise RolloutError(
                f"{who}: scores[{name + '.profile'!r}] must be [B, T, K] with [B, T] = {list(mask.shape)}, "
                f"got {list(profile.shape)}."
            )
        if _load_pymetis() is None:
            _warn_no_metis()
            return top_share_anchors(conn, mask, anchor_share=self.anchor_share)
        labels = cluster_tokens(
            conn, mask, None if profile is None else profile.float(),
            cluster_size=self.cluster_size, knn=self.knn, seed=self.seed,
        )
        return select_anchor_clusters(labels, conn, mask, anchor_share=self.anchor_share)

    def __call__(self, scores: Mapping[str, Tensor], rollout: Rollout, *, reducer: Reducer | None = None) -> Tensor:
        mask = rollout.response_mask
        anchors = self.anchors(scores, rollout)
        zero = torch.zeros((), device=mask.device)
        if self.mode == "anchors_only":
            return anchors.float()
        if self.mode == "non_anchors_only":
            return (mask & ~anchors).float()
        w = torch.where(anchors, torch.tensor(float(self.w_anchor), device=mask.device), float(self.w_other))
        w = torch.where(mask, w, zero)
        if self.rescale:
            mean = w.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp_min(1)
            # A response whose weights are all 0 keeps them (no mean to rescale by).
            w = torch.where(mean > 0, w / mean.clamp_min(1e-30), w)
        return w
