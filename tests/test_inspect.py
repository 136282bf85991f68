"""``rlcredit inspect``: heatmaps of a saved tiny VLM, checked against a plain two-forward KL reference."""

from __future__ import annotations

import os
import re
import stat

import pytest
import torch

import rlcredit
from rlcredit_mm.cli import main as cli_main
from rlcredit_mm import AttentionConnectivity
from rlcredit_mm.demo import model as M
from rlcredit_mm.demo import task as T
from rlcredit_mm.inspect import TokenHeatmap, build_inputs, heatmap_html, load_vlm, run_inspect, token_scores

PROMPT = "what colour is the square ?"


RESPONSE = "ok . the answer is red ."


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Qwen2.5-VL saved with its tokenizer and image processor, and a picture file."""
    folder = tmp_path_factory.mktemp("vlm")
    kit = M.ModelKit()
    model = M.build_model(kit.tokenizer, seed=1, hidden=32)
    model.save_pretrained(folder)
    kit.tokenizer.save_pretrained(folder)
    kit.image_processor.save_pretrained(folder)
    image = folder / "picture.png"
    example = T.Example(shapes=(("square", "red", 0),), asked="square", answer="red", seed=5)
    T.render(example).save(image)
    return folder, image, kit, example


def _values(page: str, name: str) -> list[float]:
    return [float(v) for v in re.findall(rf"title='{name} = (-?[0-9.]+)'", page)]


def test_inputs_equal_the_demo_training_inputs(saved):
    folder, image, kit, example = saved
    model, proc = load_vlm(folder)
    assert proc.processor is None  # Qwen's processor needs torchvision: the parts are loaded instead
    from PIL import Image

    built = build_inputs(model, proc, Image.open(image).convert("RGB"), PROMPT, RESPONSE)
    prompt = M.encode_prompts(kit, [example])
    resp = torch.tensor([kit.tokenizer(RESPONSE)["input_ids"]])
    want = M.join_responses(prompt, resp, torch.ones_like(resp, dtype=torch.bool))
    assert built.tokens == tuple(RESPONSE.split())
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw"):
        assert torch.equal(built.model_inputs[key], want[key]), key
    assert torch.allclose(built.model_inputs["pixel_values"], want["pixel_values"])


def test_visual_dependency_is_the_exact_kl_against_a_black_picture(saved, tmp_path):
    folder, image, kit, example = saved
    out = tmp_path / "heat.html"
    assert cli_main(["inspect", "--model", str(folder), "--image", str(image), "--prompt", PROMPT,
                     "--response", RESPONSE, "--out", str(out), "--png"]) == 0
    page = out.read_text()
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in page
    # Reference: two plain forwards, with the picture and with an all-black picture through the
    # same image processor, and the full-vocabulary KL at each response position.
    from PIL import Image

    model, proc = load_vlm(folder)
    built = build_inputs(model, proc, Image.open(image).convert("RGB"), PROMPT, RESPONSE)
    black = kit.pixels([Image.new("RGB", (56, 56), (0, 0, 0))])["pixel_values"]
    T_ = len(RESPONSE.split())
    with torch.no_grad():
        p = model(**built.model_inputs).logits[0, -T_ - 1:-1].log_softmax(-1)
        q = model(**{**built.model_inputs, "pixel_values": black}).logits[0, -T_ - 1:-1].log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert kl.max() > 1e-4  # the random tower does see the picture
    assert _values(page, "visual dependency") == pytest.approx(kl.tolist(), abs=1.5e-4)
    # Connectivity: what the AT-RL estimator gives on the same inputs (a mass in (0, 1]).
    policy = rlcredit.HFPolicy(model)
    rollout = rlcredit.Rollout(built.response_mask, torch.zeros(1), torch.zeros(1, dtype=torch.long),
                               model_inputs=built.model_inputs)
    conn = AttentionConnectivity()(rollout, policy).score[0]
    assert _values(page, "connectivity") == pytest.approx(conn.tolist(), abs=1.5e-4)
    assert bool(((conn > 0) & (conn <= 1)).all())


def test_token_scores_zero_on_padding(saved):
    folder, _, kit, example = saved
    model, _ = load_vlm(folder)
    prompt = M.encode_prompts(kit, [example], repeat=2)
    resp = torch.tensor([kit.tokenizer("ok . the answer is red .")["input_ids"]] * 2)
    mask = torch.ones_like(resp, dtype=torch.bool)
    mask[1, 3:] = False
    resp[1, 3:] = kit.pad_id
    scores = token_scores(rlcredit.HFPolicy(model), M.join_responses(prompt, resp, mask), mask)
    for value in scores.values():
        assert torch.all(value[1, 3:] == 0) and torch.isfinite(value).all()
    # Row 1's valid tokens see the same prefix as row 0's: same scores.
    assert torch.allclose(scores["visual dependency"][1, :3], scores["visual dependency"][0, :3], atol=1e-6)


def test_llava_goes_through_its_own_processor(tmp_path):
    """An architecture whose AutoProcessor loads offline (LLaVA) uses it, chat template or not."""
    import transformers as tf
    from PIL import Image
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    words = ["<pad>", "<eos>", "<unk>", "<image>", "what", "colour", "is", "it", "?", "red", "blue", "."]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = tf.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                  vision_feature_select_strategy="default", image_token="<image>",
                                  num_additional_image_tokens=1)
    cfg = tf.LlavaConfig(
        vision_config=tf.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=28, patch_size=14),
        text_config=tf.LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, pad_token_id=0),
        image_token_index=3, image_seq_length=4, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    tf.LlavaForConditionalGeneration(cfg).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    Image.new("RGB", (40, 30), (220, 30, 30)).save(tmp_path / "red.png")
    html_path, = run_inspect(tmp_path, tmp_path / "red.png", "what colour is it ?", "red .", out=tmp_path / "x.html")
    page = html_path.read_text()
    assert ">red</span>" in page and len(_values(page, "visual dependency")) == 2
    _, proc = load_vlm(tmp_path)
    assert isinstance(proc.processor, tf.LlavaProcessor)


# --------------------------------------------------------------------------------------------
# Bad input: exit code 2 and a message that says what to do


def _run(capsys, *args: str) -> tuple[int, str]:
    code = cli_main(["inspect", *args])
    return code, capsys.readouterr().err


def test_missing_folder(saved, tmp_path, capsys):
    _, image, _, _ = saved
    code, err = _run(capsys, "--model", str(tmp_path / "nope"), "--image", str(image), "--prompt", PROMPT,
                     "--response", RESPONSE, "--out", str(tmp_path / "a.html"))
    assert code == 2 and "is not a folder" in err and "save_pretrained" in err
    assert not (tmp_path / "a.html").exists()


def test_unsupported_architectures(saved, tmp_path, capsys):
    import transformers as tf

    _, image, _, _ = saved
    text_only = tmp_path / "qwen2"
    tf.Qwen2Config(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1).save_pretrained(text_only)
    code, err = _run(capsys, "--model", str(text_only), "--image", str(image), "--prompt", PROMPT, "--response", RESPONSE,
                     "--out", str(tmp_path / "a.html"))
    assert code == 2 and "text-only model (model_type 'qwen2')" in err and "qwen2_5_vl" in err
    other = tmp_path / "blip2"
    tf.Blip2Config().save_pretrained(other)
    code, err = _run(capsys, "--model", str(other), "--image", str(image), "--prompt", PROMPT, "--response", RESPONSE,
                     "--out", str(tmp_path / "a.html"))
    assert code == 2 and "no rlcredit adapter supports model_type 'blip-2'" in err and "llava" in err


def test_image_that_does_not_open(saved, tmp_path, capsys):
    folder, _, _, _ = saved
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    code, err = _run(capsys, "--model", str(folder), "--image", str(bad), "--prompt", PROMPT, "--response", RESPONSE,
                     "--out", str(tmp_path / "a.html"))
    assert code == 2 and "could not be opened as an image" in err
    code, err = _run(capsys, "--model", str(folder), "--image", str(tmp_path / "missing.png"), "--prompt", PROMPT,
                     "--response", RESPONSE, "--out", str(tmp_path / "a.html"))
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("response", ["", "   "])
def test_response_that_tokenises_to_nothing(saved, tmp_path, capsys, response):
    folder, image, _, _ = saved
    code, err = _run(capsys, "--model", str(folder), "--image", str(image), "--prompt", PROMPT,
                     "--response", response, "--out", str(tmp_path / "a.html"))
    assert code == 2 and "tokenises to nothing" in err
    assert not (tmp_path / "a.html").exists()


def test_bad_out_paths(saved, tmp_path, capsys):
    folder, image, _, _ = saved
    base = ["--model", str(folder), "--image", str(image), "--prompt", PROMPT, "--response", RESPONSE]
    code, err = _run(capsys, *base, "--out", str(tmp_path / "x.txt"))
    assert code == 2 and "must end in .html" in err
    code, err = _run(capsys, *base, "--out", str(tmp_path / "no" / "x.html"))
    assert code == 2 and "does not exist" in err
    with pytest.raises(SystemExit) as exc:
        cli_main(["inspect", "--model", str(folder)])  # the other required flags are missing
    assert exc.value.code == 2


def test_html_escapes_tokens_and_checks_lengths():
    from PIL import Image

    page = heatmap_html([TokenHeatmap(Image.new("RGB", (2, 2)), "<q>", ["<b>", "&"], {"connectivity": [0.0, 0.5]})])
    assert "&lt;b&gt;" in page and "&amp;" in page and "<b>" not in page.replace("<body>", "")
    with pytest.raises(rlcredit.RolloutError, match="has 1 values for 2 tokens"):
        TokenHeatmap(Image.new("RGB", (2, 2)), "q", ["a", "b"], {"connectivity": [0.1]})


# --------------------------------------------------------------------------------------------
# What the page says, and how the files are written


def test_header_puts_the_prompt_before_the_response_and_the_legend_fits(saved, tmp_path):
    folder, image, _, _ = saved
    html_path, png_path = run_inspect(folder, image, PROMPT, RESPONSE, out=tmp_path / "h.html", png=True)
    page = html_path.read_text()
    body = page[page.index("<div class='sample'>"):]
    title, prompt, response = body.index(f"<h2>{folder.name}</h2>"), body.index(f"prompt: {PROMPT}"), \
        body.index(f"response: {RESPONSE}")
    first_token = body.index("<span class='tok'")
    assert title < prompt < response < first_token
    # inspect takes no strategy: nothing is underlined and the legend does not mention one.
    assert "strategy" not in page and "underlined" not in page and "tok kept" not in page
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_legend_mentions_underlines_only_when_there_are_marks():
    from PIL import Image

    plain = TokenHeatmap(Image.new("RGB", (2, 2)), "q", ["a", "b"], {"connectivity": [0.1, 0.5]})
    marked = TokenHeatmap(Image.new("RGB", (2, 2)), "q", ["a", "b"], {"connectivity": [0.1, 0.5]},
                          marks={"connectivity": [False, True]})
    assert "underlined" not in heatmap_html([plain])
    page = heatmap_html([plain, marked])
    assert "underlined: kept by the strategy" in page and page.count("class='tok kept'") == 1
    assert plain.header() == ["q"]
    assert TokenHeatmap(Image.new("RGB", (2, 2)), "q", ["a"], {}, response="a").header() == ["prompt: q", "response: a"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_are_written_with_the_usual_permissions(saved, tmp_path, umask):
    """0666 minus the umask, as open() makes a file (mkstemp's 0600 was the bug), and no temporary file left."""
    folder, image, _, _ = saved
    old = os.umask(umask)
    try:
        paths = run_inspect(folder, image, PROMPT, RESPONSE, out=tmp_path / "p.html", png=True)
    finally:
        os.umask(old)
    assert [oct(stat.S_IMODE(p.stat().st_mode)) for p in paths] == [oct(0o666 & ~umask)] * 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.html", "p.png"]
