"""The gRPC face of a teacher: ``fuseflow.v1.TeacherService`` over a scoring engine.

A thin servicer, as vLLM's entrypoints: requests become domain objects at the boundary, the work goes to
the :class:`RequestBatcher` (the one thread that touches the engine), results become messages on the
way out, and exceptions become status codes through one table, :data:`STATUS_OF_ERROR`. Around it: the
standard ``grpc.health.v1`` service, server reflection, optional TLS and bearer-token auth, request limits
and a graceful drain (health NOT_SERVING, no new RPCs, in-flight ones finish within a grace period).

Requests are bounded in memory before any work (issue 15): gRPC refuses a message over a receive limit
derived from the request limits (:meth:`ServerOptions.receive_limit`), texts are measured in bytes before a
tokenizer sees them, at most ``max_concurrent_rpcs`` TeacherService calls run at once (the rest are
answered RESOURCE_EXHAUSTED at once, with the ``fuseflow-busy`` trailer, while health and reflection keep
their own threads), and a request that does not parse, or carries an array of the wrong rank or dtype, is
INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import CancelledError
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fuseflow.auth import bearer_matches
from fuseflow.score.engine import Engine, ScoreError
from fuseflow.teacher.metrics import TeacherMetrics
from fuseflow.teacher.request_batcher import (
    DEFAULT_MAX_TOKENIZING,
    Cancelled,
    RequestBatcher,
    RequestTooLarge,
    ShuttingDown,
)
from fuseflow.wire.client import BUSY_KEY, ERROR_INDEX_KEY
from fuseflow.wire.codec import decode_array, encode_array, scored_to_proto
from fuseflow.wire.gen.fuseflow.v1 import teacher_pb2 as pb
from fuseflow.wire.gen.fuseflow.v1 import teacher_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TeacherService"].full_name  # "fuseflow.v1.TeacherService"

_LOGPROB_DTYPES = {pb.DTYPE_UNSPECIFIED: np.float32, pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_FLOAT16: np.float16}


class AuthError(Exception):
    """Missing or wrong bearer token."""


class Unimplemented(Exception):
    """The served engine has no such method (ScoreTails on an engine without a prefix cache)."""


class MalformedRequest(ValueError):
    """Bytes that do not parse as the method's request message. The lenient deserializer *returns* it
    (grpcio turns a deserializer that raises into INTERNAL) and the servicer raises it: INVALID_ARGUMENT."""


class Busy(Exception):
    """``max_concurrent_rpcs`` TeacherService calls are already running (RESOURCE_EXHAUSTED; the client
    reads the ``fuseflow-busy`` trailer as "retry later or elsewhere", not as a bad request)."""


# The one place where errors become status codes; first match wins, anything else is INTERNAL.
STATUS_OF_ERROR: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (Busy, grpc.StatusCode.RESOURCE_EXHAUSTED),  # max_concurrent_rpcs calls running; the fuseflow-busy trailer says so
    (RequestTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),  # too many texts or tokens in one request
    ((Cancelled, CancelledError), grpc.StatusCode.CANCELLED),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),  # ScoreError, CodecError, MalformedRequest, fields
)


def status_of(error: BaseException) -> grpc.StatusCode:
    for kinds, code in STATUS_OF_ERROR:
        if isinstance(error, kinds):
            return code
    return grpc.StatusCode.INTERNAL


# ----------------------------------------------------------------------------------------------------------
# Options.
# ----------------------------------------------------------------------------------------------------------


# Bytes a text may hold per token of ``max_tokens`` before it is refused untokenized (issue 15). Generous on
# purpose: English prose and code run 3-5 UTF-8 bytes per token in SmolLM2's and Gemma-3's tokenizers, CJK
# about 3; only long runs of one repeated character get near 16, and such a request can raise
# --max-text-bytes.
TEXT_BYTES_PER_TOKEN = 16
# Bytes of the widest token id on the wire (int64; the client sends int32).
_ID_BYTES = 8
# Protobuf framing per text or Array message (tag, length, dtype, shape) - a bound, not a measure.
_FRAMING_BYTES_PER_ITEM = 64
# Everything else a request may carry: top_k, temperature, Generate's stop ids (5 bytes each, packed).
_FIXED_REQUEST_BYTES = 64 << 10
# RPC threads beyond max_concurrent_rpcs, so health checks and reflection are served while every slot is busy.
_SPARE_THREADS = 4


@dataclass
class ServerOptions:
    """How one teacher is served (``fuseflow teacher serve`` flags)."""

    host: str = "0.0.0.0"
    port: int = 50051  # 0: any free port (build_server returns the one bound)
    max_texts: int = 256  # sequences per Score / Tokenize request
    max_tokens: int = 16384  # tokens per request (Score: all sequences; Generate: prompt + max_new_tokens)
    max_top_k: int = 64
    token: str | None = None  # bearer token required on TeacherService methods
    tls_cert: bytes | None = None  # PEM server certificate chain
    tls_key: bytes | None = None  # PEM private key
    max_text_bytes: int | None = None  # UTF-8 bytes of texts per request (default max_tokens * TEXT_BYTES_PER_TOKEN)
    max_concurrent_rpcs: int = 32  # TeacherService calls at once; more are answered RESOURCE_EXHAUSTED
    max_tokenizing: int = DEFAULT_MAX_TOKENIZING  # concurrent tokenizer calls (each holds ~250 B per text byte)
    max_workers: int | None = None  # RPC threads (default max_concurrent_rpcs + 4 spare for health checks)
    max_batch_tokens: int | None = None  # tokens per engine call (default: the engine's max_batch_tokens)
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for others to share its batch
    max_message_bytes: int = 256 << 20  # largest response message: a [16384, 64] float32 top-k block is 8 MiB

    @property
    def text_bytes_limit(self) -> int:
        """UTF-8 bytes of texts one Tokenize or Score request may hold."""
        return self.max_text_bytes if self.max_text_bytes is not None else self.max_tokens * TEXT_BYTES_PER_TOKEN

    @property
    def threads(self) -> int:
        return self.max_workers if self.max_workers is not None else self.max_concurrent_rpcs + _SPARE_THREADS

    def receive_limit(self) -> int:
        """The gRPC receive-message limit: the largest request the other limits can accept (texts of
        ``text_bytes_limit`` or ``max_tokens`` int64 ids, framed in up to ``max_texts`` items, plus 64 KiB
        of small fields), so a larger one is refused by gRPC before Python holds it."""
        payload = max(self.text_bytes_limit, self.max_tokens * _ID_BYTES)
        return payload + self.max_texts * _FRAMING_BYTES_PER_ITEM + _FIXED_REQUEST_BYTES

    def validate(self) -> None:
        for name in ("max_texts", "max_tokens", "max_top_k", "max_concurrent_rpcs", "max_tokenizing"):
            if getattr(self, name) < 1:
                raise ValueError(f"server option {name} must be >= 1, got {getattr(self, name)}")
        if self.max_text_bytes is not None and self.max_text_bytes < 1:
            raise ValueError(f"server option max_text_bytes must be >= 1, got {self.max_text_bytes}")
        if self.max_workers is not None and self.max_workers <= self.max_concurrent_rpcs:
            raise ValueError(
                f"server option max_workers ({self.max_workers}) must exceed max_concurrent_rpcs "
                f"({self.max_concurrent_rpcs}): health checks need a thread while every call slot is busy"
            )
        if self.receive_limit() > (2 << 30) - 1:
            raise ValueError(
                f"the request limits need a {self.receive_limit()}-byte message, over gRPC's 2 GiB; lower "
                "max_tokens, max_text_bytes or max_texts"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.token is not None and not self.token.strip():
            raise ValueError("the bearer token is empty; put a non-empty token in --token-file or FUSEFLOW_TEACHER_TOKEN")


# ----------------------------------------------------------------------------------------------------------
# The servicer.
# ----------------------------------------------------------------------------------------------------------


def _abort(context: grpc.ServicerContext, method: str, error: BaseException, code: grpc.StatusCode):
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=error)
        details = f"internal error in {method}: {type(error).__name__}: {error}"
    else:
        details = str(error)
    index = getattr(error, "index", None)
    if isinstance(error, ScoreError) and index is not None:
        context.set_trailing_metadata(((ERROR_INDEX_KEY, str(index)),))
    elif isinstance(error, Busy):
        context.set_trailing_metadata(((BUSY_KEY, "1"),))
    context.abort(code, details)


def _rpc(fn: Callable) -> Callable:
    """Time the RPC, count it by status code, and turn its exceptions into statuses via ``status_of``."""
    method = fn.__name__

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def streaming(self, request, context):
            t0, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                if isinstance(request, MalformedRequest):
                    raise request
                yield from fn(self, request, context)
            except GeneratorExit:  # the client went away mid-stream
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as e:
                code = status_of(e)
                _abort(context, method, e, code)
            finally:
                self.metrics.observe_request(method, code.name, time.perf_counter() - t0)

        return streaming

    @functools.wraps(fn)
    def unary(self, request, context):
        t0, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            if isinstance(request, MalformedRequest):
                raise request
            return fn(self, request, context)
        except Exception as e:
            code = status_of(e)
            _abort(context, method, e, code)
        finally:
            self.metrics.observe_request(method, code.name, time.perf_counter() - t0)

    return unary


class TeacherServicer(pb_grpc.TeacherServiceServicer):
    """``fuseflow.v1.TeacherService``: proto ↔ domain objects; the work is the batcher's."""

    def __init__(self, batcher: RequestBatcher, options: ServerOptions, metrics: TeacherMetrics):
        self.batcher = batcher
        self.options = options
        self.metrics = metrics
        engine_cap = batcher.max_top_k or batcher.vocab_size
        self.max_top_k = int(min(options.max_top_k, engine_cap, batcher.vocab_size))

    @_rpc
    def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        tokenizer = self.batcher.tokenizer
        return pb.InfoResponse(
            model=str(self.batcher.name),
            tokenizer=str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
            vocab_size=int(self.batcher.vocab_size),
            max_length=int(self.batcher.max_length),
            engine=str(self.batcher.kind),
            max_top_k=self.max_top_k,
        )

    @_rpc
    def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        texts = list(request.texts)
        self._check_texts(texts)
        if not texts:
            return pb.TokenizeResponse()
        ids, offsets, tokens = self.batcher.tokenize(
            texts, request.add_special_tokens, request.return_tokens, max_tokens=self.options.max_tokens
        )
        out = pb.TokenizeResponse()
        for i in range(len(texts)):
            item = out.results.add()
            item.token_ids.CopyFrom(encode_array(ids[i]))  # [L] int32
            item.offsets.CopyFrom(encode_array(offsets[i]))  # [L, 2] int32
            if tokens is not None:
                item.tokens.values.extend(tokens[i])
        return out

    @_rpc
    def Score(self, request: pb.ScoreRequest, context):
        top_k = request.top_k
        if top_k > self.max_top_k:
            raise ScoreError(
                f"top_k {top_k} exceeds this teacher's max_top_k {self.max_top_k}; ask for fewer "
                "(or serve with a larger --max-top-k)"
            )
        temperature = request.temperature if request.HasField("temperature") else 1.0
        if request.logprob_dtype not in _LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT16, got {pb.DType.Name(request.logprob_dtype)}")
        lp_dtype = _LOGPROB_DTYPES[request.logprob_dtype]
        which = request.WhichOneof("input")
        if which == "texts":
            texts = list(request.texts.texts)
            self._check_texts(texts)
            stream = self.batcher.submit_texts(
                texts, top_k, temperature, request.return_tokens, max_tokens=self.options.max_tokens
            )
        elif which == "token_ids":
            arrays = request.token_ids.sequences
            self._check_count(len(arrays), "token id sequences")
            seqs = [_decode_ids(a, f"token_ids.sequences[{i}]", i) for i, a in enumerate(arrays)]
            stream = self.batcher.submit_ids(
                seqs, top_k, temperature, request.return_tokens, max_tokens=self.options.max_tokens
            )
        else:
            raise ValueError("ScoreRequest has no input: set texts or token_ids")
        context.add_callback(stream.cancel)
        for index, scored in stream:
            yield scored_to_proto(scored, index, lp_dtype)

    @_rpc
    def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        if not request.HasField("prompt_ids"):
            raise ValueError("GenerateRequest has no prompt_ids")
        prompt = _decode_ids(request.prompt_ids, "prompt_ids")  # [L]
        if prompt.size + request.max_new_tokens > self.options.max_tokens:
            raise RequestTooLarge(
                f"prompt of {prompt.size} tokens + max_new_tokens {request.max_new_tokens} exceeds the server's "
                f"limit of {self.options.max_tokens} tokens per request"
            )
        future = self.batcher.submit_generate(
            prompt,
            request.max_new_tokens,
            temperature=request.temperature,
            top_p=request.top_p if request.HasField("top_p") else 1.0,
            stop_token_ids=list(request.stop_ids),
            seed=request.seed if request.HasField("seed") else None,
        )
        context.add_callback(future.cancel)  # a no-op once it has started or finished
        result = future.result()
        return pb.GenerateResponse(
            token_ids=encode_array(result.token_ids, "<i4"),  # [N]
            logprobs=encode_array(result.logprobs, "<f4"),  # [N]
            finish_reason=result.finish_reason,
        )

    @_rpc
    def ScoreTails(self, request: pb.ScoreTailsRequest, context) -> pb.ScoreTailsResponse:
        if not hasattr(self.batcher.engine, "score_tails"):
            raise Unimplemented(f"the {self.batcher.engine.kind} engine has no ScoreTails; use Score")
        self._check_count(len(request.sequences), "sequences")
        if len(request.starts) != len(request.sequences):
            raise ValueError(
                f"ScoreTailsRequest has {len(request.sequences)} sequences but {len(request.starts)} starts; "
                "send one start per sequence"
            )
        seqs = [_decode_ids(a, f"sequences[{i}]", i) for i, a in enumerate(request.sequences)]  # each [L]
        total = sum(len(s) for s in seqs)
        if total > self.options.max_tokens:
            raise RequestTooLarge(
                f"request holds {total} tokens, more than the server's limit of {self.options.max_tokens} per "
                "request; send fewer or shorter sequences"
            )
        future = self.batcher.submit_call("score_tails", seqs=seqs, starts=list(request.starts))
        context.add_callback(future.cancel)
        return pb.ScoreTailsResponse(logprobs=[encode_array(r, "<f4") for r in future.result()])

    def _check_count(self, n: int, what: str) -> None:
        if n > self.options.max_texts:
            raise RequestTooLarge(
                f"request holds {n} {what}, more than the server's limit of {self.options.max_texts}; split it"
            )

    def _check_texts(self, texts: list[str]) -> None:
        """Count and UTF-8 bytes of ``texts``, before any tokenizer sees them: tokenizing costs ~250 bytes
        of memory per text byte, and the token limit can only be checked after it (issue 15)."""
        self._check_count(len(texts), "texts")
        limit = self.options.text_bytes_limit
        total = 0
        for text in texts:
            total += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
            if total > limit:
                raise RequestTooLarge(
                    f"texts hold more than {limit} UTF-8 bytes, the server's limit per request (--max-text-bytes, "
                    f"default {TEXT_BYTES_PER_TOKEN} bytes per token of --max-tokens); send fewer or shorter texts"
                )


