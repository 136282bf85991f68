"""VPPO with TRL: a vision-language model, images in the dataset, ``CreditGRPOTrainer(credit="vppo")``.

VPPO (arXiv 2510.09285) trains on the tokens that depend on the image: once per generation batch
the strategy runs the policy a second time with the image perturbed (patch blackout), scores each
response token by how much its distribution moved (``visual_kl``), keeps the top 40% per response
and scales each response's advantage by its mean visual dependency. What TRL needs for it:

- a VLM and its **processor** as ``processing_class`` (TRL then applies the chat template with images);
- **conversational prompts** and an **"image" column** (PIL images): TRL inserts each image into its
  prompt, and the trainer hands the pixel inputs (``pixel_values``, ``image_grid_thw``...) and the
  model (as ``rlcredit.HFPolicy``) to the strategy. Nothing else: no custom collator, no second model.

    python examples/trl_vppo.py --quick                      # offline: a tiny random Qwen2.5-VL, ~10 s on a CPU
    python examples/trl_vppo.py --model Qwen/Qwen2.5-VL-3B-Instruct --steps 100   # a real run (downloads; GPU)

TRL's loss has no term for VPPO's entropy penalty (0.06 * mean(-log pi)): the trainer warns that it
is not run. A text-only model fails at construction (VPPO needs to see an image). The block between
the "recipe" markers is what docs/integrations/trl.md shows (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import warnings

import torch

# --- recipe (docs/integrations/trl.md) ---
from datasets import Dataset
from PIL import Image
from trl import GRPOConfig

from rlcredit.integrations.trl import CreditGRPOTrainer, trl_config_kwargs

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def colour_dataset(n=8, size=56):
    """``n`` one-colour pictures, the question "what colour is the picture ?" and the answer (a column)."""
    names = [list(COLOURS)[i % len(COLOURS)] for i in range(n)]
    return Dataset.from_dict({
        "prompt": [[{"role": "user", "content": "what colour is the picture ?"}]] * n,  # conversational
        "image": [Image.new("RGB", (size, size), COLOURS[name]) for name in names],  # one image per prompt
        "answer": names,  # extra columns reach the reward function as keyword arguments
    })


def reward_colour(completions, answer, **kwargs):
    """1 when the completion names the picture's colour, else 0."""
    return [float(name in completion[0]["content"].split()) for completion, name in zip(completions, answer)]


def train(model, processor=None, *, credit="vppo", steps=100, learning_rate=1e-6, output_dir="trl_vppo_out",
          use_cpu=False):
    """GRPO with VPPO's credit; ``model`` is a Hub id (TRL loads it and its processor) or a model with its processor."""
    config = GRPOConfig(
        output_dir=output_dir, max_steps=steps, learning_rate=learning_rate, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=16, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=use_cpu, seed=0,
        **trl_config_kwargs(credit),  # DAPO's clip-higher, the dual clip as TRL's delta, group-normalised rewards
    )
    trainer = CreditGRPOTrainer(
        model=model, processing_class=processor, reward_funcs=reward_colour, args=config,
        train_dataset=colour_dataset(), credit=credit,
    )
    trainer.train()
    return trainer
# --- end of recipe ---


SPECIAL = ["<pad>", "<eos>", "<unk>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]
# The chat template of the tiny model: the image's placeholder, then the text (the processor expands the
# placeholder to one token per merged 28 px patch).
TEMPLATE = ("{% for message in messages %}{% for part in message['content'] %}"
            "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
            "{% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}{% endfor %}{% endfor %}")


def tiny_qwen2_5_vl(size=56):
    """A random-weight Qwen2.5-VL (2 layers, 32 wide) and its processor, built from configs (no network)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, ProcessorMixin, Qwen2_5_VLConfig,
                              Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImageOnlyProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor without its video processor, which needs torchvision (a real run loads the
        full one with AutoProcessor)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    words = SPECIAL + ["what", "colour", "is", "the", "picture", "?", "it", "."] + list(COLOURS)
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with single spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    pixels = size * size  # images stay size x size px: (size / 28)^2 image tokens each
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14,
                                               temporal_patch_size=2, merge_size=2)
    processor = ImageOnlyProcessor(image_processor, tokenizer, chat_template=TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                pad_token_id=ids["<pad>"], bos_token_id=ids["<eos>"], eos_token_id=ids["<eos>"])
    vision = dict(depth=2, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], pad_token_id=ids["<pad>"],
                              eos_token_id=ids["<eos>"])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = ids["<pad>"], ids["<eos>"]
    return model, processor


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps on a tiny random Qwen2.5-VL, offline")
    parser.add_argument("--model", default=None, help="a Hub VLM id (default: the tiny offline model)")
    parser.add_argument("--credit", default="vppo", help="a preset name (vppo, vppo_paper, at_rl) or a spec file")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: 2 with --quick, else 100)")
    parser.add_argument("--output-dir", default="trl_vppo_out")
    opts = parser.parse_args(argv)
    model, processor = (opts.model, None) if opts.model else tiny_qwen2_5_vl()
    steps = opts.steps or (2 if opts.quick else 100)
    use_cpu = opts.model is None or not torch.cuda.is_available()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, not ours
        trainer = train(model, processor, credit=opts.credit, steps=steps, learning_rate=1e-6 if opts.model else 1e-3,
                        output_dir=opts.output_dir, use_cpu=use_cpu)
    print(f"strategy: {trainer.credit_strategy!r}")
    for log in trainer.state.log_history:
        if "rlcredit/kept_tokens" in log:
            print(f"step {log['step']}: reward {log['reward']:.3f}, kept tokens {log['rlcredit/kept_tokens']:.0f} "
                  f"({log['rlcredit/kept_fraction']:.0%}), mean visual dependency {log['rlcredit/score/visual']:.2e}")
    return trainer


if __name__ == "__main__":
    main()
