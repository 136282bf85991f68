"""Distributed correctness: R ranks holding slices of a batch give what one process holding it all gives.

DESIGN §9 / issue #5: every batch-scope statistic goes through an injected reducer, so with
``TorchDistributedReducer`` on R ranks the token weights and advantages of each rank's rows equal
the single-process ones, and the per-rank losses average (as DDP averages gradients) to the
single-process loss, with gradients averaged likewise.

Three tiers:

- real ``torch.distributed``: 2 and 3 gloo processes on loopback (``torch.multiprocessing``
  spawn, one spawn per world size shared by all the checks below, bounded timeouts); uneven row
  counts, groups spanning ranks, per-rank padded lengths ``T``, and (3 ranks) a rank whose rows
  are all padding; the reducer's collectives themselves, checked against hand-computed values;
- the same comparisons with in-process ranks (``tests.strategies.run_ranks``: threads whose
  reducer really exchanges tensors) under Hypothesis, over random batches and partitions;
- the reducer's error cases.

Reference = one process holding every row, in rank order (rank 0's rows first), ``reducer=None``.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import rlcredit
from rlcredit import functional as F
from rlcredit.distributed import LocalReducer, Reducer, TorchDistributedReducer
from rlcredit.errors import RLCreditError, RolloutError
from rlcredit.requirements import Field, Signal
from tests.strategies import run_ranks, spawn_bounded

ATOL = RTOL = 1e-6
PRESETS = ("grpo", "dapo", "dr_grpo", "entropy_forks", "vppo")
# Compositions beyond the presets, through every other batch-scope path of the strategy layer:
# STAPO's batch quantile and renormalised loss, group-scope top-fraction, group-scope bounded
# TAS, leave-one-out, a reference KL term, seq-mean aggregation, GSPO's sequence ratio.
EXTRA = ("stapo_lowprob", "mixed", "gspo")
CASES = PRESETS + EXTRA
SPAWN_TIMEOUT_S = 120.0  # deadlock guard for the whole spawn (normally ~15 s); gloo ops time out at 60 s

# Dataset shared by both world sizes: 14 rows, T = 12, groups of 4 (ids not sorted), rows 11-13
# have no valid token. Partitions (rank order = row order):
#   2 ranks: rows 0-8 | 9-13              (uneven; group of rows 8-11 spans the ranks)
#   3 ranks: rows 0-5 | 6-10 | 11-13      (rank 2 all padding; groups 4-7 and 8-11 span ranks)
N_ROWS, T_FULL = 14, 12
LENGTHS = [12, 5, 9, 1, 7, 12, 3, 8, 6, 2, 10, 0, 0, 0]
GROUP_IDS = [7, 7, 7, 7, 3, 3, 3, 3, 5, 5, 5, 5, 9, 9]
PARTITIONS = {2: [9, 5], 3: [6, 5, 3]}


# --------------------------------------------------------------------------------- the data


def make_data(lengths: list[int], group_ids: list[int], T: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full-batch tensors: rewards (one all-equal group), log-probs, signals, features for grads."""
    g = torch.Generator().manual_seed(seed)
    n = len(lengths)
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(T)[None, :] < lengths_t[:, None]
    zero = torch.zeros(())
    rewards = torch.randint(0, 3, (n,), generator=g).float()
    gid = torch.tensor(group_ids)
    first = gid == gid[0]
    rewards[first] = 1.0  # one group with all-equal rewards: advantage exactly 0
    old = torch.where(mask, -3.0 * torch.rand(n, T, generator=g), zero)
    return {
        "mask": mask,
        "rewards": rewards,
        "group_ids": gid,
        "old_logprobs": old,
        "ref_logprobs": torch.where(mask, old + 0.1 * torch.randn(n, T, generator=g), zero),
        # padding positions of the current log-probs are finite garbage: they must not matter
        "base_logprobs": torch.where(mask, old + 0.3 * torch.randn(n, T, generator=g), torch.randn(n, T, generator=g)),
        "features": 0.2 * torch.randn(n, T, 3, generator=g),
        "entropy": torch.where(mask, 2.0 * torch.rand(n, T, generator=g), zero),
        "aug_logprobs": torch.where(mask, old + 0.5 * torch.randn(n, T, generator=g), zero),
        "scores": torch.rand(n, T, generator=g),
        "weights": torch.where(mask, torch.rand(n, T, generator=g).round(decimals=1), zero),
    }


THETA = (0.5, -0.3, 0.2)


