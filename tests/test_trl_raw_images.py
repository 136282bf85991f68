"""``VisualKL(stage="image")`` under ``CreditGRPOTrainer``: the trainer carries the images of TRL's forward.

A tiny random Qwen2.5-VL (examples/trl_vppo.py) with noise images of sizes its processor resizes
(to 56 x 56 px), so the 14-px squares blackened on the raw image straddle the ViT patches. The
``vppo_released`` scores of a generation batch are checked against the images blackened by hand
(``apply_pil`` with the documented per-image seeds), re-processed and run through the model
naively; the plain mapping the trainer writes gives the same scores as a ``RawImages``.
"""

from __future__ import annotations

import copy
import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from PIL import Image  # noqa: E402
from trl import GRPOConfig  # noqa: E402

import rlcredit  # noqa: E402
from rlcredit.integrations.trl import CreditGRPOTrainer  # noqa: E402
from rlcredit.requirements import RAW_IMAGES, leaves  # noqa: E402
from rlcredit_mm import VisualKL  # noqa: E402
from rlcredit_mm import perturb as P  # noqa: E402
from rlcredit_mm.images import RawImages  # noqa: E402

EXAMPLE = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "trl_vppo.py"),
                         run_name="example_trl_vppo")
G = 4
SIZES = [(60, 52), (45, 70)]  # (W, H): both resized to 56 x 56 by the tiny model's processor
PROMPT = [{"role": "user", "content": "what colour is the picture ?"}]


