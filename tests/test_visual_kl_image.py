"""VisualKL(stage="image"): blacken the PIL image, then the image processor (VPPO's released order).

Tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL models with their image processors built offline from the
class (``Qwen2VLImageProcessorPil``, which serves all three); raw images of sizes that the
processor resizes, so the 14-px squares straddle the ViT patches as in the released pipeline.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mm_models import END, IMAGE, START, make_vlm
from PIL import Image

import rlcredit
from rlcredit.errors import AdapterError, RolloutError, SpecError
from rlcredit_mm import VisualKL
from rlcredit_mm import adapters as A
from rlcredit_mm import perturb as P
from rlcredit_mm.images import RawImages, perturb_raw_images

SIZES = [[(50, 70)], [(45, 90), (64, 64)], []]  # (W, H) of each row's images; the last row has none
_KITS: dict[str, tuple] = {}


def processor_for(arch: str, min_side: int = 2):
    """The arch's image processor (Qwen2-VL's class; Qwen3-VL: 16-px patches, mean = std = 0.5).

    Pixel limits as the released configs (``min_pixels`` ``(min_side * f)^2``, ``max_pixels``
    ``1280 f^2``, ``f`` = patch * merge): an image within them is only rounded to multiples of ``f``.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kw = dict(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3) if arch.startswith("qwen3") else {}
    f = 32 if arch.startswith("qwen3") else 28
    return Qwen2VLImageProcessorPil(size={"shortest_edge": (min_side * f) ** 2, "longest_edge": 1280 * f * f},
                                    temporal_patch_size=2, merge_size=2, **kw)


