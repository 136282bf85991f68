"""The GPU table (issue #16): every kernel and estimator against its physical floor, in one run.

    python -m benchmarks --device cuda     # ~3-4 min on an H200; writes benchmarks/results/cuda/

Floors, all measured in this process on the same device:

- **bandwidth**: a device-to-device copy of a 4 GiB bf16 tensor (bytes read + written / time). A
  vocabulary kernel's floor is the bytes it must move at that bandwidth: the forward reads the
  logits once (two tensors for the KL); forward + backward reads them twice and writes the
  gradient once.
- **matmul**: the fused KL's floor is the two LM-head matmuls of both runs, timed here.
- **forward**: connectivity, ``VisualKL`` and the AT-RL assign are compared with a plain sdpa
  backbone forward of the same model and batch (what the estimator's forward costs anyway).

Rows (sizes of the issue; ``--quick`` runs the same code at toy sizes, which is how the tests
run it on CPU: ``run(quick=True, device="cpu")``; those figures mean nothing):

- ``token_kl [8, 2048, 151936] bf16``: vs its floor (target <= 3x, i.e. <= 7 ms on an H200), vs the
  naive two-``log_softmax`` KL (context), peak extra memory vs naive.
- ``token_kl [4, 1024, 32000] fp32``: vs naive.
- ``token_entropy`` and ``selected_logprobs`` on the large logits: forward, and forward + backward,
  vs their floors (target <= 3x).
- ``fused_token_kl N=16384, H=3584, V=152064 bf16``: vs the two LM-head matmuls (target <= 1.3x);
  peak extra memory (target <= 1 GiB) vs ``token_kl`` on materialised logits.
- A Qwen2.5-VL-shaped model (language model hidden 2048, 24 layers, 16 query / 2 key-value heads,
  V = 151936; a one-block vision tower), ``B = 4`` rows of 3139 tokens with 1024 image tokens:
  ``AttentionConnectivity`` (4 of 24 layers) vs the plain forward (target <= 1.05x);
  ``VisualKL`` exact / fused / k3 vs the plain forward (context: two forwards and the LM head on
  the response tokens are ~2.1x).
- ``at_rl`` assign (connectivity + METIS anchors) at ``B = 64`` vs the plain forward of the same
  rows (target <= 1.5x).
- ``grpo`` / ``vppo`` assign + loss (fwd+bwd), ``B = 1024, T = 4096``, vs a bare inline GRPO loss.
"""

from __future__ import annotations

import copy
import gc
from collections.abc import Callable
from typing import Any

import torch

import rlcredit
from benchmarks import bench_strategy
from benchmarks._util import Timing, fmt_bytes, fmt_time, row, time_ratio
from rlcredit import functional as F

DEVICES = ("cuda",)


def _special(vocab: int) -> tuple[int, int, int, int]:
    """(image, vision start, vision end, video) token ids: the last four of the vocabulary."""
    return vocab - 4, vocab - 3, vocab - 2, vocab - 1

FULL = {
    "copy_bytes": 4 * 2**30,
    "kl_big": (8, 2048, 151936), "kl_small": (4, 1024, 32000),
    "fused": (16384, 3584, 152064),
    "model": dict(hidden=2048, layers=24, heads=16, kv_heads=2, mlp=11008, vocab=151936, grid=(32, 32),
                  tokens=3139, B=4, B_at_rl=64, rows_per_chunk=16),
    "strategy": (1024, 4096),
    "min_run_time": 0.2, "rounds": 3,
}
QUICK = {
    "copy_bytes": 2**22,
    "kl_big": (2, 16, 512), "kl_small": (2, 8, 256),
    "fused": (32, 16, 256),
    "model": dict(hidden=64, layers=4, heads=4, kv_heads=2, mlp=128, vocab=2048, grid=(2, 4),
                  tokens=48, B=2, B_at_rl=3, rows_per_chunk=2),
    "strategy": (16, 64),
    "min_run_time": 0.01, "rounds": 1,
}


# ------------------------------------------------------------------------------------ helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation (so that a timer sees the work itself)."""
    def call():
        out = fn()
        _sync(device)
        return out
    return call


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak extra device memory of one ``fn()`` (CUDA allocator statistics); None off CUDA."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    del out
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def _vs_floor(seconds: float, floor_s: float) -> Timing:
    return Timing(baseline_s=floor_s, candidate_s=seconds, ratio=seconds / floor_s)


