"""The demo's RL loop: GRPO-style group sampling with ``generate``, credit from a ``rlcredit.Strategy``.

One run = one preset and one seed, starting from the seed's format warm-up (shared by all presets
of that seed, so every preset starts from the same weights and sees the same prompts):

1. sample ``group_size`` responses to each of ``prompts_per_step`` prompts with ``model.generate``
   (temperature 1, no top-k/top-p; placeholder tokens suppressed) and score them with the 0/1 reward;
2. one no-grad pass of ``rlcredit.HFPolicy`` gives the behaviour log-probs and entropies
   (``old_logprobs``, ``signals["entropy"]``);
3. ``strategy.assign(rollout, policy)`` computes scores, token weights and advantages (VPPO's
   perturbed forward and AT-RL's attention capture run here, through the same policy);
   at step 1 and every ``eval_every`` steps, ``measure`` records the mechanism evidence on this
   batch (the gradient variance against GRPO's credit, the dependency distribution; the pass of
   step 2 also returns the hidden states it needs);
4. ``minibatches`` AdamW updates on consecutive groups, each ``strategy.loss`` on
   ``rollout.select(rows)`` and ``credit.select(rows)`` (the second one is off-policy, so clipping
   matters, as in verl/TRL with ``ppo_epochs=1`` and several mini-batches).

Every ``eval_every`` steps the policy answers a fixed held-out set (one sampled response per prompt).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import attrs
import torch
from torch import Tensor

import rlcredit
from rlcredit import functional as F
from rlcredit_mm.demo import evidence as E
from rlcredit_mm.demo import model as M
from rlcredit_mm.demo import task as T
from rlcredit_mm.demo.config import DEFAULT_PRESETS, QUICK, DemoConfig

__all__ = ["DEFAULT_PRESETS", "QUICK", "DemoConfig", "Sampled", "sample", "evaluate", "run_preset", "scale_spread",
           "warm_start", "answer_mask", "measure"]

EVAL_SEED = 1_000_003  # the held-out set is the same for every preset and seed


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
    finished, responses = sampled.finished.tolist(), sampled.responses.cpu()  # one copy from the device
    values = [T.reward(examples[i // repeat], kit.words(responses[i]), finished[i])
              for i in range(responses.shape[0])]
    return torch.tensor(values, dtype=torch.float32)


def evaluate(model: Any, kit: M.ModelKit, examples: Sequence[T.Example], max_new_tokens: int, *,
             temperature: float = 1.0, seed: int = EVAL_SEED) -> float:
    """Held-out accuracy: the mean reward of one response sampled for each of ``examples``.

    Sampled at the training temperature, as the rollouts are (greedy decoding is no measure of
    this policy: among equally likely filler words it may repeat one until the length limit).
    The draws come from a generator seeded with ``seed`` inside ``torch.random.fork_rng``: every
    evaluation uses the same random numbers (a paired comparison across steps and presets) and
    leaves the training's random stream untouched.

    Examples:
        >>> kit = M.ModelKit()
        >>> model = M.build_model(kit.tokenizer, hidden=32).eval()
        >>> evaluate(model, kit, T.make_examples(4, seed=0), max_new_tokens=3)  # untrained: no format yet
        0.0
    """
    device = next(model.parameters()).device
    prompt = M.to_device(M.encode_prompts(kit, examples), device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        sampled = sample(model, kit, prompt, max_new_tokens=max_new_tokens, temperature=temperature)
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


def warm_start(kit: M.ModelKit, cfg: DemoConfig, seed: int, progress: Any = None, *,
               device: torch.device | None = None) -> tuple[dict[str, Tensor], list[float]]:
    """The seed's randomly initialised model after the format warm-up: ``(state_dict, losses)``.

    The weights are drawn on the CPU (the same initial model on every device), then trained on
    ``device`` (default: the CPU).

    Examples:
        >>> state, losses = warm_start(M.ModelKit(), DemoConfig(warmup_steps=2, hidden=32), seed=0)
        >>> len(losses), "lm_head.weight" in state
        (2, True)
    """
    model = M.build_model(kit.tokenizer, seed=seed, hidden=cfg.hidden, layers=cfg.layers).to(device or "cpu")
    losses = M.warmup(model, kit, steps=cfg.warmup_steps, lr=cfg.warmup_lr, seed=seed, shapes=cfg.shapes,
                      filler_words=cfg.filler_words, progress=progress)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, losses


def answer_mask(kit: M.ModelKit, responses: Tensor, mask: Tensor) -> Tensor:
    """``[N, T]`` bool: the response tokens that are colour words (the answer slot of a well-formed response).

    Examples:
        >>> kit = M.ModelKit()
        >>> ids = torch.tensor([[kit.colour_ids["red"], kit.eos_id, kit.pad_id]])
        >>> answer_mask(kit, ids, torch.tensor([[True, True, False]])).tolist()
        [[True, False, False]]
    """
    colours = torch.tensor(sorted(kit.colour_ids.values()), device=responses.device)
    return torch.isin(responses, colours) & mask


def measure(policy: rlcredit.HFPolicy, kit: M.ModelKit, rollout: rlcredit.Rollout, credit: rlcredit.Credit,
            responses: Tensor, hidden: Tensor, cfg: DemoConfig) -> tuple[dict[str, float] | None, dict[str, Any]]:
    """The mechanism evidence on one rollout batch (``rlcredit_mm.demo.evidence``).

    Returns:
        ``(variance, dependency)``: ``evidence.variance_evidence`` of ``credit`` against GRPO's
        credit on the same rollout (None without signal), and ``evidence.dependency_stats`` of the
        exact visual KL for each of ``evidence.DEPENDENCY_PERTURBATIONS``.
    """
    from rlcredit_mm.visual_kl import VisualKL

    mask = rollout.response_mask
    answers = answer_mask(kit, responses, mask)
    diff, u = E.lm_head_terms(policy, hidden, responses, mask, temperature=cfg.temperature)
    baseline = rlcredit.build(E.BASELINE).assign(rollout)  # GRPO's credit on the same rollout
    variance = E.variance_evidence(credit, baseline, rollout, diff, u, answers)
    dependency = {}
    for name, perturbation in E.DEPENDENCY_PERTURBATIONS.items():
        kl = VisualKL(estimate="exact", perturbation=perturbation, temperature=cfg.temperature)(rollout, policy)
        dependency[name] = E.dependency_stats(kl, mask, answers)
    return variance, dependency


def run_preset(preset: str, seed: int, kit: M.ModelKit, warm_state: dict[str, Tensor], cfg: DemoConfig,
               progress: Any = None, *, label: str | None = None,
               device: torch.device | None = None) -> tuple[dict[str, Any], Any]:
    """Train one preset from the warm state for ``cfg.steps`` steps on ``device`` (default: the CPU).

    Args:
        preset: a preset name or a strategy spec file (``rlcredit.build(preset)``).
        seed: the run's seed (prompts, sampling); kit: the tokenizer and image processor.
        warm_state: the seed's warm-up weights (``warm_start``); cfg: the run's settings.
        progress: a tqdm bar advanced once per step, or None.
        label: the name of the run in the record (default: ``preset``).

    Returns:
        ``(record, model)``: the per-step record (train reward, kept share, scale spread, step
        time, response length), the held-out curve, the measurements (``measure_steps``,
        ``grad_variance``, ``dependency``), and the trained model.

    Examples:
        >>> kit = M.ModelKit()
        >>> cfg = DemoConfig.quick(steps=2, eval_every=1, eval_prompts=4, warmup_steps=2, hidden=32)
        >>> state, _ = warm_start(kit, cfg, seed=0)
        >>> record, model = run_preset("vppo", 0, kit, state, cfg)
        >>> record["eval_steps"], record["measure_steps"], len(record["train_reward"]), 0 < record["kept_share"][0] < 1
        ([0, 1, 2], [1, 2], 2, True)
    """
    device = device or torch.device("cpu")
    strategy = rlcredit.build(preset)
    model = M.build_model(kit.tokenizer, seed=seed, hidden=cfg.hidden, layers=cfg.layers).to(device)
    model.load_state_dict(warm_state)
    model.eval()
    policy = rlcredit.HFPolicy(model, rows_per_chunk=64, tokens_per_chunk=1024)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    ramp = max(1, cfg.lr_warmup * cfg.minibatches)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / ramp))
    rng = random.Random(seed)  # same prompts for every preset of this seed: a paired comparison
    torch.manual_seed(seed)
    eval_set = T.make_examples(cfg.eval_prompts, EVAL_SEED, cfg.shapes)
    P, G, limit = cfg.prompts_per_step, cfg.group_size, cfg.response_limit
    group_ids = torch.arange(P, device=device).repeat_interleave(G)
    per_mb = P * G // cfg.minibatches
    record: dict[str, list] = {k: [] for k in ("train_reward", "kept_share", "scale_std", "step_time_s", "step_cpu_s",
                                               "response_length", "clip_fraction", "measure_steps", "grad_variance",
                                               "dependency")}
    eval_steps, eval_acc = [0], [evaluate(model, kit, eval_set, limit, temperature=cfg.temperature)]
    for step in range(1, cfg.steps + 1):
        start, cpu = time.perf_counter(), time.process_time()
        measuring = step == 1 or step % cfg.eval_every == 0 or step == cfg.steps
        examples = T.make_examples(P, rng.randrange(2**31), cfg.shapes)
        prompt = M.to_device(M.encode_prompts(kit, examples, repeat=G), device)
        sampled = sample(model, kit, prompt, max_new_tokens=limit, temperature=cfg.temperature)
        rewards = rewards_of(kit, examples, sampled, G).to(device)
        inputs = M.join_responses(prompt, sampled.responses, sampled.mask)
        stats = policy.response_stats(inputs, sampled.mask, temperature=cfg.temperature, entropy=True,
                                      hidden=measuring)
        rollout = rlcredit.Rollout(sampled.mask, rewards, group_ids, old_logprobs=stats.logprobs,
                                   signals={"entropy": stats.entropy}, model_inputs=inputs)
        credit = strategy.assign(rollout, policy)
        if measuring:
            variance, dependency = measure(policy, kit, rollout, credit, sampled.responses, stats.hidden, cfg)
            record["measure_steps"].append(step)
            record["grad_variance"].append(variance)
            record["dependency"].append(dependency)
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
        record["train_reward"].append(float(rewards.mean()))
        record["kept_share"].append(float(credit.metrics["kept_fraction"]))
        record["scale_std"].append(float(scale_spread(credit, rollout)))
        record["response_length"].append(float(sampled.mask.sum(1).float().mean()))
        record["clip_fraction"].append(float(torch.stack(clip).mean()))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            eval_steps.append(step)
            eval_acc.append(evaluate(model, kit, eval_set, limit, temperature=cfg.temperature))
        record["step_time_s"].append(time.perf_counter() - start)
        record["step_cpu_s"].append(time.process_time() - cpu)
        if progress is not None:
            progress.set_postfix_str(f"{label or preset} seed {seed} acc {eval_acc[-1]:.2f}", refresh=False)
            progress.update(1)
    reached = next((s for s, a in zip(eval_steps, eval_acc) if a >= cfg.threshold), None)
    return {"preset": label or preset, "seed": seed, **record, "eval_steps": eval_steps, "eval_accuracy": eval_acc,
            "final_accuracy": eval_acc[-1], "steps_to_threshold": reached}, model