def kit(arch: str):
    """``(model, processor, raw images per row, model_inputs, response mask)``, built once per arch."""
    if arch not in _KITS:
        model, _ = make_vlm(arch)
        proc = processor_for(arch)
        g = np.random.RandomState(0)
        images = [[Image.fromarray(g.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in row] for row in SIZES]
        flat = [img for row in images for img in row]
        out = proc(images=flat, return_tensors="pt")
        tokens = (out["image_grid_thw"].prod(-1) // 4).tolist()
        T, lengths = 5, [5, 3, 4]
        prompts, k = [], 0
        for row in images:
            ids = [5]
            for _ in row:
                ids += [START] + [IMAGE] * tokens[k] + [END]
                k += 1
            prompts.append(ids + [6, 7])
        P_len = max(map(len, prompts))
        ids = torch.zeros(3, P_len + T, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
        tok = torch.Generator().manual_seed(1)
        for b, p in enumerate(prompts):
            ids[b, P_len - len(p):P_len] = torch.tensor(p)
            attn[b, P_len - len(p):P_len] = 1
            ids[b, P_len:P_len + lengths[b]] = torch.randint(10, 80, (lengths[b],), generator=tok)
            attn[b, P_len:P_len + lengths[b]] = 1
        inputs = {"input_ids": ids, "attention_mask": attn, "pixel_values": out["pixel_values"],
                  "image_grid_thw": out["image_grid_thw"]}
        _KITS[arch] = (model, proc, images, inputs, mask)
    return _KITS[arch]


def rollout(mask, inputs, **kw):
    return rlcredit.Rollout(mask, torch.zeros(3), torch.zeros(3, dtype=torch.long), model_inputs=inputs, **kw)


def blackened_by_hand(images, inputs, pert):
    """Each image blackened on its own (``apply_pil`` with the documented per-image seed), then processed."""
    keys = P.row_keys(inputs["input_ids"], inputs["attention_mask"], pert.seed)
    out = []
    for b, row in enumerate(images):
        for i, img in enumerate(row):
            seed = int(P.per_image_keys(keys[b:b + 1], torch.tensor([i]))[0])
            out.append(pert.apply_pil(img, seed=seed))
    return out


def released_blackening(pil_img, draws, patch_size=14, black_prob=0.5):
    """``verl/workers/perc_utils.py`` L5-18 (huaixuheqing/VPPO-RL), ``np.random.rand()`` replaced by ``draws``."""
    img = np.array(pil_img).astype(np.float32)
    h, w = img.shape[:2]
    for y in range(0, h, patch_size):
        for x in range(0, w, patch_size):
            if next(draws) < black_prob:
                y_end = min(y + patch_size, h)
                x_end = min(x + patch_size, w)
                img[y:y_end, x:x_end, :] = 0
    return Image.fromarray(img.astype(np.uint8))


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_stage_image_equals_blackening_the_pil_image_then_the_processor(arch):
    model, proc, images, inputs, mask = kit(arch)
    pert = P.PatchBlackout(p=0.5, seed=3)
    raw = RawImages(images, proc)
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2)
    by_hand = proc(images=blackened_by_hand(images, inputs, pert), return_tensors="pt")
    # the perturbed model inputs, whole batch and row chunk by row chunk
    prepared = policy.adapter.prepare_inputs(inputs, model)
    whole = perturb_raw_images(prepared, raw, slice(0, 3), pert, policy.adapter)
    assert torch.equal(whole["pixel_values"], by_hand["pixel_values"])
    assert torch.equal(whole["image_grid_thw"], inputs["image_grid_thw"])
    # the score: k3 of naive full-batch forwards on the original and the hand-perturbed pixels
    T = mask.shape[1]
    with torch.no_grad():
        lp = torch.log_softmax(model(**prepared).logits[:, -T - 1:-1].double(), -1)
        lq = torch.log_softmax(model(**{**prepared, "pixel_values": by_hand["pixel_values"]}).logits[:, -T - 1:-1].double(), -1)
    y = inputs["input_ids"][:, -T:, None]
    d = (lq.gather(-1, y) - lp.gather(-1, y))[..., 0].clamp(-20, 20)
    want = torch.where(mask, (d.exp() - d - 1).clamp(0, 10), 0.0)
    r = rollout(mask, {**inputs, "raw_images": raw})
    got = VisualKL(perturbation=pert, stage="image")(r, policy)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    assert float(want.max()) > 1e-6  # the image matters: the check has teeth
    one_by_one = VisualKL(perturbation=pert, stage="image")(r, rlcredit.HFPolicy(model, rows_per_chunk=1))
    torch.testing.assert_close(one_by_one, got, atol=1e-6, rtol=0)  # seeds follow each row's tokens, not batching


def test_apply_pil_is_the_released_blackening_with_our_draws():
    g = np.random.RandomState(1)
    pert = P.PatchBlackout(p=0.5, seed=7)
    for h, w in [(50, 70), (28, 28), (97, 41)]:
        img = Image.fromarray(g.randint(1, 256, (h, w, 3), dtype=np.uint8))  # no black pixel of its own
        for seed in (0, 5):
            key = P._mix(P._seed_key(pert.seed) ^ P._seed_key(seed))[None]
            draws = iter(P.uniform(key, math.ceil(h / 14) * math.ceil(w / 14))[0].tolist())  # row-major squares
            want = np.asarray(released_blackening(img, draws))
            got = np.asarray(pert.apply_pil(img, seed=seed))
            assert np.array_equal(got, want) and (got == 0).any() and (got != 0).any()


def test_image_stage_straddles_vit_patches_where_the_pixel_stage_aligns_to_them():
    """The issue's figures: after the processor's resize most ViT patches are partly black."""
    model, proc, images, inputs, mask = kit("qwen2_5_vl")
    g = np.random.RandomState(2)
    img = Image.fromarray(g.randint(1, 256, (375, 500, 3), dtype=np.uint8))  # rounded to 364 x 504
    proc = processor_for("qwen2_5_vl")
    cfg, ad = model.config, A.adapter_for(model)
    shares = {}
    for stage in ("image", "pixels"):
        full = part = total = 0
        for seed in range(4):
            if stage == "image":
                out = proc(images=[P.PatchBlackout().apply_pil(img, seed=seed)], return_tensors="pt")
            else:
                out = dict(proc(images=[img], return_tensors="pt"))
                n = int(out["image_grid_thw"].prod()) // 4
                ids = torch.tensor([[seed + 1] + [IMAGE] * n])  # the first token varies the row's draw
                out = P.PatchBlackout()({"input_ids": ids, **out}, cfg, adapter=ad)
            grid = out["image_grid_thw"][0].tolist()
            frame = ad.unflatten(out["pixel_values"], grid, cfg)[0]
            black = (frame - ad.black(cfg).view(3, 1, 1)).abs().amax(0) < 0.02  # within resampling noise
            cells = black.unfold(0, 14, 14).unfold(1, 14, 14).flatten(2)
            full += int(cells.all(-1).sum())
            part += int((cells.any(-1) & ~cells.all(-1)).sum())
            total += cells.shape[0] * cells.shape[1]
        shares[stage] = (full / total, part / total)
    assert shares["pixels"][1] == 0 and 0.45 < shares["pixels"][0] < 0.55  # whole patches, p = 0.5
    assert shares["image"][0] < 0.2 and shares["image"][1] > 0.6  # straddled: mostly partly black


def test_raw_images_are_not_a_model_input():
    model, proc, images, inputs, mask = kit("qwen2_vl")
    policy = rlcredit.HFPolicy(model)
    with_raw = {**inputs, "raw_images": RawImages(images, proc)}
    assert "raw_images" not in policy.adapter.prepare_inputs(with_raw, model)
    torch.testing.assert_close(policy.response_stats(with_raw, mask).logprobs,
                               policy.response_stats(inputs, mask).logprobs, atol=0, rtol=0)
    exact = VisualKL(estimate="exact", stage="image", perturbation=P.PatchBlackout(seed=1))
    assert (exact(rollout(mask, with_raw), policy) >= 0).all()  # exact / fused perturb the same way


def test_stage_image_errors_are_clear():
    model, proc, images, inputs, mask = kit("qwen2_vl")
    policy = rlcredit.HFPolicy(model)
    est = VisualKL(stage="image")
    with pytest.raises(RolloutError, match=r"model_inputs\['raw_images'\] must be a rlcredit_mm.images.RawImages"):
        est(rollout(mask, inputs), policy)
    with pytest.raises(RolloutError, match="holds 2 rows, not B = 3"):
        est(rollout(mask, {**inputs, "raw_images": RawImages(images[:2], proc)}), policy)
    other = processor_for("qwen2_vl", min_side=4)  # a processor that resizes to another grid
    with pytest.raises(AdapterError, match="does not match the model inputs"):
        est(rollout(mask, {**inputs, "raw_images": RawImages(images, other)}), policy)
    with pytest.raises(RolloutError, match="hold no raw image"):
        est(rollout(mask, {**inputs, "raw_images": RawImages([[], [], []], proc)}), policy)
    with pytest.raises(SpecError, match="one list of PIL images per row"):
        RawImages(images[0][0], proc)
    with pytest.raises(SpecError, match=r"images\[0\]\[0\] must be a PIL.Image.Image"):
        RawImages([[np.zeros((4, 4))]], proc)
    with pytest.raises(SpecError, match="image processor"):
        RawImages(images, object())
    with pytest.raises(AdapterError, match="use stage='pixels'"):
        perturb_raw_images(inputs, RawImages(images, proc), slice(0, 3), P.PatchBlackout(), A.Idefics3Adapter())


def test_signals_need_no_raw_images():
    """With precomputed aug_logprobs the stage plays no part (as in the released trainer)."""
    r = rlcredit.Rollout(torch.ones(1, 2, dtype=torch.bool), torch.zeros(1), torch.zeros(1, dtype=torch.long),
                         old_logprobs=torch.zeros(1, 2), signals={"aug_logprobs": torch.tensor([[-1.0, 0.0]])})
    assert torch.equal(VisualKL(stage="image")(r), VisualKL()(r))
