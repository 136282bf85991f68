"""``rlcredit demo``: the task, the format-only warm-up, the RL loop's pieces, the report, the CLI."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
import torch

import rlcredit
from rlcredit_mm.cli import build_parser, config_from_args
from rlcredit_mm.cli import main as cli_main
from rlcredit_mm.demo import model as M
from rlcredit_mm.demo import report as R
from rlcredit_mm.demo import task as T
from rlcredit_mm.demo import train as TR
from rlcredit_mm.demo.run import _publish, check_presets, prepare_output, run_demo

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
# The command: bad input exits 2 and writes nothing


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.mark.parametrize("argv, message", [
    (["--presets", "grpo,vpo"], "unknown strategy 'vpo'; did you mean 'vppo'?"),
    (["--presets", "grpo,grpo"], "lists a preset twice"),
    (["--presets", ","], "presets is empty"),
    (["--presets", "grpo,no/such/spec.yaml"], "spec file 'no/such/spec.yaml' does not exist"),
    (["--shapes", "5"], r"shapes must be in [1, 3]"),
    (["--steps", "0"], "DemoConfig.steps must be a positive integer, got 0"),
    (["--threshold", "1.5"], "DemoConfig.threshold is an accuracy in (0, 1], got 1.5"),
    (["--lr", "nan"], "DemoConfig.lr must be a finite number > 0, got nan"),
    (["--hidden", "40"], "DemoConfig.hidden must be a multiple of 16"),
    (["--device", "tpu"], "DemoConfig.device must be one of auto, cpu, cuda or cuda:N, got 'tpu'"),
    *([] if torch.cuda.is_available() else [(["--device", "cuda"], "--device cuda: torch sees 0 CUDA device(s)")]),
])
def test_bad_values_exit_2_with_a_message(tmp_path, capsys, argv, message):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlcredit demo: error:") and message in err
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("argv, message", [
    (["--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
    (["--threshold", "high"], "argument --threshold: invalid float value: 'high'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_flags_that_do_not_parse_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli_main(["demo", *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_version_and_the_bare_command_print_and_exit_0(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"rlcredit {rlcredit.__version__}"
    assert cli_main([]) == 0  # no subcommand: the help, not an error
    out = capsys.readouterr().out
    assert out.startswith("usage: rlcredit") and "demo" in out and "inspect" in out and "--version" in out


def _flag_fields():
    return [f for f in attrs.fields(TR.DemoConfig) if "help" in f.metadata]


def test_demo_flags_are_derived_from_the_config_fields(capsys):
    """One flag per DemoConfig field with help metadata: its default when absent, its value when given."""
    fields = _flag_fields()
    assert [f.name for f in fields] == ["presets", "seeds", "steps", "lr", "threshold", "shapes", "filler_words", "hidden",
                                        "layers", "device", "progress"]
    args = build_parser().parse_args(["demo"])
    assert set(vars(args)) == {"command", "out", "quick"} | {f.name for f in fields}
    assert config_from_args(args) == TR.DemoConfig()
    assert config_from_args(build_parser().parse_args(["demo", "--quick"])) == TR.DemoConfig.quick()
    argv, want = ["demo"], {}
    for f in fields:  # a value other than the default for every flag
        if f.name == "progress":
            argv.append("--no-progress")
            want[f.name] = False
        elif f.name == "presets":
            argv += ["--presets", "vppo, grpo"]
            want[f.name] = ("vppo", "grpo")
        elif f.name == "device":
            argv += ["--device", "cpu"]
            want[f.name] = "cpu"
        elif f.name == "hidden":
            argv += ["--hidden", "128"]
            want[f.name] = 128
        else:
            value = f.default + 1 if isinstance(f.default, int) else f.default / 2
            argv += ["--" + f.name.replace("_", "-"), str(value)]
            want[f.name] = value
    cfg = config_from_args(build_parser().parse_args(argv))
    assert {name: getattr(cfg, name) for name in want} == want
    # --quick starts from the bundle; the flags given override it.
    cfg = config_from_args(build_parser().parse_args(["demo", "--quick", "--steps", "9"]))
    assert cfg == TR.DemoConfig.quick(steps=9) and cfg.seeds == TR.QUICK["seeds"]
    # The help shows each field's help text and default, and the --quick values.
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields:
        assert f.metadata["help"] in text
        if f.name != "progress":
            assert f"(default {f.default if f.name != 'presets' else ','.join(f.default)}" in text
    assert "--no-progress" in text and "steps=4" in text and f"(default {TR.DemoConfig().steps}; --quick: 4)" in text


def _tiny(**kwargs):
    return TR.DemoConfig.quick(steps=2, warmup_steps=2, hidden=32, eval_prompts=4, heatmap_samples=0, progress=False,
                               **kwargs)


def test_device_plumbing_on_the_cpu(tmp_path):
    """``--device cpu`` reaches every part of the run: the warm-up, the RL loop, the results."""
    assert M.resolve_device("cpu") == torch.device("cpu")
    assert M.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = build_parser().parse_args(["demo", "--quick", "--device", "cpu", "--presets", "grpo"])
    cfg = config_from_args(args)
    assert cfg.device == "cpu" and cfg == TR.DemoConfig.quick(device="cpu", presets=("grpo",))
    results = run_demo(_tiny(presets=("grpo",), device="cpu"), tmp_path / "demo", stream=io.StringIO())
    assert results["environment"]["device"] == "cpu" and results["config"]["device"] == "cpu"
    # A model on another device gets its inputs there: to_device walks the nested inputs.
    inputs = M.to_device(M.encode_prompts(M.ModelKit(), T.make_examples(1, seed=0)), torch.device("meta"))
    assert {v.device.type for v in inputs.values()} == {"meta"}


def test_presets_take_spec_files_labelled_by_their_stem(tmp_path):
    same = tmp_path / "same_as_grpo.json"
    same.write_text(json.dumps({"preset": "grpo"}))
    wide = tmp_path / "wide_clip.yaml"
    wide.write_text("preset: dapo\npolicy_loss: {name: clipped_surrogate, clip_high: 0.4}\n")
    assert check_presets(["grpo", str(same), str(wide)]) == {"grpo": "grpo", "same_as_grpo": str(same),
                                                             "wide_clip": str(wide)}
    stream = io.StringIO()
    results = run_demo(_tiny(presets=("grpo", str(same), str(wide))), tmp_path / "demo", stream=stream)
    assert list(results["summary"]) == ["grpo", "same_as_grpo", "wide_clip"]
    assert results["config"]["presets"] == ["grpo", str(same), str(wide)]
    for text in (stream.getvalue(), (tmp_path / "demo" / "results.md").read_text()):
        assert "| same_as_grpo | " in text and "| wide_clip | " in text
    # The grpo spec file trains exactly as the grpo preset (same seed, same warm start, same prompts).
    runs = {r["preset"]: r for r in results["runs"]}
    for key in ("train_reward", "kept_share", "scale_std", "eval_accuracy", "response_length", "clip_fraction"):
        assert runs["same_as_grpo"][key] == runs["grpo"][key], key


def test_presets_whose_labels_clash_exit_2_naming_both(tmp_path, capsys):
    spec = tmp_path / "grpo.json"
    spec.write_text(json.dumps({"preset": "dapo"}))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mine.json").write_text("{}")
    (tmp_path / "mine.yaml").write_text("{}")
    out = tmp_path / "demo"
    for first, second, label in [("grpo", str(spec), "grpo"),
                                 (str(tmp_path / "sub" / "mine.json"), str(tmp_path / "mine.yaml"), "mine")]:
        assert cli_main(["demo", "--quick", "--presets", f"{first},{second}", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rlcredit demo: error: --presets:"), err
        assert f"{first!r} and {second!r} would both be labelled {label!r}" in err
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_missing_multimodal_extra_exits_2_with_the_install_command(tmp_path, capsys, monkeypatch):
    for name in ("tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, name, None)  # `from tqdm.auto import tqdm` raises ModuleNotFoundError
    assert cli_main(["demo", "--quick", "--presets", "grpo", "--out", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlcredit demo: error: needs the multimodal extra") and "pip install 'rlcredit[mm]'" in err
    assert not (tmp_path / "demo").exists() and _leftovers(tmp_path) == []


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
    assert (out / "results.md").read_text().split("Wall time")[0] == \
        (tmp_path / "again" / "results.md").read_text().split("Wall time")[0]


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
