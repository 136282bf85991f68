"""The demo's RL loop: GRPO-style group sampling with ``generate``, credit from a ``rlcredit.Strategy``.

One run = one preset and one seed, starting from the seed's format warm-up (shared by all presets
of that seed, so every preset starts from the same weights and sees the same prompts):

1. sample ``group_size`` responses to each of ``prompts_per_step`` prompts with ``model.generate``
   (temperature 1, no top-k/top-p; placeholder tokens suppressed) and score them with the 0/1 reward;
2. one no-grad pass of ``rlcredit.HFPolicy`` gives the behaviour log-probs and entropies
   (``old_logprobs``, ``signals["entropy"]``);
3. ``strategy.assign(rollout, policy)`` computes scores, token weights and advantages (VPPO's
   perturbed forward and AT-RL's attention capture run here, through the same policy);
4. ``minibatches`` AdamW updates on consecutive groups, each ``strategy.loss`` on
   ``rollout.select(rows)`` and ``credit.select(rows)`` (the second one is off-policy, so clipping
   matters, as in verl/TRL with ``ppo_epochs=1`` and several mini-batches).

Every ``eval_every`` steps the greedy policy answers a fixed held-out set.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

import rlcredit
from rlcredit import functional as F
from rlcredit.errors import SpecError
from rlcredit.validators import is_bool
from rlcredit_mm.demo import model as M
from rlcredit_mm.demo import task as T

__all__ = ["DEFAULT_PRESETS", "QUICK", "DemoConfig", "Sampled", "sample", "evaluate", "run_preset", "scale_spread",
           "warm_start"]

DEFAULT_PRESETS: tuple[str, ...] = ("grpo", "dapo", "entropy_forks", "vppo", "at_rl")
EVAL_SEED = 1_000_003  # the held-out set is the same for every preset and seed


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
        max_new_tokens: response length limit (a response cut there earns 0).
        temperature: sampling temperature (also used for the log-probs).
        eval_prompts: held-out prompts answered greedily every ``eval_every`` steps.
        threshold: held-out accuracy whose first crossing is reported as "steps to threshold".
        shapes: shapes per picture (1: read the colour of the only shape; 2-3: find the asked one).
        hidden: model width (a multiple of 16).
        heatmap_samples: sample responses shown in ``heatmaps.html``.
        threads: torch intra-op threads during the run (restored afterwards). 1 is as fast for
            these tiny matrices and immune to oversubscription: with 2 OpenMP threads on 2 busy
            cores a step was measured 40x slower.
        progress: show tqdm progress bars.

    Raises:
        SpecError: a bad value (the message names the field and the accepted range).

    Examples:
        >>> cfg = DemoConfig(presets="grpo,vppo", seeds=2)
        >>> cfg.presets, cfg.prompts_per_step * cfg.group_size
        (('grpo', 'vppo'), 64)
        >>> [f.name for f in attrs.fields(DemoConfig) if "help" in f.metadata]
        ['presets', 'seeds', 'steps', 'lr', 'threshold', 'shapes', 'progress']
        >>> DemoConfig(minibatches=3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        rlcredit.errors.SpecError: DemoConfig.minibatches (3) must divide prompts_per_step (8): ...
    """

    presets: tuple[str, ...] = attrs.field(
        default=DEFAULT_PRESETS, converter=_to_presets, validator=_check_presets,
        metadata=_help("comma-separated preset names or strategy spec files (.json, .yaml, .yml, .toml; "
                       "labelled by file stem)"))
    seeds: int = attrs.field(default=3, validator=_positive_int, metadata=_help("number of seeds, 0..N-1"))
    steps: int = attrs.field(default=100, validator=_positive_int, metadata=_help("RL steps per run"))
    prompts_per_step: int = attrs.field(default=8, validator=_positive_int)
    group_size: int = attrs.field(default=8, validator=_positive_int)
    minibatches: int = attrs.field(default=2, validator=_positive_int)
    lr: float = attrs.field(default=1e-3, validator=_positive_float,
                            metadata=_help("AdamW learning rate of the RL updates"))
    lr_warmup: int = attrs.field(default=10, validator=_nonneg_int)
    warmup_steps: int = attrs.field(default=120, validator=_nonneg_int)
    warmup_lr: float = attrs.field(default=5e-3, validator=_positive_float)
    max_new_tokens: int = attrs.field(default=16, validator=_positive_int)
    temperature: float = attrs.field(default=1.0, validator=_positive_float)
    eval_prompts: int = attrs.field(default=64, validator=_positive_int)
    eval_every: int = attrs.field(default=10, validator=_positive_int)
    threshold: float = attrs.field(default=0.6, validator=_accuracy,
                                   metadata=_help("held-out accuracy for 'steps to threshold', in (0, 1]"))
    shapes: int = attrs.field(default=1, validator=_shape_count,
                              metadata=_help("shapes per picture, 1-3 (2-3 make the model find the asked shape)"))
    hidden: int = attrs.field(default=64, validator=_width)
    heatmap_samples: int = attrs.field(default=4, validator=_nonneg_int)
    threads: int = attrs.field(default=1, validator=_positive_int)
    progress: bool = attrs.field(default=True, validator=is_bool,
                                 metadata=_help("progress bars"))

    def __attrs_post_init__(self) -> None:
        if self.prompts_per_step % self.minibatches:
            raise SpecError(
                f"DemoConfig.minibatches ({self.minibatches}) must divide prompts_per_step ({self.prompts_per_step}): "
                f"mini-batches hold whole groups."
            )

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


