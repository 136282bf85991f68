"""Summaries of demo runs: the results tables, 95% intervals over seeds, the verdict, learning curves,
the report text and the README block (``results.json`` in, Markdown out; nothing here measures)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["t_quantile", "interval", "summarize", "results_table", "evidence_table", "verdict", "plot_curves",
           "report_text", "readme_block", "update_readme", "without_timings", "TIMING_KEYS", "README_START",
           "README_END"]

TIMING_KEYS = ("step_time_s", "step_cpu_s", "cpu_s_per_step", "wall_time_s", "cpu_time_s")
"""Keys of ``results.json`` that hold timings (everything else is reproducible bit for bit)."""

README_START = "<!-- demo-results:start (generated from docs/assets/demo_results.json; do not edit) -->"
README_END = "<!-- demo-results:end -->"

# Student-t 0.975 quantiles for 1..30 degrees of freedom (beyond: the normal 1.96).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile(df: int) -> float:
    """The two-sided 95% Student-t quantile ``t_{0.975, df}`` (``df >= 1``).

    Examples:
        >>> t_quantile(2), t_quantile(100)
        (4.303, 1.96)
    """
    if df < 1:
        raise ValueError(f"t_quantile needs df >= 1, got {df}.")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean and 95% t-interval ``mean +- t_{0.975, n-1} s / sqrt(n)`` over seeds (no interval for n = 1).

    Examples:
        >>> r = interval([0.5, 0.7, 0.9])
        >>> round(r["mean"], 3), round(r["low"], 3), round(r["high"], 3)
        (0.7, 0.203, 1.197)
        >>> interval([0.4])["low"] is None
        True
    """
    n = len(values)
    mean = sum(values) / n if n else float("nan")
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n, "values": list(values)}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "values": list(values)}


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def summarize(records: Sequence[Mapping[str, Any]], presets: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per preset: final accuracy interval, steps to threshold, kept share, scale spread, step time, curves.

    Args:
        records: one record per (preset, seed) from ``rlcredit_mm.demo.train.run_preset``.
        presets: the presets in display order.

    Returns:
        ``preset -> {"final_accuracy": interval, "steps_to_threshold", "kept_share", "scale_std",
        "step_time_s", "initial_accuracy", "train_reward_last10", "runs"}``.

    Examples:
        >>> rec = {"preset": "grpo", "seed": 0, "final_accuracy": 0.5, "eval_accuracy": [0.25, 0.5],
        ...        "eval_steps": [0, 10], "steps_to_threshold": None, "kept_share": [1.0, 1.0],
        ...        "scale_std": [0.0], "step_time_s": [0.1, 0.3], "train_reward": [0.2, 0.4]}
        >>> s = summarize([rec], ["grpo"])["grpo"]
        >>> s["final_accuracy"]["mean"], s["steps_to_threshold"]["reached"], s["step_time_s"]
        (0.5, 0, 0.2)
    """
    out: dict[str, dict[str, Any]] = {}
    for preset in presets:
        runs = sorted((r for r in records if r["preset"] == preset), key=lambda r: r["seed"])
        if not runs:
            continue
        reached = [r["steps_to_threshold"] for r in runs]
        hit = [s for s in reached if s is not None]
        out[preset] = {
            "final_accuracy": interval([r["final_accuracy"] for r in runs]),
            "initial_accuracy": _mean([r["eval_accuracy"][0] for r in runs]),
            "steps_to_threshold": {"per_seed": reached, "reached": len(hit), "of": len(runs),
                                   "median": _median(hit) if hit else None},
            "kept_share": _mean([_mean(r["kept_share"]) for r in runs]),
            "scale_std": _mean([_mean(r["scale_std"]) for r in runs]),
            "step_time_s": _median([t for r in runs for t in r["step_time_s"]]),
            "cpu_s_per_step": _median([t for r in runs for t in r.get("step_cpu_s", [])]),
            "train_reward_last10": _mean([_mean(r["train_reward"][-10:]) for r in runs]),
            "runs": list(runs),
        }
    return out


def _fmt_acc(acc: Mapping[str, Any]) -> str:
    if acc["low"] is None:
        return f"{acc['mean']:.2f} (1 seed)"
    return f"{acc['mean']:.2f} [{max(0.0, acc['low']):.2f}, {min(1.0, acc['high']):.2f}]"


def _fmt_steps(s: Mapping[str, Any], total_steps: int) -> str:
    if not s["reached"]:
        return f"> {total_steps} (0/{s['of']})"
    return f"{s['median']:g} ({s['reached']}/{s['of']})"


def _fmt_ratio(value: Any, bounds: Any = None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if bounds is None or bounds[0] is None:
        return f"{value:.2f}"
    return f"{value:.2f} [{bounds[0]:.2f}, {bounds[1]:.2f}]"


def _fmt_num(value: Any, form: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, form)


def results_table(summary: Mapping[str, Mapping[str, Any]], *, threshold: float, steps: int) -> str:
    """The results as a Markdown table (one row per preset).

    Columns: held-out accuracy after the last step (mean over seeds and 95% t-interval),
    the median first step whose held-out accuracy reached ``threshold`` (seeds that reached it),
    the mean share of response tokens with non-zero weight, the mean std of each kept token's
    effective advantage scale (``w A / A_GRPO``; 0 = plain GRPO credit), the gradient variance
    against GRPO's on the same rollouts, measured and as the bound predicts it (``grad_variance``,
    when measured; geometric means over seeds), and the median CPU time of one RL step.

    Examples:
        >>> rec = {"preset": "grpo", "seed": 0, "final_accuracy": 0.75, "eval_accuracy": [0.25, 0.75],
        ...        "eval_steps": [0, 10], "steps_to_threshold": 10, "kept_share": [1.0], "scale_std": [0.0],
        ...        "step_time_s": [0.1], "step_cpu_s": [0.1], "train_reward": [0.5]}
        >>> print(results_table(summarize([rec], ["grpo"]), threshold=0.6, steps=10).splitlines()[-1])
        | grpo | 0.75 (1 seed) | 10 (1/1) | 100% | 0.000 | - | - | 0.100 |
    """
    head = (f"| preset | final accuracy (95% CI) | steps to {threshold:.0%} | kept tokens | adv. scale std | "
            f"grad. variance / GRPO's | predicted k·E[w²α²] | CPU s / step |\n"
            f"|---|---|---|---|---|---|---|---|")
    rows = [head]
    for preset, s in summary.items():
        g = s.get("grad_variance") or {}
        rows.append(
            f"| {preset} | {_fmt_acc(s['final_accuracy'])} | {_fmt_steps(s['steps_to_threshold'], steps)} | "
            f"{s['kept_share']:.0%} | {s['scale_std']:.3f} | "
            f"{_fmt_ratio(g.get('measured_ratio'), g.get('measured_interval'))} | "
            f"{_fmt_ratio(g.get('predicted_ratio'))} | {_fmt_num(s.get('cpu_s_per_step'), '.3f')} |"
        )
    return "\n".join(rows)


def evidence_table(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """The mechanism numbers as a Markdown table: the gradient-variance ratios to GRPO's and the
    dependency distribution (``rlcredit_mm.demo.evidence``), one row per preset.

    Columns: measured ratio (95% interval over seeds), the bound's prediction ``k E[w^2 alpha^2]``,
    the ratio with the real per-token gradient norms but uncorrelated terms, the share of
    responses whose answer token is kept; then, for the exact KL against a black picture and
    against VPPO's 50% patch blackout, the share of a response's tokens holding half its
    dependency, the skewness of the token values and the share on the answer token.

    Examples:
        >>> g = {"measured_ratio": 0.9, "measured_interval": [0.7, 1.1], "predicted_ratio": 0.45,
        ...      "uncorrelated_ratio": 0.8, "answer_kept": 1.0, "measurements": 3}
        >>> d = {"half_share": 0.05, "skewness": 6.0, "answer_share": 0.97, "max": 4.0}
        >>> print(evidence_table({"vppo": {"grad_variance": g, "dependency": {"black": d, "patch_blackout": d}}})
        ...       .splitlines()[-1])
        | vppo | 0.90 [0.70, 1.10] | 0.45 | 0.80 | 100% | 5% / 6.0 / 97% | 5% / 6.0 / 97% |
    """
    rows = ["| preset | grad. variance / GRPO's (95% CI) | predicted k·E[w²α²] | uncorrelated terms | answer kept | "
            "black picture: half / skew / answer | patch blackout: half / skew / answer |",
            "|---|---|---|---|---|---|---|"]
    for preset, s in summary.items():
        g = s.get("grad_variance")
        if not g or not g.get("measurements"):
            continue
        dep = []
        for name in ("black", "patch_blackout"):
            d = s["dependency"][name]
            dep.append(f"{_fmt_num(d['half_share'], '.0%')} / {_fmt_num(d['skewness'], '.1f')} / "
                       f"{_fmt_num(d['answer_share'], '.0%')}")
        rows.append(f"| {preset} | {_fmt_ratio(g['measured_ratio'], g.get('measured_interval'))} | "
                    f"{_fmt_ratio(g['predicted_ratio'])} | {_fmt_ratio(g['uncorrelated_ratio'])} | "
                    f"{_fmt_num(g['answer_kept'], '.0%')} | {dep[0]} | {dep[1]} |")
    return "\n".join(rows)


def _overlap(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if a["low"] is None or b["low"] is None:
        return True
    return not (a["low"] > b["high"] or b["low"] > a["high"])


def verdict(summary: Mapping[str, Mapping[str, Any]], baseline: str = "grpo") -> list[str]:
    """One plain sentence per preset comparing its final accuracy with ``baseline``, as measured.

    "beats"/"is worse than" only when the 95% intervals do not overlap; otherwise "no clear
    difference". With one seed there are no intervals and no comparison.

    Examples:
        >>> acc = lambda m: {"final_accuracy": interval([m - 0.01, m, m + 0.01])}
        >>> verdict({"grpo": acc(0.9), "vppo": acc(0.5)})[0][:40]
        'vppo is worse than grpo on this task: fi'
    """
    if baseline not in summary:
        return []
    base = summary[baseline]["final_accuracy"]
    if base["n"] < 2:
        return [f"1 seed: no intervals, so no comparison with {baseline}; run with --seeds 2 or more to compare."]
    lines = []
    for preset, s in summary.items():
        if preset == baseline:
            continue
        acc = s["final_accuracy"]
        diff = acc["mean"] - base["mean"]
        if _overlap(acc, base):
            word = "no clear difference from"
        elif diff > 0:
            word = "beats"
        else:
            word = "is worse than"
        lines.append(f"{preset} {word} {baseline} on this task: final accuracy {acc['mean']:.2f} vs "
                     f"{base['mean']:.2f} ({diff:+.2f}, {acc['n']} seeds, 95% intervals "
                     f"{'overlap' if _overlap(acc, base) else 'do not overlap'}).")
    return lines


def plot_curves(summary: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, *, threshold: float,
                chance: float) -> None:
    """Learning curves (matplotlib, Agg): held-out accuracy and training reward per preset, mean over
    seeds with the range of seeds shaded.

    Examples:
        >>> import os, tempfile
        >>> rec = {"preset": "grpo", "seed": 0, "final_accuracy": 0.5, "eval_accuracy": [0.25, 0.5],
        ...        "eval_steps": [0, 2], "steps_to_threshold": None, "kept_share": [1.0, 1.0],
        ...        "scale_std": [0.0, 0.0], "step_time_s": [0.1, 0.1], "train_reward": [0.2, 0.4]}
        >>> path = os.path.join(tempfile.mkdtemp(), "curves.png")
        >>> plot_curves(summarize([rec], ["grpo"]), path, threshold=0.6, chance=0.25)
        >>> open(path, "rb").read(4)
        b'\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for preset, s in summary.items():
        runs = s["runs"]
        steps = runs[0]["eval_steps"]
        acc = [[r["eval_accuracy"][i] for r in runs] for i in range(len(steps))]
        mean = [_mean(a) for a in acc]
        line, = axes[0].plot(steps, mean, marker="o", markersize=3, label=preset)
        if len(runs) > 1:
            axes[0].fill_between(steps, [min(a) for a in acc], [max(a) for a in acc], color=line.get_color(), alpha=0.15)
        n = min(len(r["train_reward"]) for r in runs)
        window = max(1, n // 10)
        reward = [_mean([r["train_reward"][i] for r in runs]) for i in range(n)]
        smooth = [_mean(reward[max(0, i - window + 1):i + 1]) for i in range(n)]
        axes[1].plot(range(1, n + 1), smooth, color=line.get_color(), label=preset)
    axes[0].axhline(threshold, color="#999", linestyle="--", linewidth=0.8)
    axes[0].axhline(chance, color="#bbb", linestyle=":", linewidth=0.8)
    axes[0].set(title="held-out accuracy (one sample per prompt)", xlabel="RL step", ylabel="accuracy", ylim=(-0.02, 1.02))
    axes[1].axhline(chance, color="#bbb", linestyle=":", linewidth=0.8)
    axes[1].set(title="training reward (sampled, moving mean)", xlabel="RL step", ylabel="mean reward", ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def report_text(results: Mapping[str, Any]) -> str:
    """The results table, the verdict, the mechanism table and the footnote, as Markdown
    (``results.md``, and what ``rlcredit demo`` prints).

    Examples:
        >>> rec = {"preset": "grpo", "seed": 0, "final_accuracy": 0.75, "eval_accuracy": [0.25, 0.75],
        ...        "eval_steps": [0, 10], "steps_to_threshold": 10, "kept_share": [1.0], "scale_std": [0.0],
        ...        "step_time_s": [0.1], "step_cpu_s": [0.1], "train_reward": [0.5]}
        >>> results = {"config": {"threshold": 0.6, "steps": 10, "eval_prompts": 64},
        ...            "summary": summarize([rec], ["grpo"]), "verdict": ["one line."],
        ...            "task": {"chance_accuracy": 0.25}, "wall_time_s": {"total": 12.3}, "cpu_time_s": {"total": 10.0}}
        >>> print(report_text(results).splitlines()[2])
        | grpo | 0.75 (1 seed) | 10 (1/1) | 100% | 0.000 | - | - | 0.100 |
    """
    cfg = results["config"]
    table = results_table(results["summary"], threshold=cfg["threshold"], steps=cfg["steps"])
    mechanism = evidence_table(results["summary"])
    parts = [table, "\n".join(f"- {line}" for line in results["verdict"])]
    if mechanism.count("\n") > 1:
        parts.append(mechanism)
    parts.append(f"Chance accuracy {results['task']['chance_accuracy']:.2f}; held-out accuracy is the mean reward of one "
                 f"sampled response to each of {cfg['eval_prompts']} fixed prompts. Wall time {results['wall_time_s']['total']:.0f} s, CPU time "
                 f"{results['cpu_time_s']['total']:.0f} s.")
    return "\n\n".join(parts) + "\n"


def readme_block(results: Mapping[str, Any]) -> str:
    """The README's generated block: the results table, the verdict and the mechanism table of
    ``results`` (a default run's ``results.json``), between ``README_START`` and ``README_END``.

    Timings other than CPU time per step are left out (they depend on the machine).
    """
    cfg = results["config"]
    table = results_table(results["summary"], threshold=cfg["threshold"], steps=cfg["steps"])
    verdict_lines = "\n".join(f"- {line}" for line in results["verdict"])
    return f"{README_START}\n{table}\n\n{verdict_lines}\n\n{evidence_table(results['summary'])}\n{README_END}"


def update_readme(readme: str | os.PathLike, results: Mapping[str, Any]) -> bool:
    """Replace the block between ``README_START`` and ``README_END`` in ``readme`` by ``readme_block(results)``.

    Returns:
        Whether the file changed.

    Raises:
        ValueError: the markers are missing.
    """
    from pathlib import Path

    path = Path(readme)
    text = path.read_text(encoding="utf-8")
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no '{README_START}' ... '{README_END}' block to replace.")
    new = text[:start] + readme_block(results) + text[end + len(README_END):]
    path.write_text(new, encoding="utf-8")
    return new != text


def without_timings(value: Any) -> Any:
    """``value`` (a ``results.json`` structure) with every ``TIMING_KEYS`` entry removed, recursively:
    what two runs with the same arguments on the same machine give identically.

    Examples:
        >>> without_timings({"a": 1, "wall_time_s": {"total": 3.0}, "runs": [{"step_time_s": [0.1], "b": 2}]})
        {'a': 1, 'runs': [{'b': 2}]}
    """
    if isinstance(value, Mapping):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value

