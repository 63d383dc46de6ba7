"""Autoregressive generation: KV cache, greedy/sampled decoding, stop rules, streaming, batching.

One loop serves every use: `generate_ids` yields the next token of each sequence of a left-padded
batch; `generate` / `stream` / `generate_batch` turn those ids into text with stop rules applied.
"""

import hashlib
import math
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from smolvlm.errors import SmolVLMError
from smolvlm.models.decoder import KVCache
from smolvlm.models.vlm import VLM


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filtering
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before the first one
    ignore_eos: bool = False  # keep going past EOS / <end_of_utterance> (benchmarks)
    use_cache: bool = True  # False recomputes the whole sequence every step (a reference check)

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise SmolVLMError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise SmolVLMError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SmolVLMError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SmolVLMError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens, including a final EOS if one ended the answer
    logprobs: list[float]  # log-probability of each generated token under the model (temperature 1)
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"


def sample_next(logits: torch.Tensor, params: SamplingParams, rng: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) float32 -> next token ids (B,)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already cover top_p (the most likely always stays)
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=rng)[:, 0]


class ImageEmbeddingCache:
    """The vision tower's output for recently seen tiles, keyed by a hash of their pixels: a chat turn
    re-sends the conversation's earlier images, which then cost a hash instead of a pass through the
    vision tower. Owned by whoever holds a conversation (a chat session, the server's engine) and passed to
    generate; invalidated when the model's vision or connector weights change."""

    def __init__(self, max_tiles: int = 128):
        self.max_tiles = max_tiles
        self.entries: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # key -> (L, D)
        self.version = None

    @staticmethod
    def weights_version(model: VLM) -> tuple:
        # in-place updates (an optimizer step) bump _version; reassignment changes the data pointer
        params = [*model.vision_model.parameters(), *model.connector.parameters()]
        return model.dtype, sum(p._version for p in params), sum(p.data_ptr() for p in params)

    def encode(self, model: VLM, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor | None):
        """Same result as model.encode_images(pixel_values, pixel_attention_mask): (N real tiles, L, D)."""
        version = self.weights_version(model)
        if version != self.version:
            self.entries.clear()
            self.version = version
        b, i = pixel_values.shape[:2]
        tiles = pixel_values.reshape(b * i, *pixel_values.shape[2:])
        masks = None if pixel_attention_mask is None else pixel_attention_mask.reshape(b * i, -1)
        real = (tiles != 0).flatten(1).any(dim=1)  # padding images are all zero (as encode_images skips them)
        real[0] |= ~real.any()
        index = real.nonzero()[:, 0].tolist()
        keys = []
        for j in index:
            h = hashlib.blake2b(tiles[j].contiguous().numpy().tobytes(), digest_size=16)
            h.update(str(tuple(tiles[j].shape)).encode())
            if masks is not None:
                h.update(masks[j].contiguous().numpy().tobytes())
            keys.append(h.digest())
        todo = [j for j, k in zip(index, keys, strict=True) if k not in self.entries]
        if todo:
            sub_mask = None if masks is None else pixel_attention_mask.reshape(b * i, *pixel_attention_mask.shape[2:])
            new = model.encode_images(tiles[todo][None], None if sub_mask is None else sub_mask[todo][None])
            for j, emb in zip(todo, new, strict=True):
                self.entries[keys[index.index(j)]] = emb
        out = []
        for k in keys:
            self.entries.move_to_end(k)
            out.append(self.entries[k])
        while len(self.entries) > self.max_tiles:
            self.entries.popitem(last=False)
        return torch.stack(out)


