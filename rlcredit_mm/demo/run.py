"""``rlcredit demo``: train the presets over seeds, then write the results folder atomically.

The folder (``--out``, default ``./rlcredit-demo/``) holds ``results.json`` (config, per-run curves
and the summary), ``results.md`` (the table and verdict), ``curves.png`` (learning curves),
``heatmaps.html`` / ``heatmaps.png`` (per-token visual dependency and connectivity of sample
responses) and ``model/`` (the trained VPPO policy of seed 0 with its tokenizer and image
processor, for ``rlcredit inspect``) with ``sample.png``. Everything is written into a temporary
sibling folder first and renamed into place at the end, so a failed or interrupted run leaves
nothing half-written.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import rlcredit
from rlcredit.errors import RLCreditError, SpecError
from rlcredit_mm.demo import model as M
from rlcredit_mm.demo import report as R
from rlcredit_mm.demo import task as T
from rlcredit_mm.demo.train import DemoConfig, evaluate, run_preset, sample, warm_start

__all__ = ["check_presets", "prepare_output", "run_demo", "main", "REGENERATE"]

REGENERATE = ("rlcredit demo && cp rlcredit-demo/curves.png docs/assets/demo_curves.png "
              "&& cp rlcredit-demo/heatmaps.png docs/assets/demo_heatmaps.png")
"""The command that regenerates the README's figures (a default run)."""

_MARKER = "results.json"


def check_presets(names: Sequence[str]) -> list[Any]:
    """Build every preset up front (before any training): unknown names raise ``RegistryError``
    with the available presets and the closest match.

    Examples:
        >>> [type(s).__name__ for s in check_presets(["grpo", "vppo"])]
        ['Strategy', 'Strategy']
        >>> check_presets(["vpo"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        rlcredit.errors.RegistryError: unknown strategy 'vpo'; did you mean 'vppo'? ...
    """
    strategies = []
    for name in names:
        rlcredit.get("strategy", name)  # a registered preset, never a file path
        strategies.append(rlcredit.build(name))
    return strategies


def prepare_output(out: str | os.PathLike) -> tuple[Path, Path]:
    """Check that ``out`` can be written and create a temporary sibling folder: ``(out, tmp)``.

    ``out`` may not exist yet, be empty, or hold a previous demo's results (it is replaced at the
    end); anything else is refused so that no user data is overwritten.

    Raises:
        SpecError: ``out`` is a file, a non-demo folder, or its parent is missing or not writable.

    Examples:
        >>> import tempfile
        >>> out, tmp = prepare_output(Path(tempfile.mkdtemp()) / "demo")
        >>> tmp.parent == out.parent, tmp.name.startswith(".demo.tmp-"), out.exists()
        (True, True, False)
    """
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise SpecError(f"--out {str(path)!r} exists and is not a folder; choose a folder path.")
    if path.is_dir() and any(path.iterdir()) and not (path / _MARKER).is_file():
        raise SpecError(
            f"--out {str(path)!r} is a non-empty folder that is not an rlcredit demo output (no {_MARKER}); "
            f"choose a new or empty folder."
        )
    parent = path.absolute().parent
    if not parent.is_dir():
        raise SpecError(f"--out {str(path)!r}: the parent folder {str(parent)!r} does not exist.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SpecError(f"--out {str(path)!r}: the parent folder {str(parent)!r} is not writable.")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    except OSError as err:
        raise SpecError(f"--out {str(path)!r} cannot be written: {err}") from err
    return path, tmp


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place (replacing a previous demo output)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.absolute().parent))
        os.replace(out, old / "previous")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr)


