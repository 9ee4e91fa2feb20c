"""``fuseflow serve-ensemble ENSEMBLE.yaml``: Cool-Fusion behind an OpenAI-compatible HTTP API.

    fuseflow serve-ensemble examples/ensemble.yaml --port 8000
    curl localhost:8000/v1/completions -d '{"model": "cool-fusion", "prompt": "2 + 3 =", "max_tokens": 8}'

Endpoints: ``/v1/completions`` and ``/v1/chat/completions`` (OpenAI shapes, ``usage`` included, streaming
as server-sent events ``data: {...}`` ending with ``data: [DONE]``), ``/v1/models``, ``/healthz``,
``/metrics`` (Prometheus).

An API key (issue 26), as vLLM's ``--api-key``: from env ``FUSEFLOW_GATEWAY_API_KEY`` or the file
``server.api_key_file`` (``--api-key-file``; it wins over the environment), never from argv. With one, every
``/v1/*`` request needs ``Authorization: Bearer <key>`` (the scheme in any case) and gets a 401 in OpenAI's error
shape otherwise; ``/healthz`` and ``/metrics`` stay open for probes and Prometheus. The gateway binds 127.0.0.1
by default and refuses to start on any other address without a key, unless ``--allow-unauthenticated``. The model id is the ensemble's ``name`` for Cool-Fusion, or a source's name for
that source alone (the comparison baseline). Chat requests are rendered with each source's own chat
template. Token counts (``max_tokens``, ``usage``) are in the first source's tokenizer.

A thin shell (as vLLM's entrypoints): :class:`EnsembleService` holds the sources and the decoder and knows
nothing of HTTP; :func:`create_app` maps requests to it and errors to OpenAI error JSON.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fuseflow.auth import bearer_credential, bearer_matches
from fuseflow.config import ConfigError, add_field_flags, config_parser, flag_values, load_config
from fuseflow.ensemble.config import EnsembleConfig, ServerConfig, build_decoder, build_sources
from fuseflow.ensemble.decoder import Completion, DecodeParams, StreamEvent, stream_single
from fuseflow.gateway.metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from fuseflow.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    chat_choice,
    chat_chunk_choice,
    completion_choice,
    error_body,
    model_card,
    new_id,
    now,
    response,
    usage,
)
from fuseflow.ensemble.sources import EnsembleSource, Prompt, chat_prompt, completion_prompt

log = logging.getLogger("fuseflow.gateway.server")

EXIT_OK, EXIT_USAGE = 0, 2


@dataclass
class Job:
    """One choice to decode: which prompt, with which parameters."""

    index: int  # the choice's index in the response
    prompt: Prompt
    params: DecodeParams


class EnsembleService:
    """The sources, the Cool-Fusion decoder and the admission control; no HTTP here."""

    def __init__(self, cfg: EnsembleConfig, sources: Sequence[EnsembleSource], metrics: GatewayMetrics | None = None):
        self.cfg = cfg
        self.sources = list(sources)
        self.decoder = build_decoder(cfg, self.sources)
        self.metrics = metrics or GatewayMetrics()
        self.created = now()
        self._slots = threading.BoundedSemaphore(cfg.server.max_concurrent)

    def close(self) -> None:
        self.decoder.close()
        for s in self.sources:
            s.close()

    # -- requests → jobs -----------------------------------------------------------------------------

    def model_ids(self) -> list[str]:
        return [self.cfg.name] + [s.name for s in self.sources]

    def source_index(self, model: str) -> int | None:
        """``None`` for the ensemble, else the index of the source served alone; 404 for anything else."""
        if model == self.cfg.name:
            return None
        for i, s in enumerate(self.sources):
            if s.name == model:
                return i
        raise RequestError(
            f"model {model!r} does not exist; this gateway serves {self.model_ids()}",
            "model", 404, code="model_not_found",
        )

    def jobs(
        self, req: CompletionRequest | ChatCompletionRequest, prompts: list[Prompt], max_tokens: int | None
    ) -> list[Job]:
        req.unsupported()
        if req.n > self.cfg.server.max_n:
            raise RequestError(f"n must be <= {self.cfg.server.max_n} (server.max_n), got {req.n}", "n")
        d = self.cfg.decoding
        max_tokens = d.default_max_tokens if max_tokens is None else max_tokens
        if max_tokens > d.max_tokens_limit:
            raise RequestError(
                f"max_tokens {max_tokens} exceeds this gateway's limit {d.max_tokens_limit} "
                "(decoding.max_tokens_limit)",
                "max_tokens",
            )
        jobs = []
        for p, prompt in enumerate(prompts):
            for i in range(req.n):
                params = DecodeParams(
                    max_tokens=max_tokens,
                    temperature=1.0 if req.temperature is None else req.temperature,
                    top_p=1.0 if req.top_p is None else req.top_p,
                    seed=None if req.seed is None else req.seed + i,
                    stop=tuple(req.stop or ()),
                )
                jobs.append(Job(p * req.n + i, prompt, params))
        return jobs

    def completion_prompts(self, req: CompletionRequest) -> list[Prompt]:
        return [completion_prompt(self.sources, text) for text in req.prompts()]

    def chat_prompts(self, req: ChatCompletionRequest, source: int | None) -> list[Prompt]:
        messages = req.rendered_messages()
        try:
            if source is None:
                return [chat_prompt(self.sources, messages)]
            rendered = self.sources[source].render_chat(messages)
        except ValueError as e:
            raise RequestError(str(e), "messages") from None
        except Exception as e:  # a template that rejects the conversation (e.g. roles must alternate)
            raise RequestError(f"the chat template rejected the messages: {e}", "messages") from None
        return [Prompt(texts=tuple(rendered for _ in self.sources), add_special_tokens=False)]

    def check(self, jobs: list[Job], source: int | None) -> None:
        """Reject prompts that are empty or too long for a source before anything is decoded (a 400)."""
        seen = set()
        for job in jobs:
            if id(job.prompt) in seen:
                continue
            seen.add(id(job.prompt))
            targets = range(len(self.sources)) if source is None else [source]
            for i in targets:
                s = self.sources[i]
                (enc,) = s.encode([job.prompt.texts[i]], job.prompt.add_special_tokens)
                if enc.ids.size == 0:
                    raise RequestError("the prompt is empty; give a non-empty prompt", "prompt")
                if enc.ids.size >= s.max_length:
                    raise RequestError(
                        f"the prompt has {enc.ids.size} tokens of source {s.name!r}, not less than its max_length "
                        f"{s.max_length}; shorten it",
                        "prompt",
                    )

    # -- decoding ------------------------------------------------------------------------------------

    def stream(self, job: Job, source: int | None) -> Iterator[StreamEvent]:
        if source is None:
            return self.decoder.stream(job.prompt, job.params)
        return stream_single(self.sources[source], job.prompt.texts[source], job.prompt.add_special_tokens, job.params)

    def run(self, jobs: list[Job], source: int | None, model: str) -> list[Completion]:
        with self.slot():
            out = []
            for job in jobs:
                completion = None
                for event in self.stream(job, source):
                    completion = event.completion or completion
                self.metrics.observe_completion(model, completion)
                out.append(completion)
            return out

    def slot(self) -> "Slot":
        """Admission: at most ``server.max_concurrent`` decodes at once; a 503 after ``queue_timeout_s``."""
        return Slot(self)

    def health(self) -> dict:
        status = {}
        for s in self.sources:
            if not s.remote:
                status[s.name] = "ok"
                continue
            try:
                s.teacher.wait_ready(2.0)
                status[s.name] = "ok"
            except Exception as e:
                status[s.name] = f"unreachable: {e}"
        return status


class Slot:
    """One decoding slot of a service. ``acquire`` waits up to ``server.queue_timeout_s`` and raises the busy
    503; ``release`` is idempotent, so a streamed response can take its slot before the 200 is sent (issue 16:
    a busy gateway answers 503, not an error inside an open stream) and give it back from wherever the stream
    ends — its last event, a client that went away, or a response body never started (garbage collection)."""

    def __init__(self, service: EnsembleService):
        self.service = service
        self.held = False
        self._lock = threading.Lock()

    def acquire(self) -> "Slot":
        metrics = self.service.metrics
        metrics.waiting.inc()
        try:
            ok = self.service._slots.acquire(timeout=self.service.cfg.server.queue_timeout_s)
        finally:
            metrics.waiting.dec()
        if not ok:
            raise RequestError(
                "the gateway is busy (server.max_concurrent requests decoding); retry later",
                None, 503, "server_error", "server_busy",
            )
        self.held = True
        metrics.in_flight.inc()
        return self

    def release(self) -> None:
        with self._lock:
            if not self.held:
                return
            self.held = False
        self.service.metrics.in_flight.dec()
        self.service._slots.release()

    def __enter__(self) -> "Slot":
        return self if self.held else self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def as_request_error(error: Exception) -> RequestError:
    """The HTTP answer to an error raised while decoding: 400 for a rejected input (a source's ``ScoreError``,
    a prompt too long), 503 for an unreachable teacher, 500 for anything else (logged)."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, ConnectionError):  # TeacherUnavailable
        return RequestError(f"a source is unreachable: {error}", None, 503, "server_error", "source_unavailable")
    if isinstance(error, ValueError):
        return RequestError(str(error), None)
    log.error("decoding failed", exc_info=error)
    return RequestError(f"internal error: {type(error).__name__}: {error}", None, 500, "server_error")


