"""The chat page at / in a real headless Chromium (Debian's `chromium`, driven by Playwright): pick an
image, ask, and the answer streams in, equal to what the API gives for the same request. Drag and drop
works, and a follow-up question is answered with the conversation kept.

The screenshot goes to the test's tmp folder; SMOLVLM_UPDATE_SCREENSHOT=1 also writes docs/webchat.png."""

import os
import shutil
from pathlib import Path

import httpx
import pytest

from conftest import REPO, require
from serve_harness import Server, png_bytes, user

CHROMIUM = Path("/usr/bin/chromium")
DOCS_SCREENSHOT = REPO / "docs" / "webchat.png"
QUESTION = "What is in this picture?"
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint, tmp_path_factory):
    folder, _ = tiny_hf_checkpoint
    s = Server(folder, log=tmp_path_factory.mktemp("webchat") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    require("chromium", CHROMIUM.exists())
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def api_answer(server, messages) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "m", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_pick_an_image_ask_and_the_answer_streams_in(server, browser, tmp_path):
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes((120, 80), (240, 180, 40)))
    page = browser.new_page(viewport={"width": 900, "height": 640})
    page.set_default_timeout(15_000)
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny')")
    page.click("summary")  # open the settings, as a user would
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.set_input_files("#file", str(image))
    page.wait_for_selector("#preview:not([hidden])")
    page.fill("#prompt", QUESTION)
    page.click("#send")

    answer = page.locator(".msg.assistant").last
    page.wait_for_selector(".msg.assistant[data-state=done]", timeout=30_000)
    text = answer.locator(".text").inner_text()
    expected = api_answer(server, [user(QUESTION, image.read_bytes())])
    assert text == expected and text.strip()
    assert int(answer.get_attribute("data-chunks")) > 1, "the answer should have arrived in several pieces"
    assert "tokens" in answer.locator(".meta").inner_text()  # the usage chunk was read
    assert page.locator(".msg.user img").count() == 1

    shot = tmp_path / "webchat.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("SMOLVLM_UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, DOCS_SCREENSHOT)

    # a follow-up: the page sends the whole conversation, image included
    page.fill("#prompt", "And what colour is it?")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.msg.assistant[data-state=done]').length == 2",
                           timeout=30_000)
    follow_up = page.locator(".msg.assistant").last.locator(".text").inner_text()
    assert follow_up == api_answer(server, [user(QUESTION, image.read_bytes()),
                                            {"role": "assistant", "content": text},
                                            {"role": "user", "content": "And what colour is it?"}])
    page.close()


def test_drop_an_image_and_see_errors(server, browser, tmp_path):
    page = browser.new_page()
    page.set_default_timeout(15_000)
    page.goto(server.url + "/")
    # drop a file onto the drop zone, as a user dragging it from their desktop would
    data = png_bytes((30, 30), (0, 0, 255))
    page.evaluate("""(bytes) => {
        const file = new File([new Uint8Array(bytes)], "dropped.png", {type: "image/png"});
        const transfer = new DataTransfer();
        transfer.items.add(file);
        document.getElementById("drop").dispatchEvent(new DragEvent("drop", {dataTransfer: transfer, bubbles: true}));
    }""", list(data))
    page.wait_for_selector("#preview:not([hidden])")
    assert page.inner_text("#drop-text") == "dropped.png"

    # a server-side refusal shows its message instead of an answer
    page.click("summary")
    page.fill("#max-tokens", "100000")
    page.fill("#prompt", "Describe it.")
    page.click("#send")
    page.wait_for_selector(".msg.assistant[data-state=error]", timeout=30_000)
    assert "max_tokens" in page.locator(".msg.assistant").last.inner_text()
    page.close()
