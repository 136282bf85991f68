"""Every script in examples/ runs (in its fast ``--quick`` mode) and does what it says."""

from __future__ import annotations

import math
import re
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch

import rlcredit
from rlcredit import registry

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"




@pytest.fixture
def clean_registry():
    """Examples register components (custom_estimator.py): undo it so other tests see the built-ins only."""
    saved = {kind: dict(table) for kind, table in registry._REGISTRY.items()}
    names = dict(registry._NAMES)
    yield
    for kind, table in saved.items():
        registry._REGISTRY[kind].clear()
        registry._REGISTRY[kind].update(table)
    registry._NAMES.clear()
    registry._NAMES.update(names)


def _load(name: str) -> dict:
    """The example's namespace, loaded as a module (its ``main`` is called by the test)."""
    return runpy.run_path(str(EXAMPLES / name), run_name=f"example_{name[:-3]}")


def test_every_example_is_tested():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == ["custom_estimator.py", "from_config.py", "mix_methods.py", "own_training_loop.py",
                       "trl_grpo.py", "trl_vppo.py"]


def test_own_training_loop(capsys):
    history = _load("own_training_loop.py")["main"](["--quick"])
    assert len(history) == 3 and all(0.0 <= r <= 1.0 for r in history)
    out = capsys.readouterr().out
    assert "strategy: rlcredit.build(" in out and out.count("step ") == 3


def test_own_training_loop_accepts_a_spec_file(tmp_path, capsys):
    spec = tmp_path / "forks.yaml"
    spec.write_text("estimators: {entropy: entropy}\n"
                    "weighter: {name: top_fraction, fraction: 0.5, scope: batch, score: entropy}\n")
    history = _load("own_training_loop.py")["main"](["--quick", "--strategy", str(spec)])
    assert len(history) == 3
    out = capsys.readouterr().out
    assert "'fraction': 0.5" in out and "kept tokens 100%" not in out  # the mask is in effect


def test_mix_methods(capsys):
    ns = _load("mix_methods.py")
    ns["main"](["--quick"])
    out = capsys.readouterr().out
    assert "== VPPO visual mask x entropy forks, VPPO shaping" in out and "== AT-RL anchors x VPPO shaping" in out
    mixed = ns["visual_and_forking"]
    assert rlcredit.build(mixed.to_spec()) == mixed
    assert sorted(mixed.estimators) == ["entropy", "visual"]
    assert [p.score for p in mixed.weighter.parts] == ["visual", "entropy"]
    assert ns["anchors_with_tas"].shapers[1].score == "visual"


def test_custom_estimator(clean_registry, capsys):
    ns = _load("custom_estimator.py")
    strategy = ns["main"](["--quick"])
    out = capsys.readouterr().out
    assert "SpecError as expected: Surprisal.cap must be a number in (0.0, inf), got -1." in out
    assert rlcredit.get("estimator", "surprisal") is ns["Surprisal"]
    # The estimator's values by hand: -old_logprobs clamped to [0, cap], 0 on padding.
    rollout = ns["synthetic_rollout"](4, 5)
    score = strategy.estimators["surprise"](rollout)
    want = torch.where(rollout.response_mask, (-rollout.old_logprobs).clamp(0, 8.0), 0.0)
    assert torch.equal(score, want)


def test_from_config(capsys):
    ns = _load("from_config.py")
    strategy = ns["main"](["--quick"])
    assert strategy == rlcredit.build(str(EXAMPLES / "strategy.yaml"))
    assert strategy.estimators["visual"].estimate == "k3"
    assert strategy.policy_loss.entropy_penalty == 0.06
    out = capsys.readouterr().out
    assert "built from" in out and "with the override: kept" in out


def test_examples_run_as_scripts(monkeypatch, capsys):
    """``python examples/from_config.py --quick`` (the __main__ path) works as documented."""
    monkeypatch.setattr(sys, "argv", ["from_config.py", "--quick"])
    runpy.run_path(str(EXAMPLES / "from_config.py"), run_name="__main__")
    assert "kept" in capsys.readouterr().out


# --- TRL (the `trl` extra) -------------------------------------------------------------------


def test_trl_grpo(tmp_path, capsys):
    """Entropy forks through CreditGRPOTrainer on a tiny Qwen2: 2 steps; the kept tokens are TRL's 80/20 rule."""
    pytest.importorskip("trl")
    trainer = _load("trl_grpo.py")["main"](["--quick", "--output-dir", str(tmp_path)])
    assert trainer.state.global_step == 2
    out = capsys.readouterr().out
    assert "'scope': 'batch', 'score': 'entropy'" in out and out.count("step ") == 2
    rollout, credit = trainer.last_rollout, trainer.last_credit
    mask, entropy = rollout.response_mask, rollout.signals["entropy"]
    tau = torch.quantile(entropy[mask], 0.8)  # the top 20% of the batch's valid tokens, ties kept
    assert torch.equal(credit.token_weights, ((entropy >= tau) & mask).float())
    assert 0 < float(credit.metrics["kept_tokens"]) < float(mask.sum())


def test_trl_vppo(tmp_path, capsys):
    """VPPO through CreditGRPOTrainer on a tiny Qwen2.5-VL with images: pixel inputs reach the strategy, the
    visual scores are a real second forward (> 0, 0 on padding), TGF keeps ceil(0.4 T_i) tokens of each response
    (the highest-scoring ones), and the only warning is the entropy penalty TRL cannot run."""
    pytest.importorskip("trl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _load("trl_vppo.py")["main"](["--quick", "--output-dir", str(tmp_path)])
    ours = [str(w.message) for w in caught if "CreditGRPOTrainer" in str(w.message)]
    assert len(ours) == 1 and "entropy penalty" in ours[0]
    assert trainer.state.global_step == 2 and capsys.readouterr().out.count("step ") == 2
    rollout, credit = trainer.last_rollout, trainer.last_credit
    mask, inputs = rollout.response_mask, rollout.model_inputs
    assert {"pixel_values", "image_grid_thw"} <= set(inputs) and inputs["image_grid_thw"].shape[0] == mask.shape[0]
    visual, weights = credit.scores["visual"], credit.token_weights
    assert float(visual[mask].max()) > 0 and torch.all(visual >= 0) and torch.all(visual[~mask] == 0)
    for row in range(mask.shape[0]):
        n = int(mask[row].sum())
        kept = weights[row].bool()
        assert int(kept.sum()) == math.ceil(0.4 * n)
        if 0 < int(kept.sum()) < n:
            assert float(visual[row][kept].min()) >= float(visual[row][mask[row] & ~kept].max())


@pytest.mark.parametrize("name", ["trl_grpo.py", "trl_vppo.py"])
def test_trl_docs_show_the_examples_recipes(name):
    """docs/integrations/trl.md shows each example's recipe block verbatim: the docs' code is the code the tests run."""
    source = (EXAMPLES / name).read_text()
    recipe = re.search(r"# --- recipe \(docs/integrations/trl.md\) ---\n(.*?)# --- end of recipe ---", source, re.S)
    assert recipe is not None
    page = (EXAMPLES.parent / "docs" / "integrations" / "trl.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", page, re.S)
    assert recipe.group(1).strip() in [b.strip() for b in blocks]
