"""The README's Python example runs as written, and its two set-up commands exist in the Makefile."""

import re
from pathlib import Path

import torch

import rlcredit

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md should show a Python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # the README's own code, nothing else
    strategy, out = namespace["strategy"], namespace["out"]
    assert isinstance(strategy, rlcredit.Strategy) and strategy == rlcredit.build(strategy.to_spec())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert namespace["logprobs"].grad is not None


def test_readme_commands_are_make_targets():
    text = (ROOT / "README.md").read_text()
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", text, flags=re.M):
        assert re.search(rf"^{target}:", makefile, flags=re.M), f"README names `make {target}`, the Makefile has none"
    assert "make test" in (ROOT / ".ci" / "run").read_text()
