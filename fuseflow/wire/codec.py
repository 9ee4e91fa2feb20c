"""numpy arrays ↔ raw little-endian bytes: the protobuf ``Array`` message, Redis fields of an
``AlignedDist`` and the ``ScoredText`` message.

Never repeated floats, JSON or pickle (DESIGN.md, "Data flow"): an array is its bytes plus dtype and shape,
decoded with one ``np.frombuffer``. Decoded arrays share memory with the message / Redis reply where numpy
allows (same dtype on the wire as in memory), so they are **read-only**; copy before writing into them.
float16 logprobs are widened to float32 on decode (``fuseflow.sparse`` keeps float32 in memory).

An ``AlignedDist`` on the wire, per position and teacher at top-k ``k``:
``4k`` (ids int32) + ``2k`` (logprobs float16) + 4 (gold float32) + 1/8 (aligned, packed bits) bytes,
64.125 bytes at k = 10, plus a small JSON ``meta`` field per sample.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import numpy as np

from fuseflow.sparse import AlignedDist, ScoredText
from fuseflow.wire.gen.fuseflow.v1 import teacher_pb2 as pb

# Largest finite float16; finite logprobs beyond it would round to -inf, which reads as padding.
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504.0

_PROTO_DTYPES: dict[np.dtype, int] = {
    np.dtype("<f4"): pb.DTYPE_FLOAT32,
    np.dtype("<f2"): pb.DTYPE_FLOAT16,
    np.dtype("<f8"): pb.DTYPE_FLOAT64,
    np.dtype("i1"): pb.DTYPE_INT8,
    np.dtype("<i2"): pb.DTYPE_INT16,
    np.dtype("<i4"): pb.DTYPE_INT32,
    np.dtype("<i8"): pb.DTYPE_INT64,
    np.dtype("u1"): pb.DTYPE_UINT8,
    np.dtype("<u2"): pb.DTYPE_UINT16,
    np.dtype("<u4"): pb.DTYPE_UINT32,
    np.dtype("<u8"): pb.DTYPE_UINT64,
    np.dtype("?"): pb.DTYPE_BOOL,
}
_NUMPY_DTYPES: dict[int, np.dtype] = {v: k for k, v in _PROTO_DTYPES.items()}

# Field names of an encoded AlignedDist (Redis hash / stream fields).
IDS, LOGPROBS, GOLD, ALIGNED, META = b"ids", b"logprobs", b"gold", b"aligned", b"meta"
ALIGNED_FIELDS = (IDS, LOGPROBS, GOLD, ALIGNED, META)
_FORMAT_VERSION = 1


class CodecError(ValueError):
    """Bytes that do not decode to what their dtype/shape header says."""


# ----------------------------------------------------------------------------------------------------------
# Raw little-endian bytes
# ----------------------------------------------------------------------------------------------------------


def little_endian(dtype: np.dtype | type | str) -> np.dtype:
    """``dtype`` with little-endian byte order (no-op for 1-byte types)."""
    dt = np.dtype(dtype)
    return dt.newbyteorder("<") if dt.itemsize > 1 else dt


def to_le_bytes(a: np.ndarray, dtype: np.dtype | type | str | None = None) -> bytes:
    """C-order little-endian bytes of ``a`` cast to ``dtype`` (default: its own dtype)."""
    dt = little_endian(a.dtype if dtype is None else dtype)
    return np.ascontiguousarray(a, dtype=dt).tobytes()


def from_le_bytes(buf: bytes | memoryview, dtype: np.dtype | type | str, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``to_le_bytes``: a read-only view of ``buf`` (no copy) with ``dtype`` and ``shape``."""
    dt = little_endian(dtype)
    want = math.prod(shape) * dt.itemsize
    if len(buf) != want:
        raise CodecError(f"{dt.name} array of shape {tuple(shape)} needs {want} bytes, got {len(buf)}")
    return np.frombuffer(buf, dtype=dt).reshape(shape)


def to_float16(x: np.ndarray) -> np.ndarray:
    """``x`` as little-endian float16, finite values saturated at ±65504 so that only ``-inf`` stays ``-inf``
    (a finite logprob below -65504 would otherwise turn into the padding value)."""
    with np.errstate(over="ignore"):  # overflow is expected and repaired below
        h = np.asarray(x).astype("<f2")  # same shape as x
    overflow = np.isinf(h) & np.isfinite(x)
    if overflow.any():
        h[overflow] = np.copysign(FLOAT16_MAX, np.asarray(x)[overflow])
    return h


# ----------------------------------------------------------------------------------------------------------
# protobuf Array
# ----------------------------------------------------------------------------------------------------------


def encode_array(a: np.ndarray, dtype: np.dtype | type | str | None = None) -> pb.Array:
    """``a`` (cast to ``dtype`` if given) as an ``Array`` message of raw little-endian bytes."""
    a = np.asarray(a)
    dt = little_endian(a.dtype if dtype is None else dtype)
    if dt not in _PROTO_DTYPES:
        raise CodecError(f"dtype {dt} has no fuseflow.v1.DType; use one of {sorted(d.name for d in _PROTO_DTYPES)}")
    data = to_float16(a).tobytes() if dt == np.dtype("<f2") else to_le_bytes(a, dt)
    return pb.Array(data=data, dtype=_PROTO_DTYPES[dt], shape=a.shape)