def _decode_ids(msg: pb.Array, field: str, index: int | None = None) -> np.ndarray:
    """A token id array of a request: 1-D, non-empty, integer. Checked on the header before decoding, so
    a wrong rank or dtype is INVALID_ARGUMENT naming ``field`` (a 2-D array reached the engine before)."""
    if len(msg.shape) != 1:
        raise ScoreError(f"{field} must be a 1-D array of token ids, got shape {list(msg.shape)}", index)
    a = decode_array(msg, field)  # CodecError (a ValueError) when the bytes do not match dtype and shape
    if not np.issubdtype(a.dtype, np.integer):
        raise ScoreError(f"{field} must hold integer token ids, got dtype {a.dtype}", index)
    if a.size == 0:
        raise ScoreError(f"{field} is empty", index)
    return a


def _parse_or_malformed(message_type) -> Callable[[bytes], object]:
    """A request deserializer that returns :class:`MalformedRequest` instead of raising: grpcio answers a
    raising deserializer with INTERNAL ("Exception deserializing request!"), a client error is not that."""
    full_name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return message_type.FromString(data)
        except DecodeError as e:
            return MalformedRequest(f"the request is not a valid {full_name} message ({e}); was it sent to the "
                                    "right method with stubs of fuseflow.v1?")

    return parse


