"""The FastAPI app: OpenAI chat completions (plain and streamed), models, health, and the chat page.

A request goes: size-limited body -> JSON -> schema -> images (data: URLs, or http(s) when allowed) ->
chat template, tokenizer and vision encoder (thread pool, a few at a time) -> the engine's queue ->
answer pieces back through an asyncio queue. Any problem before the answer starts is an OpenAI error
body with a 4xx/5xx status; a problem after a stream started is sent as an `error` event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from smolvlm.errors import SmolVLMError
from smolvlm.generation import SamplingParams
from smolvlm.serve import images as image_io
from smolvlm.serve.engine import Engine, Finished, Job, QueueFull
from smolvlm.serve.protocol import (
    APIError,
    ChatRequest,
    Limits,
    chunk_body,
    completion_body,
    completion_id,
    parse_request,
    requested_max_tokens,
    usage_chunk_body,
)

log = logging.getLogger("smolvlm.serve")

# Preparing a request decodes its images and runs the vision encoder; a few at a time bounds the memory
# that large images can take while they wait.
PREPARE_SLOTS = 2
# A token is rarely more than a few characters; text far beyond the context is refused before tokenizing.
CHARS_PER_TOKEN_BOUND = 16


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def chat_messages(req: ChatRequest) -> tuple[list[dict], list[tuple[str, str]]]:
    """OpenAI messages -> the processor's messages ({"type": "image"} / {"type": "text"} parts), and the
    image URLs in prompt order with the request parameter each came from."""
    messages, urls = [], []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if m.content is None or isinstance(m.content, str):
            messages.append({"role": role, "content": [{"type": "text", "text": m.content or ""}]})
            continue
        parts = []
        for j, p in enumerate(m.content):
            if p.type == "text":
                parts.append({"type": "text", "text": p.text})
            else:
                if role != "user":
                    raise APIError(400, f"messages[{i}]: only user messages may hold images",
                                   param=f"messages[{i}].content[{j}]", code="invalid_value")
                url = p.image_url if isinstance(p.image_url, str) else p.image_url.url
                urls.append((f"messages[{i}].content[{j}].image_url", url))
                parts.append({"type": "image"})
        messages.append({"role": role, "content": parts})
    return messages, urls


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing it once it passes `limit` bytes (whether or not Content-Length was sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes; this server accepts at most {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(model, processor, model_name: str, limits: Limits | None = None, max_batch_size: int = 8,
               allow_remote_images: bool = False, api_key: str | None = None) -> FastAPI:
    limits = limits or Limits()
    engine = Engine(model, processor, max_batch_size=max_batch_size, max_queue=limits.max_queue)
    context = engine.context
    created = int(time.time())
    page = resources.files("smolvlm.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.stop)

    app = FastAPI(title="smolvlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    prepare_slots = asyncio.Semaphore(PREPARE_SLOTS)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, e: Exception):
        log.exception("request failed")  # a bug, not a bad request: the operator needs the traceback
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").body(),
                            status_code=500)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key; send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "vision": model.has_vision, "auth": api_key is not None,
                "dtype": str(model.dtype).removeprefix("torch."), **engine.snapshot()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "smolvlm"}]}

    def prepare(messages: list[dict], blobs: list[tuple[str, bytes]]):
        """Runs in a worker thread: decode images, render the chat template, tokenize, encode images."""
        pictures = [image_io.open_image_bytes(data, limits, param) for param, data in blobs]
        try:
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
            return engine.encode(text, pictures)
        except SmolVLMError as e:
            raise APIError(400, str(e), param="messages", code="invalid_value") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await read_body(request, limits.max_request_bytes)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None
        req = parse_request(data)
        max_tokens = requested_max_tokens(req, limits)
        messages, urls = chat_messages(req)
        if urls and not model.has_vision:
            raise APIError(400, f"{model_name} is a text-only model; send no images", param=urls[0][0],
                           code="invalid_value")
        if len(urls) > limits.max_images:
            raise APIError(400, f"the request has {len(urls)} images; this server accepts at most "
                                f"{limits.max_images} per request", param="messages", code="too_many_images")
        chars = sum(len(p.get("text", "")) for m in messages for p in m["content"])
        if chars > CHARS_PER_TOKEN_BOUND * context:
            raise APIError(400, f"the messages hold {chars} characters, far more than the model's context of "
                                f"{context} tokens", param="messages", code="context_length_exceeded")

        try:
            engine.admit()
        except QueueFull:
            raise APIError(503, f"the server is busy ({limits.max_queue} requests waiting); retry shortly",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        try:
            job = await make_job(req, max_tokens, messages, urls)
        except BaseException:
            engine.withdraw()
            raise
        engine.submit(job)

        cid = completion_id()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(stream(job, cid, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(request, job, cid)

    async def make_job(req: ChatRequest, max_tokens: int | None, messages: list[dict],
                       urls: list[tuple[str, str]]) -> Job:
        """Fetch and decode the images, render and tokenize the prompt, encode the images."""
        blobs = []
        for param, url in urls:
            if image_io.is_remote(url):
                if not allow_remote_images:
                    raise APIError(400, f"{param}: remote image URLs are disabled on this server; send the image "
                                        "as a base64 data: URL (or start it with --allow-remote-images)",
                                   param=param, code="remote_images_disabled")
                blobs.append((param, await image_io.fetch_remote(url, limits, param)))
            else:
                blobs.append((param, image_io.data_url_bytes(url, limits, param)))

        async with prepare_slots:
            input_ids, image_embeds = await anyio.to_thread.run_sync(prepare, messages, blobs)
        prompt_tokens = int(input_ids.numel())
        if max_tokens is None:
            max_tokens = min(limits.max_tokens, context - prompt_tokens)
        elif prompt_tokens + max_tokens > context:
            raise APIError(400, f"the prompt is {prompt_tokens} tokens and max_tokens is {max_tokens}, more than "
                                f"the model's context of {context}; lower max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        params = SamplingParams(
            max_new_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, seed=req.seed, stop=stop, ignore_eos=req.ignore_eos,
        )
        return Job(input_ids, image_embeds, params, asyncio.get_running_loop())

    async def complete(request: Request, job: Job, cid: str) -> dict | JSONResponse:
        async def watch_disconnect():
            # the body is read, so the next message is the client going away (or never comes)
            while (await request.receive())["type"] != "http.disconnect":
                pass
            job.cancel()
            job.events.put_nowait(("gone", None))  # the engine says nothing more to a cancelled job

        watcher = asyncio.create_task(watch_disconnect())
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "done":
                    f: Finished = value
                    return completion_body(cid, model_name, f.text, f.finish_reason, f.prompt_tokens,
                                           f.completion_tokens)
                if kind == "error":
                    raise value
                if kind == "gone":
                    return JSONResponse(APIError(499, "the client closed the connection", code="client_closed").body(),
                                        status_code=499)
        finally:
            watcher.cancel()
            job.cancel()  # a no-op once done; stops the generation if this handler was cancelled

    async def stream(job: Job, cid: str, include_usage: bool):
        created = int(time.time())
        try:
            yield sse(chunk_body(cid, model_name, created, {"role": "assistant", "content": ""}, None, include_usage))
            while True:
                kind, value = await job.events.get()
                if kind == "piece":
                    yield sse(chunk_body(cid, model_name, created, {"content": value}, None, include_usage))
                elif kind == "done":
                    f: Finished = value
                    yield sse(chunk_body(cid, model_name, created, {}, f.finish_reason, include_usage))
                    if include_usage:
                        yield sse(usage_chunk_body(cid, model_name, created, f.prompt_tokens, f.completion_tokens))
                    break
                else:
                    yield sse(value.body())
                    break
            yield sse("[DONE]")
        finally:
            # Starlette cancels this generator when the client disconnects; stop decoding for it
            job.cancel()

    return app
