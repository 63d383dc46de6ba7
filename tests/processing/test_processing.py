"""The processor against transformers' SmolVLM processor: same input_ids, attention masks, pixel_values
(bit for bit), pixel_attention_mask, rows/cols and chat template renderings; clear errors on bad input.

The reference is transformers' own code: `SmolVLMImageProcessorPil`, the tokenizer from `AutoTokenizer`
and `SmolVLMProcessor.__call__` (built without `__init__`, which wants a video processor and so
torchvision; `__call__` itself never touches it for images)."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import FIXTURES
from smolvlm.errors import SmolVLMError
from smolvlm.processing import (
    SMOLVLM_CHAT_TEMPLATE,
    ImageProcessingConfig,
    Processor,
    open_image,
)

IMAGES = FIXTURES / "vision-formats" / "images"
PHOTO_JPEG = IMAGES / "vqav2" / "COCO_val2014_000000262148.jpg"  # 640x512
PHOTO_TALL = IMAGES / "gqa" / "2400861.jpg"  # 316x500
PHOTO_BIG = IMAGES / "nlvr2" / "test1-0-2-img0.png"  # a 1500x1000 JPEG despite its name
RGBA_PNG = IMAGES / "vision_reader" / "png_example.png"  # a real RGBA PNG


# ---------------------------------------------------------------------------------------------
# references


@pytest.fixture(scope="module")
def hf_tok(smolvlm_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smolvlm_tokenizer_dir)


@pytest.fixture(scope="module")
def text_processor(smolvlm_tokenizer_dir):
    """The tokenizer folder alone: no image config, SmolLM2's ChatML template."""
    return Processor.from_pretrained(smolvlm_tokenizer_dir)


def hf_image_processor(longest_edge=128, tile=32, **kw):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return SmolVLMImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}, **kw)


def hf_processor(tok, image_processor, image_seq_len, chat_template=None):
    """transformers' SmolVLMProcessor with the attributes its __init__ sets (that __init__ needs a
    video processor, hence torchvision, which is not installed)."""
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    proc = SmolVLMProcessor.__new__(SmolVLMProcessor)
    proc.__dict__.update(
        image_processor=image_processor, tokenizer=tok, chat_template=chat_template,
        fake_image_token="<fake_token_around_image>", image_token="<image>", global_image_token="<global-img>",
        image_token_id=tok.convert_tokens_to_ids("<image>"), end_of_utterance_token="<end_of_utterance>",
        video_token="<video>", image_seq_len=image_seq_len,
        video_processor=SimpleNamespace(num_frames=None, fps=None),  # read by apply_chat_template only
    )
    return proc


def ours_and_hf(text_processor, hf_tok, longest_edge=128, tile=32, image_seq_len=4, **kw):
    cfg = ImageProcessingConfig(longest_edge=longest_edge, max_image_size=tile, **kw)
    ours = Processor(text_processor.tokenizer, cfg, image_seq_len, eos_token=text_processor.eos_token,
                     pad_token=text_processor.pad_token, bos_token=text_processor.bos_token)
    return ours, hf_processor(hf_tok, hf_image_processor(longest_edge, tile, **kw), image_seq_len)


def assert_same_pixels(ours: Processor, hf_ip, images):
    got = ours.process_images(images)
    ref = hf_ip(images, return_tensors="pt", return_row_col_info=True)
    assert got["pixel_values"].dtype == torch.float32
    assert got["pixel_values"].shape == ref["pixel_values"].shape
    assert torch.equal(got["pixel_values"], ref["pixel_values"])  # bit for bit
    assert got["pixel_attention_mask"].dtype == torch.bool
    assert torch.equal(got["pixel_attention_mask"], ref["pixel_attention_mask"].bool())
    assert (got["rows"], got["cols"]) == (ref["rows"], ref["cols"])
    return got


def assert_same_call(ours: Processor, hf, texts, images, padding_side="left"):
    got = ours(texts, images=images, padding_side=padding_side)
    ref = hf(text=list(texts) if isinstance(texts, list) else texts, images=images, return_tensors="pt",
             padding=True, padding_side=padding_side)
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["attention_mask"], ref["attention_mask"])
    if images is not None:
        assert torch.equal(got["pixel_values"], ref["pixel_values"])
        assert torch.equal(got["pixel_attention_mask"], ref["pixel_attention_mask"].bool())
    return got


