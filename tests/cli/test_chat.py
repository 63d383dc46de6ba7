"""`smolvlm chat` fed a scripted conversation on stdin: answers stream to stdout, the conversation and
its images are kept across turns, /image, /reset and /quit work, and a bad /image is not fatal."""

import io
import sys

import pytest
from PIL import Image

from smolvlm.cli.main import main
from smolvlm.generation import SamplingParams, generate
from smolvlm.io import load

N = 8
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "photo.png"
    Image.new("RGB", (80, 50), (10, 200, 30)).save(path)
    return path


def run_chat(monkeypatch, capsys, script: str, *args: str):
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code = main(["chat", *args, "--max-new-tokens", str(N), "--dtype", "float32", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out.splitlines(), err


def answer(model, processor, messages, images):
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text, images=[images] if images else None)
    return generate(model, processor, inputs, SamplingParams(max_new_tokens=N)).text


def test_a_conversation_with_images_reset_and_quit(monkeypatch, capsys, tiny_hf_checkpoint, photo, tmp_path):
    folder, _ = tiny_hf_checkpoint
    script = (f"What is it?\n/image {tmp_path / 'missing.png'}\n/image {photo}\nAnd this one?\nWhy?\n"
              "/reset\nWhat is it?\n/quit\nnever asked\n")
    out, err = run_chat(monkeypatch, capsys, script, "--model", str(folder), "--image", str(photo))
    model, processor = load(folder, dtype="float32")
    img = Image.open(photo)

    def turn(text, n_images=0):
        return {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}

    def bot(text):
        return {"role": "assistant", "content": [{"type": "text", "text": text}]}

    a1 = answer(model, processor, [turn("What is it?", 1)], [img])
    a2 = answer(model, processor, [turn("What is it?", 1), bot(a1), turn("And this one?", 1)], [img, img])
    a3 = answer(model, processor, [turn("What is it?", 1), bot(a1), turn("And this one?", 1), bot(a2),
                                   turn("Why?")], [img, img])
    a4 = answer(model, processor, [turn("What is it?")], [])  # after /reset: no history, no image
    assert out == [a1, a2, a3, a4]
    assert "does not exist" in err and "conversation cleared" in err


def test_an_unknown_command_is_not_fatal(monkeypatch, capsys, tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint
    out, err = run_chat(monkeypatch, capsys, "hi\n/frobnicate\n", "--model", str(folder))
    assert len(out) == 1 and "unknown command /frobnicate" in err


def test_bad_first_image_is_one_clear_line(capsys, tiny_hf_checkpoint, tmp_path):
    folder, _ = tiny_hf_checkpoint
    bad = tmp_path / "x.png"
    bad.write_text("nope")
    code = main(["chat", "--model", str(folder), "--image", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and "not an image" in err
