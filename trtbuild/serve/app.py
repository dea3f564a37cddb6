"""The OpenAI-compatible endpoints over one engine's in-flight batcher.

GET /v1/models, POST /v1/completions and /v1/chat/completions (non-streamed, or streamed as
server-sent events ending in `data: [DONE]`), GET /health (503 while the engine loads), GET
/metrics. The engine's base model and each LoRA adapter loaded with it are models by name. Errors
are OpenAI's body (`{"error": {"message", "type", "param", "code"}}`): 400 for bad parameters and
prompts longer than the engine takes, 401 without the API key, 404 for an unknown model, 429 when
`max_queue` requests are in flight already; never a traceback.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from trtbuild.errors import TrtbuildError
from trtbuild.runtime.sampling import SamplingConfig
from trtbuild.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, error_body
from trtbuild.serving import IncrementalDetokenizer

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


class Metrics:
    """The Prometheus metrics of /metrics, in a registry of their own (no global state)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("trtbuild_requests", "requests served, by how they finished", ["finish_reason"],
                                registry=self.registry)
        self.prompt_tokens = Counter("trtbuild_prompt_tokens", "prompt tokens of the requests served",
                                     registry=self.registry)
        self.generated_tokens = Counter("trtbuild_generation_tokens", "tokens generated", registry=self.registry)
        self.running = Gauge("trtbuild_requests_running", "requests in the engine's batch or its queue",
                             registry=self.registry)
        self.queued = Gauge("trtbuild_requests_waiting", "requests waiting for a place in the batch",
                            registry=self.registry)
        buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
        self.time_to_first_token = Histogram("trtbuild_time_to_first_token_seconds", "time to first token",
                                             buckets=buckets, registry=self.registry)
        self.inter_token_latency = Histogram("trtbuild_inter_token_latency_seconds", "time between tokens",
                                             buckets=buckets, registry=self.registry)


@dataclass
class ServedEngine:
    """What the endpoints serve: the runner, its batcher, the names it answers to."""

    runner: Any = None  # ModelRunner, once loaded
    batcher: Any = None  # InflightBatcher
    model_name: str = ""
    adapters: dict[str, int] = field(default_factory=dict)  # LoRA adapter name → lora task id
    tokenizer_dir: Path | None = None
    api_key: str | None = None
    max_queue: int = 64
    ready: threading.Event = field(default_factory=threading.Event)
    load_error: str | None = None
    in_flight: int = 0
    metrics: Metrics = field(default_factory=Metrics)

    def lora_task_id(self, model: str) -> int:
        """The lora task id of a model name (-1: the base model)."""
        if model == self.model_name:
            return -1
        if model in self.adapters:
            return self.adapters[model]
        names = ", ".join(repr(m) for m in [self.model_name, *self.adapters])
        raise ApiError(404, f"model {model!r} does not exist: this server serves {names}", param="model",
                       code="model_not_found")

    @property
    def end_ids(self) -> list[int]:
        eos = self.runner.config.pretrained_config.eos_token_id
        return [e for e in (eos if isinstance(eos, list) else [eos]) if e is not None]


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, error_body(message, type_, param, code)


@dataclass
class Generation:
    """One choice being generated: its tokens, its text so far and why it ended."""

    index: int
    prompt_tokens: int
    handle: Any = None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    logprobs: list = field(default_factory=list)  # TokenLogprob of each token received (with logprobs asked)
    reported: int = 0  # of those, how many a streamed chunk has carried
    reported_chars: int = 0  # the characters of those tokens' texts (completions' text_offset)
    started: float = field(default_factory=time.monotonic)
    last: float = 0.0