@pytest.fixture(scope="module")
def parts():
    model, processor = EXAMPLE["tiny_qwen2_5_vl"]()
    g = np.random.RandomState(0)
    images = [Image.fromarray(g.randint(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]
    return model, processor, images


def _reward(completions, **kwargs):
    return [float(len(c[0]["content"].split()) % 3) for c in completions]


def _trainer(parts, tmp_path, credit, **kwargs):
    model, processor, images = parts
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=G * len(images), num_generations=G,
                      max_completion_length=6, max_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                      seed=0, learning_rate=1e-2, logging_steps=1)
    data = Dataset.from_dict({"prompt": [PROMPT] * len(images), "image": images})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the losses TRL runs instead of the strategy's: test_trl_checks
        return CreditGRPOTrainer(model=copy.deepcopy(model), processing_class=processor, reward_funcs=_reward,
                                 args=args, train_dataset=data, credit=credit, **kwargs)


def _batch(trainer, images):
    """One generation batch on G copies of each (prompt, image), in this order."""
    trainer.model.train()
    torch.manual_seed(3)
    return trainer._generate_and_score_completions([{"prompt": PROMPT, "image": img} for img in images
                                                    for _ in range(G)])


def _tensors(rollout):
    return {k: v for k, v in rollout.model_inputs.items() if k != RAW_IMAGES.key}


def _by_hand(trainer, rollout, images, pert, temperature=1.0):
    """k3 (released form) of naive forwards on TRL's pixels and on the hand-blackened, re-processed images,
    in TRL's precision (its autocast: bf16 by default)."""
    model, processor = trainer.accelerator.unwrap_model(trainer.model), trainer.processing_class
    inputs = _tensors(rollout)
    ids, attn, mask = inputs["input_ids"], inputs["attention_mask"], rollout.response_mask
    keys = P.row_keys(ids, attn, pert.seed)
    blackened = [pert.apply_pil(img, seed=int(P.per_image_keys(keys[b:b + 1], torch.tensor([i]))[0]))
                 for b, row in enumerate(images) for i, img in enumerate(row)]
    pixels = processor.image_processor(images=blackened, return_tensors="pt")["pixel_values"]
    assert pixels.shape == inputs["pixel_values"].shape and not torch.equal(pixels, inputs["pixel_values"])
    T = mask.shape[1]
    with torch.no_grad(), trainer.accelerator.autocast():
        lp = torch.log_softmax(model(**inputs).logits[:, -T - 1:-1].double() / temperature, -1)
        lq = torch.log_softmax(model(**{**inputs, "pixel_values": pixels}).logits[:, -T - 1:-1].double()
                               / temperature, -1)
    y = ids[:, -T:, None]
    d = (lq.gather(-1, y) - lp.gather(-1, y))[..., 0].clamp(-20, 20)
    return torch.where(mask, (d.exp() - d - 1).clamp(0, 10), 0.0)


def test_vppo_released_scores_are_the_trl_images_blackened_by_hand(parts, tmp_path):
    model, processor, images = parts
    trainer = _trainer(parts, tmp_path, "vppo_released")
    _batch(trainer, images)
    rollout, credit = trainer.last_rollout, trainer.last_credit
    raw = rollout.model_inputs[RAW_IMAGES.key]
    assert set(raw) == {"images", "processor"} and raw["processor"] is trainer.processing_class
    rows = raw["images"]
    assert len(rows) == rollout.batch_size == G * len(images)
    for b, row in enumerate(rows):  # each row's dataset image, as TRL handed it to the processor
        assert len(row) == 1 and np.array_equal(np.asarray(row[0]), np.asarray(images[b // G]))
    policy_model = trainer.accelerator.unwrap_model(trainer.model)
    pert = trainer.credit_strategy.estimators["visual"].perturbation
    want = _by_hand(trainer, rollout, rows, pert)
    got = credit.scores["visual"]
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    assert float(want[rollout.response_mask].max()) > 1e-4  # the blackened image moves the model: the check has teeth
    # the plain mapping and a RawImages built from the same images give the same scores, bit for bit
    by_raw = rlcredit.Rollout(rollout.response_mask, rollout.rewards, rollout.group_ids,
                              old_logprobs=rollout.old_logprobs,
                              model_inputs={**_tensors(rollout), "raw_images": RawImages(rows, processor.image_processor)})
    estimator = VisualKL(estimate="k3", k3_form="exp", stage="image", perturbation=pert)
    with trainer.accelerator.autocast():  # TRL's precision, as the trainer's policy runs
        assert torch.equal(estimator(by_raw, rlcredit.HFPolicy(policy_model)), got)


def test_the_policy_forwards_run_in_trls_precision(parts, tmp_path):
    """TRL's old log-probs come from its autocast forward (bf16 by default); the policy the strategy gets runs under
    the same autocast, so an unperturbed forward reproduces them (a float32 forward is ~1e-3 away, which VPPO's
    k3 would read as visual dependency)."""
    model, processor, images = parts
    trainer = _trainer(parts, tmp_path, "vppo_released")
    assert trainer.args.bf16  # TRL's default
    _batch(trainer, images)
    rollout = trainer.last_rollout
    inputs, mask = _tensors(rollout), rollout.response_mask
    ours = trainer._credit_policy_handle().response_stats(inputs, mask).logprobs
    plain = rlcredit.HFPolicy(trainer.accelerator.unwrap_model(trainer.model)).response_stats(inputs, mask).logprobs
    torch.testing.assert_close(ours, rollout.old_logprobs, atol=2e-6, rtol=0)
    assert float((plain - rollout.old_logprobs).abs().max()) > 1e-4  # the gap the autocast closes


def test_a_training_step_runs_with_vppo_released(parts, tmp_path):
    trainer = _trainer(parts, tmp_path, "vppo_released")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert trainer.state.global_step == 1
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters()))
    rollout, credit = trainer.last_rollout, trainer.last_credit
    assert len(rollout.model_inputs[RAW_IMAGES.key]["images"]) == rollout.batch_size
    mask = rollout.response_mask
    assert float(credit.scores["visual"][mask].max()) > 0 and 0 < float(credit.metrics["kept_tokens"]) < mask.sum()
    assert any("rlcredit/score/visual" in log for log in trainer.state.log_history)


def test_the_pixel_stage_carries_no_raw_images(parts, tmp_path):
    """Only a strategy whose requirements mention RAW_IMAGES gets them: vppo (stage='pixels') pays nothing."""
    model, processor, images = parts
    assert not any(RAW_IMAGES in leaves(req) for req in rlcredit.build("vppo").requirements)
    trainer = _trainer(parts, tmp_path, "vppo")
    _batch(trainer, images)
    assert RAW_IMAGES.key not in trainer.last_rollout.model_inputs
    assert trainer._credit_images is None and float(trainer.last_credit.scores["visual"].max()) > 0


def test_a_rollout_func_batch_carries_the_dataset_images(parts, tmp_path):
    """With a rollout_func TRL's forward uses the dataset images (its _generate returns none): so does the trainer."""
    model, processor, images = parts

    def rollout_func(prompts, trainer):
        prompt_ids = trainer._tokenize_prompts(prompts)[0]
        eos = processor.tokenizer.eos_token_id
        completions = [[7 + (i % 4), 8 + (i % 3), eos][: 2 + i % 2] for i in range(len(prompts))]
        return {"prompt_ids": prompt_ids, "completion_ids": completions,
                "logprobs": [[-1.0] * len(c) for c in completions]}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL: rollout_func is experimental
        trainer = _trainer(parts, tmp_path, "vppo_released", rollout_func=rollout_func)
        _batch(trainer, images)
    rollout = trainer.last_rollout
    rows = rollout.model_inputs[RAW_IMAGES.key]["images"]
    assert [np.asarray(row[0]).tolist() for row in rows] == [np.asarray(images[b // G]).tolist() for b in range(len(rows))]
    pert = trainer.credit_strategy.estimators["visual"].perturbation
    want = _by_hand(trainer, rollout, rows, pert)
    torch.testing.assert_close(trainer.last_credit.scores["visual"].double(), want, atol=1e-6, rtol=0)


def test_an_unmet_raw_images_requirement_says_what_to_pass():
    """Outside the integrations, Strategy.assign names the missing key and what goes in it."""
    strategy = rlcredit.build("vppo_released")
    mask = torch.ones(1, 2, dtype=torch.bool)
    r = rlcredit.Rollout(mask, torch.ones(1), torch.zeros(1, dtype=torch.long),
                         model_inputs={"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(rlcredit.RLCreditError, match=r"model_inputs\['raw_images'\] \(each row's images as given "
                                                     r"to the image processor, and that processor: \{'images'"):
        strategy.assign(r, rlcredit.HFPolicy(EXAMPLE["tiny_qwen2_5_vl"]()[0]))
