"""VPPO visual dependency: the KL kernels and the whole ``VisualKL`` call (issue #4).

Rows:

- ``token_kl vs naive``: ``rlcredit.functional.token_kl`` against the naive two-``log_softmax`` KL
  (``(p * (log p - log q)).sum(-1)`` on the whole tensor) on ``[4, 1024, 32000]`` float32 logits
  (quick: ``[2, 512, 32000]``), every position valid. Targets: time ratio <= 1.0 and extra peak
  memory <= 1/10 of the naive one (each measured in its own process).
- ``fused_token_kl vs token_kl``: the KL from two runs' last hidden states and the LM head
  (``fused_token_kl``) against ``token_kl`` on logits materialised by the same LM head, Qwen2.5-VL's
  head shape ``H = 896, V = 151936``, bf16. Peak memory at ``B*T = 4096`` (quick 512); time at
  ``B*T = 512`` and 256 (quick: 256 only), because one call at 4096 takes tens of seconds
  single-threaded on CPU; both kernels are linear in ``B*T`` (measured 1.18x at 512, 1.13x at
  1024), so the ratio carries over. On CPU memory is the point; the time ratio is reported as
  measured.
- ``VisualKL(exact)`` (and ``fused``, ``k3``) against plain forwards of the same small Qwen2-VL
  (hidden 256, 4 layers, V = 32000, 112 px images, ``B = 8``, ``T = 128``): against two plain
  forwards (the original and the perturbed inputs: the inherent cost; target <= 1.15x) and
  against one plain forward (for context). Peak memory of ``VisualKL(exact)`` against one plain
  forward (which materialises ``[B, P+T, V]`` logits) in full runs.

The GPU figures (``fused_token_kl`` against the LM-head matmuls, the kernels against their
bandwidth floors) are rows of ``bench_gpu``: ``python -m benchmarks --device cuda``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

import rlcredit
from benchmarks._util import fmt_bytes, memory_ratio, row, time_ratio
from rlcredit import functional as F

_ME = "benchmarks.bench_visual_kl"
H_QWEN25, V_QWEN25 = 896, 151936


# ------------------------------------------------------------------------------- KL kernels


def naive_kl(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """The textbook KL: two full ``log_softmax`` over ``[B, T, V]`` and a full product."""
    lp = torch.log_softmax(logits_p.float(), -1)
    lq = torch.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _logits(shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(*shape, generator=g) * 2.0
    return p, p + 0.5 * torch.randn(*shape, generator=g)


def kl_case(which: str, B: int, T: int, V: int) -> Callable[[], Any]:
    """Peak-memory setup: ``naive`` or ``token_kl`` on ``[B, T, V]`` float32 logits."""
    p, q = _logits((B, T, V))
    if which == "naive":
        return lambda: naive_kl(p, q)
    return lambda: F.token_kl(p, q)


def _head(N: int, H: int, V: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(dtype).to(device)
    h_p = torch.randn(N, H, generator=g).to(dtype).to(device)
    h_q = (h_p.float() + 0.3 * torch.randn(N, H, generator=g)).to(dtype).to(device)
    return h_p, h_q, weight


def materialised_kl(h_p: torch.Tensor, h_q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``token_kl`` on both runs' logits, materialised by the LM head (``[N, V]`` each, model dtype)."""
    return F.token_kl(h_p @ weight.T, h_q @ weight.T)


def fused_case(which: str, N: int, device: str = "cpu") -> Callable[[], Any]:
    """Peak-memory setup: ``token_kl`` on materialised logits or ``fused_token_kl``, Qwen2.5-VL's head."""
    h_p, h_q, weight = _head(N, H_QWEN25, V_QWEN25, torch.bfloat16, device)
    if which == "materialised":
        return lambda: materialised_kl(h_p, h_q, weight)
    return lambda: F.fused_token_kl(h_p, h_q, weight)


def _token_kl_rows(quick: bool) -> list[dict]:
    B, T, V = (2, 512, 32000) if quick else (4, 1024, 32000)
    p, q = _logits((B, T, V))
    ref, got = naive_kl(p, q), F.token_kl(p, q)
    err = float((ref - got).abs().max())
    t = time_ratio(lambda: naive_kl(p, q), lambda: F.token_kl(p, q), quick=quick)
    del p, q
    m = memory_ratio((f"{_ME}:kl_case", {"which": "naive", "B": B, "T": T, "V": V}),
                     (f"{_ME}:kl_case", {"which": "token_kl", "B": B, "T": T, "V": V}))
    shape = f"[{B},{T},{V}] fp32"
    return [
        row(f"token_kl vs naive {shape}", "naive log_softmax KL", "token_kl", t, target="<= 1.0x",
            notes=f"max |diff| {err:.1e}"),
        row(f"token_kl vs naive {shape}: memory", "naive log_softmax KL", "token_kl", memory=m,
            target="mem <= 0.1x", notes=f"inputs {fmt_bytes(2 * B * T * V * 4)} not counted"),
    ]


