"""The mechanism evidence of ``rlcredit demo``: each preset's gradient variance against GRPO's on the
same rollouts, next to the bound's prediction, and the distribution of visual dependency.

**What is measured.** At the measurement steps of a run (step 1, then every ``eval_every`` steps),
on the rollout batch the preset is about to train on, with the policy that sampled it:

* the per-token terms the bound is stated for (``docs/variance.md``): ``h_{i,t}``, the gradient of
  ``log pi(y_{i,t})`` with respect to the **LM head** ``W [V, H]``. For a head without
  soft-capping it has the closed form ``h_{i,t} = (e_{y_{i,t}} - p_{i,t}) u_{i,t}^T / tau``
  (``u`` the final hidden state, ``p`` the next-token distribution, ``tau`` the temperature), so
  every token's term is exact and costs no backward pass (a per-sample gradient of a deeper block
  would cost one backward per response);
* the policy-gradient part of the loss at ``rho = 1`` (the first mini-batch is on-policy, so no
  clipping is active), with the token-mean denominator ``N`` shared by both estimators:
  ``g = (1/N) sum_{i,t} a_{i,t} h_{i,t}`` with ``a = credit.token_advantages()`` for the preset and
  ``A_i`` (GRPO's group-normalised advantage, every token kept) for GRPO. Loss terms that are not
  credit (VPPO's ``0.06 * mean(-log pi)`` entropy term) and a renormalising denominator (STAPO)
  are left out: the bound compares credits;
* the **measured ratio**: prompts are drawn i.i.d. and each group's responses are sampled
  independently of the other groups', so the batch gradient is a sum of ``P`` i.i.d. group terms
  ``G_j = sum_{i in j, t} a_{i,t} h_{i,t}``; ``Var(g)`` is estimated by ``P / N^2`` times the
  sample variance of the ``G_j`` (trace of the covariance), and the ratio is
  ``Var_j(G_j^preset) / Var_j(G_j^GRPO)`` on the same rollouts;
* the **predicted ratio**: the bound under its assumptions 1-3 (zero-mean, uncorrelated,
  equal-variance terms), ``sum a_{i,t}^2 / sum A_i^2`` over valid tokens — for VPPO exactly
  ``k * E_w[alpha^2]`` (the ``T_i A_i^2``-weighted mean of ``alpha^2``), for soft weights
  ``E[w^2 alpha^2]``;
* the **uncorrelated-terms ratio**: ``sum a^2 |h|^2 / sum A^2 |h|^2`` — the bound with the real
  per-token gradient norms (assumptions 1-2 kept, 3 dropped). Where it moves away from the
  prediction, the mask is choosing tokens by their gradient size (the bound's counter-case 2);
* **answer kept**: the share of responses whose answer (colour) token got a non-zero weight.

The **dependency distribution** comes from the exact ``KL(pi(.|I) || pi(.|I'))`` of every sampled
token (``VisualKL(estimate="exact")``) against a black picture and against VPPO's 50% patch
blackout: the mean share of a response's tokens that hold half of its total dependency, the
skewness of the token values, and the mean share of a response's dependency on its answer token.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

import rlcredit
from rlcredit.errors import RLCreditError
from rlcredit_mm.demo.report import t_quantile

__all__ = ["BASELINE", "DEPENDENCY_PERTURBATIONS", "lm_head_terms", "group_gradients", "variance_evidence", "dependency_stats",
           "log_interval", "summarize_evidence", "plot_evidence"]

BASELINE = "grpo"
"""The preset whose credit every preset's gradient variance is compared with, on the same rollouts."""

DEPENDENCY_PERTURBATIONS: dict[str, Any] = {"black": "constant", "patch_blackout": "patch_blackout"}
"""The ``I'`` of the dependency distribution: a black picture, and VPPO's 50% patch blackout."""


