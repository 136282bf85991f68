"""``python -m benchmarks --device cuda``: the GPU table's code path, run at toy sizes on the CPU.

The figures of a quick CPU run mean nothing; what is checked is that one command builds every
row of the table (floors, targets, memory columns) and writes the same JSON/Markdown files, so
that the first session with a GPU only has to run it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks import __main__ as runner
from benchmarks import bench_gpu

EXPECTED = [
    "copy bandwidth",
    "token_kl [2, 16, 512] bf16 vs floor",
    "token_kl [2, 16, 512] bf16 vs naive",
    "token_entropy [2, 16, 512] bf16 forward vs floor",
    "token_entropy [2, 16, 512] bf16 forward+backward vs floor",
    "selected_logprobs [2, 16, 512] bf16 forward vs floor",
    "selected_logprobs [2, 16, 512] bf16 forward+backward vs floor",
    "token_kl [2, 8, 256] fp32 vs naive",
    "fused_token_kl N=32, H=16, V=256 bf16 vs matmuls",
    "fused_token_kl N=32, H=16, V=256 bf16 vs materialised",
    "AttentionConnectivity (2 of 4 layers) vs forward",
    "VisualKL(exact) vs forward",
    "VisualKL(fused) vs forward",
    "VisualKL(k3) vs forward",
    "at_rl assign B=3 vs forward",
    "grpo assign+loss B=16 T=64",
    "vppo assign+loss B=16 T=64",
]


def test_the_gpu_table_runs_end_to_end_through_the_runner(tmp_path):
    assert runner.main(["--device", "cpu", "--only", "gpu", "--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["modules"]["gpu"] == {**results["modules"]["gpu"], "quick": True, "device": "cpu"}
    rows = {r["name"]: r for r in results["rows"]}
    assert list(rows) == EXPECTED
    for name, r in rows.items():
        if name != "copy bandwidth":
            assert r["time_ratio"] is not None and math.isfinite(r["time_ratio"]) and r["time_ratio"] > 0, name
            assert "->" in r["notes"], name  # absolute times recorded beside the ratio
    assert "TB/s" in rows["copy bandwidth"]["notes"]
    # the targets travel with the rows (judged on a GPU; toy CPU figures may miss them)
    targets = {"token_kl [2, 16, 512] bf16 vs floor": "<= 3x", "fused_token_kl N=32, H=16, V=256 bf16 vs matmuls":
               "<= 1.3x", "AttentionConnectivity (2 of 4 layers) vs forward": "<= 1.05x",
               "at_rl assign B=3 vs forward": "<= 1.5x"}
    for name, target in targets.items():
        assert rows[name]["target"] == target and rows[name]["status"] in ("ok", "miss")
    md = (tmp_path / "results.md").read_text()
    assert "## gpu" in md and "quick run on cpu" in md and "| token_kl [2, 16, 512] bf16 vs floor |" in md


def test_floor_ratios_are_time_over_bytes_at_the_measured_bandwidth():
    timing = bench_gpu._vs_floor(0.006, 0.002)
    assert timing.ratio == pytest.approx(3.0) and timing.baseline_s == 0.002
    assert bench_gpu.peak_bytes(lambda: torch.zeros(10), torch.device("cpu")) is None  # CPU: not measured here


def test_device_selection(capsys):
    assert runner.devices_of("gpu") == ("cuda",)
    assert all(runner.devices_of(m) == ("cpu",) for m in runner.discover() if m != "gpu")
    assert runner.main(["--list"]) == 0
    assert "gpu (cuda)" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            runner.main(["--device", "cuda"])
        with pytest.raises(RuntimeError, match="no CUDA device"):
            bench_gpu.run(quick=True, device="cuda")
