"""The batching engine: one worker thread owns decoding; requests wait in a bounded queue.

Each request is prepared on its own (chat template, tokenizer, image tiling and the vision encoder) in
the web server's thread pool, so the queue holds token ids and small image embeddings, not pixels.
The worker takes the oldest waiting request plus every other waiting request that can share its
decoding loop (same sampling rule, fits the context together), up to `max_batch_size`, and runs them as
one left-padded batch through `smolvlm.generation.generate_ids`. On a CPU one decoding step of a batch
of 8 costs little more than a step of 1, so batching multiplies throughput under load.

Each request keeps its own stop strings, EOS rule and max_tokens; it finishes (and its client gets
the answer) as soon as its own sequence is done, while the batch runs on for the others. A cancelled
request (its client went away) is dropped from the batch at the next step, and a batch whose requests
are all finished or cancelled stops at once.

Greedy requests batch together. Sampled requests batch with those of the same temperature/top_p;
a sampled request with a seed runs alone, so that the seed alone decides its answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import torch

from smolvlm.generation import ImageEmbeddingCache, SamplingParams, TextAssembler, generate_ids, stop_token_ids
from smolvlm.serve.protocol import APIError

log = logging.getLogger("smolvlm.serve")


class QueueFull(Exception):
    pass


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Job:
    """One request on its way through the engine. The worker thread reports to the request's event
    loop through `events`: ("piece", str), then ("done", Finished) or ("error", APIError)."""

    input_ids: torch.Tensor  # (T,) the prompt
    image_embeds: torch.Tensor | None  # (N, L, D) the prompt's images, already through the vision encoder
    params: SamplingParams  # this request's own max_new_tokens, stop strings, ignore_eos
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.numel())

    def batch_key(self) -> tuple:
        p = self.params
        if p.temperature == 0:
            return ("greedy",)
        if p.seed is not None:
            return ("alone", id(self))
        return ("sampled", p.temperature, p.top_k, p.top_p)

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Stats:
    requests: int = 0  # finished normally
    cancelled: int = 0  # dropped because the client went away
    failed: int = 0
    batches: int = 0
    max_batch: int = 0  # the largest batch run so far
    tokens: int = 0  # generated tokens of all requests
    busy_seconds: float = 0.0


class _Sequence:
    """The decoding state of one job inside a batch."""

    def __init__(self, job: Job, decode):
        self.job = job
        self.text = TextAssembler(decode, job.params.stop)
        self.finished = False


class Engine:
    def __init__(self, model, processor, max_batch_size: int = 8, max_queue: int = 64):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.model, self.processor = model, processor
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.context = model.cfg.text.max_position_embeddings
        self.stop_ids = stop_token_ids(processor)
        self.pad_id = processor.pad_token_id if processor.pad_token_id is not None else 0
        self.stats = Stats()
        # chat clients re-send a conversation's images with every turn: their tiles are encoded once
        self.image_cache = ImageEmbeddingCache()
        self._image_lock = threading.Lock()
        self._pending: deque[Job] = deque()
        self._running = 0
        self._preparing = 0  # admitted requests not yet queued (decoding images, encoding the prompt)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="smolvlm-engine", daemon=True)

    # -- the request side -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            waiting, self._pending = list(self._pending), deque()
            self._cond.notify_all()
        for job in waiting:
            job.emit("error", APIError(503, "the server is shutting down", code="shutting_down"))
        self._thread.join(timeout=30)

    def admit(self) -> None:
        """Take a place in the queue before the request's (costly) preparation; QueueFull when the
        requests being prepared plus those waiting reach max_queue. Follow with submit() or withdraw()."""
        with self._cond:
            if len(self._pending) + self._preparing >= self.max_queue:
                raise QueueFull
            self._preparing += 1

    def withdraw(self) -> None:
        """An admitted request failed before submit()."""
        with self._cond:
            self._preparing -= 1

    def submit(self, job: Job) -> None:
        """Queue an admitted request for the worker."""
        with self._cond:
            self._preparing -= 1
            self._pending.append(job)
            self._cond.notify()

    def snapshot(self) -> dict:
        with self._cond:
            s = self.stats
            return {"preparing": self._preparing, "queued": len(self._pending), "running": self._running,
                    "requests": s.requests, "cancelled": s.cancelled, "failed": s.failed, "batches": s.batches,
                    "max_batch": s.max_batch, "generated_tokens": s.tokens, "busy_seconds": round(s.busy_seconds, 3)}

    @torch.inference_mode()
    def encode(self, text: str, images: list) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A rendered prompt and its PIL images -> (input_ids (T,), image_embeds (N, L, D) or None).
        Runs on the caller's thread: the vision encoder only reads the weights, so it can run while the
        worker decodes."""
        inputs = self.processor(text, images=[images] if images else None)
        ids = inputs["input_ids"][0]
        if ids.numel() >= self.context:
            raise APIError(400, f"the prompt is {ids.numel()} tokens but the model's context is {self.context}; "
                                "shorten the conversation or send fewer/smaller images", param="messages",
                           code="context_length_exceeded")
        embeds = None
        if images:
            with self._image_lock:  # several requests may be prepared at once; the cache is one dict
                embeds = self.image_cache.encode(self.model, inputs["pixel_values"], inputs.get("pixel_attention_mask"))
        return ids, embeds

    # -- the worker -------------------------------------------------------------------------------

    def _fits(self, batch: list[Job], job: Job) -> bool:
        """Can job share a decoding loop with batch? The loop runs max(max_new_tokens) steps after the
        longest prompt, and all of it must stay within the context, or a short request would be cut short."""
        longest = max(j.prompt_tokens for j in [*batch, job])
        steps = max(j.params.max_new_tokens for j in [*batch, job])
        return longest + steps <= self.context

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                first = self._pending.popleft()
                if not first.cancelled.is_set():
                    break
                self.stats.cancelled += 1
            batch, key, keep = [first], first.batch_key(), deque()
            while self._pending:
                job = self._pending.popleft()
                if job.cancelled.is_set():
                    self.stats.cancelled += 1
                elif len(batch) < self.max_batch_size and job.batch_key() == key and self._fits(batch, job):
                    batch.append(job)
                else:
                    keep.append(job)
            self._pending = keep
            self._running = len(batch)
            self.stats.batches += 1
            self.stats.max_batch = max(self.stats.max_batch, len(batch))
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            start = time.perf_counter()
            try:
                self._generate(batch)
            except Exception as e:  # keep serving: report to this batch's clients, log for the operator
                if isinstance(e, APIError):
                    error = e
                elif type(e).__name__ == "SmolVLMError":
                    error = APIError(400, str(e), code="invalid_request")
                else:
                    log.exception("generation failed")
                    error = APIError(500, f"generation failed: {type(e).__name__}: {e}", code="internal_error")
                with self._cond:
                    self.stats.failed += len(batch)
                for job in batch:
                    job.emit("error", error)
            finally:
                with self._cond:
                    self._running = 0
                    self.stats.busy_seconds += time.perf_counter() - start

    @torch.inference_mode()
    def _generate(self, batch: list[Job]) -> None:
        n, longest = len(batch), max(j.prompt_tokens for j in batch)
        input_ids = torch.full((n, longest), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, longest), dtype=torch.long)
        for i, job in enumerate(batch):  # left padding: every prompt ends at the last column
            input_ids[i, longest - job.prompt_tokens:] = job.input_ids
            attention_mask[i, longest - job.prompt_tokens:] = 1
        embeds = [j.image_embeds for j in batch if j.image_embeds is not None]
        image_embeds = torch.cat(embeds) if embeds else None  # in batch order, as the <image> slots are

        # one loop for the batch; EOS, stop strings and max_tokens are applied per request below
        params = replace(batch[0].params, max_new_tokens=max(j.params.max_new_tokens for j in batch), stop=[],
                         ignore_eos=True)
        decode = lambda ids: self.processor.decode(ids, skip_special_tokens=True)  # noqa: E731
        seqs = [_Sequence(job, decode) for job in batch]
        steps = generate_ids(self.model, input_ids, attention_mask, params, self.stop_ids, image_embeds=image_embeds)
        try:
            for step_ids, _, done in steps:
                for i, s in enumerate(seqs):
                    if s.finished:
                        continue
                    if s.job.cancelled.is_set():
                        s.finished = True
                        with self._cond:
                            self.stats.cancelled += 1
                        continue
                    self._step(s, int(step_ids[i]), bool(done[i]))
                if all(s.finished for s in seqs):
                    break
        finally:
            steps.close()

    def _step(self, s: _Sequence, token: int, out_of_steps: bool) -> None:
        p = s.job.params
        at_eos = token in self.stop_ids and not p.ignore_eos
        last = at_eos or out_of_steps or len(s.text.ids) + 1 >= p.max_new_tokens
        piece = s.text.add(token, final=last)
        if piece:
            s.job.emit("piece", piece)
        stopped = at_eos or s.text.stopped
        if stopped or last:
            s.finished = True
            with self._cond:
                self.stats.requests += 1
                self.stats.tokens += len(s.text.ids)
            s.job.emit("done", Finished(s.text.text, "stop" if stopped else "length", s.job.prompt_tokens,
                                        len(s.text.ids)))
