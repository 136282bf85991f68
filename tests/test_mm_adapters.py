"""Adapters: resolution, the transformers 5 traps, row slicing, the uniform image view, drop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from mm_models import ARCHS, END, IMAGE, QWEN_ARCHS, START, make_vlm, qwen_sizes, run_rows_alone

import rlcredit
from rlcredit.errors import AdapterError
from rlcredit_mm import adapters as A
from rlcredit_mm.perturb import Constant, Drop

EXPECTED = {
    "qwen2_vl": A.Qwen2VLAdapter, "qwen2_5_vl": A.Qwen25VLAdapter, "qwen3_vl": A.Qwen3VLAdapter,
    "qwen3_vl_moe": A.Qwen3VLMoeAdapter, "llava": A.LlavaAdapter,
    "idefics3": A.Idefics3Adapter, "smolvlm": A.Idefics3Adapter, "gemma3": A.Gemma3Adapter,
}
QWEN = QWEN_ARCHS
_MODELS: dict[str, tuple] = {}


def vlm(arch: str):
    if arch not in _MODELS:
        _MODELS[arch] = make_vlm(arch)
    return _MODELS[arch]


def images_for(arch: str, B: int = 3) -> list[int]:
    return [1] * B if arch == "llava" else [1, 2, 0][:B]


def batch(arch: str, B: int = 3, T: int = 5, lengths=(5, 2, 3), seed: int = 0, **kw):
    model, make_inputs = vlm(arch)
    return make_inputs(B, 3, T, seed, lengths=list(lengths)[:B], images=images_for(arch, B), **kw)


# --- resolution ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_resolves_its_adapter(arch):
    model, _ = vlm(arch)
    assert type(rlcredit.HFPolicy(model).adapter) is EXPECTED[arch]
    assert type(A.adapter_for(model)) is EXPECTED[arch]
    assert EXPECTED[arch].matches(model.config)
    others = [c for a, c in EXPECTED.items() if c is not EXPECTED[arch]]
    assert not any(c.matches(model.config) for c in others)


def test_unknown_vlm_names_the_supported_ones_and_how_to_register():
    cfg = transformers.PaliGemmaConfig()
    with pytest.raises(AdapterError) as err:
        A.adapter_for(cfg)
    msg = str(err.value)
    assert "'paligemma'" in msg and "qwen2_vl" in msg and "llava" in msg and "idefics3" in msg
    assert "register('adapter'" in msg and "matches(config)" in msg


def test_a_registered_adapter_is_picked_up():
    @rlcredit.register("adapter", "test_paligemma", override=True)
    class PaliGemmaAdapter(A.StackedImagesAdapter):
        model_types = ("paligemma",)

    try:
        assert isinstance(A.adapter_for(transformers.PaliGemmaConfig()), PaliGemmaAdapter)
    finally:
        from rlcredit.registry import _REGISTRY

        _REGISTRY["adapter"].pop("test_paligemma")


@pytest.mark.parametrize("arch", ARCHS)
def test_facts(arch):
    model, _ = vlm(arch)
    ad, cfg = A.adapter_for(model), model.config
    assert ad.image_token_id(cfg) == IMAGE
    assert ad.patch_size(cfg) == (16 if arch.startswith("qwen3") else 14)
    ids = torch.tensor([[1, IMAGE, 5, IMAGE]])
    assert ad.image_token_mask(ids, cfg).tolist() == [[False, True, False, True]]
    mods = ad.attention_modules(model)
    n_layers = cfg.get_text_config().num_hidden_layers
    assert len(mods) == n_layers
    lm = ad.language_model(model)
    assert all(m is lm.layers[i].self_attn for i, m in enumerate(mods))
    vision = [m for name, m in model.named_modules() if "vision" in name or "visual" in name]
    assert not any(m is v for m in mods for v in vision)  # the language model's, not the vision tower's
    expected_markers = {**{a: (START, END) for a in QWEN}, "gemma3": (START, END)}
    assert ad.marker_token_ids(cfg) == expected_markers.get(arch, ())


def test_black_is_zero_intensity_through_the_real_processors():
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    for adapter, proc in ((A.Qwen2VLAdapter(), Qwen2VLImageProcessorPil), (A.LlavaAdapter(), LlavaImageProcessorPil),
                          (A.Gemma3Adapter(), Gemma3ImageProcessorPil), (A.Idefics3Adapter(), Idefics3ImageProcessorPil)):
        mean, std = torch.tensor(proc.image_mean), torch.tensor(proc.image_std)
        assert torch.allclose(adapter.black(), (0 - mean) / std)


def test_qwen_unflatten_inverts_the_image_processor():
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    rng = np.random.RandomState(0)
    img = Image.fromarray(rng.randint(0, 256, (28, 56, 3), dtype=np.uint8))
    proc = Qwen2VLImageProcessorPil()
    out = proc(images=[img], do_resize=False, return_tensors="pt")
    ad, cfg = A.Qwen2VLAdapter(), transformers.Qwen2VLConfig()
    grid = out["image_grid_thw"][0].tolist()
    frames = ad.unflatten(out["pixel_values"], grid, cfg)
    pixels = torch.tensor(np.asarray(img), dtype=torch.float32).permute(2, 0, 1) / 255
    expected = (pixels - torch.tensor(proc.image_mean)[:, None, None]) / torch.tensor(proc.image_std)[:, None, None]
    assert frames.shape == (2, 3, 28, 56)  # temporal_patch_size copies of the image
    torch.testing.assert_close(frames, expected.expand(2, -1, -1, -1), atol=1e-5, rtol=0)
    assert torch.equal(ad.flatten(frames, grid, cfg), out["pixel_values"])
    # Blackening the PIL image before processing == Constant() on the processed patches.
    black = proc(images=[Constant().apply_pil(img)], do_resize=False, return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[cfg.image_token_id] * 2])
    got = Constant()({"input_ids": ids, **out}, cfg, adapter=ad)["pixel_values"]
    torch.testing.assert_close(got, black, atol=1e-5, rtol=0)


# --- the transformers 5 traps -------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe"])
def test_qwen_needs_mm_token_type_ids_and_prepare_adds_them(arch):
    model, _ = vlm(arch)
    inputs, mask = batch(arch)
    with pytest.raises(ValueError, match="mm_token_type_ids"), torch.no_grad():
        model(**inputs)
    prepared = A.adapter_for(model).prepare_inputs(inputs, model)
    assert torch.equal(prepared["mm_token_type_ids"], (inputs["input_ids"] == IMAGE).long())
    assert "mm_token_type_ids" not in inputs  # the caller's dict is not modified
    ref, _ = batch(arch, type_ids=True)
    assert torch.equal(prepared["mm_token_type_ids"], ref["mm_token_type_ids"])


def test_qwen3_vl_deepstack_and_interleaved_mrope_are_live_in_the_tiny_model():
    """The test model exercises what the adapter must not break: DeepStack features and 3-D positions."""
    model, _ = vlm("qwen3_vl")
    inputs, mask = batch("qwen3_vl")
    assert model.config.vision_config.deepstack_visual_indexes == [0]
    assert model.config.text_config.rope_parameters["mrope_section"] == [4, 2, 2]
    prepared = A.adapter_for(model).prepare_inputs(inputs, model)
    merger = model.model.visual.deepstack_merger_list[0].linear_fc2
    with torch.no_grad():
        logits = model(**prepared).logits
        saved = [p.clone() for p in merger.parameters()]
        for p in merger.parameters():
            p.zero_()  # DeepStack adds nothing now
        try:
            no_deepstack = model(**prepared).logits
        finally:
            for p, old in zip(merger.parameters(), saved):
                p.copy_(old)
        flat = model(**{**prepared, "position_ids": torch.arange(prepared["input_ids"].shape[1]).expand(3, 3, -1)}).logits
    rows = mask.any(1) & (prepared["mm_token_type_ids"].sum(1) > 0)  # rows with an image
    assert (logits[rows] - no_deepstack[rows]).abs().max() > 1e-4
    assert (logits[rows] - flat[rows]).abs().max() > 1e-4  # 3-D positions differ from 1-D ones


def test_qwen2_5_vl_silent_1d_fallback_is_avoided():
    model, _ = vlm("qwen2_5_vl")
    inputs, mask = batch("qwen2_5_vl")
    with_types, _ = batch("qwen2_5_vl", type_ids=True)
    with torch.no_grad():
        silent = model(**inputs).logits  # transformers quietly uses 1-D positions here
        right = model(**with_types).logits
    assert not torch.allclose(silent, right, atol=1e-4)
    lp = rlcredit.HFPolicy(model).response_stats(inputs, mask).logprobs
    ref = torch.log_softmax(right[:, -6:-1], -1).gather(-1, inputs["input_ids"][:, -5:, None])[..., 0]
    torch.testing.assert_close(lp, torch.where(mask, ref, 0.0), atol=1e-5, rtol=0)


def test_gemma3_prepare_adds_token_type_ids():
    model, _ = vlm("gemma3")
    inputs, _ = batch("gemma3")
    prepared = A.adapter_for(model).prepare_inputs(inputs, model)
    ref, _ = batch("gemma3", type_ids=True)
    assert torch.equal(prepared["token_type_ids"], ref["token_type_ids"])


def test_idefics3_real_image_never_becomes_padding():
    model, _ = vlm("idefics3")
    inputs, mask = batch("idefics3")
    px = inputs["pixel_values"]
    out = Constant(value=0.0)(inputs, model)["pixel_values"]  # the mean image is all zeros
    real = (px != 0).flatten(2).any(-1)
    assert torch.equal((out != 0).flatten(2).any(-1), real)  # real images stay real, padding stays padding
    assert out[~real].abs().sum() == 0
    assert out[real].abs().max() <= 1e-6
    stats = rlcredit.HFPolicy(model).response_stats(inputs, mask, transform=lambda c, r: Constant(value=0.0)(c, model))
    assert torch.isfinite(stats.logprobs).all()


def test_idefics3_leaves_pixels_outside_the_pixel_mask():
    model, _ = vlm("idefics3")
    inputs, _ = batch("idefics3")
    pam = inputs["pixel_attention_mask"].clone()
    pam[0, 0, :, 40:] = False  # a padded strip on the right of the first image
    inputs = {**inputs, "pixel_attention_mask": pam}
    out = Constant()(inputs, model)["pixel_values"]
    assert torch.equal(out[0, 0, :, :, 40:], inputs["pixel_values"][0, 0, :, :, 40:])
    assert torch.all(out[0, 0, :, :, :40] == -1.0)


# --- errors ---------------------------------------------------------------------------------------


def test_llava_uneven_images_per_row_is_refused():
    model, make_inputs = vlm("llava")
    inputs, mask = make_inputs(2, 3, 4, 0)
    ids = inputs["input_ids"].clone()
    ids[1][ids[1] == IMAGE] = 5  # row 1 loses its image, but pixel_values still holds two images
    with pytest.raises(AdapterError, match="same number of images"):
        A.LlavaAdapter().prepare_inputs({**inputs, "input_ids": ids}, model)


def test_qwen_slice_needs_prepared_inputs():
    inputs, _ = batch("qwen2_vl")
    with pytest.raises(AdapterError, match="prepare_inputs"):
        A.Qwen2VLAdapter().slice_rows(inputs, slice(0, 1))


@pytest.mark.parametrize("rows", [slice(0, 3, 2), [0, 1]])
def test_slice_rows_takes_contiguous_slices(rows):
    inputs, _ = batch("llava")
    with pytest.raises(AdapterError, match="contiguous slice"):
        A.LlavaAdapter().slice_rows(inputs, rows)


def test_unsliceable_extra_input_is_named():
    inputs, _ = batch("llava")
    with pytest.raises(AdapterError, match="'extra'"):
        A.LlavaAdapter().slice_rows({**inputs, "extra": torch.zeros(7, 2)}, slice(0, 1))


# --- slicing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_slice_rows_matches_a_plain_loop(arch):
    model, _ = vlm(arch)
    ad = A.adapter_for(model)
    inputs, _ = batch(arch)
    prepared = ad.prepare_inputs(inputs, model)
    alone = run_rows_alone(inputs, range(3), arch, model.config)
    for b in range(3):
        got = ad.slice_rows(prepared, slice(b, b + 1))
        assert torch.equal(got["input_ids"], inputs["input_ids"][b:b + 1])
        for key in ad.image_keys:
            if key in alone[b]:
                assert torch.equal(got[key], alone[b][key]), (b, key)
            else:
                assert key not in got, (b, key)
    two = ad.slice_rows(prepared, slice(0, 2))
    one = [ad.slice_rows(prepared, slice(b, b + 1)) for b in range(2)]
    key = ad.pixel_key
    parts = [o[key] for o in one if key in o]
    assert torch.equal(two[key], torch.cat(parts))


@pytest.mark.parametrize("arch", ARCHS)
def test_right_padded_batch_equals_rows_one_by_one(arch):
    model, _ = vlm(arch)
    inputs, mask = batch(arch)
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2, tokens_per_chunk=4)
    lp = policy.response_stats(inputs, mask, entropy=True)
    for b, row in enumerate(run_rows_alone(inputs, range(3), arch, model.config)):
        one = rlcredit.HFPolicy(model).response_stats(row, mask[b:b + 1], entropy=True)
        torch.testing.assert_close(lp.logprobs[b:b + 1], one.logprobs, atol=1e-5, rtol=0)
        torch.testing.assert_close(lp.entropy[b:b + 1], one.entropy, atol=1e-5, rtol=0)
    assert torch.all(lp.logprobs[~mask] == 0)


# --- the uniform image view ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_map_images_gives_each_image_its_row_and_index(arch):
    model, _ = vlm(arch)
    ad, cfg = A.adapter_for(model), model.config
    inputs, _ = batch(arch)
    seen = []

    def fn(images, rows, index):
        assert images.ndim == 4 and images.shape[1] == 3
        seen.append(images.shape[-2:])
        return torch.zeros_like(images) + (10 * rows + index + 1).view(-1, 1, 1, 1).float()

    out = ad.map_images(inputs, cfg, fn)
    assert set(out) == set(inputs)
    for k in inputs:
        if k != ad.pixel_key:
            assert out[k] is inputs[k]
    px = out[ad.pixel_key]
    assert px.shape == inputs[ad.pixel_key].shape and px.dtype == inputs[ad.pixel_key].dtype
    owners = [(b, i) for b, n in enumerate(images_for(arch)) for i in range(n)]
    codes = [10 * b + i + 1 for b, i in owners]
    if arch in QWEN:
        grid = inputs["image_grid_thw"].tolist()
        start = 0
        for g, code in zip(grid, codes):
            n = g[0] * g[1] * g[2]
            frames = ad.unflatten(px[start:start + n], g, cfg)
            assert torch.all(frames == code)
            start += n
        assert {tuple(s) for s in seen} <= set(qwen_sizes(arch))
    elif arch in ("idefics3", "smolvlm"):
        for b, n in enumerate(images_for(arch)):
            for i in range(px.shape[1]):
                expect = 10 * b + i + 1 if i < n else 0  # padding images stay zero
                assert torch.all(px[b, i] == expect)
    else:
        assert [int(px[j, 0, 0, 0]) for j in range(px.shape[0])] == codes


@pytest.mark.parametrize("arch", ARCHS)
def test_drop_equals_the_prompt_written_without_the_image(arch):
    model, _ = vlm(arch)
    ad, cfg = A.adapter_for(model), model.config
    inputs, mask = batch(arch)
    policy = rlcredit.HFPolicy(model, rows_per_chunk=2)
    got = policy.response_stats(inputs, mask, transform=lambda chunk, rows: Drop()(chunk, model)).logprobs
    T = mask.shape[1]
    removed = {IMAGE, *ad.marker_token_ids(cfg)}
    for b in range(3):
        ids, attn = inputs["input_ids"][b], inputs["attention_mask"][b]
        prompt = [t for t, a in zip(ids[:-T].tolist(), attn[:-T].tolist()) if a and t not in removed]
        row = {"input_ids": torch.tensor([prompt + ids[-T:].tolist()]),
               "attention_mask": torch.tensor([[1] * len(prompt) + attn[-T:].tolist()])}
        ref = rlcredit.HFPolicy(model).response_stats(row, mask[b:b + 1]).logprobs
        torch.testing.assert_close(got[b:b + 1], ref, atol=1e-5, rtol=0)
    dropped = Drop()(ad.prepare_inputs(inputs, model), model)
    assert not any(k in dropped for k in ("pixel_values", "image_grid_thw", "pixel_attention_mask"))
    assert not (dropped["input_ids"] == IMAGE).any()
    assert torch.equal(dropped["input_ids"][:, -T:], inputs["input_ids"][:, -T:])  # the response stays last
    assert torch.equal(dropped["attention_mask"][:, -T:], inputs["attention_mask"][:, -T:])