# ----------------------------------------------------------------------------------------------------------
# Server-sent events.
# ----------------------------------------------------------------------------------------------------------


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def sse_stream(service: EnsembleService, jobs: list[Job], source: int | None, model: str, chat: bool,
               include_usage: bool, trace: bool, on_done, slot: Slot | None = None) -> Iterator[str]:
    """The events of a streamed response: one chunk per segment of text (per token for a source alone), a
    last chunk per choice with its ``finish_reason``, a usage chunk when asked
    (``stream_options.include_usage``), then ``[DONE]``. ``slot``: already acquired (the app takes it before
    the 200 goes out); released when the stream ends. Without one the stream takes its own."""
    rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, usage_: dict | None = None, with_usage: bool = False) -> str:
        return _sse(response(obj, rid, created, model, choices, usage_, with_usage or include_usage))

    status = 200
    prompt_tokens, completion_tokens = {}, 0
    try:
        with slot if slot is not None else service.slot():
            for job in jobs:
                if chat:
                    yield chunk([chat_chunk_choice(job.index, {"role": "assistant", "content": ""}, None)])
                for event in service.stream(job, source):
                    if event.delta:
                        choice = (
                            chat_chunk_choice(job.index, {"content": event.delta}, None)
                            if chat
                            else completion_choice(job.index, event.delta, None)
                        )
                        yield chunk([choice])
                    c = event.completion
                    if c is not None:
                        service.metrics.observe_completion(model, c)
                        prompt_tokens[id(job.prompt)] = c.prompt_tokens
                        completion_tokens += c.completion_tokens
                        extra = c.trace() if trace else None
                        last = (
                            chat_chunk_choice(job.index, {}, c.finish_reason)
                            if chat
                            else completion_choice(job.index, "", c.finish_reason)
                        )
                        if extra is not None:
                            last["fuseflow_trace"] = extra
                        yield chunk([last])
        if include_usage:
            yield chunk([], usage(sum(prompt_tokens.values()), completion_tokens), with_usage=True)
    except Exception as e:  # mid-stream: the status line is gone, the error goes in the stream
        error = as_request_error(e)
        status = error.status
        yield _sse(error_body(str(error), error.type, error.param, error.code))
    finally:
        on_done(status)
    yield _sse("[DONE]")


