"""``rlcredit demo``: the task, the format-only warm-up, the RL loop's pieces, the report, and the
quick run through the console script (reproducible, every preset). The command's flags and errors:
``test_demo_cli.py``; the mechanism evidence: ``test_demo_evidence.py``."""

from __future__ import annotations

import io
import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlcredit
from rlcredit_mm.cli import main as cli_main
from rlcredit_mm.demo import model as M
from rlcredit_mm.demo import report as R
from rlcredit_mm.demo import task as T
from rlcredit_mm.demo import train as TR
from rlcredit_mm.demo.run import run_demo


# --------------------------------------------------------------------------------------------
# The task


def test_reward_hand_cases():
    ex = T.Example(shapes=(("square", "red", 0),), asked="square", answer="red", seed=0)
    good = "first i find the square . the answer is red .".split()
    assert T.reward(ex, good) == 1.0
    assert T.reward(ex, ["hmm", "so", "hmm", "thus", *good]) == 1.0  # any filler words first
    assert T.reward(ex, ["hmm", *good[:5], "so", *good[5:]]) == 0.0  # ... only first
    assert T.reward(ex, ["hmm", "so", *good[5:]]) == 0.0  # a filler phrase is still needed
    assert T.reward(ex, good, finished=False) == 0.0  # cut at the length limit
    assert T.reward(ex, "ok . the answer is blue .".split()) == 0.0  # wrong colour
    assert T.reward(ex, "ok ok . the answer is red .".split()) == 0.0  # not one of the fillers
    assert T.reward(ex, "ok . the answer is red . red".split()) == 0.0  # trailing words
    assert T.reward(ex, "the answer is red".split()) == 0.0  # no final "."
    assert T.reward(ex, []) == 0.0


def test_the_answer_is_only_in_the_picture():
    examples = T.make_examples(200, seed=3)
    # Equal prompts with different answers exist: the text alone cannot determine the answer.
    by_prompt: dict[str, set[str]] = {}
    for ex in examples:
        by_prompt.setdefault(T.prompt_text(ex, 4), set()).add(ex.answer)
        assert ex.answer not in T.prompt_text(ex, 4).split()
    assert max(len(v) for v in by_prompt.values()) == len(T.COLOURS)
    # ... and the picture shows the answer's colour, and no other colour, with one shape.
    for ex in examples[:20]:
        img = T.render(ex)
        pixels = torch.tensor(list(img.tobytes()), dtype=torch.float32).view(-1, 3)  # [H*W, 3]
        for name, rgb in T.COLOURS.items():
            near = ((pixels - torch.tensor(rgb, dtype=torch.float32)).abs().max(-1).values <= 15).sum()
            assert (int(near) > 200) == (name == ex.answer), (name, ex.answer, int(near))


def test_render_is_deterministic_and_several_shapes_get_distinct_cells():
    ex = T.make_example(11, n_shapes=3)
    assert T.render(ex).tobytes() == T.render(ex).tobytes()
    assert len({c for _, c, _ in ex.shapes}) == 3 and len({w for _, _, w in ex.shapes}) == 3
    with pytest.raises(ValueError, match=r"n_shapes must be in \[1, 3\]"):
        T.make_example(0, n_shapes=4)


def test_tokenizer_is_word_level_and_offline():
    tok = T.build_tokenizer()
    ids = tok("what colour is the square?", add_special_tokens=False)["input_ids"]
    assert [T.vocabulary()[i] for i in ids] == ["what", "colour", "is", "the", "square", "?"]
    assert tok.convert_ids_to_tokens(tok("zebra", add_special_tokens=False)["input_ids"]) == ["<unk>"]


# --------------------------------------------------------------------------------------------
# Model inputs and the format-only warm-up


@pytest.fixture(scope="module")
def kit():
    return M.ModelKit()


def test_prompts_repeat_rows_and_mark_image_tokens(kit):
    examples = T.make_examples(3, seed=0)
    inputs = M.encode_prompts(kit, examples, repeat=2)
    ids = inputs["input_ids"]
    assert ids.shape[0] == 6 and torch.equal(ids[0], ids[1])
    assert torch.equal(inputs["mm_token_type_ids"], (ids == kit.image_id).long())
    assert (inputs["mm_token_type_ids"].sum(1) == M.tokens_per_image(56)).all()
    per = int(inputs["image_grid_thw"][0].prod())
    px = inputs["pixel_values"].view(6, per, -1)
    assert torch.equal(px[0], px[1]) and not torch.equal(px[1], px[2])


