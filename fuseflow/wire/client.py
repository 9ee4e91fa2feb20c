"""Client of a served teacher (``fuseflow.v1.TeacherService``) with the engine's own surface.

``TeacherClient.score_texts`` / ``score_ids`` / ``generate`` take and return what
:class:`fuseflow.score.engine.Engine`'s methods do (``ScoredText``, ``Generated``), so Cool-Fusion and
the teacher worker can hold a local engine or a remote teacher without knowing which. Errors come back as
exceptions of the same kinds: a rejected input raises :class:`TeacherRequestError`, a ``ScoreError``
(hence a ``ValueError``) carrying the offending input's ``index`` when the server named one.

    with TeacherClient("localhost:50051", token=os.environ.get("FUSEFLOW_TEACHER_TOKEN")) as teacher:
        scored = teacher.score_texts(["def f(x):"], top_k=5)
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from fuseflow.sparse import ScoredText
from fuseflow.sparse import Generated, ScoreError
from fuseflow.wire.codec import decode_array, encode_array, proto_to_scored
from fuseflow.wire.gen.fuseflow.v1 import teacher_pb2 as pb
from fuseflow.wire.gen.fuseflow.v1 import teacher_pb2_grpc as pb_grpc

ERROR_INDEX_KEY = "fuseflow-error-index"  # trailing metadata the server sets with a ScoreError's index
BUSY_KEY = "fuseflow-busy"  # trailing metadata of a RESOURCE_EXHAUSTED that means "all call slots taken"
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20

_LOGPROB_DTYPES = {"float32": pb.DTYPE_FLOAT32, "float16": pb.DTYPE_FLOAT16}


class TeacherError(RuntimeError):
    """A call the teacher answered with an error status; ``code`` is the ``grpc.StatusCode``."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, details: str = ""):
        super().__init__(message)
        self.code = code
        self.details = details


class TeacherUnavailable(TeacherError, ConnectionError):
    """The teacher cannot be reached (down, wrong address, TLS mismatch, draining) or did not answer in time."""


class TeacherBusy(TeacherUnavailable):
    """The teacher refused the call because its ``--max-concurrent-rpcs`` slots were all taken: the request
    was not at fault; retry later or on another replica."""


class TeacherRequestError(ScoreError):
    """The teacher rejected the request's content or size (INVALID_ARGUMENT, RESOURCE_EXHAUSTED)."""

    def __init__(self, message: str, code: grpc.StatusCode, details: str, index: int | None = None):
        super().__init__(message, index)
        self.code = code
        self.details = details


@dataclass(frozen=True)
class TeacherInfo:
    model: str
    tokenizer: str
    vocab_size: int
    max_length: int
    engine: str
    max_top_k: int


@dataclass
class Tokenized:
    """One text in the teacher's tokenization."""

    token_ids: np.ndarray  # [L] int32
    offsets: np.ndarray | None  # [L, 2] int32 character spans
    tokens: list[str] | None  # [L] token strings, when asked for


