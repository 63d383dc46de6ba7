"""Every kind of bad request gets a 4xx with an OpenAI error body, and the server keeps answering
correctly afterwards (the next good request gets the same answer as before any bad one)."""

import base64
import io
import json

import httpx
import pytest
from PIL import Image

from serve_harness import Server, data_url, png_bytes, user

GOOD = {"model": "m", "messages": [user("What is it?", png_bytes())], "max_tokens": 8, "temperature": 0}
MAX_REQUEST_BYTES = 1_000_000


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint, tmp_path_factory):
    folder, _ = tiny_hf_checkpoint
    s = Server(folder, "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-images", "4",
               log=tmp_path_factory.mktemp("serve-errors") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def good_answer(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def with_image_url(url: str, text: str = "What is it?") -> dict:
    return {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                              {"type": "text", "text": text}]}]}


def with_image_bytes(data: bytes) -> dict:
    return with_image_url(data_url(data))


def truncated_png() -> bytes:
    return png_bytes((64, 64), (1, 2, 3))[:60]


def bomb_png() -> bytes:
    """25 million pixels in a few kB: a 1-bit image of one colour."""
    buf = io.BytesIO()
    Image.new("1", (5000, 5000), 0).save(buf, format="PNG", optimize=True)
    assert len(buf.getvalue()) < 100_000
    return buf.getvalue()


def body(d: dict) -> bytes:
    return json.dumps(d).encode()


CASES = {
    # name: (raw request body, expected status, expected error code, expected param or None)
    "malformed JSON": (b'{"messages": [', 400, "invalid_json", None),
    "not UTF-8": (b'{"messages": "\xff"}', 400, "invalid_json", None),
    "JSON that is not an object": (b"[1, 2]", 400, "invalid_request", None),
    "no messages": (body({"model": "m"}), 400, "invalid_value", "messages"),
    "empty messages": (body({"model": "m", "messages": []}), 400, "invalid_value", "messages"),
    "unknown role": (body({**GOOD, "messages": [{"role": "wizard", "content": "hi"}]}), 400, "invalid_value",
                     "messages[0].role"),
    "unknown part type": (body({**GOOD, "messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400,
                          "invalid_value", "messages[0].content[0]"),
    "temperature as a string": (body({**GOOD, "temperature": "hot"}), 400, "invalid_value", "temperature"),
    "temperature out of range": (body({**GOOD, "temperature": 7}), 400, "invalid_value", "temperature"),
    "top_p of 0": (body({**GOOD, "top_p": 0}), 400, "invalid_value", "top_p"),
    "n of 3": (body({**GOOD, "n": 3}), 400, "unsupported_value", "n"),
    "five stop strings": (body({**GOOD, "stop": ["a", "b", "c", "d", "e"]}), 400, "invalid_value", "stop"),
    "image in an assistant turn": (
        body({**GOOD, "messages": [{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}]}),
        400, "invalid_value", "messages[0].content[0]"),
    "bad base64": (body(with_image_url("data:image/png;base64,iVBOR!!notbase64")), 400, "invalid_base64",
                   "messages[0].content[0].image_url"),
    "data URL without base64": (body(with_image_url("data:image/png,rawbytes")), 400, "invalid_image_url",
                                "messages[0].content[0].image_url"),
    "bytes that are not an image": (body(with_image_bytes(b"hello, I am not a picture")), 400, "invalid_image",
                                    "messages[0].content[0].image_url"),
    "a truncated PNG": (body(with_image_bytes(truncated_png())), 400, "invalid_image",
                        "messages[0].content[0].image_url"),
    "a decompression bomb": (body(with_image_bytes(bomb_png())), 400, "image_too_large",
                             "messages[0].content[0].image_url"),
    "too many images": (body({**GOOD, "messages": [user("Count them.", *[png_bytes((8, 8))] * 5)]}), 400,
                        "too_many_images", "messages"),
    "remote image URL": (body(with_image_url("http://127.0.0.1:9/cat.png")), 400, "remote_images_disabled",
                         "messages[0].content[0].image_url"),
    "file URL": (body(with_image_url("file:///etc/passwd")), 400, "invalid_image_url",
                 "messages[0].content[0].image_url"),
    "negative max_tokens": (body({**GOOD, "max_tokens": -5}), 400, "invalid_value", "max_tokens"),
    "zero max_completion_tokens": (body({**GOOD, "max_completion_tokens": 0}), 400, "invalid_value",
                                   "max_completion_tokens"),
    "huge max_tokens": (body({**GOOD, "max_tokens": 10**12}), 400, "invalid_value", "max_tokens"),
    "prompt + max_tokens beyond the context": (body({**GOOD, "max_tokens": 4000}), 400, "context_length_exceeded",
                                               "max_tokens"),
    "prompt longer than the context": (
        body({**GOOD, "messages": [{"role": "user", "content": "word " * 3000}]}), 400, "context_length_exceeded",
        "messages"),
    "text far beyond the context": (
        body({**GOOD, "messages": [{"role": "user", "content": "x" * 40000}]}), 400, "context_length_exceeded",
        "messages"),
    "literal <image> in the text": (body({**GOOD, "messages": [{"role": "user", "content": "look: <image>"}]}), 400,
                                    "invalid_value", "messages"),
    "request body over the limit": (body({**GOOD, "padding": "x" * MAX_REQUEST_BYTES}), 413, "request_too_large",
                                    None),
    "a bad image in a streamed request": (body({**with_image_bytes(b"nope"), "stream": True}), 400, "invalid_image",
                                          "messages[0].content[0].image_url"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_request_is_refused_and_the_server_keeps_answering(server, good_answer, name):
    raw, status, code, param = CASES[name]
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert error["message"]
    again = httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=30)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == good_answer


def test_chunked_body_over_the_limit_is_refused(server, good_answer):
    def chunks():  # no Content-Length: the server must count as it reads
        yield b'{"model": "m", "padding": "'
        for _ in range(20):
            yield b"x" * 100_000
        yield b'"}'

    r = httpx.post(server.url + "/v1/chat/completions", content=chunks(), timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    again = httpx.post(server.url + "/v1/chat/completions", json=GOOD, timeout=30)
    assert again.json()["choices"][0]["message"]["content"] == good_answer


def test_unknown_routes_and_methods_get_error_bodies(server):
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_error_messages_say_what_to_do(server):
    r = httpx.post(server.url + "/v1/chat/completions", json=with_image_url("https://example.com/cat.png"))
    assert "--allow-remote-images" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json=with_image_bytes(bomb_png()))
    assert "5000x5000" in r.json()["error"]["message"]


def test_openai_client_raises_its_bad_request_error(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    bad = base64.b64encode(b"not an image").decode()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{bad}"}}]}])
    assert e.value.status_code == 400 and e.value.code == "invalid_image"