def _ratio(baseline: Callable[[], Any], candidate: Callable[[], Any], device: torch.device, sz: dict) -> Timing:
    return time_ratio(_timed(baseline, device), _timed(candidate, device), min_run_time=sz["min_run_time"],
                      rounds=sz["rounds"])


def _time(fn: Callable[[], Any], device: torch.device, sz: dict) -> float:
    """Median seconds per call (the candidate side of a ratio against itself: same method)."""
    return _ratio(fn, fn, device, sz).candidate_s


def bandwidth(device: torch.device, nbytes: int, sz: dict) -> float:
    """Bytes per second of a device-to-device copy (read + write) of ``nbytes``."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = _time(lambda: dst.copy_(src), device, sz)
    return 2 * nbytes / seconds


def naive_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(p.float(), -1), torch.log_softmax(q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _logits(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    p = torch.randn(*shape, generator=g, device=device, dtype=dtype).mul_(2.0)
    q = (p.float() + 0.5 * torch.randn(*shape, generator=g, device=device)).to(dtype)
    return p, q


def _mem(fn: Callable[[], Any], device: torch.device) -> str:
    b = peak_bytes(fn, device)
    return "" if b is None else f"; peak extra {fmt_bytes(b)}"


# ------------------------------------------------------------------------------- vocabulary


def _vocab_rows(device: torch.device, sz: dict, bw: float) -> list[dict]:
    rows = []
    B, T, V = sz["kl_big"]
    p, q = _logits((B, T, V), torch.bfloat16, device)
    shape = f"[{B}, {T}, {V}] bf16"
    one = p.numel() * p.element_size()
    kl = lambda: F.token_kl(p, q)  # noqa: E731
    t_kl = _time(kl, device, sz)
    rows.append(row(f"token_kl {shape} vs floor", "read both logits once at the copy bandwidth", "token_kl",
                    _vs_floor(t_kl, 2 * one / bw), target="<= 3x",
                    notes=f"{2 * one / t_kl / 1e12:.2f} TB/s effective{_mem(kl, device)}"))
    t = _ratio(lambda: naive_kl(p, q), kl, device, sz)
    m_naive, m_kl = peak_bytes(lambda: naive_kl(p, q), device), peak_bytes(kl, device)
    mem = None if m_naive is None else {"baseline_bytes": m_naive, "candidate_bytes": m_kl,
                                        "ratio": m_kl / max(1, m_naive)}
    rows.append(row(f"token_kl {shape} vs naive", "naive two-log_softmax KL", "token_kl", t, mem,
                    notes=f"max |diff| {float((naive_kl(p, q) - kl()).abs().max()):.1e}"))
    for name, fwd, floor_reads in (
        ("token_entropy", lambda x: F.token_entropy(x), 1),
        ("selected_logprobs", lambda x: F.selected_logprobs(x, torch.zeros(B, T, dtype=torch.long, device=device)), 1),
    ):
        t_f = _time(lambda: fwd(p), device, sz)
        rows.append(row(f"{name} {shape} forward vs floor", "read the logits once", name,
                        _vs_floor(t_f, floor_reads * one / bw), target="<= 3x"))
        leaf = p.detach().requires_grad_(True)
        g = torch.ones(B, T, device=device)

        def fwd_bwd(leaf=leaf, fwd=fwd, g=g):
            leaf.grad = None
            fwd(leaf).backward(g)

        t_fb = _time(fwd_bwd, device, sz)
        rows.append(row(f"{name} {shape} forward+backward vs floor", "read twice, write the gradient once",
                        f"{name} fwd+bwd", _vs_floor(t_fb, 3 * one / bw), target="<= 3x",
                        notes=f"the gradient itself is {fmt_bytes(one)}{_mem(fwd_bwd, device)}"))
        del leaf
    del p, q
    B, T, V = sz["kl_small"]
    p, q = _logits((B, T, V), torch.float32, device, seed=1)
    t = _ratio(lambda: naive_kl(p, q), lambda: F.token_kl(p, q), device, sz)
    rows.append(row(f"token_kl [{B}, {T}, {V}] fp32 vs naive", "naive two-log_softmax KL", "token_kl", t,
                    notes=f"floor (both read once) {fmt_time(2 * p.numel() * 4 / bw)}"))
    return rows


def _fused_rows(device: torch.device, sz: dict) -> list[dict]:
    N, H, V = sz["fused"]
    g = torch.Generator(device=device).manual_seed(2)
    weight = (torch.randn(V, H, generator=g, device=device) / H**0.5).to(torch.bfloat16)
    hp = torch.randn(N, H, generator=g, device=device).to(torch.bfloat16)
    hq = (hp.float() + 0.3 * torch.randn(N, H, generator=g, device=device)).to(torch.bfloat16)
    fused = lambda: F.fused_token_kl(hp, hq, weight)  # noqa: E731
    matmuls = lambda: (hp @ weight.T, hq @ weight.T)  # noqa: E731
    t = _ratio(matmuls, fused, device, sz)
    shape = f"N={N}, H={H}, V={V} bf16"
    rows = [row(f"fused_token_kl {shape} vs matmuls", "two LM-head matmuls", "fused_token_kl", t, target="<= 1.3x")]
    materialised = lambda: F.token_kl(hp @ weight.T, hq @ weight.T)  # noqa: E731
    m_mat, m_fused = peak_bytes(materialised, device), peak_bytes(fused, device)
    if m_fused is not None:
        rows.append(row(f"fused_token_kl {shape}: memory", "token_kl on materialised logits", "fused_token_kl",
                        memory={"baseline_bytes": m_mat, "candidate_bytes": m_fused, "ratio": m_fused / max(1, m_mat)},
                        target="extra <= 1 GiB", status="ok" if m_fused <= 2**30 else "miss"))
    t_mat = _ratio(materialised, fused, device, sz)
    rows.append(row(f"fused_token_kl {shape} vs materialised", "LM head + token_kl", "fused_token_kl", t_mat))
    return rows


# ---------------------------------------------------------------------------------- the model


def build_model(device: torch.device, m: dict) -> Any:
    """A random-weight Qwen2.5-VL of the given language-model shape (bf16 on GPUs), built on ``device``."""
    import transformers as tf

    head_dim = m["hidden"] // m["heads"]
    text = dict(vocab_size=m["vocab"], hidden_size=m["hidden"], intermediate_size=m["mlp"],
                num_hidden_layers=m["layers"], num_attention_heads=m["heads"], num_key_value_heads=m["kv_heads"],
                max_position_embeddings=8192, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                 "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]})
    vision = dict(depth=1, hidden_size=32, out_hidden_size=m["hidden"], intermediate_size=64, num_heads=2,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  fullatt_block_indexes=[0])
    image, start, end, video = _special(m["vocab"])
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=image,
                              video_token_id=video, vision_start_token_id=start, vision_end_token_id=end)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = tf.Qwen2_5_VLForConditionalGeneration._from_config(copy.deepcopy(cfg), attn_implementation="sdpa",
                                                                   dtype=dtype)
    return model.eval()


def model_batch(m: dict, B: int, device: torch.device, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``B`` rows of ``m["tokens"]`` tokens: [text, start, image tokens, end, 30 text] then the response."""
    gh, gw = m["grid"]
    n_img = gh * gw
    P = 1 + 1 + n_img + 1 + 30
    T = m["tokens"] - P
    image, start, end, _ = _special(m["vocab"])
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, image, (B, m["tokens"]), generator=g)
    ids[:, 1], ids[:, 2:2 + n_img], ids[:, 2 + n_img] = start, image, end
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None] < lengths[:, None]
    attn = torch.cat([torch.ones(B, P, dtype=torch.long), mask.long()], 1)
    grid = [1, 2 * gh, 2 * gw]
    pixels = torch.randn(B * grid[1] * grid[2], 3 * 2 * 14 * 14, generator=g)
    # ids and masks stay on the host, as a trainer's rollout keeps them; pixels go to the device
    inputs = {"input_ids": ids, "attention_mask": attn, "pixel_values": pixels.to(device),
              "image_grid_thw": torch.tensor([grid] * B)}
    return inputs, mask


