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
