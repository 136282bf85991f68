"""The toy visual-reasoning RL task behind ``rlcredit demo``.

* ``rlcredit_mm.demo.config`` — ``DemoConfig``, the run's settings (its fields are the CLI flags);
* ``rlcredit_mm.demo.task`` — pictures of coloured shapes, the question, the 0/1 reward;
* ``rlcredit_mm.demo.model`` — a tiny random-init Qwen2.5-VL, its inputs, the format-only warm-up;
* ``rlcredit_mm.demo.train`` — the RL loop (``generate`` rollouts, ``Strategy.assign``/``loss``, AdamW);
* ``rlcredit_mm.demo.evidence`` — gradient variance against GRPO's, the dependency distribution;
* ``rlcredit_mm.demo.report`` — the results tables, intervals over seeds, learning curves, README block;
* ``rlcredit_mm.demo.run`` — ``rlcredit demo`` itself (writes the results folder atomically).

Examples:
    >>> from rlcredit_mm.demo import DemoConfig
    >>> DemoConfig.quick().seeds, DemoConfig().presets
    (1, ('grpo', 'vppo'))
"""

from rlcredit_mm.demo.run import run_demo
from rlcredit_mm.demo.train import DEFAULT_PRESETS, DemoConfig

__all__ = ["DEFAULT_PRESETS", "DemoConfig", "run_demo"]