def decode_array(msg: pb.Array, field: str = "array") -> np.ndarray:
    """The numpy array of an ``Array`` message: a read-only view of its bytes. ``field`` names it in errors."""
    dt = _NUMPY_DTYPES.get(msg.dtype)
    if dt is None:
        raise CodecError(f"{field}: unknown or unspecified dtype {msg.dtype}")
    try:
        return from_le_bytes(msg.data, dt, tuple(msg.shape))
    except CodecError as e:
        raise CodecError(f"{field}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# AlignedDist ↔ Redis fields
# ----------------------------------------------------------------------------------------------------------


def encode_aligned(dist: AlignedDist) -> dict[bytes, bytes]:
    """Redis fields of one teacher's aligned distributions: ids int32, logprobs float16, gold float32,
    aligned packed bits, and a JSON ``meta`` with the shape and ``dist.meta``."""
    dist.validate()
    t, k = dist.ids.shape
    head = {"v": _FORMAT_VERSION, "T": t, "k": k, "meta": dist.meta}
    return {
        IDS: to_le_bytes(dist.ids, "<i4"),
        LOGPROBS: to_float16(dist.logprobs).tobytes(),
        GOLD: to_le_bytes(dist.gold_logprobs, "<f4"),
        ALIGNED: np.packbits(np.asarray(dist.aligned, dtype=bool)).tobytes(),  # [ceil(T/8)] uint8
        META: json.dumps(head, separators=(",", ":")).encode(),
    }


def decode_aligned(fields: Mapping[bytes, bytes] | Mapping[str, bytes]) -> AlignedDist:
    """Inverse of ``encode_aligned``; ids and gold are read-only views of ``fields``' bytes."""
    f = {k.encode() if isinstance(k, str) else k: v for k, v in fields.items()}
    missing = [name.decode() for name in ALIGNED_FIELDS if name not in f]
    if missing:
        raise CodecError(f"aligned distribution is missing field(s) {missing}")
    head = _meta_head(f[META])
    if head.get("v") != _FORMAT_VERSION:
        raise CodecError(
            f"aligned distribution format v{head.get('v')!r} is not v{_FORMAT_VERSION}; "
            "teacher workers and trainer must run the same fuseflow version"
        )
    t, k = head["T"], head["k"]
    aligned_bits = from_le_bytes(f[ALIGNED], np.uint8, ((t + 7) // 8,))
    return AlignedDist(
        ids=from_le_bytes(f[IDS], "<i4", (t, k)),  # [T, k]
        logprobs=from_le_bytes(f[LOGPROBS], "<f2", (t, k)).astype(np.float32),  # [T, k]
        gold_logprobs=from_le_bytes(f[GOLD], "<f4", (t,)),  # [T]
        aligned=np.unpackbits(aligned_bits, count=t).view(bool),  # [T]
        meta=head["meta"],
    )


def _meta_head(raw: bytes | str) -> dict:
    """The ``meta`` field of an encoded ``AlignedDist``, checked: UTF-8 JSON (decoded explicitly: ``json.loads``
    of bytes guesses UTF-16 or UTF-32 from garbage), an object with non-negative integers ``T`` and ``k`` and an
    object ``meta``. Raises :class:`CodecError` naming what is wrong (issue 26)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    except UnicodeDecodeError as e:
        raise CodecError(f"meta is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        head = json.loads(text)
    except (json.JSONDecodeError, TypeError) as e:
        raise CodecError(f"meta is not JSON ({getattr(e, 'msg', e)} at character {getattr(e, 'pos', 0)})") from None
    if not isinstance(head, dict):
        raise CodecError(f"meta must be a JSON object, got {type(head).__name__}")
    head.setdefault("meta", {})
    for name in ("T", "k"):
        value = head.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CodecError(f"meta field {name!r} must be an integer >= 0, got {value!r:.40}")
    if not isinstance(head["meta"], dict):
        raise CodecError(f"meta field 'meta' must be a JSON object, got {type(head['meta']).__name__}")
    return head


# ----------------------------------------------------------------------------------------------------------
# ScoredText ↔ protobuf
# ----------------------------------------------------------------------------------------------------------


def scored_to_proto(
    scored: ScoredText, index: int = 0, logprob_dtype: np.dtype | type | str = np.float32
) -> pb.ScoredText:
    """``ScoredText`` as the message ``Score`` streams; logprobs as ``logprob_dtype`` (float32 or float16)."""
    lp = little_endian(logprob_dtype)
    if lp not in (np.dtype("<f4"), np.dtype("<f2")):
        raise CodecError(f"logprob_dtype must be float32 or float16, got {lp}")
    msg = pb.ScoredText(
        index=index,
        token_ids=encode_array(scored.token_ids, "<i4"),
        topk_ids=encode_array(scored.topk_ids, "<i4"),
        topk_logprobs=encode_array(scored.topk_logprobs, lp),
        gold_logprobs=encode_array(scored.gold_logprobs, lp),
    )
    if scored.offsets is not None:
        msg.offsets.CopyFrom(encode_array(scored.offsets, "<i4"))
    if scored.tokens is not None:
        msg.tokens.values.extend(scored.tokens)
    return msg


def proto_to_scored(msg: pb.ScoredText) -> ScoredText:
    """Inverse of ``scored_to_proto``; logprobs come back as float32 whatever travelled."""
    return ScoredText(
        token_ids=decode_array(msg.token_ids, "token_ids").astype(np.int32, copy=False),  # [L]
        offsets=(  # [L, 2]
            decode_array(msg.offsets, "offsets").astype(np.int32, copy=False) if msg.HasField("offsets") else None
        ),
        tokens=list(msg.tokens.values) if msg.HasField("tokens") else None,
        topk_ids=decode_array(msg.topk_ids, "topk_ids").astype(np.int32, copy=False),  # [L-1, k]
        topk_logprobs=decode_array(msg.topk_logprobs, "topk_logprobs").astype(np.float32, copy=False),
        gold_logprobs=decode_array(msg.gold_logprobs, "gold_logprobs").astype(np.float32, copy=False),
    )
