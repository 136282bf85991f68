"""CUDA: the same numbers as the CPU, and no host synchronisation in ``assign`` or ``loss``.

Runs only where a GPU is present (``scripts/gpu_checks.sh`` runs it with the GPU benchmark table);
on CPU-only machines the module is skipped as a whole.
"""

from __future__ import annotations

import pytest
import torch

import rlcredit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Presets that run from signals alone (no model), and what each reads.
PRESETS = ["grpo", "dapo", "dr_grpo", "vppo", "entropy_forks", "stapo", "gspo"]


def _tensors(seed: int, B: int = 64, T: int = 48) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -3 * torch.rand(B, T, generator=g)
    zero = torch.zeros(())
    return {
        "mask": mask,
        "rewards": torch.randint(0, 2, (B,), generator=g).float(),
        "group_ids": torch.arange(B) // 8,
        "old": torch.where(mask, old, zero),
        "cur": torch.where(mask, old + 0.3 * torch.randn(B, T, generator=g), zero),
        "entropy": torch.where(mask, 3 * torch.rand(B, T, generator=g), zero),
        "aug": torch.where(mask, old - torch.rand(B, T, generator=g) * (torch.rand(B, T, generator=g) < 0.4), zero),
    }


def _strategy(name: str) -> rlcredit.Strategy:
    if name == "gspo":
        return rlcredit.build("grpo", policy_loss="gspo")
    return rlcredit.build(name)


def _run(name: str, t: dict[str, torch.Tensor], device: str):
    d = {k: v.to(device) for k, v in t.items()}
    rollout = rlcredit.Rollout(d["mask"], d["rewards"], d["group_ids"], old_logprobs=d["old"],
                               signals={"entropy": d["entropy"], "aug_logprobs": d["aug"]})
    strategy = _strategy(name)
    credit = strategy.assign(rollout)
    logp = d["cur"].clone().requires_grad_(True)
    out = strategy.loss(logp, rollout, credit)
    out.loss.backward()
    return credit, out, logp.grad


@pytest.mark.parametrize("name", PRESETS)
def test_cuda_equals_cpu(name):
    t = _tensors(0)
    c_cpu, o_cpu, g_cpu = _run(name, t, "cpu")
    c_gpu, o_gpu, g_gpu = _run(name, t, "cuda")
    assert torch.equal(c_cpu.token_weights, c_gpu.token_weights.cpu()), "identical masks and weights"
    torch.testing.assert_close(c_gpu.advantages.cpu(), c_cpu.advantages, atol=5e-7, rtol=1e-6)
    torch.testing.assert_close(o_gpu.loss.detach().cpu(), o_cpu.loss.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("name", PRESETS)
def test_assign_and_loss_never_sync_the_host(name):
    t = _tensors(1)
    _run(name, t, "cuda")  # warm up: lazy CUDA init, allocator
    torch.cuda.synchronize()
    d = {k: v.to("cuda") for k, v in t.items()}
    strategy = _strategy(name)
    torch.cuda.set_sync_debug_mode("error")
    try:  # building the rollout (its value checks), assign, the loss and its backward
        rollout = rlcredit.Rollout(d["mask"], d["rewards"], d["group_ids"], old_logprobs=d["old"],
                                   signals={"entropy": d["entropy"], "aug_logprobs": d["aug"]})
        credit = strategy.assign(rollout)
        logp = d["cur"].clone().requires_grad_(True)
        out = strategy.loss(logp, rollout, credit)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.loss).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vocabulary_kernels_on_cuda_equal_the_cpu(dtype):
    """The CUDA path (budget-sized chunks, compiled row functions) against the CPU's eager path."""
    from rlcredit import functional as F

    g = torch.Generator().manual_seed(3)
    B, T, V, H = 3, 17, 1000, 32
    lp, lq = torch.randn(B, T, V, generator=g).to(dtype), torch.randn(B, T, V, generator=g).to(dtype)
    lp[..., :7] = float("-inf")  # a masked vocabulary
    lq[..., :7] = float("-inf")
    mask = torch.rand(B, T, generator=g) < 0.8
    ids = torch.randint(7, V, (B, T), generator=g)
    hp, hq, w = torch.randn(B, T, H, generator=g), torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    cases = {
        "token_kl": lambda d: F.token_kl(lp.to(d), lq.to(d), mask.to(d)),
        "token_entropy": lambda d: F.token_entropy(lp.to(d), mask.to(d)),
        "selected_logprobs": lambda d: F.selected_logprobs(lp.to(d), ids.to(d)),
        "fused_token_kl": lambda d: F.fused_token_kl(hp.to(d), hq.to(d), w.to(d), mask.to(d)),
    }
    for name, fn in cases.items():
        torch.testing.assert_close(fn("cuda").cpu(), fn("cpu"), **tol, msg=name)
    x = lp.clone().requires_grad_(True)
    y = lp.to("cuda").clone().requires_grad_(True)
    F.token_entropy(x).sum().backward()
    F.token_entropy(y).sum().backward()
    torch.testing.assert_close(y.grad.cpu().float(), x.grad.float(), **tol)