def test_format_batch_has_the_filler_words_and_the_colour_slot(kit):
    import random

    inputs, mask, slot = M.format_batch(kit, T.make_examples(6, seed=1), random.Random(0), filler_words=5)
    responses = inputs["input_ids"][:, -mask.shape[1]:]
    for i in range(6):
        words = kit.words(responses[i])
        assert all(w in T.FILLER_WORDS for w in words[:5]) and words[5] not in T.FILLER_WORDS
        assert T.parse_answer(words) in T.COLOURS and words[-2] == kit.vocab[int(responses[i][slot[i]])]
        assert int(mask[i].sum()) == len(words) + 1  # + <eos>
    assert int(mask.sum(1).max()) <= T.longest_response(5)


def test_format_loss_never_looks_at_the_answer(kit):
    """The warm-up is format-only: its loss is the same whichever colour sits in the slot."""
    g = torch.Generator().manual_seed(0)
    V = len(kit.tokenizer)
    logits = torch.randn(2, 4, V, generator=g)
    targets = torch.randint(0, V, (2, 4), generator=g)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    slot = torch.zeros(2, 4, dtype=torch.bool)
    slot[0, 1] = slot[1, 2] = True
    colours = torch.tensor(sorted(kit.colour_ids.values()))
    loss = M.format_loss(logits, targets, mask, slot, colours)
    other = targets.clone()
    other[0, 1], other[1, 2] = colours[0], colours[3]
    assert torch.equal(loss, M.format_loss(logits, other, mask, slot, colours))
    # Hand computation: mean over the 5 text tokens' CE and the 2 slots' -mean_c log p(c).
    logp = logits.log_softmax(-1)
    terms = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(4) if mask[b, t] and not slot[b, t]]
    terms += [-logp[0, 1, colours].mean(), -logp[1, 2, colours].mean()]
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-6)


# --------------------------------------------------------------------------------------------
# The RL loop's pieces


class _FakeGenerate:
    def __init__(self, out):
        self.out = out

    def generate(self, **kwargs):
        return self.out


def test_sample_cuts_after_the_first_eos(kit):
    E, P = kit.eos_id, kit.pad_id
    prompt = {"input_ids": torch.tensor([[7, 7], [7, 7], [7, 7]])}
    out = torch.tensor([[7, 7, 20, E, P, P], [7, 7, 21, 22, 23, 24], [7, 7, E, 25, E, P]])
    s = TR.sample(_FakeGenerate(out), kit, prompt, max_new_tokens=4)
    assert s.mask.tolist() == [[True, True, False, False], [True, True, True, True], [True, False, False, False]]
    assert s.finished.tolist() == [True, False, True]
    assert s.responses.tolist() == [[20, E, P, P], [21, 22, 23, 24], [E, P, P, P]]


