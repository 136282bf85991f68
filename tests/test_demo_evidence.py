"""The demo's mechanism evidence: per-token LM-head gradients, the gradient-variance ratios against
GRPO's, the dependency distribution, their summaries, and the README block generated from them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import rlcredit
from rlcredit_mm.demo import evidence as E
from rlcredit_mm.demo import model as M
from rlcredit_mm.demo import report as R
from rlcredit_mm.demo import task as T
from rlcredit_mm.demo.train import answer_mask

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kit():
    return M.ModelKit()


def _batch(kit, rows=4, seed=0):
    """Prompts and hand-written responses of different lengths (right-padded), as the loop builds them."""
    examples = T.make_examples(rows // 2, seed=seed)
    prompt = M.encode_prompts(kit, examples, repeat=2)
    texts = [T.response_text(examples[i // 2], "red", i % len(T.FILLERS), words=[i, i + 1][: i % 3])
             for i in range(rows)]
    ids = [kit.tokenizer(t, add_special_tokens=False)["input_ids"] + [kit.eos_id] for t in texts]
    width = max(map(len, ids))
    responses = torch.full((rows, width), kit.pad_id)
    mask = torch.zeros(rows, width, dtype=torch.bool)
    for i, r in enumerate(ids):
        responses[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = True
    return M.join_responses(prompt, responses, mask), responses, mask


def test_lm_head_terms_are_the_autograd_gradient_of_the_log_probs(kit):
    """G_j from the closed form (e_y - p) u^T / tau equals autograd's gradient of sum coef * log pi."""
    model = M.build_model(kit.tokenizer, seed=3, hidden=32).eval()
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2)
    inputs, responses, mask = _batch(kit)
    tau = 0.7
    hidden = policy.response_stats(inputs, mask, hidden=True, logprobs=False, temperature=tau).hidden
    diff, u = E.lm_head_terms(policy, hidden, responses, mask, temperature=tau)
    assert diff.shape == (int(mask.sum()), len(kit.tokenizer)) and u.shape == (int(mask.sum()), 32)
    coef = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))
    groups = torch.tensor([5, 5, 2, 2])  # any ids: ordered by value
    G = E.group_gradients(coef, diff, u, mask, groups)
    logprobs = policy.logprobs(inputs, mask, temperature=tau)
    W = model.get_output_embeddings().weight
    for j, rows in enumerate(([2, 3], [0, 1])):
        (want,) = torch.autograd.grad((coef * logprobs)[rows].sum(), W, retain_graph=True)
        assert torch.allclose(G[j], want, atol=1e-5, rtol=1e-4), j


