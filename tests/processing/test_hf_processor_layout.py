"""transformers 5.x's processor layout: SmolVLMProcessor.save_pretrained writes one processor_config.json (the image
processor nested in it, a video processor beside it) and no preprocessor_config.json. A checkpoint saved that way
loads in smolvlm and generates what transformers generates; what smolvlm saves holds both layouts and loads in
transformers (AutoProcessor + SmolVLMForConditionalGeneration) and back in smolvlm; bad processor configs are
clear one-line errors."""

import json
import shutil

import pytest
import torch
from PIL import Image
from test_processing import PHOTO_JPEG, PHOTO_TALL, assert_same_call

from reference import TINY_IMAGE, hf_auto_processor, make_hf_smolvlm
from smolvlm.errors import SmolVLMError
from smolvlm.generation import SamplingParams, generate
from smolvlm.io import load, save
from smolvlm.processing import Processor, open_image

TILE, LONGEST_EDGE = TINY_IMAGE["max_image_size"]["longest_edge"], TINY_IMAGE["size"]["longest_edge"]


@pytest.fixture(scope="module")
def hf5_checkpoint(tmp_path_factory, smolvlm_tokenizer_dir):
    """(folder, transformers model): a tiny random SmolVLM whose processor transformers 5.x saved."""
    folder = tmp_path_factory.mktemp("tiny-smolvlm-5x")
    return folder, make_hf_smolvlm(folder, smolvlm_tokenizer_dir, seed=7, processor_layout="5.x")


def small_photo() -> Image.Image:
    """A real photo shrunk below one tile, so that the processor has to upscale it (to LONGEST_EDGE)."""
    return open_image(PHOTO_TALL).convert("RGB").resize((19, 30), Image.Resampling.BICUBIC)


def test_the_reference_folder_is_in_the_5x_layout(hf5_checkpoint):
    """Guards the tests below: they would prove nothing on a folder that still had the old file."""
    folder, _ = hf5_checkpoint
    assert not (folder / "preprocessor_config.json").exists()
    proc = json.loads((folder / "processor_config.json").read_text())
    assert set(proc) == {"image_processor", "video_processor", "image_seq_len", "processor_class"}
    assert proc["image_processor"]["max_image_size"] == {"longest_edge": TILE}


@pytest.mark.parametrize("case, frames", [
    ("tiled photo", [10]),  # 640x512 -> 96x76 -> a 96x96 grid: 3x3 tiles + the global image
    ("small image upscaled", [7]),  # 19x30 -> 60x96 -> a 64x96 grid: 3x2 tiles + the global image
    ("two images", [10, 7]),  # the 316x500 photo: 3x2 tiles + the global image
])
def test_5x_checkpoint_generates_as_transformers(hf5_checkpoint, case, frames):
    folder, hf = hf5_checkpoint
    images = {"tiled photo": [open_image(PHOTO_JPEG)], "small image upscaled": [small_photo()],
              "two images": [open_image(PHOTO_JPEG), open_image(PHOTO_TALL)]}[case]
    if case == "small image upscaled":
        assert max(images[0].size) < TILE < LONGEST_EDGE
    model, processor = load(folder, dtype="float32")
    hf_proc = hf_auto_processor(folder)
    assert processor.image_seq_len == hf_proc.image_seq_len == 4
    messages = [{"role": "user", "content": [{"type": "image"}] * len(images) + [
        {"type": "text", "text": "What is in the picture?"}]}]
    text = processor.apply_chat_template(messages)
    assert text == hf_proc.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = assert_same_call(processor, hf_proc, text, [images])  # ids and pixels equal transformers'
    assert inputs["pixel_values"].shape[1] == sum(frames)  # the processor really cut the images into tiles
    hf_inputs = hf_proc(text=text, images=[images], return_tensors="pt")
    n = 24
    with torch.no_grad():
        # the prompt's logits first: greedy tokens of a tiny random model hardly move when image features do
        prompt_logits = model(**{k: inputs[k] for k in hf_inputs})
        assert (prompt_logits - hf(**hf_inputs).logits).abs().max() < 1e-4
        ref = hf.generate(**hf_inputs, do_sample=False, max_new_tokens=n, min_new_tokens=n)
    ref = ref[0, hf_inputs["input_ids"].shape[1]:].tolist()
    got = generate(model, processor, inputs, SamplingParams(max_new_tokens=n, ignore_eos=True))
    assert got.prompt_tokens == hf_inputs["input_ids"].shape[1]
    assert got.token_ids == ref


