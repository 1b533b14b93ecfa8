"""``POST /v1/completions`` and ``/v1/chat/completions``: a checked request becomes an engine
``Request``; its text comes back as one JSON response or as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass

from fastapi.responses import JSONResponse, StreamingResponse

from lorakit.errors import DataError, ServeError

from ..data import render_messages
from ..evaluate import encode_prompt
from . import protocol
from .batch import Request

log = logging.getLogger("lorakit.serve")


@dataclass
class Job:
    """A request on its way: the engine request, its event queue and what the response needs."""

    chat: bool
    rid: str
    model: str
    request: Request
    events: asyncio.Queue
    prompt_tokens: int
    include_usage: bool
    disconnected: object = None  # async () -> bool: the client went away


def prompts_of(server, req, chat: bool, adapter: str | None) -> list[list[int]]:
    """Token ids of each prompt: a completion's prompt as is (like ``lorakit generate --raw``), a
    chat's messages under the adapter's recorded prompt format (like ``lorakit generate``).

    Raises:
        ServeError: 400 for an empty prompt or messages the format cannot render, 413 for a
            prompt that leaves no room in the model's context.
    """
    param = "messages" if chat else "prompt"
    if chat:
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            texts = [render_messages(server.tokenizer, messages, server.prompt_format(adapter))]
        except DataError as e:
            raise ServeError(400, str(e), param) from None
    else:
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not texts or any(not t for t in texts):
            raise ServeError(400, "prompt must be a non-empty string or a list of non-empty strings", param)
    ids = [encode_prompt(server.tokenizer, t) for t in texts]
    for p in ids:
        if not p:
            raise ServeError(400, "the prompt encodes to no tokens", param)
        if len(p) >= server.context:
            raise ServeError(413, f"the prompt is {len(p)} tokens; this model's context is {server.context} tokens",
                             param, code="context_length_exceeded")
    return ids


def max_tokens_of(server, req, chat: bool, prompts: list[list[int]]) -> int:
    """The request's token budget: its max_tokens (at most ``--max-new-tokens`` and what the
    context leaves), or by default the smaller of the two."""
    asked = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
    room = server.context - max(len(p) for p in prompts)
    if asked is None:
        return min(server.max_new_tokens, room)
    if asked > server.max_new_tokens:
        raise ServeError(400, f"max_tokens {asked} is more than this server allows ({server.max_new_tokens})",
                         "max_tokens")
    if asked > room:
        raise ServeError(400, f"max_tokens {asked} does not fit: the prompt leaves {room} of the model's "
                         f"{server.context}-token context", "max_tokens", code="context_length_exceeded")
    return asked


async def create(server, body: dict, chat: bool, disconnected=None):
    """Check a request's JSON object, queue it on the engine, and answer (JSON or a stream)."""
    req = protocol.parse(protocol.ChatRequest if chat else protocol.CompletionRequest, body)
    adapter = server.adapter_for(req.model)
    prompts = await asyncio.to_thread(prompts_of, server, req, chat, adapter)  # a long prompt: off the event loop
    n = req.n or 1
    if n * len(prompts) > server.engine.max_batch:
        raise ServeError(400, f"n x prompts = {n * len(prompts)} rows; at most {server.engine.max_batch}", "n")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def sink(index, delta, finish) -> None:  # engine thread -> this event loop
        loop.call_soon_threadsafe(events.put_nowait, (index, delta, finish))

    request = Request(adapter, prompts, n, max_tokens_of(server, req, chat, prompts),
                      1.0 if req.temperature is None else req.temperature, 1.0 if req.top_p is None else req.top_p,
                      req.seed, protocol.stops(req), sink, bool(req.ignore_eos))
    usage_opt = bool((req.stream_options or {}).get("include_usage"))
    job = Job(chat, protocol.new_id("chatcmpl" if chat else "cmpl"), req.model, request, events,
              sum(len(p) for p in prompts), usage_opt, disconnected)
    server.engine.submit(request)
    if req.stream:
        first = await _first_event(server, job)
        if first is None:
            return JSONResponse(protocol.error_body(499, "client closed the request"), status_code=499)
        return StreamingResponse(_stream(server, job, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(server, job)


async def _first_event(server, job: Job):
    """A stream's first event, awaited before the response starts, so that a request failing before any text
    (an adapter that cannot be loaded, a failed prefill) gets its status and error body, as without
    ``stream``, not a 200 stream carrying the error; None if the client left meanwhile.

    Raises:
        ServeError: the request's failure.
    """
    getter = asyncio.ensure_future(job.events.get())  # one getter throughout: a timed-out wait_for may drop an item
    while not (await asyncio.wait({getter}, timeout=0.25))[0]:
        if job.disconnected is not None and await job.disconnected():
            getter.cancel()
            job.request.cancelled = True  # nobody to answer; the engine drops the rows
            done(server, job, 499)
            return None
    event = getter.result()
    if event[0] is None:
        job.request.cancelled = True
        raise event[1]
    return event


async def _collect(server, job: Job) -> JSONResponse:
    rows = job.request.rows
    texts, finishes = [""] * rows, [None] * rows
    try:
        checked = time.monotonic()
        while any(f is None for f in finishes):
            try:
                index, delta, finish = await asyncio.wait_for(job.events.get(), 0.25)
            except asyncio.TimeoutError:
                index = -1
            if time.monotonic() - checked > 0.25 and job.disconnected is not None:
                checked = time.monotonic()
                if await job.disconnected():
                    done(server, job, 499)  # nobody to answer; the engine drops the rows
                    return JSONResponse(protocol.error_body(499, "client closed the request"), status_code=499)
            if index == -1:
                continue
            if index is None:
                raise delta
            texts[index] += delta
            finishes[index] = finish
    finally:
        job.request.cancelled = any(f is None for f in finishes)  # the client left, or a failure
    choices = [protocol.choice(job.chat, i, texts[i], finishes[i]) for i in range(rows)]
    use = protocol.usage(job.prompt_tokens, job.request.generated)
    done(server, job, 200)
    return JSONResponse(protocol.envelope(job.chat, job.rid, job.model, choices, use=use))


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode() if not isinstance(obj, str) else f"data: {obj}\n\n".encode()


async def _stream(server, job: Job, pending: tuple | None):
    rows, status = job.request.rows, 200
    open_rows, started = set(range(rows)), set()
    try:
        while open_rows:
            index, delta, finish = pending if pending is not None else await job.events.get()  # _first_event's
            pending = None
            if index is None:
                status = delta.status
                yield _sse(protocol.error_body(delta.status, str(delta), delta.param, delta.code))
                break
            first = index not in started
            started.add(index)
            piece = protocol.choice(job.chat, index, delta, finish, delta=True, first=first)
            yield _sse(protocol.envelope(job.chat, job.rid, job.model, [piece], chunk=True))
            if finish is not None:
                open_rows.discard(index)
        if job.include_usage and status == 200:
            use = protocol.usage(job.prompt_tokens, job.request.generated)
            yield _sse(protocol.envelope(job.chat, job.rid, job.model, [], chunk=True, use=use))
        yield _sse("[DONE]")
    finally:
        job.request.cancelled = bool(open_rows)
        done(server, job, status if not open_rows or status != 200 else 499)


def done(server, job: Job, status: int) -> None:
    """The request's log line and metrics."""
    r = job.request
    elapsed = time.perf_counter() - r.arrived
    server.count(job.model, status)
    if status == 200:
        server.metrics.latency.observe(elapsed)
    log.info("%s %s status=%d prompt_tokens=%d completion_tokens=%d time=%.3fs",
             "chat" if job.chat else "completion", job.model, status, job.prompt_tokens, r.generated, elapsed)
