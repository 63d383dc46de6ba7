"""The OpenAI chat completions request schema, the server's limits, and OpenAI-shaped errors and bodies.

Every bad request becomes an `APIError` with an HTTP status and the body OpenAI's clients understand:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass
class Limits:
    """What one request may ask for. Defaults suit a CPU server; `smolvlm serve --help` lists the flags."""

    max_request_bytes: int = 20 * 1024 * 1024  # the whole JSON body
    max_images: int = 8  # image parts per request (all messages)
    max_image_bytes: int = 10 * 1024 * 1024  # one image, encoded (after base64 decoding / download)
    max_image_pixels: int = 4096 * 4096  # width * height, checked from the header before decoding
    max_tokens: int = 4096  # the largest max_tokens a request may ask for
    max_queue: int = 64  # requests waiting for the model; more get 503
    remote_timeout: float = 10.0  # seconds for downloading one remote image


class APIError(Exception):
    """An error answered with `status` and an OpenAI error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------
# the request schema (strict: "5" is not a number, 1 is not a boolean)


class ImageURL(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    url: str
    detail: str | None = None  # accepted and ignored: SmolVLM always tiles at its own resolution


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL | str  # the object form, or the bare URL string some clients send


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    # Unknown fields (tools, logit_bias, user, ...) are ignored, as most OpenAI-compatible servers do,
    # so that existing client code keeps working; the ones that would change the answer are refused below.
    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens tokens (load tests)
    tools: list | None = None
    response_format: dict | None = None


# pydantic names the branch of a union in an error's location; these are not request fields
UNION_LABELS = {"str", "int", "float", "bool", "ImageURL", "TextPart", "ImagePart"}
PART_TAGS = {"text", "image_url"}  # a tagged union's label is the tag, right after the part's index


def _param(loc: tuple) -> str:
    """('messages', 0, 'content', 'list[...]', 0, 'image_url', 'image_url', 'ImageURL', 'url')
    -> 'messages[0].content[0].image_url.url'."""
    out, prev = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not ("[" in part or part in UNION_LABELS or (isinstance(prev, int) and part in PART_TAGS)):
            out += ("." if out else "") + part
        prev = part
    return out


def _schema_error(e: ValidationError) -> APIError:
    """The most specific problem: the deepest parameter; the union branches failing there are joined
    ("a valid string or a valid list")."""
    errors = [(_param(err["loc"]), err["msg"]) for err in e.errors()]
    depth = lambda param: param.count(".") + param.count("[")  # noqa: E731
    param = max((p for p, _ in errors), key=depth)
    msgs = list(dict.fromkeys(m for p, m in errors if p == param))
    msg = msgs[0] + "".join(" or " + m.removeprefix("Input should be ") for m in msgs[1:])
    return APIError(400, f"{param or 'body'}: {msg}", param=param or None, code="invalid_value")


def parse_request(data: object) -> ChatRequest:
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_request")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        raise _schema_error(e) from None
    if req.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
    if req.tools:
        raise APIError(400, "tools are not supported by this server", param="tools", code="unsupported_value")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format",
                       code="unsupported_value")
    stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
    if len(stops) > 4 or any(len(s) > 256 for s in stops):
        raise APIError(400, "stop takes at most 4 strings of at most 256 characters", param="stop",
                       code="invalid_value")
    return req


def requested_max_tokens(req: ChatRequest, limits: Limits) -> int | None:
    value = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if value is None:
        return None
    if value < 1:
        raise APIError(400, f"{name} must be at least 1, got {value}", param=name, code="invalid_value")
    if value > limits.max_tokens:
        raise APIError(400, f"{name} is {value} but this server allows at most {limits.max_tokens}", param=name,
                       code="invalid_value")
    return value


# ---------------------------------------------------------------------------------------------
# response bodies


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk_body(cid: str, model: str, created: int, delta: dict, finish_reason: str | None,
               include_usage: bool) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
    if include_usage:  # OpenAI sends "usage": null on every chunk but the last when usage was asked for
        body["usage"] = None
    return body


def usage_chunk_body(cid: str, model: str, created: int, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}