def noise(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}
    if mode in bands:
        shape = (h, w) if bands[mode] == 1 else (h, w, bands[mode])
        return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.uniform(-50, 400, (h, w)).astype(np.float32))
    if mode in ("P", "P+transparency"):
        img = noise(w, h, "RGB", seed).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        if mode == "P+transparency":
            img.info["transparency"] = 3
        return img
    if mode == "RGB+transparency":  # a PNG tRNS colour key
        img = Image.fromarray(rng.integers(0, 4, (h, w, 3), dtype=np.uint8) * 80)
        img.info["transparency"] = (80, 80, 80)
        return img
    return noise(w, h, "RGB", seed).convert(mode)  # CMYK, YCbCr, 1, I, ...


# ---------------------------------------------------------------------------------------------
# pixels


@pytest.mark.parametrize("size", [(20, 12), (12, 20), (1400, 900), (60, 250), (250, 40), (32, 32), (1, 1),
                                  (33, 31), (2, 300)])
def test_pixels_match_transformers_for_sizes(text_processor, hf_tok, size):
    ours, hf = ours_and_hf(text_processor, hf_tok)
    assert_same_pixels(ours, hf.image_processor, [[noise(*size, seed=size[0])]])


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "RGB+transparency", "I;16", "I", "F",
                                  "CMYK", "YCbCr", "1"])
def test_pixels_match_transformers_for_modes(text_processor, hf_tok, mode):
    ours, hf = ours_and_hf(text_processor, hf_tok)
    image = noise(45, 70, mode, seed=3)
    if mode != "RGB+transparency":
        assert image.mode == mode.split("+")[0]
    assert_same_pixels(ours, hf.image_processor, [[image]])


@pytest.mark.parametrize("kw", [
    dict(longest_edge=256, tile=64),
    dict(longest_edge=24, tile=32),  # the longest edge is below one tile: one frame, rows = cols = 0
    dict(do_image_splitting=False),
    dict(do_resize=False),
    dict(resample=3),  # bicubic
    dict(image_mean=(0.48145466, 0.4578275, 0.40821073), image_std=(0.26862954, 0.26130258, 0.27577711)),
    dict(do_normalize=False),
    dict(do_rescale=False),
])
def test_pixels_match_transformers_for_configs(text_processor, hf_tok, kw):
    ours, hf = ours_and_hf(text_processor, hf_tok, **kw)
    images = [[noise(90, 50, seed=1), noise(20, 70, "RGBA", seed=2)], [noise(40, 40, "L", seed=3)]]
    assert_same_pixels(ours, hf.image_processor, images)


def test_pixels_of_real_files_match_transformers(text_processor, hf_tok):
    """JPEG photos, a real RGBA PNG and a JPEG named .png, several per prompt, prompts with different counts."""
    ours, hf = ours_and_hf(text_processor, hf_tok, longest_edge=256, tile=64)
    files = [PHOTO_JPEG, PHOTO_TALL, RGBA_PNG, IMAGES / "nlvr2" / "train-10171-0-img1.png"]
    images = [[open_image(f) for f in files[:3]], [open_image(files[3])]]
    assert images[0][2].mode == "RGBA"
    got = assert_same_pixels(ours, hf.image_processor, images)
    k = got["rows"][1][0] * got["cols"][1][0] + 1  # the second prompt's frames; the rest is padding
    assert got["pixel_values"].shape[1] > k and got["pixel_attention_mask"][1, :k].all()
    assert not got["pixel_attention_mask"][1, k:].any() and not got["pixel_values"][1, k:].any()


def test_paths_are_accepted_and_opened(text_processor, hf_tok):
    ours, hf = ours_and_hf(text_processor, hf_tok)
    got = ours.process_images([[str(PHOTO_TALL)], [PHOTO_JPEG]])
    ref = hf.image_processor([[Image.open(PHOTO_TALL)], [Image.open(PHOTO_JPEG)]], return_tensors="pt")
    assert torch.equal(got["pixel_values"], ref["pixel_values"])


@settings(max_examples=15, deadline=None, database=None)
@given(w=st.integers(1, 300), h=st.integers(1, 300), mode=st.sampled_from(["RGB", "L", "RGBA"]),
       longest_edge=st.sampled_from([64, 96, 128]))
