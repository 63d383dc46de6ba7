"""The commands at their defaults on every ISA level this CPU can run: `--dtype auto` resolves per level (bfloat16
only with native bf16), generate / chat / caption / serve run with it and say what they ran, and `smolvlm doctor`
reports the CPU, the level and the kernels. Levels are forced with SMOLVLM_CPU in a subprocess; a level above this
CPU's is skipped with the reason."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import CPU_CEILING, skip_above_ceiling
from serve_harness import Server, png_bytes, user
from smolvlm.runtime import cpu

LEVELS = list(cpu.LEVELS)


def smolvlm(*args: str, level: str | None = None, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)  # without a level: the run's own (SMOLVLM_CPU, if the whole run sets one)
    if level:
        env[cpu.ENV] = level
    return subprocess.run([sys.executable, "-m", "smolvlm.cli", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=600)


def runnable(level: str) -> None:
    skip_above_ceiling(level)


def expected_dtype(level: str) -> str:
    return "bfloat16" if level == "avx512_bf16" else "float32"


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.new("RGB", (80, 50), (10, 200, 30)).save(path)
    return path


def test_doctor_reports_the_cpu_level_and_kernels():
    r = smolvlm("doctor", "--json")
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    assert facts["level"] == CPU_CEILING and facts["level_detected"] == cpu.detected_level()
    assert facts["dtype_auto"] == expected_dtype(CPU_CEILING)
    assert set(facts["features"]) <= set(cpu.REPORTED) and facts["kernels"]["level"] == facts["level"]
    text = smolvlm("doctor", level="avx2")
    assert text.returncode == 0, text.stderr
    assert "level:      avx2 (SMOLVLM_CPU=avx2" in text.stdout and "float32 (auto: no native bf16" in text.stdout


def test_a_bad_forced_level_is_one_clear_line():
    r = smolvlm("doctor", level="avx9000")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "SMOLVLM_CPU='avx9000' is not a level" in r.stderr


@pytest.mark.parametrize("level", LEVELS)
def test_generate_at_its_default_dtype_on_every_level(level, tiny_hf_checkpoint, photo):
    runnable(level)
    folder, _ = tiny_hf_checkpoint
    args = ["generate", "--model", str(folder), "--image", str(photo), "--prompt", "What is it?",
            "--max-new-tokens", "6", "--ignore-eos", "--json", "--threads", "1"]
    r = smolvlm(*args, level=level)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["dtype_requested"] == "auto" and got["dtype"] == expected_dtype(level) and got["cpu_level"] == level
    assert got["completion_tokens"] == 6
    if got["dtype"] == "float32":  # auto is float32 here: the same answer as asking for float32
        ref = smolvlm(*args, "--dtype", "float32", level=level)
        assert ref.returncode == 0, ref.stderr
        assert json.loads(ref.stdout)["token_ids"] == got["token_ids"]


@pytest.mark.parametrize("level", ["avx2", CPU_CEILING])
def test_caption_and_chat_at_their_default_dtype(level, tiny_hf_checkpoint, photo, tmp_path):
    runnable(level)
    folder, _ = tiny_hf_checkpoint
    out = tmp_path / "captions.jsonl"
    r = smolvlm("caption", str(photo), "--model", str(folder), "--out", str(out), "--max-new-tokens", "4",
                "--quiet", "--json", "--threads", "1", level=level)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["captioned"] == 1 and summary["dtype"] == expected_dtype(level) and summary["cpu_level"] == level
    assert json.loads(out.read_text().splitlines()[0])["path"] == str(photo)
    chat = smolvlm("chat", "--model", str(folder), "--image", str(photo), "--max-new-tokens", "4", "--threads", "1",
                   level=level, stdin="What is it?\n")
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip(), "the chat printed no answer"


@pytest.mark.parametrize("level", ["avx2", CPU_CEILING])
def test_serve_at_its_default_dtype_answers_an_image_request(level, tiny_hf_checkpoint, tmp_path):
    runnable(level)
    folder, _ = tiny_hf_checkpoint
    server = Server(folder, log=tmp_path / "serve.log", dtype=None, env={cpu.ENV: level})
    try:
        assert server.health()["dtype"] == expected_dtype(level)
        import httpx

        body = {"model": "m", "max_tokens": 4, "messages": [user("What is it?", png_bytes())]}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1
    finally:
        server.stop()
    assert f"on CPU level {level}" in (tmp_path / "serve.log").read_text()