def _model_rows(device: torch.device, sz: dict) -> list[dict]:
    from rlcredit_mm import AttentionConnectivity, VisualKL

    m = sz["model"]
    model = build_model(device, m)
    policy = rlcredit.HFPolicy(model, rows_per_chunk=m["B"])
    inputs, mask = model_batch(m, m["B"], device)
    rollout = rlcredit.Rollout(mask.to(device), torch.zeros(m["B"], device=device),
                               torch.zeros(m["B"], dtype=torch.long, device=device), model_inputs=inputs)
    prepared = policy.adapter.prepare_inputs(inputs, model)
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prepared.items()}

    def forward():
        with torch.no_grad():
            return model.model(**on_device, use_cache=False).last_hidden_state

    shape = (f"hidden {m['hidden']}, {m['layers']} layers, B={m['B']}, {m['tokens']} tokens "
             f"({m['grid'][0] * m['grid'][1]} image), V={m['vocab']}")
    conn = AttentionConnectivity()
    n_layers = len(conn.chosen_layers(m["layers"]))
    rows = [row(f"AttentionConnectivity ({n_layers} of {m['layers']} layers) vs forward", "plain sdpa forward",
                "attention_connectivity", _ratio(forward, lambda: conn(rollout, policy).score, device, sz),
                target="<= 1.05x", notes=shape + _mem(lambda: conn(rollout, policy).score, device))]
    for estimate in ("exact", "fused", "k3"):
        est = VisualKL(estimate=estimate)
        rows.append(row(f"VisualKL({estimate}) vs forward", "plain sdpa forward", f"VisualKL({estimate})",
                        _ratio(forward, lambda est=est: est(rollout, policy), device, sz),
                        notes="context: two forwards + the LM head on the response tokens are ~2.1x"))
    del on_device
    B = m["B_at_rl"]
    big, big_mask = model_batch(m, B, device, seed=1)
    big_rollout = rlcredit.Rollout(big_mask.to(device), torch.rand(B, device=device),
                                   torch.arange(B, device=device) // max(1, B // 8), model_inputs=big)
    at_rl = rlcredit.build("at_rl")
    chunked = rlcredit.HFPolicy(model, rows_per_chunk=m["rows_per_chunk"])
    big_prepared = chunked.adapter.prepare_inputs(big, model)

    def big_forward():
        with torch.no_grad():
            for s in range(0, B, chunked.rows_per_chunk):
                part = chunked.slice_rows(big_prepared, slice(s, min(B, s + chunked.rows_per_chunk)))
                part = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in part.items()}
                model.model(**part, use_cache=False)

    rows.append(row(f"at_rl assign B={B} vs forward", f"plain sdpa forward of the {B} rows",
                    "at_rl assign (connectivity + METIS)",
                    _ratio(big_forward, lambda: at_rl.assign(big_rollout, chunked), device, sz),
                    target="<= 1.5x", notes=f"rows_per_chunk={chunked.rows_per_chunk}"))
    del model
    return rows