def test_scale_spread_hand_cases():
    mask = torch.ones(4, 3, dtype=torch.bool)
    rollout = rlcredit.Rollout(mask, torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    base = rlcredit.functional.group_normalize(rollout.rewards, rollout.group_ids)
    grpo = rlcredit.Credit({}, torch.ones(4, 3), base)
    assert float(TR.scale_spread(grpo, rollout)) == 0.0
    # VPPO-like: alpha = (1.2, 0.8) on the two rows of group 0 (group 1 is all-equal: left out).
    shaped = rlcredit.Credit({}, torch.ones(4, 3), base * torch.tensor([1.2, 0.8, 5.0, 5.0]))
    assert math.isclose(float(TR.scale_spread(shaped, rollout)), 0.2, rel_tol=1e-5)
    # AT-RL-like weights 1.5 / 1.0 on kept tokens; zero-weight tokens are not counted.
    w = torch.tensor([[1.5, 1.0, 0.0], [1.0, 1.0, 1.5], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    kept = torch.tensor([1.5, 1.0, 1.0, 1.0, 1.5])
    assert math.isclose(float(TR.scale_spread(rlcredit.Credit({}, w, base), rollout)),
                        float(kept.std(unbiased=False)), rel_tol=1e-5)


def test_config_validation_messages():
    with pytest.raises(rlcredit.SpecError, match=r"max_new_tokens \(16\) is shorter than the longest well-formed "
                                                 r"response with 4 filler word\(s\) \(18 tokens\)"):
        TR.DemoConfig(max_new_tokens=16)
    assert TR.DemoConfig(filler_words=0).response_limit == 14 and TR.DemoConfig(max_new_tokens=40).response_limit == 40
    assert TR.DemoConfig(filler_words=4).response_limit == T.longest_response(8) == 22
    with pytest.raises(rlcredit.SpecError, match="device must be one of auto, cpu, cuda or cuda:N, got 'gpu'"):
        TR.DemoConfig(device="gpu")
    with pytest.raises(rlcredit.SpecError, match="must divide prompts_per_step"):
        TR.DemoConfig(prompts_per_step=5, minibatches=2)
    with pytest.raises(rlcredit.SpecError, match=r"shapes must be in \[1, 3\]"):
        TR.DemoConfig(shapes=4)
    with pytest.raises(rlcredit.SpecError, match="seeds must be a positive integer"):
        TR.DemoConfig(seeds=0)
    with pytest.raises(rlcredit.SpecError, match="lists a preset twice"):
        TR.DemoConfig(presets="grpo,grpo")


# --------------------------------------------------------------------------------------------
# Report


def test_interval_is_the_student_t_interval():
    r = R.interval([0.2, 0.4, 0.9])
    mean, sd = 0.5, math.sqrt(((0.3) ** 2 + 0.1 ** 2 + 0.4 ** 2) / 2)
    assert math.isclose(r["mean"], mean) and math.isclose(r["high"] - mean, 4.303 * sd / math.sqrt(3))
    assert R.interval([0.3])["low"] is None


def _summary(accs: dict[str, list[float]]) -> dict:
    records = []
    for preset, values in accs.items():
        for seed, a in enumerate(values):
            records.append({"preset": preset, "seed": seed, "final_accuracy": a, "eval_accuracy": [0.25, a],
                            "eval_steps": [0, 10], "steps_to_threshold": 10 if a >= 0.6 else None,
                            "kept_share": [1.0], "scale_std": [0.0], "step_time_s": [0.1], "train_reward": [a]})
    return R.summarize(records, list(accs))


def test_verdict_says_so_when_vppo_does_not_beat_grpo():
    lines = R.verdict(_summary({"grpo": [0.8, 0.82, 0.84], "vppo": [0.5, 0.52, 0.54], "dapo": [0.7, 0.9, 0.8]}))
    assert lines[0].startswith("vppo is worse than grpo on this task: final accuracy 0.52 vs 0.82")
    assert lines[1].startswith("dapo no clear difference from grpo") and lines[1].endswith("intervals overlap).")
    assert R.verdict(_summary({"grpo": [0.8], "vppo": [0.5]})) == [
        "1 seed: no intervals, so no comparison with grpo; run with --seeds 2 or more to compare."]
    table = R.results_table(_summary({"grpo": [0.8, 0.82, 0.84], "vppo": [0.5, 0.52, 0.54]}), threshold=0.6, steps=10)
    assert "| vppo | 0.52 [0.47, 0.57] | > 10 (0/3) |" in table
    assert "| grpo | 0.82 [0.77, 0.87] | 10 (3/3) |" in table


# --------------------------------------------------------------------------------------------
# The real thing: `rlcredit demo --quick` through the console script


def _console_script() -> list[str]:
    """The installed ``rlcredit`` script when it is this version's (``rlcredit_mm.cli``), else the module."""
    script = Path(sys.executable).parent / "rlcredit"
    if script.exists() and "rlcredit_mm.cli" in script.read_text(errors="replace"):
        return [str(script)]
    return [sys.executable, "-m", "rlcredit_mm.cli"]


ALL_PRESETS = ("grpo", "dapo", "entropy_forks", "vppo", "at_rl")  # the smoke run tries every kind of credit
UMASK = 0o027  # not the usual 022: the modes below must follow the umask, not be fixed


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*_console_script(), "demo", "--quick", "--no-progress", "--presets", ",".join(ALL_PRESETS),
                           "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300, preexec_fn=lambda: os.umask(UMASK))
    return proc, out


def test_quick_demo_writes_with_the_usual_permissions(quick_run):
    """Folders 0777 and files 0666 minus the umask, as mkdir and open make them (not mkdtemp's 0700)."""
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [out, out / "model"]
    files = [out / name for name in ("results.json", "results.md", "curves.png", "heatmaps.html", "sample.png")]
    files.append(out / "model" / "config.json")
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in folders + files} == {
        **{str(p): oct(0o777 & ~UMASK) for p in folders}, **{str(p): oct(0o666 & ~UMASK) for p in files}}


def test_same_arguments_give_the_same_numbers(quick_run, tmp_path):
    """Reproducible: a second ``--quick`` run (in this process) gives the console script's numbers
    exactly, timings aside (config, curves, measurements, summary, verdict)."""
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = json.loads((out / "results.json").read_text())
    run_demo(TR.DemoConfig.quick(progress=False, presets=ALL_PRESETS), tmp_path / "again", stream=io.StringIO())
    second = json.loads((tmp_path / "again" / "results.json").read_text())
    assert R.without_timings(first) == R.without_timings(second)
    assert first["runs"][0]["step_time_s"] and "wall_time_s" in first  # timings were there, and were left out
    assert R.evidence_table(first["summary"]) == R.evidence_table(second["summary"])


def test_quick_demo_runs_every_preset_and_writes_the_results(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| preset | final accuracy (95% CI) |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]) == list(ALL_PRESETS)
    cfg = TR.DemoConfig.quick()
    for preset, s in results["summary"].items():
        acc = s["final_accuracy"]
        assert 0.0 <= acc["mean"] <= 1.0 and acc["n"] == 1
        assert 0.0 < s["kept_share"] <= 1.0 and s["step_time_s"] > 0
    for run in results["runs"]:
        assert len(run["train_reward"]) == cfg.steps and run["eval_steps"][-1] == cfg.steps
        # held-out accuracy is a fraction of cfg.eval_prompts answers
        assert all(abs(a * cfg.eval_prompts - round(a * cfg.eval_prompts)) < 1e-6 for a in run["eval_accuracy"])
    s = results["summary"]
    # Binary masks keep their documented share; GRPO keeps everything with unscaled advantages.
    assert s["grpo"]["kept_share"] == 1.0 and s["grpo"]["scale_std"] == 0.0
    assert s["vppo"]["kept_share"] < 0.75 and s["entropy_forks"]["kept_share"] < 0.5
    # The mechanism evidence: GRPO's own credit is GRPO's (ratio 1); VPPO's prediction is k E_w[alpha^2].
    for preset, summary in s.items():
        g = summary["grad_variance"]
        assert {"measured_ratio", "predicted_ratio", "uncorrelated_ratio", "measured_interval", "predicted_interval",
                "per_seed", "answer_kept", "measurements"} <= set(g), preset
        assert set(summary["dependency"]) == {"black", "patch_blackout"}
        assert set(summary["dependency"]["black"]) == {"half_share", "skewness", "answer_share", "max"}
    assert s["grpo"]["grad_variance"]["measured_ratio"] == pytest.approx(1.0)
    assert s["grpo"]["grad_variance"]["predicted_ratio"] == pytest.approx(1.0)
    vppo = s["vppo"]["grad_variance"]
    assert vppo["measurements"] > 0 and vppo["measured_ratio"] > 0
    assert vppo["predicted_ratio"] >= 0.4 * 0.9**2  # k >= 0.4 (ceil), alpha >= 0.9
    for run in results["runs"]:
        assert run["measure_steps"] == [1, 2, 4] and len(run["grad_variance"]) == len(run["dependency"]) == 3
    assert "grad. variance / GRPO's" in proc.stdout and "black picture: half / skew / answer" in proc.stdout
    for name in ("curves.png", "heatmaps.png", "sample.png", "variance.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "heatmaps.html").read_text()
    assert "data:image/png;base64," in page and "visual dependency" in page and "connectivity" in page
    assert "class='tok kept'" in page and "underlined: kept by the strategy" in page  # vppo drops tokens
    assert (out / "model" / "config.json").is_file() and (out / "model" / "preprocessor_config.json").is_file()
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def test_the_saved_policy_can_be_inspected(quick_run, tmp_path):
    proc, out = quick_run
    assert proc.returncode == 0
    html = tmp_path / "inspect.html"
    code = cli_main(["inspect", "--model", str(out / "model"), "--image", str(out / "sample.png"),
                     "--prompt", "what colour is the square ?", "--response", "ok . the answer is red .",
                     "--out", str(html)])
    assert code == 0
    page = html.read_text()
    assert page.count("title='visual dependency = ") == page.count("title='connectivity = ") == 7  # 7 tokens
    assert ">red</span>" in page
