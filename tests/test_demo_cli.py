"""``rlcredit demo`` as a command: flags derived from ``DemoConfig``, bad input exits 2 and writes
nothing, spec files as presets, ``--device`` plumbing, the output folder's life cycle."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import attrs
import pytest
import torch

import rlcredit
from rlcredit_mm.cli import build_parser, config_from_args
from rlcredit_mm.cli import main as cli_main
from rlcredit_mm.demo import model as M
from rlcredit_mm.demo import task as T
from rlcredit_mm.demo import train as TR
from rlcredit_mm.demo.run import _publish, check_presets, prepare_output, run_demo



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