def lm_head_terms(policy: rlcredit.HFPolicy, hidden: Tensor, responses: Tensor, mask: Tensor, *,
                  temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The factors of every valid token's gradient of ``log pi(y_t)`` w.r.t. the LM head weight.

    ``d log pi(y_t) / dW = (e_{y_t} - p_t) u_t^T / tau`` with ``p_t = softmax(W u_t / tau)``
    (a bias does not change it; a soft-capped head would, and is refused).

    Args:
        policy: the ``rlcredit.HFPolicy``; hidden: ``[B, T, H]`` final hidden states of the
            response positions (``policy.response_stats(..., hidden=True).hidden``).
        responses: ``[B, T]`` sampled token ids; mask: ``[B, T]`` bool.
        temperature: the sampling temperature.

    Returns:
        ``(diff [n, V], u [n, H])`` float32 over the ``n`` valid tokens (row-major), with the
        token's gradient ``diff[k, :, None] * u[k, None, :]``.

    Examples:
        >>> import torch, rlcredit
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> model = Qwen2ForCausalLM(Qwen2Config(vocab_size=16, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)).eval()
        >>> policy = rlcredit.HFPolicy(model)
        >>> ids, mask = torch.randint(0, 16, (2, 5)), torch.ones(2, 3, dtype=torch.bool)
        >>> hidden = policy.response_stats({"input_ids": ids}, mask, hidden=True).hidden
        >>> diff, u = lm_head_terms(policy, hidden, ids[:, -3:], mask)
        >>> diff.shape, u.shape, torch.allclose(diff.sum(-1), torch.zeros(6), atol=1e-6)
        (torch.Size([6, 16]), torch.Size([6, 8]), True)
    """
    if policy.logit_softcap:
        raise RLCreditError("lm_head_terms: a soft-capped LM head has no (e_y - p) u^T gradient; the demo's "
                            "model has none.")
    with torch.no_grad():
        u = hidden[mask].float()
        p = policy.logits_from_hidden(u, temperature=temperature).softmax(-1)
        diff = torch.nn.functional.one_hot(responses[mask], p.shape[-1]).float() - p
    return diff, u / temperature


def group_gradients(coef: Tensor, diff: Tensor, u: Tensor, mask: Tensor, group_ids: Tensor) -> Tensor:
    """``[P, V, H]``: each group's ``G_j = sum_{i in j, t} coef_{i,t} (e - p)_{i,t} u_{i,t}^T``.

    Groups are ordered by id. ``coef [B, T]``; ``diff``, ``u`` from ``lm_head_terms``.

    Examples:
        >>> import torch
        >>> mask = torch.tensor([[True, False], [True, True]])
        >>> diff, u = torch.ones(3, 2), torch.tensor([[1.0], [2.0], [3.0]])
        >>> group_gradients(torch.tensor([[1.0, 9.0], [2.0, -1.0]]), diff, u, mask, torch.tensor([0, 1]))[:, 0, 0]
        tensor([1., 1.])
    """
    _, index = torch.unique(group_ids, return_inverse=True)
    token_group = index[:, None].expand_as(mask)[mask]
    onehot = torch.nn.functional.one_hot(token_group, int(index.max()) + 1).to(diff.dtype)
    return torch.einsum("np,nv,nh->pvh", onehot * coef[mask].to(diff.dtype)[:, None], diff, u)


def _spread(G: Tensor) -> float:
    """Trace of the sample covariance of the group terms ``G [P, V, H]``."""
    return float((G - G.mean(0)).square().sum() / (G.shape[0] - 1))


def variance_evidence(credit: rlcredit.Credit, baseline: rlcredit.Credit, rollout: rlcredit.Rollout, diff: Tensor,
                      u: Tensor, answer_mask: Tensor) -> dict[str, float] | None:
    """One measurement: the preset's credit against GRPO's (``baseline``) on the same rollout.

    Returns:
        ``{"measured_ratio", "predicted_ratio", "uncorrelated_ratio", "answer_kept", "var", "var_grpo"}``,
        or None when GRPO's gradient has no spread (fewer than two groups, or every group's
        rewards equal: no signal to compare).

    Examples:
        >>> import torch, rlcredit
        >>> mask = torch.ones(4, 2, dtype=torch.bool)
        >>> r = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([0, 0, 1, 1]))
        >>> grpo = rlcredit.build("grpo").assign(r)
        >>> half = rlcredit.Credit({}, torch.tensor([[1.0, 0.0]] * 4), grpo.advantages)
        >>> g = torch.Generator().manual_seed(0)
        >>> diff, u = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
        >>> ev = variance_evidence(half, grpo, r, diff, u, torch.tensor([[True, False]] * 4))
        >>> ev["predicted_ratio"], ev["answer_kept"]
        (0.5, 1.0)
    """
    mask, groups = rollout.response_mask, rollout.group_ids
    if torch.unique(groups).numel() < 2:
        return None
    a = credit.token_advantages(mask).float()
    A = baseline.token_advantages(mask).float()
    var_grpo = _spread(group_gradients(A, diff, u, mask, groups))
    if not var_grpo > 0:
        return None
    var = _spread(group_gradients(a, diff, u, mask, groups))
    h2 = diff.square().sum(-1) * u.square().sum(-1)  # |h_{i,t}|^2 of each valid token
    a2, A2 = a[mask].square(), A[mask].square()
    has_answer = answer_mask.any(1)
    kept = ((credit.token_weights > 0) & answer_mask).any(1)[has_answer]
    return {
        "measured_ratio": var / var_grpo,
        "predicted_ratio": float(a2.sum() / A2.sum()),
        "uncorrelated_ratio": float((a2 * h2).sum() / (A2 * h2).sum()),
        "answer_kept": float(kept.float().mean()) if kept.numel() else float("nan"),
        "var": var,
        "var_grpo": var_grpo,
    }


def dependency_stats(kl: Tensor, mask: Tensor, answer_mask: Tensor) -> dict[str, float]:
    """How concentrated the per-token visual dependency ``kl [B, T]`` (>= 0) is.

    Returns:
        ``half_share``: mean over responses (with a positive total) of the smallest share of the
        response's tokens holding half of its total dependency; ``skewness``: the sample skewness
        ``m3 / m2^1.5`` of all valid tokens' values; ``answer_share``: mean over responses with an
        answer token of the share of their dependency on it; ``max``: the largest value.

    Examples:
        >>> import torch
        >>> kl = torch.tensor([[4.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
        >>> s = dependency_stats(kl, torch.ones(2, 4, dtype=torch.bool), torch.tensor([[True, False, False, False]] * 2))
        >>> s["half_share"], s["answer_share"]  # row 0: 1 token of 4 holds 4/6; row 1: 2 of 4
        (0.375, 0.4583333432674408)
    """
    kl = torch.where(mask, kl.float(), torch.zeros((), device=kl.device))
    total = kl.sum(1)
    shares = []
    for i in torch.nonzero(total > 0).flatten().tolist():
        values = kl[i][mask[i]].sort(descending=True).values
        need = int((values.cumsum(0) < 0.5 * total[i]).sum()) + 1
        shares.append(need / values.numel())
    flat = kl[mask].double()
    centred = flat - flat.mean()
    m2 = float(centred.square().mean())
    skew = float(centred.pow(3).mean()) / m2 ** 1.5 if m2 > 0 else float("nan")
    rows = answer_mask.any(1) & (total > 0)
    answer = (kl * answer_mask).sum(1)[rows] / total[rows]
    return {"half_share": sum(shares) / len(shares) if shares else float("nan"), "skewness": skew,
            "answer_share": float(answer.mean()) if rows.any() else float("nan"), "max": float(flat.max())}


def log_interval(values: Sequence[float]) -> dict[str, Any]:
    """Geometric mean and 95% t-interval on the log scale of positive ``values`` (one per seed).

    Examples:
        >>> r = log_interval([0.5, 2.0])
        >>> r["mean"], r["n"], round(r["low"], 4) < 1.0 < round(r["high"], 1)
        (1.0, 2, True)
        >>> log_interval([0.3])["low"] is None
        True
    """
    logs = [math.log(v) for v in values if v > 0 and math.isfinite(v)]
    n = len(logs)
    if not n:
        return {"mean": None, "low": None, "high": None, "n": 0, "values": list(values)}
    mean = sum(logs) / n
    if n < 2:
        return {"mean": math.exp(mean), "low": None, "high": None, "n": 1, "values": list(values)}
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"mean": math.exp(mean), "low": math.exp(mean - half), "high": math.exp(mean + half), "n": n,
            "values": list(values)}


def _geomean(xs: Sequence[float]) -> float:
    logs = [math.log(x) for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(logs) / len(logs)) if logs else float("nan")


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def summarize_evidence(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """A preset's ``grad_variance`` and ``dependency`` summaries from its runs' measurements.

    Per seed, the geometric mean of its measurements' ratios; over seeds, ``log_interval``.
    ``measured_ratio`` / ``predicted_ratio`` / ``uncorrelated_ratio`` are the geometric means over
    seeds, ``*_interval`` their 95% intervals, ``per_seed`` the seeds' values. The dependency
    numbers are means over seeds and measurements.

    Examples:
        >>> m = lambda r: {"step": 1, "measured_ratio": r, "predicted_ratio": 0.4, "uncorrelated_ratio": 0.5,
        ...                "answer_kept": 1.0, "var": r, "var_grpo": 1.0}
        >>> runs = [{"grad_variance": [m(0.5), m(2.0)], "dependency": []}, {"grad_variance": [m(1.0)], "dependency": []}]
        >>> s = summarize_evidence(runs)["grad_variance"]
        >>> s["measured_ratio"], round(s["predicted_ratio"], 6), s["per_seed"]["measured_ratio"]
        (1.0, 0.4, [1.0, 1.0])
    """
    keys = ("measured_ratio", "predicted_ratio", "uncorrelated_ratio")
    per_seed = {k: [_geomean([m[k] for m in r["grad_variance"] if m]) for r in runs] for k in keys}
    grad: dict[str, Any] = {}
    for k in keys:
        iv = log_interval(per_seed[k])
        grad[k] = iv["mean"]
        grad[k.replace("_ratio", "_interval")] = [iv["low"], iv["high"]]
    grad["answer_kept"] = _mean([m["answer_kept"] for r in runs for m in r["grad_variance"] if m])
    grad["per_seed"] = per_seed
    grad["measurements"] = sum(1 for r in runs for m in r["grad_variance"] if m)
    dependency: dict[str, Any] = {}
    for name in DEPENDENCY_PERTURBATIONS:
        items = [d[name] for r in runs for d in r["dependency"]]
        dependency[name] = {k: _mean([d[k] for d in items]) for k in ("half_share", "skewness", "answer_share", "max")}
    return {"grad_variance": grad, "dependency": dependency}


def plot_evidence(summary: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> None:
    """The variance figure (matplotlib, Agg): left, each preset's measured and predicted ratio to
    GRPO's gradient variance (geometric mean over seeds, 95% interval); right, the measured and
    predicted ratio at each measurement step (geometric mean over seeds).

    Examples:
        >>> import os, tempfile
        >>> meas = {"step": 1, "measured_ratio": 0.8, "predicted_ratio": 0.4, "uncorrelated_ratio": 0.5,
        ...         "answer_kept": 1.0, "var": 0.8, "var_grpo": 1.0}
        >>> run = {"grad_variance": [meas], "dependency": [], "measure_steps": [1]}
        >>> s = {"vppo": {**summarize_evidence([run]), "runs": [run]}}
        >>> path = os.path.join(tempfile.mkdtemp(), "variance.png")
        >>> plot_evidence(s, path)
        >>> open(path, "rb").read(4)
        b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    shown = [(p, s) for p, s in summary.items() if s["grad_variance"]["measurements"]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for x, (preset, s) in enumerate(shown):
        g = s["grad_variance"]
        for key, marker, dx, label in (("measured", "o", -0.12, "measured"), ("predicted", "s", 0.12, "predicted k E[w² α²]")):
            value, (low, high) = g[f"{key}_ratio"], g[f"{key}_interval"]
            err = None if low is None else [[value - low], [high - value]]
            axes[0].errorbar([x + dx], [value], yerr=err, fmt=marker, color="C0" if key == "measured" else "C1",
                             capsize=3, label=label if x == 0 else None)
        runs = s["runs"]
        steps = runs[0]["measure_steps"]
        if preset == BASELINE:
            continue  # 1 by construction
        for key, style in (("measured_ratio", "-"), ("predicted_ratio", "--")):
            ys = [_geomean([r["grad_variance"][i][key] for r in runs if i < len(r["grad_variance"]) and r["grad_variance"][i]])
                  for i in range(len(steps))]
            axes[1].plot(steps, ys, style, marker="o", markersize=3, color=f"C{x + 2}",
                         label=f"{preset} {key.split('_')[0]}")
    for ax in axes:
        ax.axhline(1.0, color="#999", linestyle=":", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    axes[0].set_xticks(range(len(shown)), [p for p, _ in shown])
    axes[0].set(title="gradient variance / GRPO's, same rollouts (LM head)", ylabel="ratio (log scale)")
    axes[1].set(title="ratio during training (geometric mean over seeds)", xlabel="RL step", ylabel="ratio")
    if shown:
        axes[0].legend(fontsize=8)
        axes[1].legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
