"""Codec round trips against slow references built from ``struct`` (one element at a time)."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fuseflow.sparse import AlignedDist, ScoredText
from fuseflow.wire import codec
from fuseflow.wire.gen.fuseflow.v1 import teacher_pb2 as pb

# struct format character of each dtype the Array message carries.
STRUCT_CHAR = {
    "f4": "f",
    "f2": "e",
    "f8": "d",
    "i1": "b",
    "i2": "h",
    "i4": "i",
    "i8": "q",
    "u1": "B",
    "u2": "H",
    "u4": "I",
    "u8": "Q",
    "b1": "?",
}


def reference_le_bytes(a: np.ndarray) -> bytes:
    """Little-endian bytes of ``a`` in C order, one element at a time."""
    ch = STRUCT_CHAR[a.dtype.kind + str(a.dtype.itemsize)]
    return b"".join(struct.pack("<" + ch, x.item()) for x in a.reshape(-1))


def reference_float16(x: float) -> float:
    """float16 rounding of one value (IEEE round-half-even via struct), finite values saturated at ±65504."""
    if math.isfinite(x) and abs(x) > 65504:
        return math.copysign(65504.0, x)
    try:
        return struct.unpack("<e", struct.pack("<e", x))[0]
    except OverflowError:  # rounds past the largest finite half
        return math.copysign(65504.0, x)


array_dtypes = st.sampled_from(["<f4", ">f4", "<f8", "i1", "<i2", ">i4", "<i8", "u1", "<u2", "<u4", "<u8", "?"])


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(dtype=array_dtypes, shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)))
def test_array_round_trip_matches_struct_reference(a):
    msg = codec.encode_array(a)
    assert msg.data == reference_le_bytes(a)
    assert list(msg.shape) == list(a.shape)
    back = codec.decode_array(pb.Array.FromString(msg.SerializeToString()))
    assert back.shape == a.shape
    assert back.dtype == a.dtype.newbyteorder("<") or back.dtype == a.dtype
    np.testing.assert_array_equal(back, a)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=2, max_side=6), elements=st.floats(width=32, allow_nan=False)
    )
)
def test_float16_matches_reference_and_keeps_padding(x):
    h = codec.to_float16(x)
    expected = np.array([reference_float16(float(v)) for v in x.reshape(-1)], dtype=np.float64).reshape(x.shape)
    np.testing.assert_array_equal(h.astype(np.float64), expected)
    # -inf (padding) stays -inf and nothing finite becomes infinite.
    np.testing.assert_array_equal(np.isneginf(h), np.isneginf(x))
    assert not np.isinf(h[np.isfinite(x)]).any()


def test_decode_array_rejects_wrong_length_and_dtype():
    msg = codec.encode_array(np.arange(6, dtype=np.int32).reshape(2, 3))
    bad = pb.Array(data=msg.data[:-1], dtype=msg.dtype, shape=msg.shape)
    with pytest.raises(codec.CodecError, match="topk_ids: int32 array of shape \\(2, 3\\) needs 24 bytes, got 23"):
        codec.decode_array(bad, "topk_ids")
    with pytest.raises(codec.CodecError, match="dtype"):
        codec.decode_array(pb.Array(data=msg.data, shape=msg.shape))
    with pytest.raises(codec.CodecError, match="has no fuseflow.v1.DType"):
        codec.encode_array(np.zeros(2, dtype=np.complex64))


@settings(max_examples=40, deadline=None)
@given(t=st.integers(0, 40), k=st.integers(1, 12), seed=st.integers(0, 2**31), pad=st.floats(0, 1))
def test_aligned_round_trip(make_dist, t, k, seed, pad):
    dist = make_dist(t, k, seed, pad_frac=pad, meta={"teacher": "gemma", "source_tokens": t + 3})
    fields = codec.encode_aligned(dist)
    assert fields[codec.IDS] == reference_le_bytes(dist.ids)
    assert fields[codec.GOLD] == reference_le_bytes(dist.gold_logprobs)
    assert len(fields[codec.ALIGNED]) == (t + 7) // 8
    back = codec.decode_aligned(fields)
    back.validate()
    assert back.ids.dtype == np.int32 and back.logprobs.dtype == np.float32 and back.aligned.dtype == bool
    np.testing.assert_array_equal(back.ids, dist.ids)
    np.testing.assert_array_equal(back.gold_logprobs, dist.gold_logprobs)
    np.testing.assert_array_equal(back.aligned, dist.aligned)
    np.testing.assert_array_equal(np.isneginf(back.logprobs), np.isneginf(dist.logprobs))
    finite = np.isfinite(dist.logprobs)
    # float16 has an 11-bit significand: relative error <= 2^-11, absolute 2^-25 among subnormals.
    err = np.abs(back.logprobs[finite] - dist.logprobs[finite])
    assert (err <= np.maximum(np.abs(dist.logprobs[finite]) * 2.0**-11, 2.0**-25)).all()
    assert back.meta == dist.meta


def test_aligned_bytes_per_token_at_k10(make_dist):
    t = 2048
    fields = codec.encode_aligned(make_dist(t, 10, seed=0, meta={"teacher": "a", "source_tokens": 2100}))
    per_token = sum(len(v) for v in fields.values()) / t
    # 10 ids * 4 + 10 logprobs * 2 + gold 4 + 1/8 aligned bit = 64.125, plus the JSON meta spread over T.
    assert 64.125 <= per_token < 64.2


def test_decoded_arrays_share_the_wire_bytes(make_dist):
    fields = codec.encode_aligned(make_dist(16, 4, seed=1))
    back = codec.decode_aligned(fields)
    assert not back.ids.flags.writeable and not back.gold_logprobs.flags.writeable  # views, not copies
    assert np.shares_memory(back.ids, np.frombuffer(fields[codec.IDS], dtype=np.uint8))


def test_decode_aligned_names_missing_and_bad_fields(make_dist):
    fields = codec.encode_aligned(make_dist(5, 3, seed=2))
    with pytest.raises(codec.CodecError, match="missing field"):
        codec.decode_aligned({k: v for k, v in fields.items() if k != codec.GOLD})
    with pytest.raises(codec.CodecError, match="needs 60 bytes"):
        codec.decode_aligned({**fields, codec.IDS: fields[codec.IDS][:-4]})
    # str keys (e.g. from a decode_responses client) are accepted too.
    assert codec.decode_aligned({k.decode(): v for k, v in fields.items()}).num_positions == 5


@pytest.mark.parametrize(("meta", "message"), [
    # json.loads(bytes) guesses UTF-16/32 from garbage and reports a UnicodeDecodeError('utf-16-le', …)
    (b"\x01\x00\xff\xfe", r"^meta is not UTF-8 \(invalid start byte at byte 2\)$"),
    (b"{not json", r"^meta is not JSON \(Expecting property name enclosed in double quotes at character 1\)$"),
    (b"[1, 2]", "meta must be a JSON object, got list"),
    (b'{"v": 1, "k": 3}', "meta field 'T' must be an integer >= 0, got None"),
    (b'{"v": 1, "T": -5, "k": 3}', "meta field 'T' must be an integer >= 0, got -5"),
    (b'{"v": 1, "T": 5, "k": "3"}', "meta field 'k' must be an integer >= 0, got '3'"),
    (b'{"v": 1, "T": 5, "k": 3, "meta": [1]}', "meta field 'meta' must be a JSON object, got list"),
    (b'{"v": 2, "T": 5, "k": 3}', "format v2 is not v1"),
])
def test_decode_aligned_checks_every_part_of_meta(make_dist, meta, message):
    """The meta field is decoded as UTF-8 explicitly and checked field by field: a rogue writer gets a reason
    that names the field, never a bare KeyError or a UTF-16 guess (issue 26)."""
    fields = codec.encode_aligned(make_dist(5, 3, seed=2))
    with pytest.raises(codec.CodecError, match=message):
        codec.decode_aligned({**fields, codec.META: meta})


def test_encode_aligned_validates(make_dist):
    d = make_dist(4, 3, seed=3)
    bad = AlignedDist(ids=d.ids.astype(np.int64), logprobs=d.logprobs, gold_logprobs=d.gold_logprobs, aligned=d.aligned)
    with pytest.raises(ValueError, match="int32"):
        codec.encode_aligned(bad)


@pytest.mark.parametrize("nll", [-1.0, float("nan"), float("-inf"), "12"])
def test_a_whole_text_nll_a_log_softmax_cannot_give_is_refused(make_dist, nll):
    """meta 'nll' ranks teachers under fusion.criterion 'text': a negative one would win every sample."""
    d = make_dist(4, 3, seed=3)
    d.meta["nll"] = 7.5
    d.validate()
    d.meta["nll"] = nll
    with pytest.raises(ValueError, match="meta 'nll'"):
        d.validate()


def make_scored(length: int, k: int, seed: int, offsets: bool, tokens: bool) -> ScoredText:
    rng = np.random.default_rng(seed)
    n = max(length - 1, 0)
    lp = -np.sort(rng.exponential(3.0, size=(n, k)), axis=1).astype(np.float32)  # [L-1, k]
    return ScoredText(
        token_ids=rng.integers(0, 640, size=length).astype(np.int32),  # [L]
        offsets=np.cumsum(rng.integers(0, 4, size=(length, 2)), axis=0).astype(np.int32) if offsets else None,
        tokens=[f"▁tok{i}" for i in range(length)] if tokens else None,
        topk_ids=rng.integers(0, 640, size=(n, k)).astype(np.int32),  # [L-1, k]
        topk_logprobs=lp,
        gold_logprobs=lp[:, -1].copy(),  # [L-1]
    )


@pytest.mark.parametrize("offsets,tokens", [(True, True), (False, False), (True, False)])
@pytest.mark.parametrize("length", [0, 1, 7])
def test_scored_round_trip_float32_exact(length, offsets, tokens):
    s = make_scored(length, 5, seed=length, offsets=offsets, tokens=tokens)
    msg = pb.ScoredText.FromString(codec.scored_to_proto(s, index=3).SerializeToString())
    assert msg.index == 3
    back = codec.proto_to_scored(msg)
    for name in ("token_ids", "topk_ids", "topk_logprobs", "gold_logprobs"):
        np.testing.assert_array_equal(getattr(back, name), getattr(s, name), err_msg=name)
    assert (back.offsets is None) == (s.offsets is None)
    if s.offsets is not None:
        np.testing.assert_array_equal(back.offsets, s.offsets)
    assert back.tokens == s.tokens
    assert back.nll == pytest.approx(s.nll)


def test_scored_float16_on_the_wire():
    s = make_scored(9, 4, seed=5, offsets=True, tokens=False)
    msg = codec.scored_to_proto(s, logprob_dtype=np.float16)
    assert msg.topk_logprobs.dtype == pb.DTYPE_FLOAT16 and len(msg.topk_logprobs.data) == 8 * 4 * 2
    back = codec.proto_to_scored(msg)
    assert back.topk_logprobs.dtype == np.float32
    np.testing.assert_array_equal(back.topk_logprobs, s.topk_logprobs.astype(np.float16).astype(np.float32))
    with pytest.raises(codec.CodecError, match="float32 or float16"):
        codec.scored_to_proto(s, logprob_dtype=np.int32)
