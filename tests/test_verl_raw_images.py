"""``VisualKL(stage="image")`` through verl's ``apply_credit``: the images before the processor, from the batch.

A dict batch in verl's layout (``multi_modal_inputs`` per sample, ``multi_modal_data`` with each
row's PIL images) for a tiny Qwen2.5-VL whose processor resizes the images (tests/test_visual_kl_image.py's
kit: rows with 1, 2 and 0 images). The ``vppo_released`` scores are checked against the images
blackened by hand and re-processed; every way of passing the images gives the same scores.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image
from test_visual_kl_image import blackened_by_hand, kit

import rlcredit
from rlcredit.errors import RolloutError
from rlcredit.integrations.verl import apply_credit
from rlcredit_mm import VisualKL
from rlcredit_mm.images import RawImages, raw_images_of


def _batch(images_key="images"):
    """(model, processor, images per row, verl dict batch, model inputs); old log-probs from the policy."""
    model, proc, images, inputs, mask = kit("qwen2_5_vl")
    per_sample = [dict(proc(images=row, return_tensors="pt")) if row else {} for row in images]
    old = rlcredit.HFPolicy(model).response_stats(inputs, mask).logprobs
    rewards = torch.zeros(mask.shape)
    rewards[0, 0] = 1.0
    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "response_mask": mask,
             "token_level_rewards": rewards, "old_log_probs": old, "uid": np.array(["a", "a", "b"], dtype=object),
             "multi_modal_inputs": np.array(per_sample, dtype=object),
             "multi_modal_data": np.array([{images_key: row} if row else {} for row in images], dtype=object)}
    return model, proc, images, batch, inputs


def _by_hand(model, proc, images, inputs, mask, pert):
    """k3 (released form) of naive forwards on the original and the hand-blackened, re-processed pixels."""
    pixels = proc(images=blackened_by_hand(images, inputs, pert), return_tensors="pt")["pixel_values"]
    inputs = rlcredit.HFPolicy(model).adapter.prepare_inputs(inputs, model)  # what transformers needs besides
    T = mask.shape[1]
    with torch.no_grad():
        lp = torch.log_softmax(model(**inputs).logits[:, -T - 1:-1].double(), -1)
        lq = torch.log_softmax(model(**{**inputs, "pixel_values": pixels}).logits[:, -T - 1:-1].double(), -1)
    y = inputs["input_ids"][:, -T:, None]
    d = (lq.gather(-1, y) - lp.gather(-1, y))[..., 0].clamp(-20, 20)
    return torch.where(mask, (d.exp() - d - 1).clamp(0, 10), 0.0)


def test_vppo_released_reads_multi_modal_data_and_equals_blackening_by_hand():
    model, proc, images, batch, inputs = _batch()
    mask = batch["response_mask"]
    # verl's per-sample multi_modal_inputs concatenated are the batch's pixels
    credit = apply_credit(batch, model=model, credit="vppo_released", processor=proc)
    pert = rlcredit.build("vppo_released").estimators["visual"].perturbation
    want = _by_hand(model, proc, images, inputs, mask, pert)
    torch.testing.assert_close(credit.scores["visual"].double(), want, atol=1e-6, rtol=0)
    assert float(want.max()) > 1e-4  # the blackened image moves the model: the check has teeth
    rollout = rlcredit.Rollout(mask, torch.zeros(3), torch.zeros(3, dtype=torch.long), old_logprobs=batch["old_log_probs"],
                               model_inputs={**inputs, "raw_images": RawImages(images, proc)})
    direct = VisualKL(estimate="k3", k3_form="exp", stage="image", perturbation=pert)(rollout, rlcredit.HFPolicy(model))
    assert torch.equal(credit.scores["visual"], direct)  # the plain mapping is read as a RawImages
    torch.testing.assert_close(batch["advantages"], credit.token_weights * credit.advantages.unsqueeze(1))


@pytest.mark.parametrize("way", ["image_key", "raw_images", "dataproto"])
def test_every_way_of_passing_the_images_gives_the_same_scores(way):
    model, proc, images, batch, _ = _batch()
    want = apply_credit(dict(batch), model=model, credit="vppo_released", processor=proc).scores["visual"]
    holder = types.SimpleNamespace(image_processor=proc)  # verl's self.processor holds the image processor
    if way == "image_key":  # verl's older datasets: multi_modal_data[i]["image"]
        got = apply_credit(_batch("image")[3], model=model, credit="vppo_released", processor=holder)
    elif way == "raw_images":
        del batch["multi_modal_data"]
        got = apply_credit(batch, model=model, credit="vppo_released", processor=holder,
                           raw_images=[row or None for row in images])
    else:
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        data = types.SimpleNamespace(batch=tensors, non_tensor_batch={k: v for k, v in batch.items() if k not in tensors})
        got = apply_credit(data, model=model, credit="vppo_released", processor=proc)
        assert torch.equal(data.batch["advantages"], got.token_advantages())
    assert torch.equal(got.scores["visual"], want)


def test_missing_images_or_processor_say_what_to_pass():
    model, proc, images, batch, _ = _batch()
    with pytest.raises(RolloutError, match=r"missing: processor=\. In the actor worker pass processor=self.processor"):
        apply_credit(dict(batch), model=model, credit="vppo_released")
    no_data = {k: v for k, v in batch.items() if k != "multi_modal_data"}
    with pytest.raises(RolloutError, match=r"missing: the images\..*raw_images= or in "
                                           r"non_tensor_batch\['multi_modal_data'\]\[i\]\['images'\]"):
        apply_credit(dict(no_data), model=model, credit="vppo_released", processor=proc)
    with pytest.raises(RolloutError, match=r"missing: processor= and the images.*stage='pixels'"):
        apply_credit(dict(no_data), model=model, credit="vppo_released")
    # EasyR1 keeps the dataset's images (e.g. {"bytes": ...}) in multi_modal_data until its process_image
    raw = dict(batch, multi_modal_data=np.array([{"images": [{"bytes": b""}]}, {}, {}], dtype=object))
    with pytest.raises(RolloutError, match=r"images\[0\]\[0\] must be a PIL.Image.Image, got dict.*process_image"):
        apply_credit(raw, model=model, credit="vppo_released", processor=proc)
    with pytest.raises(RolloutError, match=r"multi_modal_data'\]\[1\] must be a dict"):
        apply_credit(dict(batch, multi_modal_data=[{}, "x", {}]), model=model, credit="vppo_released", processor=proc)
    with pytest.raises(RolloutError, match="holds 2 rows, not B = 3"):
        apply_credit(dict(no_data), model=model, credit="vppo_released", processor=proc, raw_images=images[:2])


def test_precomputed_aug_logprobs_need_no_images():
    """With signals['aug_logprobs'] (the released trainer's second forward) nothing reads the images."""
    _, _, _, batch, _ = _batch()
    del batch["multi_modal_data"]
    old = batch["old_log_probs"]
    aug = torch.where(batch["response_mask"], old - 0.5, 0.0)
    credit = apply_credit(batch, credit="vppo_released", signals={"aug_logprobs": aug})
    d = torch.tensor(-0.5)
    assert torch.equal(credit.scores["visual"], torch.where(batch["response_mask"], d.exp() - d - 1, 0.0))


def test_a_pixel_stage_strategy_never_reads_the_images():
    """vppo (stage='pixels') pays nothing for them: a multi_modal_data it could not read is not even looked at."""
    model, proc, _, batch, _ = _batch()
    want = apply_credit(dict(batch), model=model, credit="vppo").scores["visual"]
    got = apply_credit(dict(batch, multi_modal_data=["not", "read", "at all"]), model=model, credit="vppo")
    assert torch.equal(got.scores["visual"], want) and float(want.max()) > 0


def test_raw_images_of_reads_a_mapping_or_raw_images():
    _, proc, images, _, _ = kit("qwen2_5_vl")
    as_map = raw_images_of({"raw_images": {"images": [images[0], images[1], None], "processor": proc}}, 3, "t")
    assert [len(r) for r in as_map.images] == [1, 2, 0] and as_map.processor is proc
    assert as_map.images[1][1] is images[1][1]
    with pytest.raises(RolloutError, match=r"exactly the keys 'images'.*and 'processor'.*got \['images', 'proc'\]"):
        raw_images_of({"raw_images": {"images": images, "proc": proc}}, 3, "t")
    with pytest.raises(RolloutError, match=r"t: rollout.model_inputs\['raw_images'\]: RawImages.processor must be"):
        raw_images_of({"raw_images": {"images": images, "processor": object()}}, 3, "t")
    with pytest.raises(RolloutError, match="must be a rlcredit_mm.images.RawImages or a mapping"):
        raw_images_of({"raw_images": images}, 3, "t")
    img = Image.new("RGB", (8, 8))
    assert raw_images_of({"raw_images": RawImages([[img]], proc)}, 1, "t").images == ((img,),)


def test_only_the_image_stage_requires_raw_images():
    from rlcredit.errors import SpecError
    from rlcredit.requirements import POLICY, RAW_IMAGES, ModelInput, leaves

    for estimate in ("k3", "exact", "fused"):
        image = [leaf for req in VisualKL(estimate=estimate, stage="image").requires for leaf in leaves(req)]
        pixels = [leaf for req in VisualKL(estimate=estimate).requires for leaf in leaves(req)]
        assert RAW_IMAGES in image and POLICY in image and RAW_IMAGES not in pixels
    assert RAW_IMAGES == ModelInput("raw_images") and RAW_IMAGES.key == "raw_images"
    assert not RAW_IMAGES.met(types.SimpleNamespace(model_inputs=None), None)
    with pytest.raises(SpecError, match="non-empty string"):
        ModelInput("")
    # with precomputed signals the k3 estimate needs neither the images nor a policy
    mask = torch.ones(1, 2, dtype=torch.bool)
    r = rlcredit.Rollout(mask, torch.ones(1), torch.zeros(1, dtype=torch.long), old_logprobs=torch.zeros(1, 2),
                         signals={"aug_logprobs": torch.zeros(1, 2)})
    assert not rlcredit.build("vppo_released").needs_policy(r)