@pytest.mark.parametrize("source_layout", ["4.x", "5.x"])
def test_save_writes_both_layouts_that_transformers_and_smolvlm_load(tmp_path, smolvlm_tokenizer_dir,
                                                                     source_layout):
    from transformers import SmolVLMForConditionalGeneration

    src, out = tmp_path / "src", tmp_path / "out"
    make_hf_smolvlm(src, smolvlm_tokenizer_dir, seed=3, processor_layout=source_layout)
    model, processor = load(src)
    save(model, processor, out)

    flat = json.loads((out / "preprocessor_config.json").read_text())
    proc = json.loads((out / "processor_config.json").read_text())
    assert proc["image_processor"] == {k: v for k, v in flat.items() if k != "processor_class"}
    assert proc["image_seq_len"] == 4 and proc["processor_class"] == "SmolVLMProcessor"
    if source_layout == "5.x":  # transformers' own file comes back unchanged, its video processor included
        assert (out / "processor_config.json").read_text() == (src / "processor_config.json").read_text()
    else:  # no video processor to keep: one with the image settings, as transformers derives it
        assert proc["video_processor"]["max_image_size"] == {"longest_edge": TILE}

    hf_proc = hf_auto_processor(out)
    hf = SmolVLMForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    again_model, again_proc = load(out)
    assert again_proc.image_config == processor.image_config and again_proc.image_seq_len == 4
    texts = ["User:<image>What is this?<end_of_utterance>\nAssistant:", "<image><image> two"]
    images = [[open_image(PHOTO_JPEG)], [small_photo(), open_image(PHOTO_TALL)]]
    assert_same_call(processor, hf_proc, texts, images)  # a left-padded batch: ids, masks and pixels
    assert_same_call(again_proc, hf_proc, texts, images)
    keys = ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask")
    for text, prompt_images in zip(texts, images, strict=True):  # one at a time: no padding positions to compare
        inputs = {k: v for k, v in processor(text, [prompt_images]).items() if k in keys}
        with torch.no_grad():
            ours, ref, again = model(**inputs), hf(**inputs).logits, again_model(**inputs)
        assert (ours - ref).abs().max() < 1e-4
        assert torch.equal(again, ours)


def test_saved_preprocessor_config_alone_gives_the_same_processor(tmp_path, hf5_checkpoint):
    """What a transformers 4.x reader uses: preprocessor_config.json, and processor_config.json for
    image_seq_len only. Without the nested entries the saved folder must still give the same processor."""
    folder, _ = hf5_checkpoint
    model, processor = load(folder)
    save(model, processor, tmp_path / "out")
    path = tmp_path / "out" / "processor_config.json"
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items()
                                if k in ("image_seq_len", "processor_class")}))
    hf_proc = hf_auto_processor(tmp_path / "out")
    old = Processor.from_pretrained(tmp_path / "out")
    assert old.image_config == processor.image_config
    texts, images = ["<image>Hi"], [[open_image(PHOTO_JPEG)]]
    assert torch.equal(assert_same_call(old, hf_proc, texts, images)["pixel_values"],
                       processor(texts, images)["pixel_values"])


