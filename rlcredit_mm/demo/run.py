"""``rlcredit demo``: train the presets over seeds, then write the results folder atomically.

The folder (``--out``, default ``./rlcredit-demo/``) holds ``results.json`` (config, per-run curves
and measurements, the summary), ``results.md`` (the tables and verdict), ``curves.png`` (learning
curves), ``variance.png`` (gradient variance against GRPO's, measured and predicted),
``heatmaps.html`` / ``heatmaps.png`` (per-token visual dependency and connectivity of sample
responses) and ``model/`` (the trained VPPO policy of seed 0 with its tokenizer and image
processor, for ``rlcredit inspect``) with ``sample.png``. Everything is written into a temporary
sibling folder first and renamed into place at the end, so a failed or interrupted run leaves
nothing half-written; folders and files get the usual permissions (``0777`` / ``0666`` minus the
umask).

``run_demo`` is ``check_presets`` (labels, everything built up front), ``prepare_output``,
``train`` (the records and seed-0 policies), ``write_results`` (the files) and ``print_report``
(the table on stdout).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import torch

import rlcredit
from rlcredit.errors import SpecError
from rlcredit.specs import SPEC_SUFFIXES
from rlcredit_mm._files import new_folder
from rlcredit_mm.demo import evidence as E
from rlcredit_mm.demo import model as M
from rlcredit_mm.demo import report as R
from rlcredit_mm.demo import task as T
from rlcredit_mm.demo.report import report_text
from rlcredit_mm.demo.train import DemoConfig, run_preset, sample, warm_start

__all__ = ["DEFAULT_OUT", "REGENERATE", "Training", "check_presets", "prepare_output", "train", "write_results",
           "report_text", "print_report", "run_demo"]

DEFAULT_OUT = "rlcredit-demo"
"""The default output folder (``--out``)."""

REGENERATE = ("rlcredit demo --device cpu --no-progress && for f in curves heatmaps variance; do "
              "cp rlcredit-demo/$f.png docs/assets/demo_$f.png; done && cp rlcredit-demo/results.json "
              "docs/assets/demo_results.json && python -m rlcredit_mm.demo.readme docs/assets/demo_results.json "
              "README.md docs/demo.md")
"""The command that regenerates the README's and ``docs/demo.md``'s figures and tables (a default run on the CPU)."""

_MARKER = "results.json"


def check_presets(names: Sequence[str]) -> dict[str, str]:
    """Label and build every preset up front (before any training): ``label -> name or path``.

    A registered preset is labelled by its name; a name that is not one but a spec file
    (``.json``, ``.yaml``, ``.yml``, ``.toml``) is labelled by the file stem. Every entry is built
    once here, so an unknown name or a bad file fails before anything is trained or written.

    Raises:
        rlcredit.RegistryError: an unknown preset name (with the closest match).
        rlcredit.SpecError: a spec file that is missing or does not build; two entries with the
            same label (both are named).

    Examples:
        >>> import json, tempfile
        >>> spec = Path(tempfile.mkdtemp()) / "wide_clip.json"
        >>> _ = spec.write_text(json.dumps({"preset": "grpo", "policy_loss": {"name": "clipped_surrogate", "clip_high": 0.28}}))
        >>> list(check_presets(["grpo", str(spec)]))
        ['grpo', 'wide_clip']
        >>> check_presets(["vpo"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        rlcredit.errors.RegistryError: unknown strategy 'vpo'; did you mean 'vppo'? ...
    """
    registered = rlcredit.available("strategy")
    specs: dict[str, str] = {}
    for name in names:
        path = Path(name)
        if name in registered:
            label = name
        elif path.suffix.lower() in SPEC_SUFFIXES or path.is_file():
            label = path.stem  # rlcredit.build below says what is wrong with a missing or bad file
        else:
            rlcredit.get("strategy", name)  # raises: unknown preset, with the closest match
            label = name
        if label in specs:
            raise SpecError(
                f"--presets: {specs[label]!r} and {name!r} would both be labelled {label!r} in the results; "
                f"rename one of the spec files."
            )
        rlcredit.build(name)
        specs[label] = name
    return specs


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
        tmp = new_folder(parent, f".{path.name}.tmp-")  # 0777 minus the umask, as mkdir makes it
    except OSError as err:
        raise SpecError(f"--out {str(path)!r} cannot be written: {err}") from err
    return path, tmp


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished folder into place (replacing a previous demo output)."""
    old = None
    if out.exists():
        old = new_folder(out.absolute().parent, f".{out.name}.old-")
        os.replace(out, old / "previous")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True, file=sys.stderr)


def heatmap_examples(n: int, shapes: int) -> list[T.Example]:
    """``n`` fixed examples for the heatmaps, answers cycling through the colours.

    A policy's visual dependency against a black picture is small on the colour it gives to a
    black picture (``docs/demo.md``), so showing one answer colour only can mislead.

    Examples:
        >>> [ex.answer for ex in heatmap_examples(5, 1)]
        ['red', 'green', 'blue', 'yellow', 'red']
    """
    pool = T.make_examples(64 * max(1, n), 424242, shapes)
    colours, out = list(T.COLOURS), []
    for k in range(n):
        want = colours[k % len(colours)]
        out.append(next(ex for ex in pool if ex.answer == want and ex not in out))
    return out


def _heatmaps(kit: M.ModelKit, models: Mapping[str, Any], presets: Mapping[str, str], cfg: DemoConfig) -> list[Any]:
    """Token heatmaps of sampled responses of the trained seed-0 policies (VPPO and GRPO first)."""
    from rlcredit_mm.inspect import TokenHeatmap, token_scores

    shown = [p for p in ("vppo", "grpo") if p in models] or list(models)[:1]
    examples = heatmap_examples(cfg.heatmap_samples, cfg.shapes)
    out = []
    for preset in shown:
        model = models[preset]
        policy = rlcredit.HFPolicy(model, rows_per_chunk=16)
        strategy = rlcredit.build(presets[preset])
        torch.manual_seed(0)
        prompt = M.to_device(M.encode_prompts(kit, examples), policy.device)
        sampled = sample(model, kit, prompt, max_new_tokens=cfg.response_limit, temperature=cfg.temperature)
        inputs = M.join_responses(prompt, sampled.responses, sampled.mask)
        scores = token_scores(policy, inputs, sampled.mask)
        n = len(examples)
        stats = policy.response_stats(inputs, sampled.mask, entropy=True)
        rollout = rlcredit.Rollout(sampled.mask, torch.zeros(n, device=policy.device),
                                   torch.arange(n, device=policy.device), old_logprobs=stats.logprobs,
                                   signals={"entropy": stats.entropy}, model_inputs=inputs)
        kept = (strategy.assign(rollout, policy).token_weights > 0).cpu()
        mask, responses = sampled.mask.cpu(), sampled.responses.cpu()
        scores = {k: v.cpu() for k, v in scores.items()}
        partial = not bool(kept[mask].all())  # underline kept tokens only when some are dropped
        for i, ex in enumerate(examples):
            m = mask[i]
            ids = responses[i][m].tolist()
            r = T.reward(ex, kit.words(responses[i]), bool(sampled.finished[i]))
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


@attrs.frozen
class Training:
    """What ``train`` returns: the runs' records and the seed-0 policies.

    Attributes:
        kit: the tokenizer and image processor the models were trained with.
        records: one per (preset, seed), from ``run_preset``, in training order.
        models: label -> the trained policy of seed 0.
        warmup_final_loss: seed -> the format warm-up's last loss (None without a warm-up).
        seconds: wall time of the warm-ups and RL runs; cpu_seconds: their CPU time (this process).
        device: where they ran.
    """

    kit: M.ModelKit
    records: list[dict[str, Any]]
    models: dict[str, Any]
    warmup_final_loss: dict[int, float | None]
    seconds: float
    cpu_seconds: float
    device: str


def train(cfg: DemoConfig, presets: Mapping[str, str]) -> Training:
    """Train every preset over ``cfg.seeds`` seeds; each seed's presets start from its format warm-up.

    Args:
        cfg: the run's settings (``cfg.threads`` is not applied here: ``run_demo`` does).
        presets: label -> preset name or spec file, from ``check_presets``.

    Examples:
        >>> cfg = DemoConfig.quick(steps=1, warmup_steps=2, hidden=32, eval_prompts=4, progress=False)
        >>> done = train(cfg, {"grpo": "grpo"})
        >>> [(r["preset"], r["seed"], len(r["train_reward"])) for r in done.records], list(done.models)
        ([('grpo', 0, 1)], ['grpo'])
    """
    start, cpu = time.perf_counter(), time.process_time()
    device = M.resolve_device(cfg.device)
    kit = M.ModelKit()
    records: list[dict[str, Any]] = []
    models: dict[str, Any] = {}
    warm_losses: dict[int, float | None] = {}
    with _bar(cfg.seeds * cfg.warmup_steps, "format warm-up", cfg.progress) as wbar, \
            _bar(cfg.seeds * len(presets) * cfg.steps, "RL", cfg.progress) as bar:
        for seed in range(cfg.seeds):
            state, losses = warm_start(kit, cfg, seed, progress=wbar, device=device)
            warm_losses[seed] = losses[-1] if losses else None
            for label, spec in presets.items():
                record, model = run_preset(spec, seed, kit, state, cfg, progress=bar, label=label, device=device)
                records.append(record)
                if seed == 0:
                    models[label] = model
    return Training(kit, records, models, warm_losses, time.perf_counter() - start, time.process_time() - cpu,
                    str(device))


_INTRO = ("Each token of a sampled response, coloured by its visual dependency (exact KL between the policy's "
          "next-token distributions with the picture and with a black picture; VPPO) and its connectivity "
          "(attention mass on image tokens, sink-debiased; AT-RL). Underlined: tokens the preset kept (non-zero "
          "weight). Only the colour word depends on the picture.")


def write_results(cfg: DemoConfig, presets: Mapping[str, str], trained: Training, folder: Path, *,
                  start: float, start_cpu: float) -> dict[str, Any]:
    """Write the results folder's files into ``folder`` and return the results dictionary.

    Files: ``curves.png``, ``variance.png`` (``evidence.plot_evidence``), ``heatmaps.html`` and
    ``heatmaps.png`` (when ``cfg.heatmap_samples``), ``model/`` (the seed-0 VPPO policy, else the
    first preset's), ``sample.png``, ``results.json`` and ``results.md`` (``report.report_text``).

    ``results.json``'s ``summary[preset]`` holds ``grad_variance`` (``measured_ratio``,
    ``predicted_ratio``, ``uncorrelated_ratio``, their ``*_interval`` over seeds, ``per_seed``,
    ``answer_kept``, ``measurements``) and ``dependency`` (``evidence.summarize_evidence``).

    Args:
        cfg: the run's settings; presets: label -> name or spec file; trained: from ``train``.
        folder: an existing, empty folder.
        start, start_cpu: ``time.perf_counter()`` and ``time.process_time()`` at the start of the run
            (for the total wall and CPU time).
    """
    kit = trained.kit
    summary = R.summarize(trained.records, list(presets))
    for s in summary.values():
        s.update(E.summarize_evidence(s["runs"]))
    chance = 1.0 / len(T.COLOURS)
    R.plot_curves(summary, folder / "curves.png", threshold=cfg.threshold, chance=chance)
    E.plot_evidence(summary, folder / "variance.png")
    if cfg.heatmap_samples:
        from rlcredit_mm.inspect import heatmap_html, heatmap_png

        heat = _heatmaps(kit, trained.models, presets, cfg)
        (folder / "heatmaps.html").write_text(
            heatmap_html(heat, title="rlcredit demo: token heatmaps", intro=_INTRO), encoding="utf-8")
        per = cfg.heatmap_samples
        shown = [h for k in range(0, len(heat), per) for h in heat[k:k + 2]]  # two of each policy
        heatmap_png(shown, folder / "heatmaps.png", title="rlcredit demo: token heatmaps")
    keep = "vppo" if "vppo" in trained.models else next(iter(trained.models))
    _save_model(kit, trained.models[keep], folder / "model")
    T.render(T.make_example(7, cfg.shapes), kit.image_size).save(folder / "sample.png")
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
    results = {
        "config": cfg.to_dict(),
        "task": {"colours": list(T.COLOURS), "shapes": list(T.SHAPES), "chance_accuracy": chance,
                 "image_size": kit.image_size, "eval_prompts": cfg.eval_prompts},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": __import__("transformers").__version__, "rlcredit": rlcredit.__version__,
                        "threads": cfg.threads, "cpus": os.cpu_count(), "platform": platform.platform(),
                        "device": trained.device},
        "warmup_final_loss": trained.warmup_final_loss,
        "summary": {p: {k: v for k, v in s.items() if k != "runs"} for p, s in summary.items()},
        "verdict": R.verdict(summary),
        "runs": trained.records,
        "inspect_model": keep,
        "wall_time_s": {"training": trained.seconds, "total": wall_s},
        "cpu_time_s": {"training": trained.cpu_seconds, "total": cpu_s},
    }
    (folder / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    (folder / "results.md").write_text(report_text(results), encoding="utf-8")
    return results


def print_report(results: Mapping[str, Any], cfg: DemoConfig, out: Path, stream: Any) -> None:
    """Print the results (``report_text``), the files written and an ``rlcredit inspect`` command to try."""
    example = T.make_example(7, cfg.shapes)
    print("", file=stream)
    print(report_text(results), file=stream)
    print(f"wrote {out}/: results.json, results.md, curves.png, variance.png"
          f"{', heatmaps.html, heatmaps.png' if cfg.heatmap_samples else ''}, model/ ({results['inspect_model']}, "
          f"for rlcredit inspect), sample.png", file=stream)
    print(f"try: rlcredit inspect --model {out}/model --image {out}/sample.png "
          f"--prompt 'what colour is the {example.asked} ?' --response 'ok . the answer is "
          f"{example.answer} .' --out inspect.html --png", file=stream)


def run_demo(cfg: DemoConfig, out: str | os.PathLike = DEFAULT_OUT, *, stream: Any = None) -> dict[str, Any]:
    """Train ``cfg.presets`` over ``cfg.seeds`` seeds, write the results folder ``out`` and print the table.

    ``check_presets``, ``prepare_output``, ``train``, ``write_results`` (into a temporary sibling
    folder, renamed into place at the end; removed on any failure), then ``print_report``.

    Args:
        cfg: the run's settings.
        out: the output folder (created or replaced atomically).
        stream: where the table and messages go (default stdout).

    Returns:
        The results dictionary written to ``results.json``.

    Raises:
        rlcredit.RegistryError: an unknown preset. rlcredit.SpecError: a bad spec file or output folder.

    Examples:
        >>> import io, tempfile
        >>> cfg = DemoConfig.quick(presets="grpo", steps=1, warmup_steps=2, hidden=32, eval_prompts=4,
        ...                        heatmap_samples=0, progress=False)
        >>> out = Path(tempfile.mkdtemp()) / "demo"
        >>> results = run_demo(cfg, out, stream=io.StringIO())
        >>> sorted(p.name for p in out.iterdir())
        ['curves.png', 'model', 'results.json', 'results.md', 'sample.png', 'variance.png']
        >>> list(results["summary"])
        ['grpo']
    """
    stream = stream or sys.stdout
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    presets = check_presets(cfg.presets)
    out_path, tmp = prepare_output(out)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        start, start_cpu = time.perf_counter(), time.process_time()
        print(f"rlcredit demo: {len(presets)} presets x {cfg.seeds} seeds x {cfg.steps} steps "
              f"({cfg.prompts_per_step} prompts x {cfg.group_size} samples per step) -> {out_path}", file=stream)
        trained = train(cfg, presets)
        results = write_results(cfg, presets, trained, tmp, start=start, start_cpu=start_cpu)
        _publish(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    print_report(results, cfg, out_path, stream)
    return results