def _vppo_rollout(seed: int, n_groups: int = 300, G: int = 4, T_: int = 10):
    """A rollout whose k T_i are integers (T_i in {5, 10}) and VPPO's credit from precomputed scores."""
    g = torch.Generator().manual_seed(seed)
    B = n_groups * G
    lengths = 5 * torch.randint(1, 3, (B,), generator=g)
    mask = torch.arange(T_)[None] < lengths[:, None]
    rewards = (torch.rand(B, generator=g) < 0.5).float()
    old = -torch.rand(B, T_, generator=g) * mask
    aug = old - torch.rand(B, T_, generator=g) * torch.rand(B, 1, generator=g) * 3 * mask
    rollout = rlcredit.Rollout(mask, rewards, torch.arange(B) // G, old_logprobs=old, signals={"aug_logprobs": aug})
    return rollout, rlcredit.build("vppo").assign(rollout), rlcredit.build("grpo").assign(rollout)


def test_predicted_ratio_is_k_times_the_weighted_mean_of_alpha_squared():
    rollout, vppo, grpo = _vppo_rollout(0, n_groups=20)
    mask = rollout.response_mask
    n = int(mask.sum())
    ev = E.variance_evidence(vppo, grpo, rollout, torch.randn(n, 3), torch.randn(n, 2), torch.zeros_like(mask))
    # The docs' formula, from the parts: k = 0.4 exactly (k T_i integers); alpha_i = a_{i,t} / A_i on kept tokens.
    A = grpo.advantages
    kept = vppo.token_weights > 0
    assert torch.equal(kept.sum(1), (0.4 * mask.sum(1)).round().long())
    rows = A.abs() > 0
    alpha = (vppo.token_advantages(mask)[rows].sum(1) / kept[rows].sum(1)) / A[rows]
    T_A2 = mask[rows].sum(1) * A[rows].square()
    want = 0.4 * float((T_A2 * alpha.square()).sum() / T_A2.sum())
    assert math.isclose(ev["predicted_ratio"], want, rel_tol=1e-5)
    assert math.isnan(ev["answer_kept"])  # no answer tokens in this rollout


def test_measured_ratio_follows_the_bound_when_its_assumptions_hold_and_not_otherwise():
    """I.i.d. zero-mean terms (assumptions 1-4): the group-variance ratio is the prediction, within
    Monte-Carlo error. Terms whose size follows the mask (counter-case 2): well above it."""
    rollout, vppo, grpo = _vppo_rollout(1)
    mask = rollout.response_mask
    n = int(mask.sum())
    g = torch.Generator().manual_seed(7)
    diff, u = torch.randn(n, 4, generator=g), torch.randn(n, 3, generator=g)
    ev = E.variance_evidence(vppo, grpo, rollout, diff, u, torch.zeros_like(mask))
    # 300 groups: the log of each variance estimate has sd ~ sqrt(2 / 300) ~ 0.08, the paired ratio less.
    assert abs(math.log(ev["measured_ratio"] / ev["predicted_ratio"])) < 0.15, ev
    assert abs(math.log(ev["uncorrelated_ratio"] / ev["predicted_ratio"])) < 0.05, ev
    kept = (vppo.token_weights > 0)[mask]
    big = diff * torch.where(kept, 3.0, 1.0)[:, None]  # kept tokens have 3x larger gradients
    bad = E.variance_evidence(vppo, grpo, rollout, big, u, torch.zeros_like(mask))
    assert bad["predicted_ratio"] == ev["predicted_ratio"]  # the bound does not see the gradients
    assert bad["measured_ratio"] > 2 * bad["predicted_ratio"] and bad["uncorrelated_ratio"] > 2 * bad["predicted_ratio"]


def test_variance_evidence_hand_case_and_no_signal():
    """Two groups of one row each, one token each: the ratio is computable by hand."""
    mask = torch.ones(2, 1, dtype=torch.bool)
    rollout = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0]), torch.tensor([0, 1]))
    base = rlcredit.Credit({}, torch.ones(2, 1), torch.tensor([1.0, -1.0]))
    half = rlcredit.Credit({}, torch.tensor([[0.5], [1.0]]), torch.tensor([1.0, -1.0]))
    diff, u = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0], [1.0]])
    ev = E.variance_evidence(half, base, rollout, diff, u, torch.tensor([[True], [False]]))
    # G^half = ([.5, 0], [0, -2]); mean ([.25, -1]); spread = 2 * (.0625 + 1) = 2.125 over P - 1 = 1.
    # G^base = ([1, 0], [0, -2]); spread = 2 * (.25 + 1) = 2.5.
    close = lambda a, b: math.isclose(a, b, rel_tol=1e-6)  # noqa: E731 (float32 maths)
    assert close(ev["var"], 2.125) and close(ev["var_grpo"], 2.5)
    assert close(ev["measured_ratio"], 2.125 / 2.5)
    assert close(ev["predicted_ratio"], (0.25 + 1) / 2)
    assert close(ev["uncorrelated_ratio"], (0.25 * 1 + 1 * 4) / (1 + 4))
    assert ev["answer_kept"] == 1.0
    flat = rlcredit.Rollout(mask, torch.tensor([1.0, 1.0]), torch.tensor([0, 1]))
    zero = rlcredit.Credit({}, torch.ones(2, 1), torch.zeros(2))
    assert E.variance_evidence(zero, zero, flat, diff, u, mask) is None  # no spread to compare