def create_app(served: ServedEngine) -> FastAPI:
    """The FastAPI app of `served` (loaded in the background: /health says when it is ready)."""
    app = FastAPI(title="trtbuild-serve")

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return JSONResponse(e.body, status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        return JSONResponse(error_body(f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param),
                            status_code=400)

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> JSONResponse:  # the message, never a traceback
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    def check(request: Request) -> None:
        if served.api_key is not None:
            if request.headers.get("authorization", "") != f"Bearer {served.api_key}":
                raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>",
                               "authentication_error", code="invalid_api_key")
        if not served.ready.is_set():
            raise ApiError(503, served.load_error or "the engine is still loading", "server_error")

    @app.get("/health")
    async def health() -> JSONResponse:
        if served.ready.is_set():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error" if served.load_error else "loading", "detail": served.load_error},
                            status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import generate_latest

        if served.batcher is not None:
            served.metrics.queued.set(served.batcher.waiting)
        return Response(generate_latest(served.metrics.registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check(request)
        base = {"id": served.model_name, "object": "model", "created": 0, "owned_by": "trtbuild"}
        return {"object": "list", "data": [base, *({**base, "id": name, "parent": served.model_name}
                                                   for name in served.adapters)]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check(request)
        prompts = _completion_prompts(served, body)
        max_tokens = body.max_tokens or DEFAULT_COMPLETION_TOKENS
        return await _respond(served, body, request, prompts, max_tokens, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check(request)
        from trtbuild.runtime.chat import apply_chat_template

        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in body.messages]
        try:
            text = apply_chat_template(served.tokenizer_dir, messages)
        except TrtbuildError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = served.runner.tokenizer.encode(text, add_special_tokens=False).ids
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _respond(served, body, request, [ids], max_tokens, chat=True)

    return app


def _completion_prompts(served: ServedEngine, body: CompletionRequest) -> list[list[int]]:
    """The prompt(s) as token ids: a string, a list of strings, token ids or a list of those."""
    p = body.prompt
    if isinstance(p, str):
        p = [p]
    elif p and all(isinstance(t, int) for t in p):
        p = [p]
    prompts = [served.runner.tokenizer.encode(x).ids if isinstance(x, str) else list(x) for x in p]
    if not prompts or not all(prompts):
        raise ApiError(400, "prompt is empty", param="prompt")
    return prompts


def _sampling(served: ServedEngine, body: SamplingFields, prompt: list[int], max_tokens: int | None,
              index: int) -> SamplingConfig:
    bc = served.runner.config.build_config
    room = bc.max_seq_len - len(prompt)
    if len(prompt) > bc.max_input_len or room < 1:
        raise ApiError(400, f"the prompt has {len(prompt)} tokens; this engine takes at most "
                            f"{min(bc.max_input_len, bc.max_seq_len - 1)}", param="messages" if not hasattr(body, "prompt")
                       else "prompt", code="context_length_exceeded")
    if max_tokens is not None and max_tokens > room:
        raise ApiError(400, f"max_tokens {max_tokens} + the prompt's {len(prompt)} tokens exceed the engine's "
                            f"{bc.max_seq_len}", param="max_tokens", code="context_length_exceeded")
    seed = None if body.seed is None else body.seed + index
    greedy = body.temperature == 0.0
    end_id = -1 if body.ignore_eos else (served.end_ids or [None])[0]
    return SamplingConfig(max_new_tokens=max_tokens or room, end_id=end_id,
                          temperature=body.temperature, top_k=1 if greedy else body.top_k,
                          top_p=0.0 if greedy else body.top_p, repetition_penalty=body.repetition_penalty,
                          presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                          random_seed=seed, logprobs=body.num_logprobs)


def _submit(served: ServedEngine, gen: Generation, prompt: list[int], sampling: SamplingConfig,
            lora_task_id: int) -> None:
    loop = asyncio.get_running_loop()
    listener = lambda item: loop.call_soon_threadsafe(gen.queue.put_nowait, item)  # noqa: E731
    try:
        gen.handle = served.batcher.submit(prompt, sampling, lora_task_id, listener=listener)
    except TrtbuildError as e:
        raise ApiError(400, str(e)) from None


async def _tokens(served: ServedEngine, gen: Generation, stops: list[str]) -> AsyncIterator[str]:
    """The new text of each step until the request ends (its end token, its length, or a stop
    string, which is matched across token boundaries and left out)."""
    detok = IncrementalDetokenizer(lambda ids: served.runner.tokenizer.decode(ids, skip_special_tokens=True))
    held = ""  # the end of the text so far that may be the start of a stop string
    while True:
        item = await gen.queue.get()
        if item is None:  # the request left the batch
            if gen.finish_reason is None:  # the engine ended it: its end token, or its length
                gen.finish_reason = "length" if gen.handle.finish_reason == "length" else "stop"
                tail = held + detok.add([], final=True)
                if tail:
                    gen.text += tail
                    yield tail
            return
        if gen.finish_reason is not None:
            continue  # tokens of a step already under way when a stop string ended the request
        now = time.monotonic()
        if not gen.token_ids:
            served.metrics.time_to_first_token.observe(now - gen.started)
        else:
            served.metrics.inter_token_latency.observe((now - gen.last) / len(item))
        gen.last = now
        served.metrics.generated_tokens.inc(len(item))
        if gen.handle.request.sampling.logprobs is not None:  # the batcher stored them before sending the tokens
            gen.logprobs.extend(gen.handle.request.output_logprobs[len(gen.token_ids):len(gen.token_ids) + len(item)])
        gen.token_ids.extend(item)
        text = held + detok.add(item)
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            gen.finish_reason = "stop"
            gen.handle.cancel()
            out, held = text[:min(found)], ""
        else:
            keep = max((k for s in stops for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])),
                       default=0)
            out, held = text[:len(text) - keep], text[len(text) - keep:]
        if out:
            gen.text += out
            yield out


async def _respond(served: ServedEngine, body: SamplingFields, request: Request, prompts: list[list[int]],
                   max_tokens: int | None, chat: bool):
    lora_task_id = served.lora_task_id(body.model)
    n = body.n
    choices = [(p, i) for p in prompts for i in range(n)]
    if served.in_flight + len(choices) > served.max_queue:
        raise ApiError(429, f"{served.in_flight} requests in flight: the server takes at most {served.max_queue} "
                            "(--max_queue); retry later", "rate_limit_error", code="queue_full")
    gens = []
    for k, (prompt, i) in enumerate(choices):
        gens.append(Generation(k, len(prompt)))
        _submit(served, gens[-1], prompt, _sampling(served, body, prompt, max_tokens, i), lora_task_id)
    _enter(served, gens)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    obj = "chat.completion" if chat else "text_completion"
    stops = body.stop_strings
    if not body.stream:
        try:
            for gen in gens:
                async for _ in _tokens(served, gen, stops):
                    pass
        finally:
            _leave(served, gens)
        return {"id": rid, "object": obj, "created": created, "model": body.model,
                "choices": [_choice(served, g, chat) for g in gens], "usage": _usage(gens)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(_stream(served, gens, stops, rid, created, body.model, chat, include_usage, request),
                             media_type="text/event-stream")


async def _stream(served: ServedEngine, gens: list[Generation], stops: list[str], rid: str, created: int,
                  model: str, chat: bool, include_usage: bool, request: Request) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    try:
        for gen in gens:  # choices one after another (each was running in the batch meanwhile)
            if chat:
                yield chunk([{"index": gen.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
            async for text in _tokens(served, gen, stops):
                delta = {"index": gen.index, "delta": {"content": text}} if chat else {"index": gen.index, "text": text}
                yield chunk([{**delta, **_new_logprobs(served, gen, chat), "finish_reason": None}])
            end = {"index": gen.index, "delta": {}} if chat else {"index": gen.index, "text": ""}
            yield chunk([{**end, **_new_logprobs(served, gen, chat), "finish_reason": gen.finish_reason}])
        if include_usage:
            yield chunk([], _usage(gens))
        yield "data: [DONE]\n\n"
    finally:  # also when the client went away: its requests leave the batch
        _leave(served, gens)


def _enter(served: ServedEngine, gens: list[Generation]) -> None:
    served.in_flight += len(gens)
    served.metrics.running.set(served.in_flight)
    served.metrics.prompt_tokens.inc(sum(g.prompt_tokens for g in gens))


def _leave(served: ServedEngine, gens: list[Generation]) -> None:
    """The requests are done with (answered, or their client went away): they leave the batch."""
    served.in_flight -= len(gens)
    served.metrics.running.set(served.in_flight)
    for gen in gens:
        gen.handle.cancel()
        served.metrics.requests.labels(gen.finish_reason or "cancelled").inc()


def _choice(served: ServedEngine, gen: Generation, chat: bool) -> dict:
    logprobs = _new_logprobs(served, gen, chat)
    if chat:
        return {"index": gen.index, "message": {"role": "assistant", "content": gen.text},
                "finish_reason": gen.finish_reason, **logprobs}
    return {"index": gen.index, "text": gen.text, "finish_reason": gen.finish_reason, **logprobs}


def _new_logprobs(served: ServedEngine, gen: Generation, chat: bool) -> dict:
    """{"logprobs": ...} of the tokens received since the last call, in OpenAI's chat form
    ({"content": [{token, logprob, bytes, top_logprobs}]}) or its completions form ({tokens,
    token_logprobs, top_logprobs, text_offset}); {"logprobs": None} when the request asked for none."""
    if gen.handle.request.sampling.logprobs is None:
        return {"logprobs": None}
    decode = lambda t: served.runner.tokenizer.decode([t], skip_special_tokens=False)  # noqa: E731
    start, gen.reported = gen.reported, len(gen.logprobs)
    ids, entries = gen.token_ids[start:gen.reported], gen.logprobs[start:gen.reported]
    if chat:
        def item(t: int, lp: float) -> dict:
            s = decode(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"logprobs": {"content": [{**item(t, e.logprob), "top_logprobs": [item(u, lp) for u, lp in e.top]}
                                         for t, e in zip(ids, entries)]}}
    tokens = [decode(t) for t in ids]
    ends = list(accumulate((len(x) for x in tokens), initial=gen.reported_chars))
    offsets, gen.reported_chars = ends[:-1], ends[-1]
    return {"logprobs": {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                         "top_logprobs": [{decode(u): lp for u, lp in e.top} for e in entries],
                         "text_offset": offsets}}


def _usage(gens: list[Generation]) -> dict:
    prompt = sum(g.prompt_tokens for g in gens)
    completion = sum(len(g.token_ids) for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
