"""`smolvlm caption`: batched captions equal one-at-a-time greedy answers, unreadable files are reported
(never fatal), and a second run resumes: it skips what is done and repairs a half-written last line."""

import json

import pytest
from PIL import Image

from smolvlm.cli.main import main
from smolvlm.generation import SamplingParams, generate
from smolvlm.io import load
from smolvlm.processing import build_messages, open_image

PROMPT = "Describe this image in one sentence."
pytestmark = pytest.mark.usefixtures("restore_torch_threads")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.new("RGB", (80, 50), (10, 200, 30)).save(folder / "a.png")
    Image.new("RGB", (40, 90), (200, 10, 30)).save(folder / "b.jpg")
    (folder / "sub").mkdir()
    Image.new("RGBA", (32, 32), (0, 0, 255, 128)).save(folder / "sub" / "c.webp")
    (folder / "notes.png").write_text("not an image")
    Image.new("RGB", (64, 64)).save(folder / "cut.jpg")
    (folder / "cut.jpg").write_bytes((folder / "cut.jpg").read_bytes()[:80])
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    return folder


def caption(capsys, *args):
    code = main(["caption", *map(str, args), "--batch-size", "2", "--max-new-tokens", "6", "--dtype", "float32",
                 "--threads", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out), err


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def single_caption(model, processor, path):
    text = processor.apply_chat_template(build_messages(PROMPT, 1), add_generation_prompt=True)
    inputs = processor(text, images=[[open_image(path)]])
    return generate(model, processor, inputs, SamplingParams(max_new_tokens=6)).text


def test_caption_a_folder_then_resume(capsys, tiny_hf_checkpoint, images, tmp_path):
    folder, _ = tiny_hf_checkpoint
    out = tmp_path / "captions.jsonl"
    summary, err = caption(capsys, images, "--model", folder, "--out", out)
    assert (summary["images"], summary["captioned"], summary["failed"], summary["skipped"]) == (5, 3, 2, 0)
    assert "captioning" in err  # the progress bar
    assert {f["path"].rsplit("/", 1)[1] for f in summary["failures"]} == {"notes.png", "cut.jpg"}

    records = {r["path"].rsplit("/", 1)[1]: r for r in lines(out)}
    assert set(records) == {"a.png", "b.jpg", "c.webp", "notes.png", "cut.jpg"}
    assert "not an image" in records["notes.png"]["error"] and "corrupt" in records["cut.jpg"]["error"]
    model, processor = load(folder, dtype="float32")
    for name in ("a.png", "b.jpg", "c.webp"):
        r = records[name]
        assert set(r) == {"path", "caption", "finish_reason", "prompt_tokens", "completion_tokens"}
        path = images / ("sub/" + name if name == "c.webp" else name)
        assert r["caption"] == single_caption(model, processor, path)  # batching changes nothing

    # a second run has nothing to do and leaves the file alone
    before = out.read_text()
    summary, _ = caption(capsys, images, "--model", folder, "--out", out)
    assert (summary["captioned"], summary["failed"], summary["skipped"]) == (0, 0, 5)
    assert out.read_text() == before

    # a run killed mid-write leaves half a line: the next run removes it and carries on with the new image
    with open(out, "a") as f:
        f.write('{"path": "/half/writ')
    Image.new("RGB", (50, 50), (1, 2, 3)).save(images / "new.png")
    summary, err = caption(capsys, images, "--model", folder, "--out", out)
    assert (summary["captioned"], summary["skipped"]) == (1, 5)
    assert "unfinished last line" in err
    assert out.read_text().startswith(before)
    assert [r["path"].rsplit("/", 1)[1] for r in lines(out)][-1] == "new.png"

    # --retry-errors tries the unreadable files again (and they are still unreadable)
    summary, _ = caption(capsys, images, "--model", folder, "--out", out, "--retry-errors")
    assert (summary["captioned"], summary["failed"], summary["skipped"]) == (0, 2, 4)


def test_missing_files_are_reported_not_fatal(capsys, tiny_hf_checkpoint, images, tmp_path):
    folder, _ = tiny_hf_checkpoint
    out = tmp_path / "c.jsonl"
    summary, _ = caption(capsys, images / "a.png", tmp_path / "gone.png", "--model", folder, "--out", out)
    assert (summary["captioned"], summary["failed"]) == (1, 1)
    assert "does not exist" in summary["failures"][0]["error"]


def test_bad_output_file_is_one_clear_line(capsys, tiny_hf_checkpoint, images, tmp_path):
    folder, _ = tiny_hf_checkpoint
    out = tmp_path / "not-captions.jsonl"
    out.write_text("hello\n")
    code = main(["caption", str(images), "--model", str(folder), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "not a JSON line" in err and err.count("\n") == 1
