"""``rlcredit demo``: the task, the format-only warm-up, the RL loop's pieces, the report, the CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rlcredit
from rlcredit.cli import main as cli_main
from rlcredit_mm.demo import model as M
from rlcredit_mm.demo import report as R
from rlcredit_mm.demo import task as T
from rlcredit_mm.demo import train as TR
from rlcredit_mm.demo.run import prepare_output, run_demo, _publish

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and 2 OpenMP threads on 2 busy cores can be 40x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------
# The task


def test_reward_hand_cases():
    ex = T.Example(shapes=(("square", "red", 0),), asked="square", answer="red", seed=0)
    good = "first i find the square . the answer is red .".split()
    assert T.reward(ex, good) == 1.0
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
    # Hand computation: mean over the 5 text tokens' CE and the 2 slots' -log sum_c p(c).
    logp = logits.log_softmax(-1)
    terms = [-logp[b, t, targets[b, t]] for b in range(2) for t in range(4) if mask[b, t] and not slot[b, t]]
    terms += [-torch.logsumexp(logp[0, 1, colours], 0), -torch.logsumexp(logp[1, 2, colours], 0)]
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
        "1 seed: no intervals, so no comparison with grpo; run with --seeds 3 (the default) to compare."]
    table = R.results_table(_summary({"grpo": [0.8, 0.82, 0.84], "vppo": [0.5, 0.52, 0.54]}), threshold=0.6, steps=10)
    assert "| vppo | 0.52 [0.47, 0.57] | > 10 (0/3) |" in table
    assert "| grpo | 0.82 [0.77, 0.87] | 10 (3/3) |" in table


# --------------------------------------------------------------------------------------------
# The command: bad input exits 2 and writes nothing


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("argv, message", [
    (["--presets", "grpo,vpo"], "unknown strategy 'vpo'; did you mean 'vppo'?"),
    (["--presets", "grpo,grpo"], "lists a preset twice"),
    (["--shapes", "5"], r"shapes must be in [1, 3]"),
])
def test_bad_values_exit_2_with_a_message(tmp_path, capsys, argv, message):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlcredit demo: error:") and message in err
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "expected a positive integer, got 0"),
    (["--threshold", "1.5"], "expected a number in (0, 1]"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_invalid_flags_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli_main(["demo", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_unusable_output_folders_exit_2_and_are_left_alone(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep me")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    cases = [(a_file, "exists and is not a folder"), (busy, "not an rlcredit demo output"),
             (a_file / "sub", "does not exist")]
    for out, message in cases:
        assert cli_main(["demo", "--quick", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert a_file.read_text() == "keep me" and sorted(os.listdir(busy)) == ["notes.txt"]
    assert _leftovers(tmp_path) == []


def test_a_failing_run_writes_nothing(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure in the middle of training")

    monkeypatch.setattr("rlcredit_mm.demo.run.run_preset", boom)
    cfg = TR.DemoConfig.quick(presets=("grpo",), warmup_steps=1, progress=False)
    with pytest.raises(RuntimeError, match="simulated failure"):
        run_demo(cfg, tmp_path / "demo", stream=open(os.devnull, "w"))
    assert not (tmp_path / "demo").exists() and _leftovers(tmp_path) == []


def test_publish_replaces_a_previous_demo_output(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "results.json").write_text("{}")
    (out / "stale.txt").write_text("old")
    path, tmp = prepare_output(out)  # a previous demo output is accepted
    (tmp / "results.json").write_text('{"new": true}')
    _publish(tmp, path)
    assert sorted(os.listdir(out)) == ["results.json"] and json.loads((out / "results.json").read_text()) == {"new": True}
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------
# The real thing: `rlcredit demo --quick` through the console script


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "rlcredit"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rlcredit.cli"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "demo"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*_console_script(), "demo", "--quick", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    return proc, out


def test_quick_demo_runs_every_preset_and_writes_the_results(quick_run):
    proc, out = quick_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| preset | final accuracy (95% CI) |" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert list(results["summary"]) == list(TR.DEFAULT_PRESETS)
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
    for name in ("curves.png", "heatmaps.png", "sample.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "heatmaps.html").read_text()
    assert "data:image/png;base64," in page and "visual dependency" in page and "connectivity" in page
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