@torch.inference_mode()
def generate_ids(
    model: VLM,
    input_ids: torch.Tensor,  # (B, T), left-padded
    attention_mask: torch.Tensor | None,  # (B, T)
    params: SamplingParams,
    stop_token_ids: set[int],
    pixel_values: torch.Tensor | None = None,
    pixel_attention_mask: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    image_cache: ImageEmbeddingCache | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yields (token ids (B,), logprobs (B,), done (B,) bool) once per step. A sequence that is done
    keeps being fed its last token (its outputs are ignored) until every sequence is done. The KV cache is
    this call's own; image_cache (optional) is the caller's, shared across the calls of a conversation."""
    params.check()
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    context = model.cfg.text.max_position_embeddings
    longest = int(attention_mask.sum(dim=1).max())
    if longest >= context:
        raise SmolVLMError(f"the prompt is {longest} tokens but the model's context is {context}; shorten it")
    max_new = min(params.max_new_tokens, context - longest)
    rng = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    if pixel_values is not None:
        if not model.has_vision:
            raise SmolVLMError("this model has no vision encoder (a text-only checkpoint); drop the images")
        if image_cache is not None:
            image_embeds = image_cache.encode(model, pixel_values, pixel_attention_mask)
        else:
            image_embeds = model.encode_images(pixel_values, pixel_attention_mask)

    cache = KVCache(model.cfg.text, b, t + max_new, model.dtype) if params.use_cache else None
    ids, mask = input_ids, attention_mask
    step_ids = input_ids
    done = torch.zeros(b, dtype=torch.bool)
    for step in range(max_new):
        if cache is not None:
            logits = model(step_ids, image_embeds=image_embeds if step == 0 else None,
                           attention_mask=mask, cache=cache, last_only=True)
        else:
            logits = model(ids, image_embeds=image_embeds, attention_mask=mask, last_only=True)
        logits = logits[:, -1].float()  # (B, V)
        next_ids = sample_next(logits, params, rng)
        logprobs = logits.log_softmax(dim=-1).gather(1, next_ids[:, None])[:, 0]
        if not params.ignore_eos:
            is_stop = torch.tensor([int(i) in stop_token_ids for i in next_ids])
        else:
            is_stop = torch.zeros(b, dtype=torch.bool)
        newly_done = is_stop | (step == max_new - 1)
        yield next_ids, logprobs, done | newly_done
        done |= newly_done
        if bool(done.all()):
            return
        step_ids = next_ids[:, None]
        ids = torch.cat([ids, step_ids], dim=1)
        mask = torch.cat([mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)


class TextAssembler:
    """Turns one sequence's token ids into text pieces: decodes incrementally, holds back bytes of an
    unfinished UTF-8 character and text that may be the start of a stop string."""

    def __init__(self, decode, stop: list[str]):
        self.decode, self.stop = decode, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0  # characters of the text already handed out
        self.stopped = False

    def add(self, token_id: int, final: bool) -> str:
        self.ids.append(token_id)
        text = self.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                self.stopped, final, text = True, True, text[:at]
        if not final:
            if text.endswith("\ufffd"):
                return ""
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[: max(self.emitted, len(text) - hold)]
        piece, self.emitted = text[self.emitted :], max(self.emitted, len(text))
        return piece

    @property
    def text(self) -> str:
        text = self.decode(self.ids)
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                text = text[:at]
        return text


def stop_token_ids(processor) -> set[int]:
    ids = set(processor.eos_token_ids)
    if processor.end_of_utterance_id is not None:
        ids.add(processor.end_of_utterance_id)
    return ids


class TextStream:
    """Iterate for the text pieces of one answer as they are generated; `result` once it is done."""

    def __init__(self, model: VLM, processor, inputs: dict, params: SamplingParams,
                 image_cache: ImageEmbeddingCache | None = None):
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("TextStream takes one prompt; use generate_batch for several")
        self._steps = generate_ids(
            model, inputs["input_ids"], inputs.get("attention_mask"), params, stop_token_ids(processor),
            inputs.get("pixel_values"), inputs.get("pixel_attention_mask"), inputs.get("image_embeds"), image_cache,
        )
        self._stop_ids = stop_token_ids(processor)
        self._text = TextAssembler(lambda ids: processor.decode(ids, skip_special_tokens=True), params.stop)
        self._ignore_eos = params.ignore_eos
        self._prompt_tokens = int(inputs["input_ids"].shape[1])
        self._logprobs: list[float] = []
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        finish = "length"
        for ids, logprobs, done in self._steps:
            token = int(ids[0])
            self._logprobs.append(float(logprobs[0]))
            piece = self._text.add(token, final=bool(done[0]))
            if piece:
                yield piece
            if self._text.stopped or (not self._ignore_eos and token in self._stop_ids):
                finish = "stop"
                break
        ids = self._text.ids
        self.result = GenerationResult(
            text=self._text.text, token_ids=ids, logprobs=self._logprobs, prompt_tokens=self._prompt_tokens,
            completion_tokens=len(ids), finish_reason=finish,
        )


def generate(model: VLM, processor, inputs: dict, params: SamplingParams,
             image_cache: ImageEmbeddingCache | None = None) -> GenerationResult:
    stream = TextStream(model, processor, inputs, params, image_cache)
    for _ in stream:
        pass
    return stream.result


def generate_batch(model: VLM, processor, inputs: dict, params: SamplingParams) -> list[GenerationResult]:
    """Generate for a left-padded batch (the processor's output for several prompts) in one loop."""
    b = inputs["input_ids"].shape[0]
    stop_ids = stop_token_ids(processor)
    decode = lambda ids: processor.decode(ids, skip_special_tokens=True)  # noqa: E731
    texts = [TextAssembler(decode, params.stop) for _ in range(b)]
    logprobs: list[list[float]] = [[] for _ in range(b)]
    finish = ["length"] * b
    finished = [False] * b
    mask = inputs.get("attention_mask")
    prompt_tokens = mask.sum(dim=1).tolist() if mask is not None else [inputs["input_ids"].shape[1]] * b
    for ids, lps, done in generate_ids(
        model, inputs["input_ids"], mask, params, stop_ids,
        inputs.get("pixel_values"), inputs.get("pixel_attention_mask"), inputs.get("image_embeds"),
    ):
        for i in range(b):
            if finished[i]:
                continue
            token = int(ids[i])
            logprobs[i].append(float(lps[i]))
            texts[i].add(token, final=bool(done[i]))
            if texts[i].stopped or (not params.ignore_eos and token in stop_ids):
                finish[i] = "stop"
            finished[i] = finish[i] == "stop" or bool(done[i])
        if all(finished):
            break
    return [
        GenerationResult(
            text=texts[i].text, token_ids=texts[i].ids, logprobs=logprobs[i], prompt_tokens=int(prompt_tokens[i]),
            completion_tokens=len(texts[i].ids), finish_reason=finish[i],
        )
        for i in range(b)
    ]