def local_slice(data: dict[str, torch.Tensor], rows: range) -> dict[str, torch.Tensor]:
    """This rank's rows, right-trimmed to its own padded length (at least 1), like a trainer pads."""
    idx = torch.tensor(list(rows), dtype=torch.long)
    lengths = data["mask"][idx].sum(-1)
    T = max(1, int(lengths.max()))
    out = {}
    for key, x in data.items():
        x = x[idx]
        out[key] = x[:, :T] if x.dim() >= 2 else x
    return out


# ------------------------------------------------------------------------------ strategies


class K3FromSignal:
    """VPPO's k3 visual dependency from ``signals["aug_logprobs"]``: ``visual_kl(estimate="k3")``'s maths.

    ``d = clamp(aug - old, -20, 20)``, ``S = clamp(e^d - d - 1, 0, 10)``, 0 on padding.
    """

    requires = (Field("old_logprobs"), Signal("aug_logprobs"))
    extras = ()

    def __call__(self, rollout: rlcredit.Rollout, policy: Any = None) -> torch.Tensor:
        d = (rollout.signals["aug_logprobs"] - rollout.old_logprobs).clamp(-20, 20)
        s = (torch.expm1(d) - d).clamp(0, 10)
        return torch.where(rollout.response_mask, s, torch.zeros(()))


def _vppo_parts() -> dict[str, Any]:
    """The ``vppo`` preset's weighter, shapers and loss specs (core components only)."""
    try:
        spec = rlcredit.build("vppo").to_spec()
    except rlcredit.RegistryError:  # rlcredit_mm's visual_kl not registered (yet): same composition
        spec = {
            "weighter": {"name": "top_fraction", "fraction": 0.4, "scope": "sequence", "score": "visual"},
            "shapers": ["group_normalize", {"name": "dependency_scale", "score": "visual", "beta_min": 0.9}],
            "policy_loss": {"name": "clipped_surrogate", "clip_low": 0.2, "clip_high": 0.28, "dual_clip": 3.0,
                            "entropy_penalty": 0.06},
        }
    return {k: v for k, v in spec.items() if k != "estimators"}


def make_strategy(name: str, vppo_parts: dict[str, Any] | None = None) -> rlcredit.Strategy:
    """Preset ``name``; ``vppo`` as its own parts with the inline k3 estimator when ``vppo_parts`` is given.

    The inline estimator keeps the spawned processes from importing rlcredit_mm (and with it
    transformers: seconds per process); estimators are per-token and take no reducer, and
    ``test_inline_vppo_equals_preset`` checks that the swap changes nothing.
    """
    if name == "vppo" and vppo_parts is not None:
        return rlcredit.Strategy(estimators={"visual": K3FromSignal()}, **vppo_parts)
    if name == "stapo_lowprob":  # threshold raised so that the test data has candidate tokens
        return rlcredit.Strategy(
            estimators={"entropy": "entropy"},
            weighter={"name": "stapo", "prob_threshold": 0.2, "entropy_quantile": 0.5, "score": "entropy"},
            policy_loss={"name": "clipped_surrogate", "renormalize": True},
        )
    if name == "mixed":
        return rlcredit.Strategy(
            estimators={"entropy": "entropy", "visual": K3FromSignal()},
            weighter={"name": "intersect", "parts": [
                {"name": "top_fraction", "fraction": 0.6, "scope": "batch", "score": "entropy"},
                {"name": "union", "parts": [
                    {"name": "top_fraction", "fraction": 0.3, "scope": "group", "score": "visual"},
                    {"name": "soft", "score": "visual", "normalize": True}]}]},
            shapers=["leave_one_out", {"name": "dependency_scale", "score": "visual", "scope": "group",
                                       "beta_max": 1.2}],
            policy_loss={"name": "clipped_surrogate", "kl_coef": 0.05, "aggregation": "seq_mean_token_mean",
                         "renormalize": True},
        )
    if name == "gspo":
        return rlcredit.Strategy(policy_loss="gspo")
    return rlcredit.build(name)


# ------------------------------------------------------------------ the computations compared
#
# Each case returns {key: tensor}; the key's prefix says how ranks combine:
#   "row:"  per-row values [b] or [b, T_local]: concatenated in rank order (zero-padded to T);
#   "mean:" a per-rank loss: averaged over ranks (what DDP's gradient averaging sees);
#   "same:" a global value every rank must hold identically.
# Gradients w.r.t. per-token inputs are stored divided by R ("row:"), and w.r.t. the shared
# parameter theta as "mean:" — both are then what DDP's averaging gives.


