"""`smolvlm generate` end to end: streaming, --json, and one clear line for each kind of bad input."""

import json
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from smolvlm.cli.main import main


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.new("RGB", (80, 50), (10, 200, 30)).save(path)
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_with_images(capsys, tiny_hf_checkpoint, image_file):
    folder, _ = tiny_hf_checkpoint
    code, out, err = run(capsys, "generate", "--model", str(folder), "--image", str(image_file),
                         "--image", str(image_file), "--prompt", "What is it?", "--max-new-tokens", "5",
                         "--ignore-eos", "--dtype", "float32", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert set(r) == {"text", "token_ids", "logprobs", "prompt_tokens", "completion_tokens", "finish_reason",
                      "dtype", "dtype_requested", "cpu_level", "quantization"}
    assert r["dtype"] == "float32" and r["dtype_requested"] == "float32" and r["quantization"] is None
    assert r["completion_tokens"] == len(r["token_ids"]) == len(r["logprobs"]) == 5
    assert r["finish_reason"] == "length"
    # two images of 80x50 at 32 px tiles: each 3x2 tiles + global, 4 tokens each
    assert r["prompt_tokens"] > 2 * 7 * 4


def test_generate_streams_the_same_text_as_json(capsys, tiny_hf_checkpoint, image_file):
    folder, _ = tiny_hf_checkpoint
    args = ["generate", "--model", str(folder), "--image", str(image_file), "--prompt", "Describe.",
            "--max-new-tokens", "8", "--ignore-eos", "--dtype", "float32"]
    _, streamed, _ = run(capsys, *args)
    _, js, _ = run(capsys, *args, "--json")
    assert streamed == json.loads(js)["text"] + "\n"


def make_bad_inputs(tmp_path, folder, image_file):
    truncated = tmp_path / "cut.jpg"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated, format="JPEG")
    truncated.write_bytes(truncated.read_bytes()[:100])
    text_as_image = tmp_path / "notes.png"
    text_as_image.write_text("this is not an image")
    not_ckpt = tmp_path / "empty-folder"
    not_ckpt.mkdir()
    base = ["generate", "--model", str(folder), "--prompt", "hi", "--dtype", "float32"]
    return {
        "missing image": (base + ["--image", str(tmp_path / "nope.jpg")], "nope.jpg"),
        "corrupt image": (base + ["--image", str(truncated)], "cut.jpg"),
        "unsupported format": (base + ["--image", str(text_as_image)], "notes.png"),
        "prompt too long": (["generate", "--model", str(folder), "--prompt", "word " * 2100, "--dtype", "float32"],
                            "context"),
        "not a checkpoint": (["generate", "--model", str(not_ckpt), "--prompt", "hi"], "not a model checkpoint"),
        "unknown dtype": (["generate", "--model", str(folder), "--prompt", "hi", "--dtype", "float8"],
                          "unknown dtype"),
    }


@pytest.mark.parametrize("case", ["missing image", "corrupt image", "unsupported format", "prompt too long",
                                  "not a checkpoint", "unknown dtype"])
def test_bad_input_is_one_clear_line(capsys, tmp_path, tiny_hf_checkpoint, image_file, case):
    argv, needle = make_bad_inputs(tmp_path, tiny_hf_checkpoint[0], image_file)[case]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("smolvlm generate: error: ")
    assert needle in lines[0]


def test_console_script_reports_errors_without_traceback(tmp_path, tiny_hf_checkpoint):
    exe = shutil.which("smolvlm") or [sys.executable, "-m", "smolvlm.cli"]
    cmd = [exe] if isinstance(exe, str) else exe
    proc = subprocess.run(cmd + ["generate", "--model", str(tmp_path / "missing"), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "not found" in proc.stderr


def test_help_explains_generate(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--image", "--prompt", "--max-new-tokens", "--temperature", "--top-p", "--top-k",
                 "--seed", "--dtype", "--ignore-eos", "--json"):
        assert flag in out