class TeacherClient:
    """A connection to one teacher. Thread-safe (one gRPC channel); close it, or use it as a context manager.

    ``token``: bearer token (default: ``FUSEFLOW_TEACHER_TOKEN``); ``tls_ca``: PEM file (or bytes) of the CA
    that signed the teacher's certificate, which turns TLS on; ``timeout_s``: deadline of each call.
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls_ca: str | os.PathLike | bytes | None = None,
        timeout_s: float = 300.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self.address = address
        self.timeout_s = timeout_s
        token = token if token is not None else os.environ.get("FUSEFLOW_TEACHER_TOKEN") or None
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        if tls_ca is not None:
            ca = tls_ca if isinstance(tls_ca, bytes) else _read_file(tls_ca, "TLS CA certificate (--tls-ca)")
            self._channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca), options)
        else:
            self._channel = grpc.insecure_channel(address, options)
        self._stub = pb_grpc.TeacherServiceStub(self._channel)
        self._tails_unimplemented = False  # the teacher answered ScoreTails with UNIMPLEMENTED: use Score
        self._info: TeacherInfo | None = None

    # -- lifecycle ---------------------------------------------------------------------------------------

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the channel is connected; :class:`TeacherUnavailable` after ``timeout_s``."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise TeacherUnavailable(
                f"cannot reach the teacher at {self.address} within {timeout_s:g} s "
                "(is it running? right host:port? TLS on one side only?)",
                grpc.StatusCode.UNAVAILABLE,
            ) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "TeacherClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the engine's surface ----------------------------------------------------------------------------

    def info(self, refresh: bool = False) -> TeacherInfo:
        if self._info is None or refresh:
            r = self._call("Info", self._stub.Info, pb.InfoRequest())
            self._info = TeacherInfo(r.model, r.tokenizer, int(r.vocab_size), int(r.max_length), r.engine, int(r.max_top_k))
        return self._info

    @property
    def name(self) -> str:
        return self.info().model

    @property
    def vocab_size(self) -> int:
        return self.info().vocab_size

    @property
    def max_length(self) -> int:
        return self.info().max_length

    @property
    def max_top_k(self) -> int:
        return self.info().max_top_k

    def tokenize(self, texts: Sequence[str], add_special_tokens: bool = True, return_tokens: bool = True) -> list[Tokenized]:
        request = pb.TokenizeRequest(texts=list(texts), add_special_tokens=add_special_tokens, return_tokens=return_tokens)
        reply = self._call("Tokenize", self._stub.Tokenize, request)
        return [
            Tokenized(
                token_ids=decode_array(r.token_ids, "token_ids").astype(np.int32, copy=False),  # [L]
                offsets=decode_array(r.offsets, "offsets").astype(np.int32, copy=False) if r.HasField("offsets") else None,
                tokens=list(r.tokens.values) if r.HasField("tokens") else None,
            )
            for r in reply.results
        ]

    def score_texts(
        self,
        texts: Sequence[str],
        top_k: int,
        temperature: float = 1.0,
        logprob_dtype: str = "float32",
        return_tokens: bool = True,
    ) -> list[ScoredText]:
        """As :meth:`Engine.score_texts`: one ``ScoredText`` per text, in input order.

        ``logprob_dtype="float16"`` halves the logprob bytes on the wire (values come back as float32)."""
        request = self._score_request(top_k, temperature, logprob_dtype, return_tokens)
        request.texts.texts.extend(texts)
        return self._gather(request, len(texts))

    def score_ids(
        self,
        ids: Sequence[np.ndarray],
        top_k: int,
        temperature: float = 1.0,
        logprob_dtype: str = "float32",
        return_tokens: bool = True,
    ) -> list[ScoredText]:
        """As :meth:`Engine.score_ids`: sequences already in the teacher's token ids."""
        request = self._score_request(top_k, temperature, logprob_dtype, return_tokens)
        for a in ids:
            request.token_ids.sequences.append(encode_array(np.asarray(a), "<i4"))
        return self._gather(request, len(ids))

    def iter_scores(self, request: pb.ScoreRequest) -> Iterator[tuple[int, ScoredText]]:
        """``(index, ScoredText)`` as the teacher finishes each sequence (completion order)."""
        stream = self._stub.Score(request, timeout=self.timeout_s, metadata=self._metadata)
        try:
            for msg in stream:
                yield msg.index, proto_to_scored(msg)
        except grpc.RpcError as e:
            raise _error_of(e, self.address, "Score") from None

    def generate(
        self,
        prompt_ids: np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
    ) -> Generated:
        """As :meth:`Engine.generate`: continue ``prompt_ids`` (the teacher's token ids)."""
        request = pb.GenerateRequest(
            prompt_ids=encode_array(np.asarray(prompt_ids), "<i4"),
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            stop_ids=[int(s) for s in stop_token_ids],
        )
        if top_p != 1.0:
            request.top_p = float(top_p)
        if seed is not None:
            request.seed = int(seed)
        reply = self._call("Generate", self._stub.Generate, request)
        return Generated(
            token_ids=decode_array(reply.token_ids, "token_ids").astype(np.int32, copy=False),  # [N]
            logprobs=decode_array(reply.logprobs, "logprobs").astype(np.float32, copy=False),  # [N]
            finish_reason=reply.finish_reason,
        )

    def score_tails(self, seqs: Sequence[np.ndarray], starts: Sequence[int]) -> list[np.ndarray]:
        """As the hf engine's ``score_tails``: the logprob of each token from ``starts[i]`` on, ``[L - start]``
        float32 per sequence. A teacher whose engine lacks it (UNIMPLEMENTED, e.g. vllm) is asked for whole
        sequences with ``score_ids`` instead, once and from then on."""
        if not self._tails_unimplemented:
            request = pb.ScoreTailsRequest(
                sequences=[encode_array(np.asarray(a), "<i4") for a in seqs], starts=[int(s) for s in starts]
            )
            try:
                reply = self._call("ScoreTails", self._stub.ScoreTails, request)
            except TeacherError as e:
                if e.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._tails_unimplemented = True
            else:
                return [
                    decode_array(a, f"logprobs[{i}]").astype(np.float32, copy=False)
                    for i, a in enumerate(reply.logprobs)
                ]
        scored = self.score_ids(seqs, top_k=1, return_tokens=False)
        return [np.asarray(s.gold_logprobs, dtype=np.float32)[int(start) - 1 :] for s, start in zip(scored, starts)]

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """The teacher's token string of each id (e.g. to print top-k alternatives).

        The service has no vocabulary RPC, so this scores the ids as a sequence at ``top_k=1`` and keeps the
        token strings the teacher returns with it: one small forward, meant for tools, not hot paths.
        """
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)  # [N]
        if ids.size == 0:
            return []
        uniq, inverse = np.unique(ids, return_inverse=True)  # [U], [N]
        chunk = max(1, self.max_length)
        strings: list[str] = []
        for s in range(0, len(uniq), chunk):
            (scored,) = self.score_ids([uniq[s : s + chunk]], top_k=1, return_tokens=True)
            strings.extend(scored.tokens or [])
        return [strings[i] for i in inverse.tolist()]

    # -- plumbing ----------------------------------------------------------------------------------------

    @staticmethod
    def _score_request(top_k: int, temperature: float, logprob_dtype: str, return_tokens: bool) -> pb.ScoreRequest:
        if logprob_dtype not in _LOGPROB_DTYPES:
            raise ValueError(f"logprob_dtype must be one of {sorted(_LOGPROB_DTYPES)}, got {logprob_dtype!r}")
        request = pb.ScoreRequest(
            top_k=int(top_k), logprob_dtype=_LOGPROB_DTYPES[logprob_dtype], return_tokens=return_tokens
        )
        if temperature != 1.0:
            request.temperature = float(temperature)
        return request

    def _gather(self, request: pb.ScoreRequest, n: int) -> list[ScoredText]:
        """Reassemble the stream (completion order) into input order, checking every input came back once."""
        out: list[ScoredText | None] = [None] * n
        for index, scored in self.iter_scores(request):
            if not 0 <= index < n or out[index] is not None:
                raise TeacherError(
                    f"teacher at {self.address} sent sequence index {index} twice or out of range [0, {n})"
                )
            out[index] = scored
        missing = [i for i, s in enumerate(out) if s is None]
        if missing:
            raise TeacherError(f"teacher at {self.address} ended the Score stream without inputs {missing[:10]}")
        return out  # type: ignore[return-value]

    def _call(self, method: str, fn, request):
        try:
            return fn(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise _error_of(e, self.address, method) from None


_UNAVAILABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_REJECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}


def _error_of(error: grpc.RpcError, address: str, method: str) -> TeacherError | TeacherRequestError:
    """The exception a failed call raises: its status code, the server's details, the input index."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else None) or ""
    name = code.name if code is not None else "UNKNOWN"
    message = f"{method} on {address}: {name}: {details}"
    if code in _REJECTED:
        index, busy = None, False
        trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        for key, value in trailing or ():
            if key == ERROR_INDEX_KEY:
                index = int(value)
            busy = busy or key == BUSY_KEY
        if busy:
            return TeacherBusy(message, code, details)
        return TeacherRequestError(message, code, details, index)
    if code in _UNAVAILABLE:
        return TeacherUnavailable(message, code, details)
    return TeacherError(message, code, details)


def _read_file(path: str | os.PathLike, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(f"cannot read the {what} {path}: {e.strerror}") from None