def strategy_case(name: str, d: dict[str, torch.Tensor], reducer: Reducer | None,
                  vppo_parts: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    R = 1 if reducer is None else reducer.world_size
    strategy = make_strategy(name, vppo_parts)
    rollout = rlcredit.Rollout(
        d["mask"], d["rewards"], d["group_ids"], old_logprobs=d["old_logprobs"],
        ref_logprobs=d["ref_logprobs"], signals={"entropy": d["entropy"], "aug_logprobs": d["aug_logprobs"]},
    )
    credit = strategy.assign(rollout, reducer=reducer)
    theta = torch.tensor(THETA, requires_grad=True)
    logp = d["base_logprobs"] + d["features"] @ theta
    out = strategy.loss(logp, rollout, credit, reducer=reducer)
    g_theta, g_logp = torch.autograd.grad(out.loss, [theta, logp])
    return {
        "row:weights": credit.token_weights,
        "row:advantages": credit.advantages,
        "mean:loss": out.loss.detach(),
        "mean:grad_theta": g_theta,
        "row:grad_logprobs": g_logp / R,
    }


def functional_case(d: dict[str, torch.Tensor], reducer: Reducer | None) -> dict[str, torch.Tensor]:
    """Every functional kernel with a ``reducer=`` argument, in the scopes that cross ranks."""
    R = 1 if reducer is None else reducer.world_size
    out: dict[str, torch.Tensor] = {}
    mask, gid, scores = d["mask"], d["group_ids"], d["scores"]
    for fn in (F.group_normalize, F.group_center, F.leave_one_out):
        out[f"row:{fn.__name__}"] = fn(d["rewards"], gid, reducer=reducer)
    out["row:group_normalize_biased"] = F.group_normalize(d["rewards"], gid, unbiased=False, reducer=reducer)
    ties = (scores * 3).floor()  # few distinct values: tie-breaking across ranks matters
    for frac in (0.2, 0.5, 0.75):
        out[f"row:top_batch_{frac}"] = F.top_fraction_mask(scores, mask, frac, "batch", reducer=reducer)
        out[f"row:top_batch_ties_{frac}"] = F.top_fraction_mask(ties, mask, frac, "batch", reducer=reducer)
        out[f"row:top_group_{frac}"] = F.top_fraction_mask(scores, mask, frac, "group", group_ids=gid, reducer=reducer)
        out[f"row:top_group_ties_{frac}"] = F.top_fraction_mask(ties, mask, frac, "group", group_ids=gid,
                                                               reducer=reducer)
    mean_s = F.masked_mean(scores, mask)
    valid = mask.any(-1)
    for label, kw in {
        "batch": {}, "batch_bounded": {"beta_max": 1.1}, "group": {"scope": "group"},
        "group_bounded": {"scope": "group", "beta_max": 1.2}, "batch_mean_group": {"mean_scope": "group"},
        "group_mean_batch": {"scope": "group", "mean_scope": "batch"},
    }.items():
        out[f"row:dependency_scale_{label}"] = F.dependency_scale(mean_s, valid, group_ids=gid, reducer=reducer, **kw)
    x = (d["base_logprobs"] * 1.0).requires_grad_(True)
    for mode in F.AGGREGATIONS:
        for weights in (None, d["weights"]):
            for renorm in (False, True):
                if renorm and (weights is None or mode in ("seq_mean_token_sum", "seq_mean_token_sum_norm")):
                    continue
                key = f"{mode}_{'w' if weights is not None else 'now'}_{'renorm' if renorm else 'count'}"
                loss = F.aggregate(x, mask, weights, mode=mode, renormalize=renorm, reducer=reducer)
                (grad,) = torch.autograd.grad(loss, x)
                out[f"mean:aggregate_{key}"] = loss.detach()
                out[f"row:aggregate_grad_{key}"] = grad / R
    loss = F.aggregate(x, mask, mode="seq_mean_token_sum_norm", max_length=16, reducer=reducer)
    out["mean:aggregate_max_length"] = loss.detach()
    return out


def all_cases(d: dict[str, torch.Tensor], reducer: Reducer | None, vppo_parts: dict[str, Any] | None,
              presets: tuple[str, ...] = CASES) -> dict[str, dict[str, torch.Tensor]]:
    cases = {"functional": functional_case(d, reducer)}
    for name in presets:
        cases[name] = strategy_case(name, d, reducer, vppo_parts)
    return cases


def combine(per_rank: list[dict[str, torch.Tensor]], T: int) -> dict[str, torch.Tensor]:
    """Per-rank outputs of one case -> what a single process would have produced."""
    out = {}
    for key in per_rank[0]:
        xs = [r[key] for r in per_rank]
        if key.startswith("row:"):
            xs = [torch.nn.functional.pad(x, (0, T - x.shape[1])) if x.dim() == 2 else x for x in xs]
            out[key] = torch.cat(xs)
        elif key.startswith("mean:"):
            out[key] = torch.stack(xs).mean(0)
        else:
            for x in xs[1:]:
                torch.testing.assert_close(x, xs[0], atol=0, rtol=0)
            out[key] = xs[0]
    return out


def assert_case_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], where: str) -> None:
    assert set(got) == set(want), where
    for key in want:
        g, w = got[key], want[key]
        if w.dtype == torch.bool:
            assert torch.equal(g, w), f"{where} {key}: kept masks differ\n got {g.int()}\nwant {w.int()}"
        else:
            torch.testing.assert_close(g.float(), w.float(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{where} {key}: {m}")


# ------------------------------------------------------------------------ reducer collectives


def primitive_case(reducer: Reducer) -> dict[str, Any]:
    """Collectives on rank-dependent inputs, with the values they must give (hand-computed)."""
    R, r = reducer.world_size, reducer.rank
    res: dict[str, Any] = {}
    x = torch.tensor([r + 1.0, -(r + 1.0), 2.0 * r])
    x_before = x.clone()
    res["sum"] = (reducer.sum(x), torch.tensor([R * (R + 1) / 2, -R * (R + 1) / 2, R * (R - 1.0)]))
    res["max"] = (reducer.max(x), torch.tensor([float(R), -1.0, 2.0 * (R - 1)]))
    res["min"] = (reducer.min(x), torch.tensor([1.0, -float(R), 0.0]))
    res["not_mutated"] = (x, x_before)
    i = torch.tensor([r, 10 * r], dtype=torch.int64)
    res["sum_int64"] = (reducer.sum(i), torch.tensor([R * (R - 1) // 2, 10 * R * (R - 1) // 2]))
    b = torch.tensor([r == 0, True, False])
    res["sum_bool_counts"] = (reducer.sum(b), torch.tensor([1, R, 0]))
    res["max_bool_any"] = (reducer.max(b), torch.tensor([True, True, False]))
    res["min_bool_all"] = (reducer.min(b), torch.tensor([R == 1, True, False]))
    # Variable lengths, 0 included: rank k contributes k % 3 values k*10 + j.
    lens = [k % 3 for k in range(R)]
    mine = torch.tensor([10.0 * r + j for j in range(lens[r])])
    res["gather_float"] = (reducer.gather(mine), torch.tensor([10.0 * k + j for k in range(R) for j in range(lens[k])]))
    res["gather_int64"] = (reducer.gather(mine.long()), res["gather_float"][1].long())
    res["gather_bool"] = (reducer.gather(mine > 10), res["gather_float"][1] > 10)
    res["gather_bf16"] = (reducer.gather(mine.bfloat16()), res["gather_float"][1].bfloat16())
    res["gather_all_empty"] = (reducer.gather(torch.zeros(0)), torch.zeros(0))
    res["gather_equal"] = (reducer.gather(torch.full((2,), float(r))),
                           torch.tensor([float(k) for k in range(R) for _ in range(2)]))
    try:
        reducer.gather(torch.zeros(2, 2))
        res["gather_2d_error"] = "no error"
    except RolloutError as err:
        res["gather_2d_error"] = str(err)
    return res


# ----------------------------------------------------------------------- gloo process workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_rows(world_size: int, rank: int) -> range:
    sizes = PARTITIONS[world_size]
    start = sum(sizes[:rank])
    return range(start, start + sizes[rank])


def _worker(rank: int, port: int, out_dir: str, vppo_parts: dict[str, Any]) -> None:
    """One of 3 gloo ranks: the 3-rank checks on the default group, the 2-rank ones on ranks {0, 1}."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=3, timeout=datetime.timedelta(seconds=60))
    try:
        pair = dist.new_group([0, 1])  # collective: every rank creates it
        data = make_data(LENGTHS, GROUP_IDS, T_FULL)
        result: dict[str, Any] = {}
        for world_size, group in ((3, None), (2, pair)):
            if rank >= world_size:
                try:
                    TorchDistributedReducer(group)
                    result["not_member_error"] = "no error"
                except RLCreditError as err:
                    result["not_member_error"] = str(err)
                continue
            reducer = TorchDistributedReducer(group)
            result[world_size] = {
                "rank": reducer.rank, "world_size": reducer.world_size, "repr": repr(reducer),
                "primitives": primitive_case(reducer),
                "cases": all_cases(local_slice(data, _rank_rows(world_size, rank)), reducer, vppo_parts),
            }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn_once(out_dir: Path, vppo_parts: dict[str, Any]) -> None:
    spawn_bounded(_worker, (_free_port(), str(out_dir), vppo_parts), 3, SPAWN_TIMEOUT_S)


def run_gloo(out_dir: Path, vppo_parts: dict[str, Any]) -> dict[Any, Any]:
    """Spawn 3 gloo processes on loopback; each saves its results; fail after a deadline.

    The free port is found by binding port 0 and releasing it, so another process may take it
    before rank 0 listens: one retry on "address already in use".
    """
    for attempt in range(2):
        try:
            _spawn_once(out_dir, vppo_parts)
            break
        except mp.ProcessRaisedException as err:
            if attempt or "address already in use" not in str(err).lower():
                raise
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(3)]
    return {"not_member_error": ranks[2]["not_member_error"],
            **{R: [ranks[r][R] for r in range(R)] for R in PARTITIONS}}


@pytest.fixture(scope="module")
def vppo_parts() -> dict[str, Any]:
    return _vppo_parts()


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory, vppo_parts) -> dict[Any, Any]:
    return run_gloo(tmp_path_factory.mktemp("gloo"), vppo_parts)


@pytest.fixture(scope="module")
def reference(vppo_parts) -> dict[str, dict[str, torch.Tensor]]:
    return all_cases(make_data(LENGTHS, GROUP_IDS, T_FULL), None, vppo_parts)


# ------------------------------------------------------------------------------ gloo tests


@pytest.mark.parametrize("world_size", sorted(PARTITIONS))
def test_gloo_reducer_identity_and_collectives(gloo_runs, world_size):
    runs = gloo_runs[world_size]
    for rank, res in enumerate(runs):
        assert (res["rank"], res["world_size"]) == (rank, world_size)
        assert f"world_size={world_size}, rank={rank}" in res["repr"]
        prims = res["primitives"]
        assert "expected a 1-D tensor" in prims.pop("gather_2d_error")
        for key, (got, want) in prims.items():
            assert got.dtype == want.dtype, f"rank {rank} {key}: dtype {got.dtype} != {want.dtype}"
            assert torch.equal(got, want), f"rank {rank} {key}: {got} != {want}"


def test_gloo_reducer_on_a_group_it_is_not_in(gloo_runs):
    assert "not a member of the given group" in gloo_runs["not_member_error"]


def test_inline_vppo_equals_preset(vppo_parts):
    """The gloo ranks' vppo (inline k3 estimator) is the registered preset, output for output."""
    preset = rlcredit.build("vppo")
    assert set(preset.estimators) == {"visual"}
    assert {k: v for k, v in preset.to_spec().items() if k != "estimators"} == vppo_parts
    d = make_data(LENGTHS, GROUP_IDS, T_FULL)
    rollout = rlcredit.Rollout(d["mask"], d["rewards"], d["group_ids"], old_logprobs=d["old_logprobs"],
                               signals={"aug_logprobs": d["aug_logprobs"]})
    torch.testing.assert_close(preset.estimators["visual"](rollout), K3FromSignal()(rollout), atol=1e-6, rtol=1e-6)


def test_partitions_cover_the_edge_cases():
    """The data really has uneven ranks, groups spanning ranks, and (3 ranks) an all-padding rank."""
    for R, sizes in PARTITIONS.items():
        assert sum(sizes) == N_ROWS and len(set(sizes)) > 1
        rank_of = [r for r, n in enumerate(sizes) for _ in range(n)]
        spans = {g for g in set(GROUP_IDS) if len({rank_of[i] for i in range(N_ROWS) if GROUP_IDS[i] == g}) > 1}
        assert spans, f"no group spans ranks with {R} ranks"
    last = PARTITIONS[3][-1]
    assert all(n == 0 for n in LENGTHS[-last:]) and max(LENGTHS) == T_FULL


@pytest.mark.parametrize("case", ("functional",) + CASES)
@pytest.mark.parametrize("world_size", sorted(PARTITIONS))
def test_gloo_matches_single_process(gloo_runs, reference, world_size, case):
    got = combine([res["cases"][case] for res in gloo_runs[world_size]], T_FULL)
    assert_case_equal(got, reference[case], f"{world_size} gloo ranks, {case}:")


def test_reference_is_not_degenerate(reference):
    """Guard against a vacuous comparison: the cases select, shape and clip something."""
    ef = reference["entropy_forks"]
    kept = (ef["row:weights"] > 0).sum()
    assert 0 < kept < torch.tensor(LENGTHS).sum()
    vppo = reference["vppo"]
    assert vppo["row:advantages"].abs().sum() > 0 and vppo["row:grad_logprobs"].abs().sum() > 0
    padding = (~make_data(LENGTHS, GROUP_IDS, T_FULL)["mask"]).sum()
    assert (reference["stapo_lowprob"]["row:weights"] == 0).sum() > padding  # some tokens are spurious
    w = reference["mixed"]["row:weights"]
    assert ((w > 0) & (w != 1)).any() and (w == 0).sum() > padding
    alpha = reference["functional"]["row:dependency_scale_batch"]
    assert (alpha != 1).any() and (alpha[-3:] == 1).all()  # all-padding rows are unshaped


# --------------------------------------------------------- in-process ranks (tests.strategies)


@st.composite
def batches(draw):
    """Random lengths (zeros included), group ids and a random partition into 2-4 ranks."""
    n = draw(st.integers(2, 12))
    lengths = draw(st.lists(st.integers(0, 8), min_size=n, max_size=n))
    # The single process pads to the longest response, as each rank does (Dr. GRPO's L is the
    # padded T, the largest across ranks).
    T = max(1, max(lengths))
    group_ids = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    R = draw(st.integers(2, min(4, n)))
    cuts = sorted(draw(st.lists(st.integers(1, n - 1), min_size=R - 1, max_size=R - 1, unique=True)))
    bounds = [0] + cuts + [n]
    seed = draw(st.integers(0, 2**16))
    return lengths, group_ids, T, [range(a, b) for a, b in zip(bounds, bounds[1:])], seed


@settings(max_examples=40)
@given(batches())
def test_threads_match_single_process(vppo_parts, batch):
    lengths, group_ids, T, parts, seed = batch
    data = make_data(lengths, group_ids, T, seed=seed)
    want = all_cases(data, None, vppo_parts)
    per_rank = run_ranks(lambda red, rank: all_cases(local_slice(data, parts[rank]), red, vppo_parts), len(parts))
    for case in want:
        got = combine([r[case] for r in per_rank], T)
        assert_case_equal(got, want[case], f"{len(parts)} thread ranks {[len(p) for p in parts]}, {case}:")


def test_local_reducer_equals_none(reference, vppo_parts):
    assert isinstance(LocalReducer(), Reducer) and (LocalReducer.world_size, LocalReducer.rank) == (1, 0)
    got = all_cases(make_data(LENGTHS, GROUP_IDS, T_FULL), LocalReducer(), vppo_parts)
    for case, want in reference.items():
        assert_case_equal(got[case], want, f"LocalReducer, {case}:")


# ------------------------------------------------------------------------------ error cases


def test_reducer_needs_an_initialised_group():
    assert not dist.is_initialized()
    with pytest.raises(RLCreditError, match="not initialised.*init_process_group"):
        TorchDistributedReducer()


def test_single_rank_group_is_identity(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        r = TorchDistributedReducer()
        assert (r.world_size, r.rank) == (1, 0) and isinstance(r, Reducer)
        x = torch.tensor([1.0, 2.0])
        assert torch.equal(r.sum(x), x) and r.sum(x) is not x
        assert torch.equal(r.gather(torch.zeros(0)), torch.zeros(0))
        with pytest.raises(RolloutError, match="1-D tensor"):
            r.gather(torch.zeros(2, 2))
        with pytest.raises(RolloutError, match="expected a torch.Tensor"):
            r.max([1.0, 2.0])
        # the reducer gives the single-process answers (vppo: the registered preset itself)
        d = make_data(LENGTHS, GROUP_IDS, T_FULL)
        got = all_cases(d, r, None, presets=("vppo",))
        for case, want in all_cases(d, None, None, presets=("vppo",)).items():
            assert_case_equal(got[case], want, f"1-rank gloo group, {case}:")
    finally:
        dist.destroy_process_group()
