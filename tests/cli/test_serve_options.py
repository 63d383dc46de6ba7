"""`smolvlm serve` options: --api-key, a small --max-queue (503 + Retry-After when full),
--allow-remote-images (downloads with the same limits as data: URLs) and --max-image-pixels."""

import http.server
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from serve_harness import Server, data_url, png_bytes, user

KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
IMAGE = png_bytes((60, 40), (30, 60, 200))
LARGE = png_bytes((200, 200), (0, 0, 0))  # 40000 pixels, over this server's --max-image-pixels


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint, tmp_path_factory):
    folder, _ = tiny_hf_checkpoint
    s = Server(folder, "--api-key", KEY, "--max-queue", "1", "--max-batch-size", "1", "--allow-remote-images",
               "--max-image-pixels", "10000", log=tmp_path_factory.mktemp("serve-options") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def image_host():
    """A plain HTTP server with /image.png, /large.png; anything else is 404."""
    files = {"/image.png": IMAGE, "/large.png": LARGE}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = files.get(self.path)
            self.send_response(200 if data else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data or b"")))
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def chat(server, body, headers=AUTH):
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60)


def test_api_key_is_required_on_the_api_only(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = chat(server, body, headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert chat(server, body).status_code == 200
    # the page and the health check stay open, so that a browser can load the page and ask for the key
    assert httpx.get(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/health").json()["auth"] is True
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert openai.OpenAI(base_url=server.url + "/v1", api_key=KEY).models.list().data


def test_a_full_queue_answers_503_with_retry_after(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 200,
            "ignore_eos": True}
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: chat(server, body), range(6)))
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes, codes
    unexpected = [(r.status_code, r.text[:300]) for r in responses if r.status_code not in (200, 503)]
    assert set(codes) == {200, 503}, unexpected  # the bodies say which check refused the request
    for r in responses:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"] == {"message": r.json()["error"]["message"], "type": "server_error",
                                         "param": None, "code": "queue_full"}
        else:
            assert r.json()["usage"]["completion_tokens"] == 200
    # and once the queue drains, requests are served again
    assert chat(server, {**body, "max_tokens": 3}).status_code == 200


def test_remote_images_are_fetched_when_allowed(server, image_host):
    question = "What colour is it?"
    remote = {"model": "m", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_host + "/image.png"}}, {"type": "text", "text": question}]}]}
    inline = {**remote, "messages": [user(question, IMAGE)]}
    r = chat(server, remote)
    assert r.status_code == 200, r.text
    answer = r.json()["choices"][0]["message"]["content"]
    assert answer == chat(server, inline).json()["choices"][0]["message"]["content"]

    missing = {**remote, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_host + "/nothing.png"}}]}]}
    r = chat(server, missing)
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_fetch_failed"
    assert "404" in r.json()["error"]["message"]

    too_large = {**remote, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_host + "/large.png"}}]}]}
    r = chat(server, too_large)
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"


def test_pixel_limit_applies_to_data_urls_too(server):
    r = chat(server, {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(LARGE)}}]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"
    assert "200x200" in r.json()["error"]["message"]