def add_teacher_service(servicer: TeacherServicer, server: grpc.Server) -> None:
    """Register ``servicer`` on ``server`` as the generated ``add_TeacherServiceServicer_to_server`` does,
    with :func:`_parse_or_malformed` as every method's request deserializer; the methods come from the
    proto's service descriptor, so a new RPC cannot be left out."""
    service = pb.DESCRIPTOR.services_by_name["TeacherService"]
    handlers = {}
    for method in service.methods:
        if method.client_streaming:
            raise NotImplementedError(f"{method.full_name} streams requests; add_teacher_service has no handler kind for it")
        make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_parse_or_malformed(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


# ----------------------------------------------------------------------------------------------------------
# Interceptors: the concurrency cap and auth.
# ----------------------------------------------------------------------------------------------------------


class ConcurrencyLimitInterceptor(grpc.ServerInterceptor):
    """At most ``limit`` calls of the methods under ``prefix`` (the TeacherService) run at once; one more
    is answered RESOURCE_EXHAUSTED at once, with the ``fuseflow-busy`` trailer, instead of queueing for a
    thread while its request sits in memory (issue 15). A streaming call holds its slot until its stream
    ends. Health and reflection are not counted (gRPC's own ``maximum_concurrent_rpcs`` counts every
    method, so a busy teacher would fail its health checks)."""

    def __init__(self, limit: int, metrics: TeacherMetrics, prefix: str = f"/{SERVICE_NAME}/"):
        self._slots = threading.BoundedSemaphore(limit)
        self._limit = limit
        self._metrics = metrics
        self._prefix = prefix

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix) or handler.request_streaming:
            return handler
        name = method.rsplit("/", 1)[-1]
        if handler.response_streaming:
            behavior = handler.unary_stream

            def limited_stream(request, context):
                self._acquire(name, context)
                try:
                    yield from behavior(request, context)
                finally:
                    self._slots.release()

            return grpc.unary_stream_rpc_method_handler(
                limited_stream, handler.request_deserializer, handler.response_serializer
            )
        behavior = handler.unary_unary

        def limited(request, context):
            self._acquire(name, context)
            try:
                return behavior(request, context)
            finally:
                self._slots.release()

        return grpc.unary_unary_rpc_method_handler(limited, handler.request_deserializer, handler.response_serializer)

    def _acquire(self, name: str, context) -> None:
        if self._slots.acquire(blocking=False):
            return
        self._metrics.observe_request(name, grpc.StatusCode.RESOURCE_EXHAUSTED.name, 0.0)
        error = Busy(
            f"the teacher is busy: {self._limit} calls are running (--max-concurrent-rpcs); retry later or on "
            "another replica"
        )
        _abort(context, name, error, status_of(error))


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` on the methods under ``prefix`` (the TeacherService);
    health and reflection stay open so probes need no secret."""

    def __init__(self, token: str, metrics: TeacherMetrics, prefix: str = f"/{SERVICE_NAME}/"):
        self._token = token
        self._metrics = metrics
        self._prefix = prefix

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self._prefix):
            return handler
        given = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if bearer_matches(given, self._token):  # the scheme in any case (RFC 7235; issue 26)
            return handler
        reason = "missing bearer token" if not given else "wrong bearer token"
        return self._rejecting(handler, method.rsplit("/", 1)[-1], reason)

    def _rejecting(self, handler, name: str, reason: str):
        def reject(request, context):
            self._metrics.observe_request(name, grpc.StatusCode.UNAUTHENTICATED.name, 0.0)
            error = AuthError(f"{reason}: send metadata 'authorization: Bearer <token>' (the teacher's --token-file)")
            _abort(context, name, error, status_of(error))

        kinds = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }
        make = kinds[(handler.request_streaming, handler.response_streaming)]
        return make(
            reject,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


# ----------------------------------------------------------------------------------------------------------
# The server.
# ----------------------------------------------------------------------------------------------------------


class TeacherServer(grpc.Server):
    """A ``grpc.Server`` whose ``stop`` drains: health NOT_SERVING, no new RPCs, in-flight RPCs finish
    within the grace period, then the batcher stops. ``batcher``, ``metrics`` and ``health`` are exposed
    for the process around it (the Redis worker shares the batcher)."""

    def __init__(self, server: grpc.Server, batcher: RequestBatcher, metrics: TeacherMetrics,
                 health_servicer: health.HealthServicer, port: int, owns_batcher: bool):
        self._server = server
        self.batcher = batcher
        self.metrics = metrics
        self.health = health_servicer
        self.port = port
        self._owns_batcher = owns_batcher
        self._stopped: threading.Event | None = None
        self._lock = threading.Lock()

    # grpc.Server interface, delegated.
    def add_generic_rpc_handlers(self, generic_rpc_handlers):
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name, method_handlers):
        self._server.add_registered_method_handlers(service_name, method_handlers)

    def add_insecure_port(self, address):
        return self._server.add_insecure_port(address)

    def add_secure_port(self, address, server_credentials):
        return self._server.add_secure_port(address, server_credentials)

    def start(self):
        self._server.start()

    def wait_for_termination(self, timeout=None):
        return self._server.wait_for_termination(timeout)

    def begin_drain(self) -> None:
        """Report NOT_SERVING on health (load balancers stop routing here); requests are still served."""
        self.health.enter_graceful_shutdown()

    def stop(self, grace: float | None = None) -> threading.Event:
        """Drain and stop; the returned event is set once in-flight RPCs are done and the batcher stopped."""
        with self._lock:
            if self._stopped is not None:
                return self._stopped
            self._stopped = done = threading.Event()
        self.begin_drain()
        grpc_done = self._server.stop(grace)

        def finish() -> None:
            grpc_done.wait()
            if self._owns_batcher:
                # RPCs cut off by the grace period left their work queued: fail it, do not run it.
                self.batcher.close(timeout=grace, cancel_pending=True)
            done.set()
            log.info("teacher server on port %d stopped", self.port)

        threading.Thread(target=finish, name="teacher-drain", daemon=True).start()
        return done


def build_server(
    engine: Engine | RequestBatcher,
    options: ServerOptions | None = None,
    metrics: TeacherMetrics | None = None,
) -> tuple[TeacherServer, int]:
    """A TeacherService server for ``engine`` (or an already running batcher over one), bound but not
    started: call ``start()``. Returns the server and the port it bound (useful with ``port=0``)."""
    options = options or ServerOptions()
    options.validate()
    metrics = metrics or TeacherMetrics()
    owns_batcher = not isinstance(engine, RequestBatcher)
    batcher = (
        RequestBatcher(
            engine, options.max_batch_tokens, options.max_wait_ms, observer=metrics, max_tokenizing=options.max_tokenizing
        )
        if owns_batcher
        else engine
    )
    # Auth first: a call without the token is refused without taking a slot.
    interceptors = [BearerTokenInterceptor(options.token, metrics)] if options.token else []
    interceptors.append(ConcurrencyLimitInterceptor(options.max_concurrent_rpcs, metrics))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.threads, thread_name_prefix="teacher-rpc"),
        interceptors=interceptors,
        options=[
            ("grpc.max_send_message_length", options.max_message_bytes),
            ("grpc.max_receive_message_length", options.receive_limit()),
        ],
    )
    add_teacher_service(TeacherServicer(batcher, options, metrics), server)

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )

    address = f"{options.host}:{options.port}"
    try:
        if options.tls_cert is not None:
            credentials = grpc.ssl_server_credentials([(options.tls_key, options.tls_cert)])
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc raises instead of returning 0 in recent versions
        port = 0
    if port == 0:
        if owns_batcher:
            batcher.close()
        raise OSError(f"cannot bind the teacher's gRPC port {address}; is it in use? (--host, --port)")
    return TeacherServer(server, batcher, metrics, health_servicer, port, owns_batcher), port
