"""`smolvlm serve` driven by the official `openai` client: plain, streamed (with usage), several images,
multi-turn, concurrency (batched greedy answers equal the single one), sampling controls, and a client
that goes away. The answers are checked against smolvlm.generation run in this process."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from openai import OpenAI

from serve_harness import Server, png_bytes, reference_answer, user
from smolvlm.io import load

GREEN = png_bytes((80, 50), (10, 200, 30))
RED_TALL = png_bytes((40, 90), (220, 20, 20), fmt="JPEG")


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint, tmp_path_factory):
    folder, _ = tiny_hf_checkpoint
    s = Server(folder, "--max-batch-size", "8", log=tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    c = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()  # an idle keep-alive connection would hold up the server's graceful shutdown


@pytest.fixture(scope="module")
def local(tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model gains nothing from more, and the server shares the cores
    yield load(folder, dtype="float32")
    torch.set_num_threads(threads)


def test_models_health_and_page(server, client, tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint
    assert [m.id for m in client.models.list().data] == [folder.name]
    h = server.health()
    assert h["status"] == "ok" and h["vision"] is True and h["model"] == folder.name
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/v1/chat/completions" in page.text


def test_plain_completion_matches_local_generation(client, local):
    messages = [user("What is in the picture?", GREEN)]
    r = client.chat.completions.create(model="anything", messages=messages, max_tokens=12, temperature=0)
    text, prompt_tokens, completion_tokens = reference_answer(*local, messages, 12)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and text
    assert r.choices[0].finish_reason == ("length" if completion_tokens == 12 else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert r.usage.total_tokens == prompt_tokens + completion_tokens


def test_stream_with_usage_gives_the_same_answer(client, local):
    messages = [user("Describe it.", GREEN)]
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text, prompt_tokens, completion_tokens = reference_answer(*local, messages, 16)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1, "the answer should arrive in several chunks"
    assert "".join(pieces) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length" if completion_tokens == 16 else "stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done_marker(server):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_two_images_and_multi_turn(client, local):
    messages = [
        {"role": "system", "content": "You compare pictures."},
        user("What differs between these?", GREEN, RED_TALL),
        {"role": "assistant", "content": "The colour."},
        {"role": "user", "content": [{"type": "text", "text": "And the shape?"}]},
    ]
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=10, temperature=0)
    text, prompt_tokens, _ = reference_answer(*local, messages, 10)
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens == prompt_tokens
    one_image = client.chat.completions.create(model="m", messages=[user("What differs between these?", GREEN)],
                                               max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > one_image.usage.prompt_tokens + 4 * 4  # the second image's tiles count


def test_plain_string_image_url_form(client, local):
    data = user("What is it?", GREEN)
    plain = {"role": "user", "content": [{"type": "image_url", "image_url": data["content"][0]["image_url"]["url"]},
                                         {"type": "text", "text": "What is it?"}]}
    r = client.chat.completions.create(model="m", messages=[plain], max_tokens=8, temperature=0)
    assert r.choices[0].message.content == reference_answer(*local, [data], 8)[0]


def test_16_concurrent_requests_equal_the_single_answer(server, client):
    messages = [user("What is in the picture?", RED_TALL)]

    def ask(_=None):
        r = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    single = ask()
    batches_before = server.health()["batches"]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    assert answers == [single] * 16
    h = server.health()
    assert h["max_batch"] > 1, "concurrent greedy requests should have been decoded together"
    assert h["batches"] - batches_before < 16


def test_concurrent_different_prompts_each_get_their_own_answer(client, local):
    prompts = [[user("What is it?", GREEN)], [{"role": "user", "content": "Hello there, how are you today?"}],
               [user("Is it red or green? Answer in one word.", RED_TALL)], [{"role": "user", "content": "hi"}]]
    want = [reference_answer(*local, m, 10)[0] for m in prompts]

    def ask(messages):
        return client.chat.completions.create(model="m", messages=messages, max_tokens=10,
                                              temperature=0).choices[0].message.content

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, prompts * 2))
    assert got == want * 2


def test_stop_seed_and_top_p(client, local):
    messages = [{"role": "user", "content": "Tell me a story."}]
    full = reference_answer(*local, messages, 20)[0]
    cut = full.split()[2]  # a word in the middle of the greedy answer
    r = client.chat.completions.create(model="m", messages=messages, max_tokens=20, temperature=0, stop=[cut])
    assert r.choices[0].message.content == full[:full.index(cut)]
    assert r.choices[0].finish_reason == "stop"

    def sample(seed):
        return client.chat.completions.create(model="m", messages=messages, max_tokens=12, temperature=1.0,
                                              top_p=0.9, seed=seed).choices[0].message.content

    assert sample(7) == sample(7) == reference_answer(*local, messages, 12, temperature=1.0, top_p=0.9, seed=7)[0]
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def wait_idle(server, timeout=10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = server.health()
        if h["running"] == 0 and h["queued"] == 0 and h["preparing"] == 0:
            return h
        assert time.monotonic() < deadline, f"the server is still busy: {h}"
        time.sleep(0.05)


def test_a_streaming_client_that_disconnects_stops_its_generation(server):
    wait_idle(server)
    before = server.health()
    body = {"model": "m", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if '"content"' in line and '"role"' not in line:
                break  # one piece of the answer arrived: now hang up
    started = time.monotonic()
    h = wait_idle(server, timeout=5)
    assert time.monotonic() - started < 5
    assert h["cancelled"] == before["cancelled"] + 1
    assert h["generated_tokens"] == before["generated_tokens"]  # not run to its 2000 tokens


def test_a_waiting_client_that_disconnects_stops_its_generation(server):
    wait_idle(server)
    before = server.health()
    body = {"model": "m", "messages": [{"role": "user", "content": "Go on forever."}], "max_tokens": 2000,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    h = wait_idle(server, timeout=5)
    assert h["cancelled"] == before["cancelled"] + 1
    assert h["generated_tokens"] == before["generated_tokens"]