def _heatmaps(kit: M.ModelKit, models: dict[str, Any], cfg: DemoConfig) -> list[Any]:
    """Token heatmaps of sampled responses of the trained seed-0 policies (VPPO and GRPO first)."""
    from rlcredit_mm.inspect import TokenHeatmap, token_scores

    shown = [p for p in ("vppo", "grpo") if p in models] or list(models)[:1]
    examples = T.make_examples(cfg.heatmap_samples, 424242, cfg.shapes)
    out = []
    for preset in shown:
        model = models[preset]
        policy = rlcredit.HFPolicy(model, rows_per_chunk=16)
        strategy = rlcredit.build(preset)
        torch.manual_seed(0)
        prompt = M.encode_prompts(kit, examples)
        sampled = sample(model, kit, prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        inputs = M.join_responses(prompt, sampled.responses, sampled.mask)
        scores = token_scores(policy, inputs, sampled.mask)
        n = len(examples)
        stats = policy.response_stats(inputs, sampled.mask, entropy=True)
        rollout = rlcredit.Rollout(sampled.mask, torch.zeros(n), torch.arange(n), old_logprobs=stats.logprobs,
                                   signals={"entropy": stats.entropy}, model_inputs=inputs)
        kept = strategy.assign(rollout, policy).token_weights > 0
        partial = not bool(kept[sampled.mask].all())  # underline kept tokens only when some are dropped
        for i, ex in enumerate(examples):
            m = sampled.mask[i]
            ids = sampled.responses[i][m].tolist()
            words = kit.words(sampled.responses[i])
            r = T.reward(ex, words, bool(sampled.finished[i]))
            out.append(TokenHeatmap(
                T.render(ex, kit.image_size), f"what colour is the {ex.asked} ?  (answer: {ex.answer})",
                [kit.vocab[j] for j in ids], {k: v[i][m].tolist() for k, v in scores.items()},
                title=f"{preset}, seed 0, after {cfg.steps} steps - reward {r:.0f}",
                marks={"visual dependency": kept[i][m].tolist()} if partial else {},
            ))
    return out


def _save_model(kit: M.ModelKit, model: Any, folder: Path) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" would interleave with our output
    model.save_pretrained(folder)
    kit.tokenizer.save_pretrained(folder)
    kit.image_processor.save_pretrained(folder)


def run_demo(cfg: DemoConfig, out: str | os.PathLike = "rlcredit-demo", *, stream: Any = None) -> dict[str, Any]:
    """Train ``cfg.presets`` over ``cfg.seeds`` seeds and write the results folder ``out``.

    Args:
        cfg: the run's settings.
        out: the output folder (created or replaced atomically).
        stream: where the table and messages go (default stdout).

    Returns:
        The results dictionary written to ``results.json``.

    Raises:
        rlcredit.RegistryError: an unknown preset. rlcredit.SpecError: a bad output folder.

    Examples:
        >>> import io, tempfile
        >>> cfg = DemoConfig.quick(presets="grpo", steps=1, warmup_steps=2, hidden=32, eval_prompts=4,
        ...                        heatmap_samples=0, progress=False)
        >>> out = Path(tempfile.mkdtemp()) / "demo"
        >>> results = run_demo(cfg, out, stream=io.StringIO())
        >>> sorted(p.name for p in out.iterdir())
        ['curves.png', 'model', 'results.json', 'results.md', 'sample.png']
        >>> list(results["summary"])
        ['grpo']
    """
    stream = stream or sys.stdout
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_presets(cfg.presets)
    out_path, tmp = prepare_output(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        start = time.perf_counter()
        kit = M.ModelKit()
        records: list[dict[str, Any]] = []
        models: dict[str, Any] = {}
        warm_losses = {}
        print(f"rlcredit demo: {len(cfg.presets)} presets x {cfg.seeds} seeds x {cfg.steps} steps "
              f"({cfg.prompts_per_step} prompts x {cfg.group_size} samples per step) -> {out_path}", file=stream)
        with _bar(cfg.seeds * cfg.warmup_steps, "format warm-up", cfg.progress) as wbar, \
                _bar(cfg.seeds * len(cfg.presets) * cfg.steps, "RL", cfg.progress) as bar:
            for seed in range(cfg.seeds):
                state, losses = warm_start(kit, cfg, seed, progress=wbar)
                warm_losses[seed] = losses[-1] if losses else None
                for preset in cfg.presets:
                    record, model = run_preset(preset, seed, kit, state, cfg, progress=bar)
                    records.append(record)
                    if seed == 0:
                        models[preset] = model
        train_s = time.perf_counter() - start
        summary = R.summarize(records, cfg.presets)
        table = R.results_table(summary, threshold=cfg.threshold, steps=cfg.steps)
        lines = R.verdict(summary)
        chance = 1.0 / len(T.COLOURS)
        R.plot_curves(summary, tmp / "curves.png", threshold=cfg.threshold, chance=chance)
        if cfg.heatmap_samples:
            from rlcredit_mm.inspect import heatmap_html, heatmap_png

            heat = _heatmaps(kit, models, cfg)
            intro = ("Each token of a sampled response, coloured by its visual dependency (exact KL between the "
                     "policy's next-token distributions with the picture and with a black picture; VPPO) and its "
                     "connectivity (attention mass on image tokens, sink-debiased; AT-RL). Underlined: tokens the "
                     "preset kept (non-zero weight). Only the colour word depends on the picture.")
            (tmp / "heatmaps.html").write_text(heatmap_html(heat, title="rlcredit demo: token heatmaps", intro=intro),
                                               encoding="utf-8")
            per = cfg.heatmap_samples
            shown = [h for k in range(0, len(heat), per) for h in heat[k:k + 2]]  # two of each policy
            heatmap_png(shown, tmp / "heatmaps.png", title="rlcredit demo: token heatmaps")
        keep = "vppo" if "vppo" in models else next(iter(models))
        _save_model(kit, models[keep], tmp / "model")
        T.render(T.make_example(7, cfg.shapes), kit.image_size).save(tmp / "sample.png")
        wall_s = time.perf_counter() - start
        results = {
            "config": cfg.to_dict(),
            "task": {"colours": list(T.COLOURS), "shapes": list(T.SHAPES), "chance_accuracy": chance,
                     "image_size": kit.image_size, "eval_prompts": cfg.eval_prompts},
            "environment": {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": __import__("transformers").__version__, "rlcredit": rlcredit.__version__,
                            "threads": cfg.threads, "cpus": os.cpu_count(), "platform": platform.platform()},
            "warmup_final_loss": warm_losses,
            "summary": {p: {k: v for k, v in s.items() if k != "runs"} for p, s in summary.items()},
            "verdict": lines,
            "runs": records,
            "inspect_model": keep,
            "wall_time_s": {"training": train_s, "total": wall_s},
        }
        (tmp / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        text = (f"{table}\n\n" + "\n".join(f"- {line}" for line in lines) +
                f"\n\nChance accuracy {chance:.2f}; held-out accuracy is greedy on {cfg.eval_prompts} fixed prompts. "
                f"Wall time {wall_s:.0f} s.\n")
        (tmp / "results.md").write_text(text, encoding="utf-8")
        _publish(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    print("", file=stream)
    print(text, file=stream)
    print(f"wrote {out_path}/: results.json, results.md, curves.png"
          f"{', heatmaps.html, heatmaps.png' if cfg.heatmap_samples else ''}, model/ ({keep}, for rlcredit inspect), "
          f"sample.png", file=stream)
    print(f"try: rlcredit inspect --model {out_path}/model --image {out_path}/sample.png "
          f"--prompt 'what colour is the {T.make_example(7, cfg.shapes).asked} ?' --response 'ok . the answer is "
          f"{T.make_example(7, cfg.shapes).answer} .' --out inspect.html --png", file=stream)
    return results


def config_from_args(args: Any) -> DemoConfig:
    """The ``DemoConfig`` of parsed ``rlcredit demo`` flags (``--quick`` first, flags override).

    Examples:
        >>> from rlcredit.cli import build_parser
        >>> cfg = config_from_args(build_parser().parse_args(["demo", "--quick", "--seeds", "2"]))
        >>> cfg.seeds, cfg.steps
        (2, 4)
    """
    overrides: dict[str, Any] = {}
    for flag in ("seeds", "steps", "shapes", "threshold", "lr"):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[flag] = value
    if args.presets is not None:
        overrides["presets"] = args.presets
    overrides["progress"] = not args.no_progress
    return DemoConfig.quick(**overrides) if args.quick else DemoConfig(**overrides)


def main(args: Any) -> int:
    """Entry point of ``rlcredit demo`` (``args`` from ``rlcredit.cli``); returns the exit code.

    0: done; 2: bad input (the message goes to stderr, nothing is written); 130: interrupted.

    Examples:
        >>> from rlcredit.cli import build_parser
        >>> main(build_parser().parse_args(["demo", "--presets", "nope"]))
        2
    """
    try:
        cfg = config_from_args(args)
        run_demo(cfg, args.out)
    except RLCreditError as err:
        print(f"rlcredit demo: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlcredit demo: interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0