# ----------------------------------------------------------------------------------------------------------
# The app.
# ----------------------------------------------------------------------------------------------------------


API_KEY_ENV = "FUSEFLOW_GATEWAY_API_KEY"


def read_api_key(server: ServerConfig) -> str | None:
    """The gateway's API key: the file ``server.api_key_file`` if set, else env ``FUSEFLOW_GATEWAY_API_KEY``;
    None for neither. Raises :class:`ConfigError` naming the field for a file that cannot be read or is empty."""
    if server.api_key_file:
        try:
            key = Path(server.api_key_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"cannot read server.api_key_file (--api-key-file) {server.api_key_file}: "
                              f"{e.strerror}") from None
        if not key:
            raise ConfigError(f"server.api_key_file (--api-key-file) {server.api_key_file} is empty")
        return key
    return os.environ.get(API_KEY_ENV, "").strip() or None


def is_loopback(host: str) -> bool:
    """``host`` reaches this machine only (127.0.0.0/8, ::1, localhost); any other name or address may not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(server: ServerConfig, api_key: str | None) -> None:
    """Refuse to serve ``/v1`` without a key on an address other machines can reach (issue 26)."""
    if api_key is None and not is_loopback(server.host) and not server.allow_unauthenticated:
        raise ConfigError(
            f"server.host {server.host} is reachable from other machines and the gateway has no API key: set env "
            f"{API_KEY_ENV} or server.api_key_file (--api-key-file), bind 127.0.0.1 (--host), or pass "
            "--allow-unauthenticated to serve it open on purpose"
        )


def create_app(service: EnsembleService, api_key: str | None = None):
    """The FastAPI app over ``service``. ``api_key``: required as ``Authorization: Bearer <key>`` on ``/v1/*``
    (None: no key, as on a loopback address by default)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="fuseflow Cool-Fusion gateway", version="1")
    app.state.service = service
    metrics = service.metrics

    def failed(endpoint: str, model: str, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
        metrics.requests.labels(endpoint, model, str(status)).inc()
        return JSONResponse(body, status_code=status, headers=headers)

    if api_key is not None:
        @app.middleware("http")
        async def _require_api_key(request: Request, call_next):
            path = request.url.path
            if not (path == "/v1" or path.startswith("/v1/")):
                return await call_next(request)  # /healthz, /metrics: open to probes and Prometheus
            header = request.headers.get("authorization")
            if bearer_matches(header, api_key):
                return await call_next(request)
            message = ("invalid API key" if bearer_credential(header) is not None else
                       "missing API key: send the header 'Authorization: Bearer <key>' (the gateway's "
                       f"{API_KEY_ENV} or server.api_key_file)")
            body = error_body(message, "invalid_request_error", None, "invalid_api_key")
            return failed(path, "", 401, body, {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        return failed(request.url.path, "", 400, error_body(message, param=param))

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError):
        return failed(request.url.path, "", exc.status, error_body(str(exc), exc.type, exc.param, exc.code))

    @app.get("/v1/models")
    async def models():
        names = ", ".join(s.name for s in service.sources)
        cards = [model_card(service.cfg.name, service.created, f"Cool-Fusion over {names}")]
        cards += [model_card(s.name, service.created, f"source {s.name} alone") for s in service.sources]
        return {"object": "list", "data": cards}

    @app.get("/healthz")
    async def healthz():
        status = await run_in_threadpool(service.health)
        ok = all(v == "ok" for v in status.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "sources": status}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def serve(endpoint: str, req, chat: bool):
        t0 = time.perf_counter()
        source = service.source_index(req.model)
        if chat:
            prompts = service.chat_prompts(req, source)
            jobs = service.jobs(req, prompts, req.token_limit)
        else:
            prompts = service.completion_prompts(req)
            jobs = service.jobs(req, prompts, req.max_tokens)
        await run_in_threadpool(service.check, jobs, source)

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def done(status: int) -> None:
                metrics.requests.labels(endpoint, req.model, str(status)).inc()
                metrics.latency.labels(endpoint, req.model).observe(time.perf_counter() - t0)

            # The slot is taken before the response starts: a busy gateway answers 503 with a JSON error, as
            # a non-streamed request does, instead of a 200 stream carrying the error.
            slot = await run_in_threadpool(service.slot().acquire)
            events = sse_stream(service, jobs, source, req.model, chat, include_usage, req.fuseflow_trace, done, slot)
            weakref.finalize(events, slot.release)  # a response whose body never starts still frees its slot
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        try:
            completions = await run_in_threadpool(service.run, jobs, source, req.model)
        except Exception as e:
            raise as_request_error(e) from None
        choose = chat_choice if chat else completion_choice
        choices = [
            choose(job.index, c.text, c.finish_reason, c.trace() if req.fuseflow_trace else None)
            for job, c in zip(jobs, completions)
        ]
        prompt_tokens = sum({id(j.prompt): c.prompt_tokens for j, c in zip(jobs, completions)}.values())
        body = response(
            "chat.completion" if chat else "text_completion",
            new_id("chatcmpl" if chat else "cmpl"),
            now(),
            req.model,
            choices,
            usage(prompt_tokens, sum(c.completion_tokens for c in completions)),
        )
        metrics.requests.labels(endpoint, req.model, "200").inc()
        metrics.latency.labels(endpoint, req.model).observe(time.perf_counter() - t0)
        return body

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await serve("/v1/completions", req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        return await serve("/v1/chat/completions", req, chat=True)

    return app


# ----------------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = config_parser(
        "Serve a Cool-Fusion ensemble (training-free fusion at inference, arXiv 2407.19807) as an OpenAI-compatible "
        "API: /v1/completions, /v1/chat/completions, /v1/models, /healthz, /metrics.",
        "example: fuseflow serve-ensemble examples/ensemble.yaml --host 0.0.0.0 --port 8000 --api-key-file "
        "gateway.key decoding.rerank=mean_logprob (the key: env FUSEFLOW_GATEWAY_API_KEY or that file, never argv)",
        "ensemble config (see examples/ensemble.yaml)", "key=value overrides, e.g. decoding.segment_max_tokens=4",
        config_metavar="ENSEMBLE.yaml", prog="fuseflow serve-ensemble",
    )
    add_field_flags(p, ServerConfig, "server")  # --port 8001 = server.port=8001
    # Not a flag: a key on the command line is visible to every local user (ps). Without this, argparse would
    # take `--api-key KEY` for the abbreviation of --api-key-file and print the key in its error.
    p.add_argument("--api-key", nargs="?", action=_KeyInArgv, help=argparse.SUPPRESS)
    return p


class _KeyInArgv(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"the API key is never given on the command line (every local user can read it there): put it "
                     f"in env {API_KEY_ENV} or in a file named by --api-key-file (server.api_key_file)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(EnsembleConfig, args.config, args.overrides, flag_values(args))
    api_key = read_api_key(cfg.server)
    check_exposure(cfg.server, api_key)  # before the sources load: a refused start costs nothing
    sources = build_sources(cfg)
    service = EnsembleService(cfg, sources)
    try:
        import uvicorn

        auth = "API key required on /v1" if api_key else "no API key: /v1 open"
        log.info("Cool-Fusion gateway %r over %s on %s:%d (%s)", cfg.name, [s.name for s in sources],
                 cfg.server.host, cfg.server.port, auth)
        if api_key is None and not is_loopback(cfg.server.host):
            log.warning("server.allow_unauthenticated: /v1 is open to every client that reaches %s:%d",
                        cfg.server.host, cfg.server.port)
        uvicorn.run(create_app(service, api_key), host=cfg.server.host, port=cfg.server.port, log_config=None)
    finally:
        service.close()
    return EXIT_OK
