"""``DemoConfig``: everything that defines a demo run, and the ``--quick`` bundle.

The fields with ``help`` metadata are the ``rlcredit demo`` flags (``rlcredit_mm.cli`` derives
them: name, type, help, default); every default and every validation rule lives in its field.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from rlcredit.errors import SpecError
from rlcredit.validators import is_bool
from rlcredit_mm.demo import task as T

__all__ = ["DEFAULT_PRESETS", "QUICK", "DemoConfig", "DEVICES"]

DEFAULT_PRESETS: tuple[str, ...] = ("grpo", "vppo")
"""What a default run trains: the baseline and the credit the task is built for (any preset, or
spec file, can be added with ``--presets``; on 2 CPU cores each one adds about two minutes)."""
DEVICES = ("auto", "cpu", "cuda")
"""``--device`` values (``cuda:N`` picks one GPU)."""


def _positive_int(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpecError(f"DemoConfig.{attribute.name} must be a positive integer, got {value!r}.")


def _nonneg_int(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SpecError(f"DemoConfig.{attribute.name} must be an integer >= 0, got {value!r}.")


def _positive_float(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 or not math.isfinite(value):
        raise SpecError(f"DemoConfig.{attribute.name} must be a finite number > 0, got {value!r}.")


def _shape_count(instance: Any, attribute: Any, value: Any) -> None:
    _positive_int(instance, attribute, value)
    if value > len(T.SHAPES):
        raise SpecError(f"DemoConfig.shapes must be in [1, {len(T.SHAPES)}], got {value}.")


def _accuracy(instance: Any, attribute: Any, value: Any) -> None:
    _positive_float(instance, attribute, value)
    if value > 1:
        raise SpecError(f"DemoConfig.{attribute.name} is an accuracy in (0, 1], got {value}.")


def _width(instance: Any, attribute: Any, value: Any) -> None:
    _positive_int(instance, attribute, value)
    if value % 16:
        raise SpecError(f"DemoConfig.{attribute.name} must be a multiple of 16 (attention heads of 16), got {value}.")


def _to_presets(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    return tuple(value)


def _check_presets(instance: Any, attribute: Any, value: tuple[str, ...]) -> None:
    if not value:
        raise SpecError("DemoConfig.presets is empty; name at least one preset, e.g. --presets grpo,vppo.")
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        raise SpecError(f"DemoConfig.presets holds preset names or spec file paths (strings), got {bad[0]!r}.")
    if len(set(value)) != len(value):
        raise SpecError(f"DemoConfig.presets lists a preset twice: {', '.join(value)}.")


def _help(text: str) -> dict[str, str]:
    """Field metadata that makes the field a ``rlcredit demo`` flag (``--name-with-dashes``) with this help."""
    return {"help": text}


def _device(instance: Any, attribute: Any, value: Any) -> None:
    ok = isinstance(value, str) and (value in DEVICES or (value.startswith("cuda:") and value[5:].isdigit()))
    if not ok:
        raise SpecError(f"DemoConfig.device must be one of {', '.join(DEVICES)} or cuda:N, got {value!r}.")


def _optional_positive_int(instance: Any, attribute: Any, value: Any) -> None:
    if value is not None:
        _positive_int(instance, attribute, value)


QUICK: dict[str, Any] = dict(seeds=1, steps=4, prompts_per_step=4, group_size=4, warmup_steps=60,
                             eval_prompts=16, eval_every=2, heatmap_samples=2)
"""The ``--quick`` bundle (``DemoConfig.quick``): smaller values for a smoke run of every preset."""


@attrs.frozen
class DemoConfig:
    """Everything that defines a demo run; the fields with ``help`` metadata are the ``rlcredit demo`` flags.

    Each field holds its default and its validator, and nothing else does: ``rlcredit demo``
    derives its flags (name, type, help, default shown) from these fields and builds a
    ``DemoConfig`` from what was given (``--quick``: ``DemoConfig.quick``, then the flags).

    Args:
        presets: what to train: registered preset names (``rlcredit.build(name)``) or paths of
            strategy spec files (``.json``, ``.yaml``, ``.yml``, ``.toml``; labelled by their file
            stem in the results). A string is split on commas.
        seeds: number of seeds (0 .. seeds-1); each seed has its own warm-up, prompts and sampling.
        steps: RL steps per run.
        prompts_per_step: prompts per step; group_size: responses per prompt (``B = P * G`` rows).
        minibatches: optimiser steps per rollout batch (consecutive groups).
        lr: AdamW learning rate of the RL updates; warmup_lr: of the format warm-up.
        lr_warmup: RL steps over which the learning rate ramps up linearly from ``lr / n`` (Adam's
            first steps move every parameter by ~``lr`` whatever its gradient; without a ramp a
            sparse token mask can wreck the response format in two steps).
        warmup_steps: format warm-up steps (batch 32, random answers).
        max_new_tokens: response length limit (a response cut there earns 0), at least the longest
            well-formed response the warm-up writes; None: room for twice the warm-up's filler words
            (``response_limit``).
        temperature: sampling temperature (also used for the log-probs).
        eval_prompts: held-out prompts, each answered by one sampled response every ``eval_every``
            steps; the gradient variance and the dependency distribution are measured at step 1
            and at the same steps.
        threshold: held-out accuracy whose first crossing is reported as "steps to threshold".
        shapes: shapes per picture (1: read the colour of the only shape; 2-3: find the asked one).
        filler_words: filler words the warm-up puts before the answer (``task.FILLER_WORDS``: free,
            image-independent choices that do not change the reward; the more, the more GRPO's
            credit is diluted). 0 gives the task without them.
        hidden: model width (a multiple of 16); layers: language-model layers.
        heatmap_samples: sample responses shown in ``heatmaps.html``.
        threads: torch intra-op threads on the CPU during the run (restored afterwards). 1 is as
            fast for these tiny matrices, immune to oversubscription (with 2 OpenMP threads on 2
            busy cores a step was measured 40x slower) and part of what makes a run reproducible:
            the thread count changes float summation order.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show tqdm progress bars.

    Raises:
        SpecError: a bad value (the message names the field and the accepted range).

    Examples:
        >>> cfg = DemoConfig(presets="grpo,vppo", seeds=2)
        >>> cfg.presets, cfg.prompts_per_step * cfg.group_size, cfg.response_limit
        (('grpo', 'vppo'), 128, 22)
        >>> [f.name for f in attrs.fields(DemoConfig) if "help" in f.metadata]  # doctest: +NORMALIZE_WHITESPACE
        ['presets', 'seeds', 'steps', 'lr', 'threshold', 'shapes', 'filler_words', 'hidden', 'layers', 'device',
         'progress']
        >>> DemoConfig(minibatches=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        rlcredit.errors.SpecError: DemoConfig.minibatches (3) must divide prompts_per_step (16): ...
    """

    presets: tuple[str, ...] = attrs.field(
        default=DEFAULT_PRESETS, converter=_to_presets, validator=_check_presets,
        metadata=_help("comma-separated preset names or strategy spec files (.json, .yaml, .yml, .toml; "
                       "labelled by file stem)"))
    seeds: int = attrs.field(default=5, validator=_positive_int, metadata=_help("number of seeds, 0..N-1"))
    steps: int = attrs.field(default=50, validator=_positive_int, metadata=_help("RL steps per run"))
    prompts_per_step: int = attrs.field(default=16, validator=_positive_int)
    group_size: int = attrs.field(default=8, validator=_positive_int)
    minibatches: int = attrs.field(default=2, validator=_positive_int)
    lr: float = attrs.field(default=2e-3, validator=_positive_float,
                            metadata=_help("AdamW learning rate of the RL updates"))
    lr_warmup: int = attrs.field(default=10, validator=_nonneg_int)
    warmup_steps: int = attrs.field(default=60, validator=_nonneg_int)
    warmup_lr: float = attrs.field(default=5e-3, validator=_positive_float)
    max_new_tokens: int | None = attrs.field(default=None, validator=_optional_positive_int)
    temperature: float = attrs.field(default=1.0, validator=_positive_float)
    eval_prompts: int = attrs.field(default=128, validator=_positive_int)
    eval_every: int = attrs.field(default=10, validator=_positive_int)
    threshold: float = attrs.field(default=0.5, validator=_accuracy,
                                   metadata=_help("held-out accuracy for 'steps to threshold', in (0, 1]"))
    shapes: int = attrs.field(default=1, validator=_shape_count,
                              metadata=_help("shapes per picture, 1-3 (2-3 make the model find the asked shape)"))
    filler_words: int = attrs.field(default=4, validator=_nonneg_int,
                                    metadata=_help("image-independent filler words before the answer (free "
                                                   "choices that do not change the reward)"))
    hidden: int = attrs.field(default=64, validator=_width, metadata=_help("model width, a multiple of 16"))
    layers: int = attrs.field(default=2, validator=_positive_int, metadata=_help("language-model layers"))
    heatmap_samples: int = attrs.field(default=4, validator=_nonneg_int)
    threads: int = attrs.field(default=1, validator=_positive_int)
    device: str = attrs.field(default="auto", validator=_device,
                              metadata=_help("auto (CUDA when available), cpu, cuda or cuda:N"))
    progress: bool = attrs.field(default=True, validator=is_bool,
                                 metadata=_help("progress bars"))

    def __attrs_post_init__(self) -> None:
        if self.prompts_per_step % self.minibatches:
            raise SpecError(
                f"DemoConfig.minibatches ({self.minibatches}) must divide prompts_per_step ({self.prompts_per_step}): "
                f"mini-batches hold whole groups."
            )
        need = T.longest_response(self.filler_words)
        if self.max_new_tokens is not None and self.max_new_tokens < need:
            raise SpecError(
                f"DemoConfig.max_new_tokens ({self.max_new_tokens}) is shorter than the longest well-formed response "
                f"with {self.filler_words} filler word(s) ({need} tokens); raise it or leave it None."
            )

    @property
    def response_limit(self) -> int:
        """``max_new_tokens``, or, when it is None, the longest well-formed response with twice the
        warm-up's filler words (the filler's length is free: the limit leaves it room to drift)."""
        return self.max_new_tokens if self.max_new_tokens is not None else T.longest_response(2 * self.filler_words)

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """The ``--quick`` setting: ``QUICK`` (1 seed, 4 steps of 4 prompts x 4 samples, a 60-step
        warm-up, 16 held-out prompts every 2 steps, 2 heatmap samples), then ``overrides``.

        Examples:
            >>> cfg = DemoConfig.quick(seeds=2)
            >>> cfg.seeds, cfg.steps, cfg.group_size
            (2, 4, 4)
        """
        return cls(**{**QUICK, **overrides})

    def to_dict(self) -> dict[str, Any]:
        d = attrs.asdict(self)
        d["presets"] = list(self.presets)
        return d
