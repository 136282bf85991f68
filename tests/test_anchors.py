"""AT-RL anchor clusters: selection rule against a plain-loop reference, invariants, METIS graph, fallback."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import rlcredit
from rlcredit.requirements import Score
from rlcredit_mm import AnchorClusters, anchors
from rlcredit_mm.anchors import cluster_tokens, select_anchor_clusters, top_share_anchors

# ----------------------------------------------------------------------------------- helpers


def rollout(mask: torch.Tensor) -> rlcredit.Rollout:
    B = mask.shape[0]
    return rlcredit.Rollout(mask, torch.zeros(B), torch.zeros(B, dtype=torch.long))


@st.composite
def anchor_batches(draw, max_B: int = 4, max_T: int = 40, max_K: int = 4):
    """Connectivity [B, T] (sometimes tied), optional profiles [B, T, K], masks with holes and empty rows."""
    B = draw(st.integers(1, max_B))
    T = draw(st.integers(1, max_T))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    lengths = torch.tensor([draw(st.integers(0, T)) for _ in range(B)])
    mask = torch.arange(T)[None, :] < lengths[:, None]
    if draw(st.booleans()):  # holes inside a response (masked tool tokens)
        mask &= torch.rand(B, T, generator=g) > 0.2
    levels = draw(st.sampled_from([2, 5, 1000]))  # few levels: many ties
    conn = torch.randint(0, levels, (B, T), generator=g).float() / levels
    profile = None
    if draw(st.booleans()):
        K = draw(st.integers(1, max_K))
        profile = torch.rand(B, T, K, generator=g) * (torch.rand(B, T, 1, generator=g) > 0.1)
    return conn, mask, profile


def _reference_select(labels: torch.Tensor, conn: torch.Tensor, mask: torch.Tensor, share: float) -> torch.Tensor:
    """Plain loops: clusters by (mean desc, first token asc), longest prefix within floor(share * n), >= 1."""
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        toks = [t for t in range(mask.shape[1]) if mask[b, t]]
        if not toks:
            continue
        clusters: dict[int, list[int]] = {}
        for t in toks:
            clusters.setdefault(int(labels[b, t]), []).append(t)
        order = sorted(clusters.values(), key=lambda ts: (-sum(float(conn[b, t]) for t in ts) / len(ts), ts[0]))
        budget = math.floor(Fraction(repr(share)) * len(toks))
        covered = 0
        for i, ts in enumerate(order):
            if i > 0 and covered + len(ts) > budget:
                break
            covered += len(ts)
            for t in ts:
                out[b, t] = True
    return out


def _reference_top_share(conn: torch.Tensor, mask: torch.Tensor, share: float) -> torch.Tensor:
    out = torch.zeros_like(mask)
    for b in range(mask.shape[0]):
        toks = [t for t in range(mask.shape[1]) if mask[b, t]]
        if not toks:
            continue
        k = max(1, math.floor(Fraction(repr(share)) * len(toks)))
        for t in sorted(toks, key=lambda t: (-float(conn[b, t]), t))[:k]:
            out[b, t] = True
    return out


# ------------------------------------------------------------------------- selection (golden)


def test_select_golden_prefix_within_share():
    # clusters: A={0,1} mean .1, B={2,3} mean .8, C={4..9} mean .2; share .4 of 10 -> budget 4
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 2, 2, 2]])
    c = torch.tensor([[0.1, 0.1, 0.9, 0.7, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2]])
    m = torch.ones(1, 10, dtype=torch.bool)
    got = select_anchor_clusters(labels, c, m, anchor_share=0.4)
    # B (2 tokens) fits; C (6 more) would exceed 4 -> stop, even though A (2) would still fit
    assert got.tolist() == [[False, False, True, True] + [False] * 6]


def test_select_takes_one_cluster_even_when_it_exceeds_the_share():
    labels = torch.tensor([[0, 0, 0, 0, 1, 1]])
    c = torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.1, 0.1]])
    got = select_anchor_clusters(labels, c, torch.ones(1, 6, dtype=torch.bool), anchor_share=0.15)
    assert got.tolist() == [[True] * 4 + [False] * 2]


def test_select_ties_go_to_the_cluster_whose_first_token_is_earlier():
    labels = torch.tensor([[1, 1, 0, 0]])  # cluster 1 starts first; both means 0.5
    c = torch.full((1, 4), 0.5)
    got = select_anchor_clusters(labels, c, torch.ones(1, 4, dtype=torch.bool), anchor_share=0.5)
    assert got.tolist() == [[True, True, False, False]]


def test_select_budget_is_an_exact_rational_floor():
    # 0.29 * 100 == 28.999999999999996 in floats: a float floor would allow only 28 tokens
    labels = torch.cat([torch.zeros(29), torch.arange(1, 72)]).long()[None]
    c = torch.cat([torch.ones(29), torch.zeros(71)])[None]
    got = select_anchor_clusters(labels, c, torch.ones(1, 100, dtype=torch.bool), anchor_share=0.29)
    assert int(got.sum()) == 29


@given(anchor_batches(), st.sampled_from([0.05, 0.15, 0.29, 0.5, 1.0]), st.integers(1, 12))
def test_select_matches_loop_reference(batch, share, n_labels):
    conn, mask, _ = batch
    g = torch.Generator().manual_seed(int(conn.numel()))
    labels = torch.where(mask, torch.randint(0, min(n_labels, mask.shape[1]), mask.shape, generator=g), -1)
    got = select_anchor_clusters(labels, conn, mask, anchor_share=share)
    assert torch.equal(got, _reference_select(labels, conn, mask, share))


@given(anchor_batches(), st.sampled_from([0.05, 0.15, 0.29, 1.0]))
def test_top_share_fallback_matches_loop_reference(batch, share):
    conn, mask, _ = batch
    assert torch.equal(top_share_anchors(conn, mask, anchor_share=share), _reference_top_share(conn, mask, share))


# ------------------------------------------------------------------------------ METIS graph


def test_cluster_tokens_groups_tokens_with_similar_profiles():
    # Two planted groups by profile, interleaved in time and with equal connectivity: only the
    # profiles can separate them. Neighbour edges alone would cut the sequence in halves.
    T = 32
    group = torch.tensor([(t // 4) % 2 for t in range(T)])
    profile = torch.stack([1.0 - group.float(), group.float()], -1)[None] + 0.01 * torch.rand(1, T, 2)
    labels = cluster_tokens(torch.zeros(1, T), torch.ones(1, T, dtype=torch.bool), profile, cluster_size=16, knn=8)
    assert labels.min() >= 0 and len(set(labels[0].tolist())) == 2
    purity = max((labels[0] == group).float().mean(), (labels[0] != group).float().mean())
    assert purity >= 0.9


def test_cluster_tokens_without_profile_uses_connectivity_values():
    c = torch.tensor([[0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9, 0.1]])
    labels = cluster_tokens(c, torch.ones_like(c, dtype=torch.bool), cluster_size=6, knn=5)
    hi, lo = labels[0, ::2], labels[0, 1::2]
    assert len(set(hi.tolist())) == 1 and len(set(lo.tolist())) == 1 and hi[0] != lo[0]


def test_cluster_tokens_part_count_padding_and_short_responses():
    T = 20
    mask = torch.zeros(4, T, dtype=torch.bool)
    mask[0, :20] = True  # 20 tokens, cluster_size 4 -> 5 parts
    mask[1, :2] = True  # 2 tokens <= max(2, 1) parts -> one cluster per token
    mask[2, :1] = True
    c = torch.rand(4, T)
    labels = cluster_tokens(c, mask, cluster_size=4, knn=3)
    assert (labels[~mask] == -1).all()
    assert len(set(labels[0].tolist())) <= 5 and labels[0].max() < 5
    assert labels[1, :2].tolist() == [0, 1] and labels[2, 0] == 0
    assert (labels[3] == -1).all()


def test_cluster_tokens_is_deterministic_and_row_independent():
    g = torch.Generator().manual_seed(3)
    c, p = torch.rand(3, 30, generator=g), torch.rand(3, 30, 4, generator=g)
    mask = torch.ones(3, 30, dtype=torch.bool)
    a = cluster_tokens(c, mask, p)
    assert torch.equal(a, cluster_tokens(c, mask, p))
    # a row's clusters do not depend on the other rows of the batch
    assert torch.equal(a[1:2], cluster_tokens(c[1:2], mask[1:2], p[1:2]))


def _reference_cluster_loop(c, mask, p, *, cluster_size=8, knn=10, seed=0):
    """One pymetis call per response in this process, graph built by plain loops (the contract)."""
    import pymetis

    B, T = mask.shape
    labels = torch.full((B, T), -1, dtype=torch.long)
    pn = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    for b in range(B):
        pos = [t for t in range(T) if mask[b, t]]
        n = len(pos)
        if n == 0:
            continue
        n_parts = max(2, math.ceil(n / cluster_size))
        if n <= n_parts:
            labels[b, pos] = torch.arange(n)
            continue
        rows = pn[b][pos]  # [n, K]
        sim = rows @ rows.T
        sim.fill_diagonal_(float("-inf"))
        adj = [set() for _ in range(n)]
        for i in range(n - 1):
            adj[i].add(i + 1), adj[i + 1].add(i)
        for i in range(n):
            for j in sim[i].topk(min(knn, n - 1)).indices.tolist():
                adj[i].add(j), adj[j].add(i)
        xadj, adjncy = [0], []
        for i in range(n):
            adjncy += sorted(adj[i])
            xadj.append(len(adjncy))
        graph = pymetis.CSRAdjacency(torch.tensor(xadj).numpy(), torch.tensor(adjncy).numpy())
        part = pymetis.part_graph(n_parts, adjacency=graph, options=pymetis.Options(seed=seed), recursive=True).vertex_part
        labels[b, pos] = torch.tensor(part)
    return labels


def test_all_responses_are_partitioned_in_worker_processes_with_the_loop_results(monkeypatch):
    from rlcredit_mm import _metis

    g = torch.Generator().manual_seed(5)
    B, T = 6, 48
    c, p = torch.rand(B, T, generator=g), torch.rand(B, T, 4, generator=g)
    mask = torch.arange(T)[None] < torch.tensor([48, 40, 17, 0, 33, 9])[:, None]
    calls = []
    real = _metis.partition_all
    monkeypatch.setattr(anchors, "partition_all", lambda jobs: calls.append(len(jobs)) or real(jobs))
    pooled = cluster_tokens(c, mask, p, cluster_size=5, knn=4, seed=2)
    assert calls == [5]  # one hand-over for the batch (the empty row has no graph)
    if _metis.executor() is not None:  # Linux with >= 2 CPUs: the pool did the work
        assert _metis._pool is not None and _metis._pool[0] == __import__("os").getpid()
    monkeypatch.setattr(_metis, "executor", lambda: None)  # the inline loop
    inline = cluster_tokens(c, mask, p, cluster_size=5, knn=4, seed=2)
    assert torch.equal(pooled, inline)
    assert torch.equal(inline, _reference_cluster_loop(c, mask, p, cluster_size=5, knn=4, seed=2))


# ---------------------------------------------------------------------------- the weighter


@given(anchor_batches(), st.sampled_from([0.1, 0.15, 0.3]), st.integers(1, 9))
def test_anchor_invariants(batch, share, cluster_size):
    conn, mask, profile = batch
    scores = {"connectivity": conn}
    if profile is not None:
        scores["connectivity.profile"] = profile
    r = rollout(mask)
    w = AnchorClusters(anchor_share=share, cluster_size=cluster_size)
    anchor = w.anchors(scores, r)
    only = AnchorClusters(anchor_share=share, cluster_size=cluster_size, mode="anchors_only")(scores, r)
    rest = AnchorClusters(anchor_share=share, cluster_size=cluster_size, mode="non_anchors_only")(scores, r)
    # anchors_only and non_anchors_only partition the valid tokens
    assert torch.equal(only + rest, mask.float())
    assert torch.equal(only.bool(), anchor)
    weights = w(scores, r)
    assert torch.equal(weights, torch.where(anchor, 1.5, torch.where(mask, 1.0, 0.0)))
    for b in range(mask.shape[0]):
        n = int(mask[b].sum())
        if n == 0:
            assert not anchor[b].any()
            continue
        a = anchor[b] & mask[b]
        assert a.any()
        # anchors have a mean connectivity at least that of the non-anchors (whole clusters by mean)
        if (mask[b] & ~a).any():
            assert conn[b][a].mean() >= conn[b][mask[b] & ~a].mean() - 1e-6


def test_anchors_have_higher_connectivity_on_planted_data():
    g = torch.Generator().manual_seed(0)
    B, T = 4, 60
    conn = 0.1 * torch.rand(B, T, generator=g)
    conn[:, 20:29] += 0.8  # a contiguous high-connectivity span of 9 tokens (15% of 60)
    profile = torch.rand(B, T, 4, generator=g)
    profile[:, 20:29] = torch.tensor([5.0, 0.0, 0.0, 0.0])
    mask = torch.ones(B, T, dtype=torch.bool)
    anchor = AnchorClusters().anchors({"connectivity": conn, "connectivity.profile": profile}, rollout(mask))
    assert (conn[anchor].mean() > 3 * conn[~anchor].mean()).item()
    assert anchor[:, 20:29].float().mean() > 0.5


def test_covered_share_stays_within_anchor_share_unless_one_cluster():
    g = torch.Generator().manual_seed(1)
    conn, mask = torch.rand(6, 80, generator=g), torch.ones(6, 80, dtype=torch.bool)
    anchor = AnchorClusters(anchor_share=0.15, cluster_size=4).anchors({"c": conn}, rollout(mask))
    labels = cluster_tokens(conn, mask, cluster_size=4)
    for b in range(6):
        n_clusters = len(set(labels[b][anchor[b]].tolist()))
        assert int(anchor[b].sum()) <= 12 or n_clusters == 1


def test_rescale_gives_mean_one_per_response():
    g = torch.Generator().manual_seed(2)
    mask = torch.arange(30)[None, :] < torch.tensor([[30], [7], [1], [0]])
    w = AnchorClusters(rescale=True)({"c": torch.rand(4, 30, generator=g)}, rollout(mask))
    means = w.sum(1) / mask.sum(1).clamp_min(1)
    assert torch.allclose(means[:3], torch.ones(3)) and w[3].abs().sum() == 0
    assert (w[~mask] == 0).all()


def test_short_responses_are_handled():
    # responses shorter than the cluster count: 0, 1, 2, 3 tokens
    mask = torch.arange(3)[None, :] < torch.tensor([[0], [1], [2], [3]])
    conn = torch.tensor([[0.0, 0.0, 0.0], [0.4, 0.0, 0.0], [0.1, 0.7, 0.0], [0.3, 0.2, 0.9]])
    r = rollout(mask)
    w = AnchorClusters()({"c": conn}, r)
    # 0 tokens: nothing; 1 and 2 tokens (<= 2 parts): one cluster per token, the best one is the anchor
    assert w[:3].tolist() == [[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [1.0, 1.5, 0.0]]
    # 3 tokens, 2 METIS parts: the anchor cluster is the one holding the 0.9 token
    assert w[3, 2] == 1.5 and set(w[3].tolist()) <= {1.0, 1.5} and (w[3] == 1.0).any()


def test_deterministic_given_inputs():
    g = torch.Generator().manual_seed(4)
    scores = {"c": torch.rand(5, 50, generator=g), "c.profile": torch.rand(5, 50, 8, generator=g)}
    r = rollout(torch.ones(5, 50, dtype=torch.bool))
    first = AnchorClusters()(scores, r)
    for _ in range(3):
        assert torch.equal(AnchorClusters()(scores, r), first)


def test_profile_changes_the_graph():
    # connectivity alone groups tokens {0..3} (high) against {4..7}; the profiles pair even and odd tokens
    conn = torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.1]])
    mask = torch.ones(1, 8, dtype=torch.bool)
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).repeat(4, 1)[None]
    w = AnchorClusters(anchor_share=0.5, cluster_size=4, knn=3)
    by_conn = w.anchors({"c": conn}, rollout(mask))
    by_profile = w.anchors({"c": conn, "c.profile": p}, rollout(mask))
    assert by_conn.tolist() == [[True] * 4 + [False] * 4]
    # even/odd clusters tie on mean connectivity (0.5): the one starting first wins
    assert by_profile.tolist() == [[True, False] * 4]


def test_without_pymetis_falls_back_to_top_share_with_one_warning(monkeypatch):
    monkeypatch.setattr(anchors, "_load_pymetis", lambda: None)
    monkeypatch.setattr(anchors, "_WARNED_NO_METIS", False)
    conn = torch.tensor([[0.1, 0.9, 0.5, 0.9, 0.0, 0.2, 0.3, 0.4, 0.6, 0.7]])
    r = rollout(torch.ones(1, 10, dtype=torch.bool))
    with pytest.warns(RuntimeWarning, match="pymetis is not installed"):
        w = AnchorClusters(anchor_share=0.2)({"c": conn}, r)
    assert w.tolist() == [[1.0, 1.5, 1.0, 1.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AnchorClusters(anchor_share=0.2)({"c": conn}, r)  # no second warning
    with pytest.raises(ImportError, match="pymetis"):
        cluster_tokens(conn, r.response_mask)


# ------------------------------------------------------------------------ specs and errors


def test_spec_roundtrip_and_requires():
    w = rlcredit.registry.build_component("weighter", {"name": "anchor_clusters", "score": "connectivity", "knn": 4})
    assert w == AnchorClusters(score="connectivity", knn=4)
    assert w.requires == (Score("connectivity"),)
    assert AnchorClusters().requires == (Score(None),)
    assert rlcredit.registry.component_spec(w) == {"name": "anchor_clusters", "score": "connectivity", "knn": 4}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"anchor_share": 0.0}, "anchor_share must be a number in (0.0, 1.0]"),
    ({"anchor_share": 1.5}, "anchor_share"),
    ({"cluster_size": 0}, "cluster_size must be an int >= 1"),
    ({"cluster_size": 2.5}, "cluster_size must be an int"),
    ({"w_anchor": -1.0}, "w_anchor"),
    ({"mode": "anchors"}, "mode must be one of 'weights', 'anchors_only', 'non_anchors_only'"),
    ({"mode": "anchors_only", "w_anchor": 2.0}, "only apply to mode='weights'"),
    ({"mode": "non_anchors_only", "rescale": True}, "only apply to mode='weights'"),
    ({"rescale": True, "w_anchor": 0.0, "w_other": 0.0}, "rescale=True needs"),
    ({"knn": -1}, "knn must be an int >= 0"),
    ({"score": 3}, "score name"),
])
def test_bad_parameters_raise_spec_error(kwargs, message):
    with pytest.raises(rlcredit.SpecError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        AnchorClusters(**kwargs)


def test_bad_profile_and_missing_score_raise():
    r = rollout(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(rlcredit.RolloutError, match=r"scores\['c.profile'\] must be \[B, T, K\]"):
        AnchorClusters()({"c": torch.rand(2, 4), "c.profile": torch.rand(2, 3, 2)}, r)
    with pytest.raises(rlcredit.SpecError, match="reads score 'connectivity'"):
        AnchorClusters(score="connectivity")({"c": torch.rand(2, 4)}, r)
    with pytest.raises(rlcredit.SpecError, match="which no estimator produces"):
        rlcredit.Strategy(estimators={"entropy": "entropy"}, weighter=AnchorClusters(score="connectivity"))