def _strategy_rows(device: torch.device, sz: dict) -> list[dict]:
    B, T = sz["strategy"]
    batch = {k: v.to(device) for k, v in bench_strategy.make_batch(B, T).items()}
    rows = []
    bare = bench_strategy._step_fn("bare", batch)
    for name, target in (("grpo", "<= 1.05x"), ("vppo", "<= 1.15x")):
        _, how = bench_strategy._strategy(name)
        rows.append(row(f"{name} assign+loss B={B} T={T}", "bare GRPO clipped loss (fwd+bwd)",
                        f"{name}: assign + loss (fwd+bwd)", _ratio(bare, bench_strategy._step_fn(name, batch), device, sz),
                        target=target, notes=how))
    return rows


# ---------------------------------------------------------------------------------------- run


def run(quick: bool, device: str = "cuda") -> list[dict]:
    """Every row of the GPU table on ``device`` (``quick``: toy sizes, for testing the code path)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("bench_gpu: no CUDA device (torch.cuda.is_available() is False); "
                           "run `python -m benchmarks` for the CPU suite.")
    sz = QUICK if quick else FULL
    torch.manual_seed(0)
    bw = bandwidth(dev, sz["copy_bytes"], sz)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = [row("copy bandwidth", "-", f"{fmt_bytes(sz['copy_bytes'])} copy", None,
                notes=f"{bw / 1e12:.3f} TB/s (read + write) on {name}: the kernels' floor")]
    for part in (_vocab_rows, _fused_rows, _model_rows, _strategy_rows):
        rows += part(dev, sz, bw) if part is _vocab_rows else part(dev, sz)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows
