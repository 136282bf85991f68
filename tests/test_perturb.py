"""Perturbations: the counter-based generator, each perturbation's maths, seeding, PIL, specs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from mm_models import ARCHS, END, IMAGE, QWEN_ARCHS, START, make_vlm

import rlcredit
from rlcredit.errors import RegistryError, SpecError
from rlcredit.registry import build_component
from rlcredit_mm import adapters as A
from rlcredit_mm import perturb as P

QWEN = QWEN_ARCHS
PIXEL_PERTURBATIONS = [P.PatchBlackout(p=0.75), P.GaussianNoise(), P.Constant(), P.Blur(), P.Constant(value=0.25)]
_MODELS: dict[str, tuple] = {}


def vlm(arch: str):
    if arch not in _MODELS:
        _MODELS[arch] = make_vlm(arch)
    return _MODELS[arch]


def batch(arch: str, seed: int = 0, B: int = 3):
    model, make_inputs = vlm(arch)
    images = [1] * B if arch == "llava" else [1, 2, 0][:B]
    return make_inputs(B, 3, 4, seed, lengths=[4, 2, 3][:B], images=images)


def pixels_by_image(arch: str, inputs, config) -> list[torch.Tensor]:
    """Every real image as [C, H, W] (plain loop, independent of map_images)."""
    px = inputs["pixel_values"]
    if arch in QWEN:
        ad, out, start = A.adapter_for(config), [], 0
        for g in inputs["image_grid_thw"].tolist():
            n = g[0] * g[1] * g[2]
            out.append(ad.unflatten(px[start:start + n], g, config)[0])
            start += n
        return out
    if arch in ("idefics3", "smolvlm"):
        return [px[b, i] for b in range(px.shape[0]) for i in range(px.shape[1]) if px[b, i].any()]
    return list(px)


# --- the generator ------------------------------------------------------------------------------


def _splitmix_ref(x: int) -> int:
    m = (1 << 64) - 1
    x &= m
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & m
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=1, max_size=20))
def test_mix_is_splitmix64_with_wrapping_int64(values):
    got = P._mix(torch.tensor(values, dtype=torch.long)).tolist()
    assert [g & ((1 << 64) - 1) for g in got] == [_splitmix_ref(v) for v in values]


@given(st.lists(st.integers(1, 1000), min_size=1, max_size=12), st.integers(0, 4), st.integers(0, 4),
       st.integers(0, 2**31))
def test_row_key_ignores_padding_and_sees_every_token(tokens, left, right, seed):
    n = len(tokens)
    plain = torch.tensor([tokens])
    padded = torch.tensor([[0] * left + tokens + [0] * right])
    attn = torch.tensor([[0] * left + [1] * n + [0] * right])
    key = P.row_keys(plain, seed=seed)
    assert torch.equal(P.row_keys(padded, attn, seed), key)
    changed = list(tokens)
    changed[-1] += 1
    assert not torch.equal(P.row_keys(torch.tensor([changed]), seed=seed), key)
    assert not torch.equal(P.row_keys(plain, seed=seed + 1), key)
    if n > 1 and tokens[0] != tokens[1]:  # order matters
        swapped = [tokens[1], tokens[0]] + tokens[2:]
        assert not torch.equal(P.row_keys(torch.tensor([swapped]), seed=seed), key)


def test_uniform_and_normal_statistics():
    keys = torch.arange(4)
    u = P.uniform(keys, 50_000)
    assert u.min() >= 0 and u.max() < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    z = P.normal(keys, 50_000)
    assert torch.isfinite(z).all()
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    assert not torch.equal(u[0], u[1])  # different keys, different streams
    assert torch.equal(P.uniform(keys, 10), P.uniform(keys, 10))


# --- each perturbation's maths -----------------------------------------------------------------


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 1.0])
def test_patch_blackout_whole_squares_with_probability_p(p):
    images = torch.randn(8, 3, 70, 84) + 5.0  # never equal to black by chance
    black = torch.tensor([-1.0, -2.0, -3.0])
    out = P.PatchBlackout(p=p).perturb_images(images, torch.arange(8), black=black, patch_size=14)
    hit = out[:, 0] == -1.0
    assert torch.equal(out, torch.where(hit[:, None], black.view(1, 3, 1, 1), images))
    cells = hit.unfold(1, 14, 14).unfold(2, 14, 14)  # [8, 5, 6, 14, 14]
    assert torch.all(cells.all(-1).all(-1) | ~cells.any(-1).any(-1))  # aligned, whole squares
    frac = float(cells.float().mean())
    assert (frac == p) if p in (0.0, 1.0) else abs(frac - p) < 0.1


def test_patch_blackout_partial_edge_squares_and_own_patch_size():
    images = torch.ones(1, 1, 5, 5)
    out = P.PatchBlackout(p=1.0, patch_size=2).perturb_images(images, torch.tensor([0]), black=torch.tensor([0.0]),
                                                                patch_size=99)
    assert torch.all(out == 0)  # ceil(5/2) = 3 squares per side cover the edge; patch_size field wins
    keys = torch.arange(200)
    out = P.PatchBlackout(p=0.5).perturb_images(torch.ones(200, 1, 3, 3), keys, black=torch.tensor([0.0]), patch_size=2)
    edge = out[:, 0, 2, 2] == 0  # the 1x1 corner square is its own Bernoulli(0.5) draw
    assert 60 < int(edge.sum()) < 140


def test_gaussian_noise_adds_std_times_normal():
    images = torch.randn(2, 3, 16, 16)
    keys = torch.tensor([11, 12])
    out = P.GaussianNoise(std=0.3).perturb_images(images, keys, black=torch.zeros(3), patch_size=14)
    torch.testing.assert_close(out, images + 0.3 * P.normal(keys, 3 * 16 * 16).view(2, 3, 16, 16))
    assert torch.equal(P.GaussianNoise(std=0.0).perturb_images(images, keys, black=torch.zeros(3), patch_size=1), images)


def test_constant_fills_black_or_value():
    images = torch.randn(2, 3, 4, 4)
    black = torch.tensor([-1.0, -2.0, -3.0])
    out = P.Constant().perturb_images(images, torch.arange(2), black=black, patch_size=1)
    assert torch.equal(out, black.view(1, 3, 1, 1).expand(2, 3, 4, 4))
    assert torch.all(P.Constant(value=0.25).perturb_images(images, torch.arange(2), black=black, patch_size=1) == 0.25)


def _blur_reference(img: torch.Tensor, sigma: float, k: int) -> torch.Tensor:
    """Plain-loop 2-D Gaussian blur with replicate padding of one [H, W] image."""
    r = k // 2
    w = [math.exp(-0.5 * ((i - r) / sigma) ** 2) for i in range(k)]
    s = sum(w)
    w = [x / s for x in w]
    H, W = img.shape
    out = torch.zeros(H, W, dtype=torch.float64)
    for y in range(H):
        for x in range(W):
            acc = 0.0
            for dy in range(k):
                for dx in range(k):
                    yy = min(max(y + dy - r, 0), H - 1)
                    xx = min(max(x + dx - r, 0), W - 1)
                    acc += w[dy] * w[dx] * float(img[yy, xx])
            out[y, x] = acc
    return out.float()


@pytest.mark.parametrize("sigma,k", [(1.0, None), (0.7, 3), (2.0, 5)])
def test_blur_matches_a_plain_loop(sigma, k):
    img = torch.randn(1, 2, 6, 7)
    out = P.Blur(sigma=sigma, kernel_size=k).perturb_images(img, torch.tensor([0]), black=torch.zeros(2), patch_size=1)
    k = k or 2 * math.ceil(3 * sigma) + 1
    for c in range(2):
        torch.testing.assert_close(out[0, c], _blur_reference(img[0, c], sigma, k), atol=1e-5, rtol=0)
    flat = torch.full((1, 2, 6, 7), 3.0)
    torch.testing.assert_close(P.Blur(sigma=sigma).perturb_images(flat, torch.tensor([0]), black=torch.zeros(2),
                                                                  patch_size=1), flat)


# --- on model inputs: only pixels change, seeds reproduce --------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_only_image_pixels_change(arch):
    model, _ = vlm(arch)
    inputs, _ = batch(arch)
    ad = A.adapter_for(model)
    before = pixels_by_image(arch, inputs, model.config)
    for pert in PIXEL_PERTURBATIONS:
        out = pert(inputs, model)
        assert set(out) == set(inputs)
        for key, value in inputs.items():
            if key == "pixel_values":
                assert out[key].shape == value.shape and out[key].dtype == value.dtype
            else:
                assert torch.equal(out[key], value), (pert, key)
        after = pixels_by_image(arch, out, model.config)
        assert len(after) == len(before)
        assert all(not torch.equal(a, b) for a, b in zip(after, before)), pert
        if arch in ("idefics3", "smolvlm"):  # padding images stay all-zero
            real = inputs["pixel_values"].flatten(2).any(-1)
            assert torch.all(out["pixel_values"][~real] == 0)
        if isinstance(pert, P.Constant) and pert.value is None:
            black = ad.black(model.config).view(3, 1, 1)
            assert all(torch.allclose(a, black.expand_as(a)) for a in after)
    assert not any("pixel" in k for k in P.Drop()(ad.prepare_inputs(inputs, model), model))


@pytest.mark.parametrize("arch", ARCHS)
def test_blackout_on_model_inputs_is_aligned_to_the_patch_grid(arch):
    model, _ = vlm(arch)
    inputs, _ = batch(arch)
    out = P.PatchBlackout(p=0.5)(inputs, model)
    black = A.adapter_for(model).black(model.config)
    for a, b in zip(pixels_by_image(arch, out, model.config), pixels_by_image(arch, inputs, model.config)):
        hit = (a == black.view(3, 1, 1)).all(0)
        assert torch.equal(a, torch.where(hit, black.view(3, 1, 1), b))
        size = A.adapter_for(model).patch_size(model.config)  # 14, or 16 for Qwen3-VL
        cells = hit.unfold(0, size, size).unfold(1, size, size)
        assert torch.all(cells.all(-1).all(-1) | ~cells.any(-1).any(-1))
    if arch in QWEN:  # both temporal copies of a Qwen image get the same mask
        ad = A.adapter_for(model)
        g = inputs["image_grid_thw"][0].tolist()
        frames = ad.unflatten(out["pixel_values"][: g[0] * g[1] * g[2]], g, model.config)
        assert torch.equal(frames[0], frames[1]) and bool((frames[0] == black.view(3, 1, 1)).any())


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava", "idefics3", "gemma3"])
@pytest.mark.parametrize("pert", [P.PatchBlackout(p=0.5, seed=3), P.GaussianNoise(std=1.0, seed=3)])
def test_seeds_reproduce_and_rows_are_independent_of_batching(arch, pert):
    model, _ = vlm(arch)
    inputs, _ = batch(arch)
    ad = A.adapter_for(model)
    prepared = ad.prepare_inputs(inputs, model)
    a, b = pert(prepared, model), pert(prepared, model)
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    other = type(pert)(**{**{f: getattr(pert, f) for f in ("p", "std") if hasattr(pert, f)}, "seed": 4})
    assert not torch.equal(other(prepared, model)["pixel_values"], a["pixel_values"])
    # Row b perturbed inside the batch == row b perturbed alone.
    whole = pixels_by_image(arch, a, model.config)
    alone = []
    for r in range(3):
        chunk = ad.slice_rows(prepared, slice(r, r + 1))
        if "pixel_values" in chunk:
            alone += pixels_by_image(arch, pert(chunk, model), model.config)
    assert len(alone) == len(whole) and all(torch.equal(x, y) for x, y in zip(alone, whole))
    # A different response (one token of row 0) gives row 0 a fresh draw and leaves the others.
    draws = set()
    for token in range(2, 12):
        ids = prepared["input_ids"].clone()
        ids[0, -4] = token
        changed = pixels_by_image(arch, pert({**prepared, "input_ids": ids}, model), model.config)
        assert torch.equal(changed[-1], whole[-1])
        draws.add(changed[0].numpy().tobytes())
    assert len(draws) >= 5  # tiny 28 px images have only 2 x 2 squares: masks may repeat, not always


def test_drop_keeps_markers_that_do_not_wrap_an_image():
    model, _ = vlm("qwen2_vl")
    ids = torch.tensor([[3, START, IMAGE, END, 4, 5, START, 6]])  # the response holds a stray START
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.zeros(4, 1176), "image_grid_thw": torch.tensor([[1, 2, 2]])}
    out = P.Drop()(inputs, model)
    assert out["input_ids"].tolist() == [[3, 4, 5, START, 6]]
    assert set(out) == {"input_ids", "attention_mask"}


# --- PIL ---------------------------------------------------------------------------------------


def _pil(mode="RGB", size=(56, 42), seed=0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    return Image.fromarray(rng.randint(30, 226, shape, dtype=np.uint8), mode=mode)


def test_pil_blackout_squares_of_14_px_and_seeds():
    img = _pil()
    out = P.PatchBlackout().apply_pil(img, seed=5)
    assert out.size == img.size and out.mode == "RGB"
    arr, src = np.asarray(out), np.asarray(img)
    black = (arr == 0).all(-1)
    assert np.array_equal(arr, np.where(black[..., None], 0, src))
    cells = torch.from_numpy(black[:42, :56]).unfold(0, 14, 14).unfold(1, 14, 14)
    assert torch.all(cells.all(-1).all(-1) | ~cells.any(-1).any(-1)) and 0 < black.mean() < 1
    assert np.array_equal(np.asarray(P.PatchBlackout().apply_pil(img, seed=5)), arr)
    assert not np.array_equal(np.asarray(P.PatchBlackout().apply_pil(img, seed=6)), arr)
    assert np.all(np.asarray(P.PatchBlackout(p=1.0).apply_pil(img)) == 0)
    assert np.array_equal(np.asarray(P.PatchBlackout(p=0.0).apply_pil(img)), src)


def test_pil_other_perturbations():
    img = _pil()
    src = np.asarray(img).astype(np.float64) / 255
    assert np.all(np.asarray(P.Constant().apply_pil(img)) == 0)
    assert np.all(np.asarray(P.Constant(value=1.0).apply_pil(img)) == 255)
    noisy = np.asarray(P.GaussianNoise(std=0.05).apply_pil(img, seed=1)).astype(np.float64) / 255
    assert 0.03 < (noisy - src).std() < 0.07
    blurred = np.asarray(P.Blur(sigma=2.0).apply_pil(img)).astype(np.float64) / 255
    assert blurred.std() < src.std()
    grey = P.PatchBlackout(p=1.0).apply_pil(_pil("L"))
    assert grey.mode == "L" and np.all(np.asarray(grey) == 0)
    with pytest.raises(SpecError, match="no PIL form"):
        P.Drop().apply_pil(img)


# --- registry and specs ------------------------------------------------------------------------


def test_registered_names_and_specs():
    assert {"patch_blackout", "gaussian_noise", "constant", "blur", "drop"} <= set(rlcredit.available("perturbation"))
    assert build_component("perturbation", "patch_blackout") == P.PatchBlackout()
    assert build_component("perturbation", {"name": "patch_blackout", "p": 0.6, "seed": 2}) == P.PatchBlackout(p=0.6, seed=2)
    obj = P.Blur(sigma=1.0)
    assert build_component("perturbation", obj) is obj
    with pytest.raises(RegistryError, match="did you mean 'patch_blackout'"):
        build_component("perturbation", "patch_blackot")


@pytest.mark.parametrize("spec,message", [
    ({"name": "patch_blackout", "p": 1.5}, r"PatchBlackout.p must be a number in \[0.0, 1.0\]"),
    ({"name": "patch_blackout", "patch_size": 0}, "patch_size must be an integer >= 1 or None"),
    ({"name": "patch_blackout", "seed": 0.5}, "seed must be an integer"),
    ({"name": "gaussian_noise", "std": -1.0}, "std must be a number"),
    ({"name": "blur", "kernel_size": 4}, "kernel_size must be odd"),
    ({"name": "blur", "sigma": 0.0}, "sigma must be a number"),
    ({"name": "constant", "value": float("nan")}, "finite number or None"),
    ({"name": "patch_blackout", "prob": 0.5}, "unknown parameter"),
])
def test_bad_specs(spec, message):
    with pytest.raises(SpecError, match=message):
        build_component("perturbation", spec)