def test_nested_image_processor_wins_over_preprocessor_config(tmp_path, hf5_checkpoint):
    """transformers 5.x reads processor_config.json's "image_processor" first; so must smolvlm, or a folder
    holding both (a stale preprocessor_config.json) would give other pixels than transformers."""
    folder, _ = hf5_checkpoint
    shutil.copytree(folder, tmp_path / "ck")
    stale = dict(json.loads((folder / "processor_config.json").read_text())["image_processor"],
                 size={"longest_edge": 256}, max_image_size={"longest_edge": 64})
    (tmp_path / "ck" / "preprocessor_config.json").write_text(json.dumps(stale))
    ours, hf_proc = Processor.from_pretrained(tmp_path / "ck"), hf_auto_processor(tmp_path / "ck")
    assert hf_proc.image_processor.max_image_size["longest_edge"] == ours.image_config.max_image_size == TILE
    assert_same_call(ours, hf_proc, ["<image>Hi"], [[open_image(PHOTO_TALL)]])


def without_image_processor(d):
    (d / "processor_config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((d / "processor_config.json").read_text()).items() if k != "image_processor"}))


@pytest.mark.parametrize("layout, setup", [
    ("5.x", lambda d: (d / "processor_config.json").unlink()),
    ("5.x", without_image_processor),
    ("4.x", lambda d: [(d / f).unlink() for f in ("processor_config.json", "preprocessor_config.json")]),
])
def test_vision_folder_without_image_settings_is_a_clear_error(tmp_path, smolvlm_tokenizer_dir, layout, setup):
    make_hf_smolvlm(tmp_path, smolvlm_tokenizer_dir, processor_layout=layout)
    setup(tmp_path)
    with pytest.raises(SmolVLMError, match="holds a vision model but no image processor settings") as e:
        load(tmp_path)
    assert "preprocessor_config.json" in str(e.value) and "\n" not in str(e.value)


def image_processor_with(**changes):
    def setup(d):
        proc = json.loads((d / "processor_config.json").read_text())
        proc["image_processor"].update(changes)
        (d / "processor_config.json").write_text(json.dumps(proc))
    return setup


def processor_config_with(**changes):
    def setup(d):
        proc = json.loads((d / "processor_config.json").read_text())
        (d / "processor_config.json").write_text(json.dumps({**proc, **changes}))
    return setup


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / "processor_config.json").write_text('{"image_seq_len": 4,'), "not a readable JSON file"),
    (lambda d: (d / "processor_config.json").write_text("[4]"), "should hold a JSON object"),
    (processor_config_with(image_processor="SmolVLMImageProcessor"), "should be a JSON object, got str"),
    (processor_config_with(image_seq_len="4"), 'image_seq_len="4" should be a positive integer'),
    (processor_config_with(image_seq_len=0), "image_seq_len=0 should be a positive integer"),
    (processor_config_with(chat_template=["not", "a template"]), "chat_template should be a Jinja template"),
    (processor_config_with(chat_template=5), "chat_template should be a Jinja template"),
    (image_processor_with(size={"height": 96, "width": 96}), 'SmolVLM needs {"longest_edge": N}'),
    (image_processor_with(max_image_size={"longest_edge": "32"}), "with N a positive integer"),
    (image_processor_with(max_image_size={"longest_edge": 0}), "with N a positive integer"),
    (image_processor_with(image_mean=[0.5, 0.5]), "expected 3 numbers"),
    (image_processor_with(do_resize="yes"), "expected true or false"),
    (image_processor_with(resample="lanczos"), "resampling filter"),
    (image_processor_with(image_std="wide"), "expected 3 numbers"),
])
def test_malformed_processor_config_is_a_one_line_error_naming_the_file(tmp_path, hf5_checkpoint, setup, message):
    folder, _ = hf5_checkpoint
    shutil.copytree(folder, tmp_path / "ck")
    setup(tmp_path / "ck")
    with pytest.raises(SmolVLMError, match=message) as e:
        load(tmp_path / "ck")
    assert str(tmp_path / "ck" / "processor_config.json") in str(e.value)
    assert "\n" not in str(e.value)