@attrs.frozen
class Sampled:
    """Responses sampled for a batch of prompts.

    Attributes:
        responses: ``[N, T]`` token ids, right-padded with ``<pad>`` after ``<eos>``.
        mask: ``[N, T]`` bool, the response tokens (``<eos>`` included).
        finished: ``[N]`` bool, whether the response ended with ``<eos>``.
    """

    responses: Tensor
    mask: Tensor
    finished: Tensor


def _suppressed(kit: M.ModelKit) -> list[int]:
    tok = kit.tokenizer
    return [kit.pad_id] + [tok.convert_tokens_to_ids(t) for t in
                           (T.VISION_START, T.IMAGE_PAD, T.VISION_END, T.VIDEO_PAD)]


@torch.no_grad()
def sample(model: Any, kit: M.ModelKit, prompt: dict[str, Tensor], *, max_new_tokens: int,
           temperature: float = 1.0, greedy: bool = False) -> Sampled:
    """Responses from ``model.generate`` for the prompt inputs (``[N, P]``), cut after ``<eos>``.

    Sampling is ancestral at ``temperature`` (no top-k/top-p), from torch's global RNG; image and
    padding tokens are suppressed (the model's forward rejects placeholders it has no pixels for).

    Returns:
        ``Sampled`` with ``responses [N, T]``, ``mask [N, T]``, ``finished [N]``, ``T <= max_new_tokens``.

    Examples:
        >>> kit = M.ModelKit()
        >>> model = M.build_model(kit.tokenizer, hidden=32).eval()
        >>> out = sample(model, kit, M.encode_prompts(kit, T.make_examples(2, seed=0)), max_new_tokens=3)
        >>> out.responses.shape[1] <= 3, out.mask.dtype
        (True, torch.bool)
    """
    kwargs: dict[str, Any] = dict(do_sample=False) if greedy else dict(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(**prompt, max_new_tokens=max_new_tokens, suppress_tokens=_suppressed(kit),
                         pad_token_id=kit.pad_id, eos_token_id=kit.eos_id, **kwargs)
    responses = out[:, prompt["input_ids"].shape[1]:]
    is_eos = responses == kit.eos_id
    before = is_eos.long().cumsum(1) - is_eos.long()  # eos seen strictly before this position
    mask = before == 0
    responses = torch.where(mask, responses, torch.full_like(responses, kit.pad_id))
    return Sampled(responses=responses, mask=mask, finished=is_eos.any(1))


def rewards_of(kit: M.ModelKit, examples: Sequence[T.Example], sampled: Sampled, repeat: int) -> Tensor:
    """``[N]`` 0/1 rewards of responses to ``examples`` repeated ``repeat`` times each.

    Examples:
        >>> kit = M.ModelKit()
        >>> ex = T.make_example(0)
        >>> ids = kit.tokenizer(T.response_text(ex, ex.answer, 3))["input_ids"] + [kit.eos_id]
        >>> done = Sampled(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), torch.tensor([True]))
        >>> rewards_of(kit, [ex], done, 1)
        tensor([1.])
    """
    finished = sampled.finished.tolist()
    values = [T.reward(examples[i // repeat], kit.words(sampled.responses[i]), finished[i])
              for i in range(sampled.responses.shape[0])]
    return torch.tensor(values, dtype=torch.float32)


def evaluate(model: Any, kit: M.ModelKit, examples: Sequence[T.Example], max_new_tokens: int) -> float:
    """Greedy accuracy on ``examples`` (the fraction of rewards equal to 1).

    Examples:
        >>> kit = M.ModelKit()
        >>> model = M.build_model(kit.tokenizer, hidden=32).eval()
        >>> evaluate(model, kit, T.make_examples(4, seed=0), max_new_tokens=3)  # untrained: no format yet
        0.0
    """
    prompt = M.encode_prompts(kit, examples)
    sampled = sample(model, kit, prompt, max_new_tokens=max_new_tokens, greedy=True)
    return float(rewards_of(kit, examples, sampled, 1).mean())


def scale_spread(credit: rlcredit.Credit, rollout: rlcredit.Rollout) -> Tensor:
    """Std of each kept token's effective advantage scale ``w_{i,t} A_{i,t} / A_i^GRPO``.

    ``A^GRPO`` is the plain group-normalised advantage; rows where it is 0 (all-equal groups) are
    left out. 0 for GRPO/DAPO/entropy forks (binary masks, unscaled advantages), the spread of
    VPPO's ``alpha_i`` (TAS) and of AT-RL's anchor weights otherwise.

    Examples:
        >>> import rlcredit
        >>> r = rlcredit.Rollout(torch.ones(2, 2, dtype=torch.bool), torch.tensor([1.0, 0.0]), torch.tensor([0, 0]))
        >>> base = F.group_normalize(r.rewards, r.group_ids)
        >>> round(float(scale_spread(rlcredit.Credit({}, torch.ones(2, 2), base * torch.tensor([1.2, 0.8])), r)), 4)
        0.2
    """
    base = F.group_normalize(rollout.rewards, rollout.group_ids)
    adv = credit.advantages if credit.advantages.ndim == 2 else credit.advantages[:, None]
    w = credit.token_weights
    usable = rollout.response_mask & (w > 0) & (base.abs() > 1e-6)[:, None]
    ratio = (w * adv / torch.where(base.abs() > 1e-6, base, torch.ones_like(base))[:, None])[usable]
    return ratio.std(unbiased=False) if ratio.numel() > 1 else torch.zeros(())


def warm_start(kit: M.ModelKit, cfg: DemoConfig, seed: int, progress: Any = None) -> tuple[dict[str, Tensor], list[float]]:
    """The seed's randomly initialised model after the format warm-up: ``(state_dict, losses)``.

    Examples:
        >>> state, losses = warm_start(M.ModelKit(), DemoConfig(warmup_steps=2, hidden=32), seed=0)
        >>> len(losses), "lm_head.weight" in state
        (2, True)
    """
    model = M.build_model(kit.tokenizer, seed=seed, hidden=cfg.hidden)
    losses = M.warmup(model, kit, steps=cfg.warmup_steps, lr=cfg.warmup_lr, seed=seed, shapes=cfg.shapes,
                      progress=progress)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def run_preset(preset: str, seed: int, kit: M.ModelKit, warm_state: dict[str, Tensor], cfg: DemoConfig,
               progress: Any = None, *, label: str | None = None) -> tuple[dict[str, Any], Any]:
    """Train one preset from the warm state for ``cfg.steps`` steps.

    Args:
        preset: a preset name or a strategy spec file (``rlcredit.build(preset)``).
        seed: the run's seed (prompts, sampling); kit: the tokenizer and image processor.
        warm_state: the seed's warm-up weights (``warm_start``); cfg: the run's settings.
        progress: a tqdm bar advanced once per step, or None.
        label: the name of the run in the record (default: ``preset``).

    Returns:
        ``(record, model)``: the per-step record (train reward, kept share, scale spread, step
        time, response length) and the held-out curve, and the trained model.

    Examples:
        >>> kit = M.ModelKit()
        >>> cfg = DemoConfig.quick(steps=2, eval_every=1, eval_prompts=4, warmup_steps=2, hidden=32)
        >>> state, _ = warm_start(kit, cfg, seed=0)
        >>> record, model = run_preset("vppo", 0, kit, state, cfg)
        >>> record["eval_steps"], len(record["train_reward"]), 0 < record["kept_share"][0] < 1
        ([0, 1, 2], 2, True)
    """
    strategy = rlcredit.build(preset)
    model = M.build_model(kit.tokenizer, seed=seed, hidden=cfg.hidden)
    model.load_state_dict(warm_state)
    model.eval()
    policy = rlcredit.HFPolicy(model, rows_per_chunk=64, tokens_per_chunk=1024)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ramp = max(1, cfg.lr_warmup * cfg.minibatches)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / ramp))
    rng = random.Random(seed)  # same prompts for every preset of this seed: a paired comparison
    torch.manual_seed(seed)
    eval_set = T.make_examples(cfg.eval_prompts, EVAL_SEED, cfg.shapes)
    P, G = cfg.prompts_per_step, cfg.group_size
    group_ids = torch.arange(P).repeat_interleave(G)
    per_mb = P * G // cfg.minibatches
    record: dict[str, list] = {k: [] for k in ("train_reward", "kept_share", "scale_std", "step_time_s",
                                               "response_length", "clip_fraction")}
    eval_steps, eval_acc = [0], [evaluate(model, kit, eval_set, cfg.max_new_tokens)]
    for step in range(1, cfg.steps + 1):
        start = time.perf_counter()
        examples = T.make_examples(P, rng.randrange(2**31), cfg.shapes)
        prompt = M.encode_prompts(kit, examples, repeat=G)
        sampled = sample(model, kit, prompt, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)
        rewards = rewards_of(kit, examples, sampled, G)
        inputs = M.join_responses(prompt, sampled.responses, sampled.mask)
        stats = policy.response_stats(inputs, sampled.mask, temperature=cfg.temperature, entropy=True)
        rollout = rlcredit.Rollout(sampled.mask, rewards, group_ids, old_logprobs=stats.logprobs,
                                   signals={"entropy": stats.entropy}, model_inputs=inputs)
        credit = strategy.assign(rollout, policy)
        model.train()
        clip = []
        for mb in range(cfg.minibatches):
            rows = slice(mb * per_mb, (mb + 1) * per_mb)
            logprobs = policy.logprobs(policy.slice_rows(inputs, rows), sampled.mask[rows],
                                       temperature=cfg.temperature)
            out = strategy.loss(logprobs, rollout.select(rows), credit.select(rows))
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            clip.append(out.metrics["clip_fraction"])
        model.eval()
        record["step_time_s"].append(time.perf_counter() - start)
        record["train_reward"].append(float(rewards.mean()))
        record["kept_share"].append(float(credit.metrics["kept_fraction"]))
        record["scale_std"].append(float(scale_spread(credit, rollout)))
        record["response_length"].append(float(sampled.mask.sum(1).float().mean()))
        record["clip_fraction"].append(float(torch.stack(clip).mean()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            eval_steps.append(step)
            eval_acc.append(evaluate(model, kit, eval_set, cfg.max_new_tokens))
        if progress is not None:
            progress.set_postfix_str(f"{label or preset} seed {seed} acc {eval_acc[-1]:.2f}", refresh=False)
            progress.update(1)
    reached = next((s for s, a in zip(eval_steps, eval_acc) if a >= cfg.threshold), None)
    return {"preset": label or preset, "seed": seed, **record, "eval_steps": eval_steps, "eval_accuracy": eval_acc,
            "final_accuracy": eval_acc[-1], "steps_to_threshold": reached}, model
