"""AT-RL attention connectivity: capture overhead and peak memory (issue #9).

Model: a random-weight Qwen2.5-VL whose language model has hidden size 512, 16 layers, 8 query and
2 key/value heads (GQA, 3-D mRoPE), MLP 1408; a one-block vision tower of width 32 (cheap, and
the same on both sides). Batch: ``B`` rows of 1024 tokens = 1 text + [vision start] + 256 image
tokens + [vision end] + 30 prompt text tokens + 735 response tokens.

Rows:

- ``connectivity overhead (CPU time)`` and ``(wall time)``: ``AttentionConnectivity`` on 4 of the
  16 layers (the default: 8, 10, 13, 15) — one forward in which the chosen layers' response
  queries are softmaxed over all keys in chunks — against one plain sdpa forward of the same
  backbone on the same batch (what the estimator's forward costs without capture; neither
  computes LM-head logits). Target <= 1.05x (AT-RL reports 1.2% on GPU). Both ratios come from
  interleaved ``torch.utils.benchmark`` rounds in this process; the CPU-time one (process time,
  single thread) is the steady figure on a shared machine, and the notes add the share of the
  call spent inside the capture, measured directly.
- ``connectivity memory vs eager attentions``: peak extra memory of the estimator call against an
  eager forward with ``output_attentions=True`` (the naive way: every layer's ``[B, H, L, L]``
  map). Target <= 0.1x.
- ``connectivity memory vs sdpa forward``: the same peak against the plain sdpa forward, for
  context (what the capture adds to an ordinary no-grad forward).

Quick runs use hidden 256, 512 tokens (128 image tokens) and one row: per layer, the capture's
cost (proportional to heads x response rows x keys) is then a larger share than at hidden 512.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from benchmarks._util import Timing, fmt_time, peak_memory, row, time_ratio

_ME = "benchmarks.bench_connectivity"
IMAGE, START, END, VOCAB = 1000, 1001, 1002, 1024


def _sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"hidden": 256, "layers": 16, "heads": 8, "kv_heads": 2, "mlp": 704, "grid": (8, 16), "L": 512, "B": 1}
    return {"hidden": 512, "layers": 16, "heads": 8, "kv_heads": 2, "mlp": 1408, "grid": (16, 16), "L": 1024, "B": 2}


def build(quick: bool, attn_implementation: str = "sdpa") -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    """``(model, model_inputs, response_mask)`` of the benchmark configuration (seeded)."""
    import transformers as tf

    s = _sizes(quick)
    text = dict(vocab_size=VOCAB, hidden_size=s["hidden"], intermediate_size=s["mlp"], num_hidden_layers=s["layers"],
                num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], max_position_embeddings=4096,
                rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12] if s["hidden"] // s["heads"] == 64
                                 else [4, 6, 6], "rope_theta": 10000.0}, pad_token_id=0)
    vision = dict(depth=1, hidden_size=32, out_hidden_size=s["hidden"], intermediate_size=64, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[0])
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VOCAB - 1,
                              vision_start_token_id=START, vision_end_token_id=END)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tf.Qwen2_5_VLForConditionalGeneration._from_config(
            copy.deepcopy(cfg), attn_implementation=attn_implementation).eval()
        n_img = s["grid"][0] * s["grid"][1]
        P = 1 + 1 + n_img + 1 + 30
        T = s["L"] - P
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(1, 900, (s["B"], s["L"]), generator=g)
        ids[:, 1], ids[:, 2:2 + n_img], ids[:, 2 + n_img] = START, IMAGE, END
        grid = [1, 2 * s["grid"][0], 2 * s["grid"][1]]  # patches; 2x2 patches merge into one image token
        pixels = torch.randn(s["B"] * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=g)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": pixels,
        "image_grid_thw": torch.tensor([grid] * s["B"]),
    }
    return model, inputs, torch.ones(s["B"], T, dtype=torch.bool)


def _callables(quick: bool, attn_implementation: str = "sdpa"):
    import rlcredit
    from rlcredit_mm import AttentionConnectivity

    model, inputs, mask = build(quick, attn_implementation)
    policy = rlcredit.HFPolicy(model, rows_per_chunk=mask.shape[0])
    prepared = policy.adapter.prepare_inputs(inputs, model)
    rollout = rlcredit.Rollout(mask, torch.zeros(mask.shape[0]), torch.zeros(mask.shape[0], dtype=torch.long),
                               model_inputs=inputs)
    est = AttentionConnectivity()
    assert len(est.chosen_layers(model.config.text_config.num_hidden_layers)) == 4

    def plain():
        with torch.no_grad():
            return model.model(**prepared, use_cache=False).last_hidden_state

    def eager_attentions():
        with torch.no_grad():
            return model.model(**prepared, use_cache=False, output_attentions=True).attentions

    def candidate():
        return est(rollout, policy).score

    return plain, candidate, eager_attentions


def cpu_time_ratio(baseline_fn, candidate_fn, *, rounds: int) -> Timing:
    """``benchmarks._util.time_ratio`` measured in process CPU time instead of wall time.

    Single-threaded, a call's CPU time barely moves when other processes load the machine (they
    take wall time, not this process's CPU time), so on a shared machine this ratio is the steady
    one. Interleaved rounds of one ``torch.utils.benchmark`` call each, medians.
    """
    from torch.utils import benchmark

    times: dict[str, list[float]] = {"baseline": [], "candidate": []}
    for _ in range(rounds):
        for key, fn in (("baseline", baseline_fn), ("candidate", candidate_fn)):
            t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=1, timer=time.process_time)
            times[key].append(t.timeit(1).median)
    base, cand = sorted(times["baseline"])[rounds // 2], sorted(times["candidate"])[rounds // 2]
    return Timing(baseline_s=base, candidate_s=cand, ratio=cand / base)


def capture_share(candidate_fn, *, calls: int) -> float:
    """Median share of the candidate call's process CPU time spent inside the capture (diagnostic)."""
    from rlcredit_mm import connectivity

    real = connectivity._layer_connectivity
    spent = [0.0]

    def timed(*args):
        t0 = time.process_time()
        try:
            return real(*args)
        finally:
            spent[0] += time.process_time() - t0

    shares = []
    connectivity._layer_connectivity = timed
    try:
        for _ in range(calls):
            spent[0] = 0.0
            t0 = time.process_time()
            candidate_fn()
            shares.append(spent[0] / (time.process_time() - t0))
    finally:
        connectivity._layer_connectivity = real
    return sorted(shares)[calls // 2]


def mem_case(which: str, quick: bool) -> Any:
    """Setup for ``benchmarks._util.peak_memory``: ``which`` in plain / candidate / eager."""
    plain, candidate, eager = _callables(quick, "eager" if which == "eager" else "sdpa")
    return {"plain": plain, "candidate": candidate, "eager": eager}[which]


def run(quick: bool) -> list[dict[str, Any]]:
    s = _sizes(quick)
    shape = (f"B={s['B']}, L={s['L']} ({s['grid'][0] * s['grid'][1]} image tokens), hidden {s['hidden']}, "
             f"{s['layers']} layers, 8q/2kv heads")
    torch.set_num_threads(1)
    plain, candidate, _ = _callables(quick)
    timing = time_ratio(plain, candidate, quick=quick)
    cpu = cpu_time_ratio(plain, candidate, rounds=3 if quick else 5)
    share = capture_share(candidate, calls=3)
    del plain, candidate
    # one child process per configuration; quick runs skip the context-only plain forward
    peaks = {which: peak_memory(f"{_ME}:mem_case", {"which": which, "quick": quick})
             for which in ("candidate", "eager") + (() if quick else ("plain",))}

    def mem(base: str) -> dict[str, float] | None:
        if base not in peaks:
            return None
        return {"baseline_bytes": peaks[base], "candidate_bytes": peaks["candidate"],
                "ratio": peaks["candidate"] / peaks[base] if peaks[base] > 0 else float("nan")}

    mem_eager, mem_plain = mem("eager"), mem("plain")
    overhead = f"capture = {100 * share:.1f}% of the estimator call's CPU time"
    return [
        row("connectivity overhead (CPU time)", "plain sdpa forward", "attention_connectivity (4/16 layers)", cpu,
            target="<= 1.05x", notes=f"{shape}; single-threaded, process CPU time; {overhead}"),
        row("connectivity overhead (wall time)", "plain sdpa forward", "attention_connectivity (4/16 layers)", timing,
            target="<= 1.05x", notes=f"{shape}; single-threaded wall time (noisy when other processes load the machine)"),
        row("connectivity memory vs eager attentions", "eager forward, output_attentions=True",
            "attention_connectivity (4/16 layers)", None, mem_eager, target="mem <= 0.1x", notes=shape),
        row("connectivity memory vs sdpa forward", "plain sdpa forward", "attention_connectivity (4/16 layers)",
            None, mem_plain, target=None,
            notes=f"{shape}; context: what the capture adds" + ("" if mem_plain else " (full runs only)")),
    ]