def _fused_rows(quick: bool) -> list[dict]:
    rows = []
    n_time = 256 if quick else 512
    sizes = (n_time,) if quick else (n_time // 2, n_time)
    for N in sizes:
        h_p, h_q, weight = _head(N, H_QWEN25, V_QWEN25, torch.bfloat16)
        err = float((materialised_kl(h_p, h_q, weight) - F.fused_token_kl(h_p, h_q, weight)).abs().max())
        t = time_ratio(lambda: materialised_kl(h_p, h_q, weight), lambda: F.fused_token_kl(h_p, h_q, weight),
                       quick=True, rounds=2 if not quick else 1, min_run_time=0.05)
        rows.append(row(f"fused_token_kl vs token_kl B*T={N} bf16", "lm_head + token_kl", "fused_token_kl", t,
                        notes=f"H={H_QWEN25}, V={V_QWEN25}; max |diff| {err:.1e}; linear in B*T"))
    n_mem = 512 if quick else 4096
    m = memory_ratio((f"{_ME}:fused_case", {"which": "materialised", "N": n_mem}),
                     (f"{_ME}:fused_case", {"which": "fused", "N": n_mem}))
    logits = 2 * n_mem * V_QWEN25 * 2
    rows.append(row(f"fused_token_kl vs token_kl B*T={n_mem} bf16: memory", "lm_head + token_kl", "fused_token_kl",
                    memory=m, target=None if quick else "mem <= 0.1x",
                    notes=f"the baseline's two bf16 logit tensors alone are {fmt_bytes(logits)}; the fused peak is "
                          f"its [chunk_size, V] fp32 temporaries, constant in B*T"))
    return rows


# ------------------------------------------------------------------------- the whole estimator


def small_vlm(seed: int = 0):
    """A small but not trivial Qwen2-VL (random weights): hidden 256, 4 layers, V = 32000."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e4}),
        vision_config=dict(depth=2, embed_dim=128, hidden_size=256, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=31990, video_token_id=31991, vision_start_token_id=31992, vision_end_token_id=31993,
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def vlm_batch(model, B: int = 8, P_text: int = 32, T: int = 128, image: int = 112, seed: int = 0):
    """``B`` rows: one ``image`` px image each, ``P_text`` text tokens, responses of length in ``[T/2, T]``."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    grid = image // 14
    n_tok = (grid // 2) ** 2
    prompt = torch.cat([
        torch.randint(1, 30000, (B, 1), generator=g),
        torch.full((B, 1), cfg.vision_start_token_id), torch.full((B, n_tok), cfg.image_token_id),
        torch.full((B, 1), cfg.vision_end_token_id), torch.randint(1, 30000, (B, P_text - 1), generator=g),
    ], 1)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None] < lengths[:, None]
    response = torch.where(mask, torch.randint(1, 30000, (B, T), generator=g), 0)
    ids = torch.cat([prompt, response], 1)
    attn = torch.cat([torch.ones_like(prompt), mask.long()], 1)
    pixels = torch.randn(B * grid * grid, 3 * 2 * 14 * 14, generator=g)
    inputs = {"input_ids": ids, "attention_mask": attn, "pixel_values": pixels,
              "image_grid_thw": torch.tensor([[1, grid, grid]] * B)}
    return inputs, mask


def _setup_vlm(quick: bool):
    from rlcredit_mm.adapters import adapter_for

    model = small_vlm()
    inputs, mask = vlm_batch(model, B=4 if quick else 8, T=64 if quick else 128)
    prepared = adapter_for(model).prepare_inputs(inputs, model)
    rollout = rlcredit.Rollout(mask, torch.zeros(mask.shape[0]), torch.zeros(mask.shape[0], dtype=torch.long),
                               model_inputs=inputs)
    return model, prepared, rollout


def vlm_case(which: str, quick: bool = False) -> Callable[[], Any]:
    """Peak-memory setup: one plain forward or ``VisualKL(estimate=which)`` on the small VLM."""
    from rlcredit_mm import VisualKL

    model, prepared, rollout = _setup_vlm(quick)
    policy = rlcredit.HFPolicy(model)
    if which == "forward":
        def forward():
            with torch.no_grad():
                return model(**prepared).logits
        return forward
    est = VisualKL(estimate=which)
    return lambda: est(rollout, policy)


def _visual_kl_rows(quick: bool) -> list[dict]:
    from rlcredit_mm import VisualKL

    model, prepared, rollout = _setup_vlm(quick)
    policy = rlcredit.HFPolicy(model)
    perturbed = VisualKL().perturbation(prepared, model)

    def one_forward():
        with torch.no_grad():
            model(**prepared)

    def two_forwards():
        with torch.no_grad():
            model(**prepared)
            model(**perturbed)

    B, T = rollout.response_mask.shape
    shape = f"B={B}, T={T}, V=32000"
    rows = []
    for estimate in ("exact",) if quick else ("exact", "fused", "k3"):
        est = VisualKL(estimate=estimate)
        t2 = time_ratio(two_forwards, lambda: est(rollout, policy), quick=quick)
        rows.append(row(f"VisualKL({estimate}) vs two forwards", "model(I) + model(I')", f"VisualKL({estimate})", t2,
                        target="<= 1.15x" if estimate == "exact" else None,
                        notes=f"small Qwen2-VL, {shape}; HFPolicy rows_per_chunk=4"))
        if estimate == "exact":
            t1 = time_ratio(one_forward, lambda: est(rollout, policy), quick=quick)
            rows.append(row("VisualKL(exact) vs one forward", "model(I)", "VisualKL(exact)", t1,
                            notes="the perturbed forward is inherent: about 2x"))
    if not quick:
        m = memory_ratio((f"{_ME}:vlm_case", {"which": "forward"}), (f"{_ME}:vlm_case", {"which": "exact"}))
        rows.append(row("VisualKL(exact) vs one forward: memory", "model(I) (full logits)", "VisualKL(exact)",
                        memory=m, notes=shape))
    return rows


def run(quick: bool) -> list[dict]:
    """All rows of this module (``quick``: smaller shapes, fewer repeats)."""
    torch.manual_seed(0)
    return _token_kl_rows(quick) + _fused_rows(quick) + _visual_kl_rows(quick)