def test_random_sizes_match_transformers(text_processor, hf_tok, w, h, mode, longest_edge):
    ours, hf = ours_and_hf(text_processor, hf_tok, longest_edge=longest_edge)
    assert_same_pixels(ours, hf.image_processor, [[noise(w, h, mode, seed=w * 1000 + h)]])


# ---------------------------------------------------------------------------------------------
# prompts and tokens


def test_image_prompt_matches_transformers_prompt_functions(text_processor, hf_tok):
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    ours, _ = ours_and_hf(text_processor, hf_tok, image_seq_len=3)
    for rows, cols in [(0, 0), (1, 2), (2, 1), (3, 4), (6, 6)]:
        assert ours.image_prompt(rows, cols) == get_image_prompt_string(
            rows, cols, 3, fake_token_around_image="<fake_token_around_image>", image_token="<image>",
            global_image_token="<global-img>")
    text = "A<image>B<image>"
    assert ours.expand_prompt(text, [0, 2], [0, 3]) == "A" + ours.image_prompt(0, 0) + "B" + ours.image_prompt(2, 3)


def test_one_image(text_processor, hf_tok):
    ours, hf = ours_and_hf(text_processor, hf_tok)
    got = assert_same_call(ours, hf, "<|im_start|>User:<image>What is this?<end_of_utterance>\nAssistant:",
                           [[noise(100, 60)]])
    # 3x4 tiles (128x96 after resizing) + the global image, 4 tokens each
    assert (got["input_ids"] == 49190).sum() == 13 * 4 and got["pixel_values"].shape == (1, 13, 3, 32, 32)


def test_several_images_in_one_prompt(text_processor, hf_tok):
    ours, hf = ours_and_hf(text_processor, hf_tok)
    images = [[noise(100, 60), noise(10, 10, "L"), open_image(RGBA_PNG)]]
    assert_same_call(ours, hf, "Compare <image>, <image>\nand<image> please.", images)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_with_different_numbers_of_images(text_processor, hf_tok, padding_side):
    ours, hf = ours_and_hf(text_processor, hf_tok)
    texts = ["User:<image><image>Two pictures.<end_of_utterance>\nAssistant:", "User:<image>One.\nAssistant:"]
    images = [[noise(100, 60), noise(30, 90, "RGBA")], [noise(15, 15)]]
    got = assert_same_call(ours, hf, texts, images, padding_side)
    assert got["attention_mask"][1].sum() < got["attention_mask"].shape[1]  # the second prompt is padded
    pad_at = 0 if padding_side == "left" else -1
    assert got["input_ids"][1, pad_at] == ours.pad_token_id and got["attention_mask"][1, pad_at] == 0


def test_batch_with_a_prompt_without_images(text_processor, hf_tok):
    ours, hf = ours_and_hf(text_processor, hf_tok)
    assert_same_call(ours, hf, ["No image here.", "Here: <image>"], [[], [noise(50, 50)]])


def test_text_only_prompts_match_the_tokenizer(text_processor, hf_tok):
    texts = ["Hello world!", "<|im_start|>user\nA longer prompt, with ünïcödé and <image>.<|im_end|>\n"]
    for side in ("left", "right"):
        got = text_processor(texts, padding_side=side)
        ref = hf_tok(texts, padding=True, padding_side=side, return_tensors="pt")
        assert torch.equal(got["input_ids"], ref["input_ids"])
        assert torch.equal(got["attention_mask"], ref["attention_mask"])
        assert "pixel_values" not in got


def test_real_smolvlm_256m_settings(text_processor, hf_tok):
    """SmolVLM-256M: images resized to a 2048 longest edge, 512 px tiles, 64 tokens per tile."""
    ours, hf = ours_and_hf(text_processor, hf_tok, longest_edge=2048, tile=512, image_seq_len=64)
    assert ours.image_config == ImageProcessingConfig()
    text = ours.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                  {"type": "text", "text": "Describe it."}]}])
    got = assert_same_call(ours, hf, text, [[open_image(PHOTO_BIG)]])
    # 1500x1000 -> 2048x1366 -> 2048x1536: 3 rows x 4 cols + the global image
    assert got["pixel_values"].shape == (1, 13, 3, 512, 512) and (got["input_ids"] == 49190).sum() == 13 * 64


