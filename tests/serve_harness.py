"""Start `smolvlm serve` as a real process on a free port for the server tests, and small helpers."""

import base64
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, *extra: str, log: Path, dtype: str | None = "float32", env: dict | None = None):
        """dtype None: the server's default (--dtype auto); env: extra environment variables (e.g. SMOLVLM_CPU)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        cmd = [sys.executable, "-m", "smolvlm.cli", "serve", "--model", str(model), "--port", str(self.port),
               *(["--dtype", dtype] if dtype else []), "--log-level", "warning",
               # one thread: the tiny model gains nothing from more, and other processes share the cores
               "--threads", "1", *extra]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self._log_file = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not come up:\n{log.read_text()}")
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log_file.close()


def png_bytes(size=(80, 50), color=(10, 200, 30), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def user(text: str, *images: bytes) -> dict:
    return {"role": "user", "content": [*(image_part(i) for i in images), {"type": "text", "text": text}]}


def reference_answer(model, processor, messages: list[dict], max_tokens: int, **sampling) -> tuple[str, int, int]:
    """What smolvlm.generation gives in-process for OpenAI-style messages: (text, prompt, completion tokens)."""
    from smolvlm.generation import SamplingParams, generate

    chat, images = [], []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts = []
        for p in content:
            if p["type"] == "text":
                parts.append({"type": "text", "text": p["text"]})
            else:
                url = p["image_url"] if isinstance(p["image_url"], str) else p["image_url"]["url"]
                images.append(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
                parts.append({"type": "image"})
        chat.append({"role": m["role"], "content": parts})
    text = processor.apply_chat_template(chat, add_generation_prompt=True)
    inputs = processor(text, images=[images] if images else None)
    r = generate(model, processor, inputs, SamplingParams(max_new_tokens=max_tokens, **sampling))
    return r.text, r.prompt_tokens, r.completion_tokens