def test_dependency_stats_against_a_plain_loop():
    g = torch.Generator().manual_seed(0)
    kl = torch.rand(6, 9, generator=g).pow(6) * 5
    mask = torch.arange(9)[None] < torch.tensor([9, 3, 5, 9, 1, 7])[:, None]
    answers = torch.zeros_like(mask)
    answers[torch.arange(6), torch.tensor([0, 2, 4, 8, 0, 6])] = True
    s = E.dependency_stats(kl, mask, answers)
    shares, answer = [], []
    for i in range(6):
        vals = sorted(kl[i][mask[i]].tolist(), reverse=True)
        total, acc = sum(vals), 0.0
        for k, v in enumerate(vals, 1):
            acc += v
            if acc >= total / 2:
                shares.append(k / len(vals))
                break
        answer.append(float(kl[i][answers[i]].sum()) / total)
    flat = [v for i in range(6) for v in kl[i][mask[i]].tolist()]
    mean = sum(flat) / len(flat)
    m2 = sum((v - mean) ** 2 for v in flat) / len(flat)
    m3 = sum((v - mean) ** 3 for v in flat) / len(flat)
    assert math.isclose(s["half_share"], sum(shares) / 6, rel_tol=1e-9)
    assert math.isclose(s["skewness"], m3 / m2 ** 1.5, rel_tol=1e-6)
    assert math.isclose(s["answer_share"], sum(answer) / 6, rel_tol=1e-5)


def test_answer_mask_marks_the_colour_words(kit):
    _, responses, mask = _batch(kit)
    marked = answer_mask(kit, responses, mask)
    assert marked.sum(1).tolist() == [1, 1, 1, 1]
    for i in range(4):
        assert [kit.vocab[t] for t in responses[i][marked[i]].tolist()] == ["red"]


def test_log_interval_is_the_t_interval_of_the_logs():
    r = E.log_interval([0.5, 1.0, 2.0, 0.0])  # a non-positive value is left out
    logs = [math.log(0.5), 0.0, math.log(2.0)]
    sd = math.sqrt(sum(x * x for x in logs) / 2)
    assert r["n"] == 3 and math.isclose(r["mean"], 1.0)
    assert math.isclose(r["high"], math.exp(4.303 * sd / math.sqrt(3))) and math.isclose(r["low"] * r["high"], 1.0)


# --------------------------------------------------------------------------------------------
# The README block is the committed default run's output


def test_readme_and_docs_show_the_committed_default_run():
    """The tables in README.md and docs/demo.md are generated from docs/assets/demo_results.json, the
    results.json of a default run (only the device pinned to the CPU), by the command both print."""
    from rlcredit_mm.demo.config import DemoConfig
    from rlcredit_mm.demo.run import REGENERATE

    results = json.loads((ROOT / "docs" / "assets" / "demo_results.json").read_text())
    assert results["config"] == DemoConfig(device="cpu", progress=False).to_dict()
    block = R.readme_block(results)
    for page in ("README.md", "docs/demo.md"):
        text = (ROOT / page).read_text()
        assert block in text and REGENERATE in text, page
    assert results["summary"]["grpo"]["grad_variance"]["measured_ratio"] == pytest.approx(1.0)
    vppo = results["summary"]["vppo"]["grad_variance"]
    taken = [m for r in results["runs"] if r["preset"] == "vppo" for m in r["grad_variance"] if m]
    # 6 measurements per seed, minus those where GRPO's gradient is 0 (every group's rewards equal)
    assert vppo["measurements"] == len(taken) and 5 <= len(taken) <= 5 * 6
    assert 0 < vppo["predicted_ratio"] < vppo["measured_ratio"]
    for name in ("curves", "heatmaps", "variance"):
        assert (ROOT / "docs" / "assets" / f"demo_{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_update_readme_rewrites_only_the_block(tmp_path):
    results = json.loads((ROOT / "docs" / "assets" / "demo_results.json").read_text())
    page = tmp_path / "page.md"
    page.write_text(f"before\n{R.README_START}\nstale table\n{R.README_END}\nafter\n")
    assert R.update_readme(page, results) is True
    assert page.read_text() == f"before\n{R.readme_block(results)}\nafter\n"
    assert R.update_readme(page, results) is False  # idempotent
    (tmp_path / "none.md").write_text("no markers")
    with pytest.raises(ValueError, match="no '<!-- demo-results:start"):
        R.update_readme(tmp_path / "none.md", results)