def test_decode_matches_transformers(text_processor, hf_tok):
    ours, _ = ours_and_hf(text_processor, hf_tok)
    ids = ours("<|im_start|>User:<image>Hi, there !<end_of_utterance>\nAssistant: ok.", [[noise(8, 8)]])["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids[0], skip_special_tokens=skip) == hf_tok.decode(ids[0], skip_special_tokens=skip)


# ---------------------------------------------------------------------------------------------
# chat templates

CHATS = {
    "single": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
    "text first": [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]}],
    "multi-image": [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "Same place?"}]}],
    "multi-turn": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}, {"type": "image"}]},
    ],
    "system": [
        {"role": "system", "content": [{"type": "text", "text": "Answer in one word."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Animal?"}]},
    ],
}


@pytest.mark.parametrize("name", list(CHATS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smolvlm_chat_template_matches_transformers(text_processor, hf_tok, name, add_generation_prompt):
    ours, _ = ours_and_hf(text_processor, hf_tok)
    assert ours.chat_template == SMOLVLM_CHAT_TEMPLATE  # the default for a vision model without a template
    hf = hf_processor(hf_tok, None, 4, chat_template=SMOLVLM_CHAT_TEMPLATE)
    got = ours.apply_chat_template(CHATS[name], add_generation_prompt=add_generation_prompt)
    assert got == hf.apply_chat_template(CHATS[name], add_generation_prompt=add_generation_prompt)
    assert got == hf_tok.apply_chat_template(CHATS[name], chat_template=SMOLVLM_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)


def test_string_content_with_the_smolvlm_template(text_processor, hf_tok):
    """transformers renders string content with the 256M template as nothing ("User: <end_of_utterance>");
    we treat it as one text part, which is what transformers' newer SmolVLM template does with strings."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    ours, _ = ours_and_hf(text_processor, hf_tok)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Bye"}]
    got = ours.apply_chat_template(chat)
    assert got == hf_processor(hf_tok, None, 4, chat_template=DEFAULT_CHAT_TEMPLATE).apply_chat_template(
        chat, add_generation_prompt=True)
    as_parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in chat]
    assert got == hf_tok.apply_chat_template(as_parts, chat_template=SMOLVLM_CHAT_TEMPLATE, tokenize=False,
                                             add_generation_prompt=True)
    assert got.startswith("<|im_start|>System: Be brief.<end_of_utterance>\nUser: Hello there")


@pytest.mark.parametrize("chat", [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."}],
])
def test_text_only_chatml_template_matches_the_tokenizer(text_processor, hf_tok, chat):
    assert text_processor.image_config is None and "<|im_start|>" in text_processor.chat_template
    for add in (True, False):
        assert text_processor.apply_chat_template(chat, add_generation_prompt=add) == hf_tok.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=add)
    # text parts are joined into the string a ChatML template expects
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in chat]
    assert text_processor.apply_chat_template(parts) == hf_tok.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)


def test_image_parts_with_a_string_chat_template(text_processor, hf_tok):
    """A vision model whose template prints content as a string (here SmolLM2's ChatML, as in a checkpoint
    whose tokenizer folder came from SmolLM2): each image part becomes `<image>` where it stands."""
    ours = Processor(text_processor.tokenizer, ImageProcessingConfig(longest_edge=32, max_image_size=32), 4,
                     chat_template=text_processor.chat_template, eos_token=text_processor.eos_token)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Left, "},
                                         {"type": "image"}, {"type": "text", "text": "right?"}]}]
    got = ours.apply_chat_template(chat)
    assert got == hf_tok.apply_chat_template([{"role": "user", "content": "<image>Left, <image>right?"}],
                                             tokenize=False, add_generation_prompt=True)
    assert ours(got, [[noise(10, 10), noise(10, 10)]])["pixel_values"].shape == (1, 2, 3, 32, 32)


# ---------------------------------------------------------------------------------------------
# loading and saving


def test_save_pretrained_loads_in_transformers_with_same_outputs(tmp_path, text_processor, hf_tok):
    from transformers import AutoTokenizer
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    ours, _ = ours_and_hf(text_processor, hf_tok, longest_edge=96, tile=32, image_seq_len=5,
                          resample=3, image_mean=(0.4, 0.5, 0.6))
    ours.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ip = SmolVLMImageProcessorPil.from_pretrained(tmp_path)
    seq_len = json.loads((tmp_path / "processor_config.json").read_text())["image_seq_len"]
    hf = hf_processor(tok, ip, seq_len)
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (ours.eos_token, ours.pad_token, ours.bos_token)
    assert tok.chat_template == ours.chat_template == SMOLVLM_CHAT_TEMPLATE
    texts = ["User:<image>Hi<end_of_utterance>\nAssistant:", "<image><image> two"]
    images = [[noise(70, 40)], [noise(20, 90, "RGBA"), noise(33, 33, "P")]]
    ids = assert_same_call(ours, hf, texts, images)["input_ids"][0]
    # the image tokens are special (skipped); the image block's newlines (2 tile rows + 1) stay
    assert tok.decode(ids, skip_special_tokens=True) == ours.decode(ids) == "User:\n\n\nHi\nAssistant:"
    again = Processor.from_pretrained(tmp_path)
    assert again.image_config == ours.image_config and again.image_seq_len == 5
    assert (again.chat_template, again.eos_token_ids, again.pad_token_id) == (
        ours.chat_template, ours.eos_token_ids, ours.pad_token_id)
    assert_same_call(again, hf, texts, images)


def test_save_pretrained_text_only(tmp_path, text_processor, hf_tok):
    from transformers import AutoTokenizer

    text_processor.save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    tok = AutoTokenizer.from_pretrained(tmp_path)
    chat = [{"role": "user", "content": "2+2?"}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        text_processor.apply_chat_template(chat)
    text = "Some text, <|im_end|> and <image> tokens."
    assert tok(text)["input_ids"] == text_processor(text)["input_ids"][0].tolist()


def test_save_pretrained_loads_in_smolvlm_processor_when_torchvision_exists(tmp_path, text_processor, hf_tok):
    # optional, even under CI: PyPI's torchvision wheels are built against the CUDA torch and do not load
    # with the pinned CPU one, and the PIL image processor (torchvision-free) is compared in the other tests
    pytest.importorskip("torchvision", reason="torchvision is not installed (no build for the pinned CPU torch)")
    from transformers import AutoProcessor

    ours, _ = ours_and_hf(text_processor, hf_tok)
    ours.save_pretrained(tmp_path)
    hf = AutoProcessor.from_pretrained(tmp_path)
    images = [[noise(70, 40)]]
    ref = hf(text=["<image>hi"], images=images, return_tensors="pt")
    got = ours("<image>hi", images)
    assert torch.equal(got["input_ids"], ref["input_ids"])
    assert torch.equal(got["pixel_values"], ref["pixel_values"])


def test_from_pretrained_reads_a_transformers_checkpoint(tiny_hf_checkpoint, hf_tok):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    folder, _ = tiny_hf_checkpoint
    ours = Processor.from_pretrained(folder)
    assert ours.image_seq_len == 4 and ours.image_token_id == 49190 and ours.end_of_utterance_id == 49279
    assert (ours.image_config.longest_edge, ours.image_config.max_image_size) == (96, 32)
    hf = hf_processor(hf_tok, SmolVLMImageProcessorPil.from_pretrained(folder), 4)
    assert_same_call(ours, hf, ["<image>A", "B<image><image>"], [[noise(50, 80)], [noise(9, 9), noise(200, 20)]])


def test_image_config_dict_round_trip():
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    ref = SmolVLMImageProcessorPil(size={"longest_edge": 1536}, max_image_size={"longest_edge": 384}).to_dict()
    cfg = ImageProcessingConfig.from_dict(json.loads(json.dumps(ref)))
    assert (cfg.longest_edge, cfg.max_image_size, cfg.resample, cfg.rescale_factor) == (1536, 384, 1, 1 / 255)
    assert ImageProcessingConfig.from_dict(cfg.to_dict()) == cfg
    back = SmolVLMImageProcessorPil(**{k: v for k, v in cfg.to_dict().items() if k != "processor_class"})
    assert back.to_dict() == ref


# ---------------------------------------------------------------------------------------------
# files


def test_open_image_matches_transformers_load_image_and_applies_exif_orientation(tmp_path):
    from transformers.image_utils import load_image

    assert np.array_equal(np.asarray(open_image(PHOTO_JPEG)), np.asarray(load_image(str(PHOTO_JPEG))))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    noise(40, 20).save(tmp_path / "rotated.jpg", exif=exif)
    img = open_image(tmp_path / "rotated.jpg")
    assert img.size == (20, 40)
    assert np.array_equal(np.asarray(img), np.asarray(load_image(str(tmp_path / "rotated.jpg"))))


# ---------------------------------------------------------------------------------------------
# errors


def test_missing_file(tmp_path):
    with pytest.raises(SmolVLMError, match=r"nope\.jpg does not exist"):
        open_image(tmp_path / "nope.jpg")


def test_truncated_jpeg(tmp_path):
    data = PHOTO_JPEG.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(SmolVLMError, match=r"cut\.jpg is corrupt or truncated"):
        open_image(tmp_path / "cut.jpg")


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(SmolVLMError, match=r"notes\.png is not an image .*PNG or JPEG"):
        open_image(tmp_path / "notes.png")


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(SmolVLMError, match="not a file"):
        open_image(tmp_path)


def test_image_count_must_match_placeholders(text_processor, hf_tok):
    ours, _ = ours_and_hf(text_processor, hf_tok)
    with pytest.raises(SmolVLMError, match=r"\[1\] <image> placeholders but \[2\] images"):
        ours("<image> one", [[noise(8, 8), noise(8, 8)]])
    with pytest.raises(SmolVLMError, match=r"\[2\] <image> placeholders but \[0\] images"):
        ours("<image><image>")
    with pytest.raises(SmolVLMError, match=r"\[1, 0\] <image> placeholders but \[1, 1\]"):
        ours(["<image>", "none"], [[noise(8, 8)], [noise(8, 8)]])
    with pytest.raises(SmolVLMError, match="one list of images per prompt"):
        ours(["<image>", "<image>"], [noise(8, 8), noise(8, 8)])
    with pytest.raises(SmolVLMError, match="placeholders"):
        ours.expand_prompt("<image>", [1, 2], [1, 2])


def test_too_many_tiles_for_the_row_col_tokens(text_processor, hf_tok):
    ours, _ = ours_and_hf(text_processor, hf_tok, longest_edge=256, tile=32)  # 8x8 tiles; tokens stop at 6x6
    with pytest.raises(SmolVLMError, match=r"8x8 tiles needs a <row_8_col_8> token"):
        ours("<image>", [[noise(64, 64)]])


def test_text_only_model_refuses_images(text_processor):
    with pytest.raises(SmolVLMError, match="no vision encoder"):
        text_processor("<image>", [[noise(8, 8)]])
    with pytest.raises(SmolVLMError, match="no vision encoder"):
        text_processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}])
    with pytest.raises(SmolVLMError, match="no vision encoder"):
        text_processor.process_images([[noise(8, 8)]])


def test_other_bad_inputs(text_processor, hf_tok):
    ours, _ = ours_and_hf(text_processor, hf_tok)
    with pytest.raises(SmolVLMError, match="padding_side"):
        ours("hi", padding_side="middle")
    with pytest.raises(SmolVLMError, match="PIL images or file paths"):
        ours("<image>", [[np.zeros((8, 8, 3), np.uint8)]])
    with pytest.raises(SmolVLMError, match="to RGB"):
        ours("<image>", [[Image.new("La", (8, 8))]])
    with pytest.raises(SmolVLMError, match="'role' and 'content'"):
        ours.apply_chat_template(["hello"])
    bad = Processor(ours.tokenizer, None, 0, chat_template="{{ raise_exception('roles must alternate') }}")
    with pytest.raises(SmolVLMError, match="roles must alternate"):
        bad.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(SmolVLMError, match="not a folder"):
        Processor.from_pretrained(Path("/nonexistent/model"))


def test_corrupt_image_inside_a_call(tmp_path, text_processor, hf_tok):
    ours, _ = ours_and_hf(text_processor, hf_tok)
    buf = io.BytesIO()
    noise(64, 64).save(buf, format="PNG")
    (tmp_path / "half.png").write_bytes(buf.getvalue()[:200])
    with pytest.raises(SmolVLMError, match=r"half\.png is corrupt or truncated"):
        ours("<image>", [[tmp_path / "half.png"]])
