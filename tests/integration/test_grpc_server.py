"""The teacher's gRPC server on a real localhost port, serving the tiny Llama through the hf engine, checked
against the same engine called directly."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from google.protobuf import descriptor_pb2

from fuseflow.models import builtin_text
from fuseflow.teacher.server import SERVICE_NAME
from fuseflow.wire.client import TeacherClient, TeacherRequestError, TeacherUnavailable
from fuseflow.wire.codec import encode_array
from fuseflow.wire.gen.fuseflow.v1 import teacher_pb2 as pb
from fuseflow.wire.gen.fuseflow.v1 import teacher_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

FIELDS = ("token_ids", "offsets", "topk_ids", "topk_logprobs", "gold_logprobs")


@pytest.fixture(scope="module")
def texts():
    text = builtin_text(20_000)
    rng = np.random.default_rng(0)
    sizes = [120, 7, 400, 35, 1, 260, 60, 15]
    starts = rng.integers(0, len(text) - 400, size=len(sizes))
    return [text[s : s + n] for s, n in zip(starts, sizes)]


def assert_same(got, ref, exact: bool = True):
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        for name in FIELDS:
            a, b = getattr(g, name), getattr(r, name)
            if b is None:  # offsets of token id input
                assert a is None, name
                continue
            if exact or name in ("token_ids", "offsets", "topk_ids"):
                np.testing.assert_array_equal(a, b, err_msg=name)
                assert a.dtype == b.dtype, name
            else:
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=name)
        assert g.tokens == r.tokens


def test_info(engine, serve):
    _, address = serve(engine, max_top_k=16)
    with TeacherClient(address) as client:
        info = client.info()
    assert info.vocab_size == engine.vocab_size == 512
    assert info.max_length == engine.max_length and info.engine == "hf"
    assert info.max_top_k == 16  # the server's limit is below the engine's 32
    assert info.model == engine.name


def test_score_texts_over_grpc_is_bitwise_the_engine(engine, serve, texts):
    _, address = serve(engine)
    with TeacherClient(address) as client:
        got = client.score_texts(texts, top_k=7)
        got_t = client.score_texts(texts[:3], top_k=3, temperature=0.7)
    assert_same(got, engine.score_texts(texts, top_k=7))
    assert_same(got_t, engine.score_texts(texts[:3], top_k=3, temperature=0.7))


def test_score_ids_and_float16_logprobs(engine, serve, texts):
    _, address = serve(engine)
    ids = [np.asarray(engine.tokenizer(t)["input_ids"], dtype=np.int64) for t in texts[:4]]
    with TeacherClient(address) as client:
        got = client.score_ids(ids, top_k=5)
        half = client.score_texts(texts[:4], top_k=5, logprob_dtype="float16")
    assert_same(got, engine.score_ids(ids, top_k=5))
    for h, r in zip(half, engine.score_texts(texts[:4], top_k=5)):
        np.testing.assert_array_equal(h.topk_ids, r.topk_ids)
        np.testing.assert_array_equal(h.topk_logprobs, r.topk_logprobs.astype(np.float16).astype(np.float32))
        np.testing.assert_array_equal(h.gold_logprobs, r.gold_logprobs.astype(np.float16).astype(np.float32))


def test_score_streams_one_message_per_sequence(engine, serve, texts):
    _, address = serve(engine, max_batch_tokens=64)  # several engine calls for one request
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        request = pb.ScoreRequest(texts=pb.Texts(texts=texts), top_k=2)
        indices = [m.index for m in stub.Score(request, timeout=60)]
        assert sorted(indices) == list(range(len(texts)))
        empty = list(stub.Score(pb.ScoreRequest(texts=pb.Texts(texts=[]), top_k=2), timeout=60))
    assert empty == []


def test_tokenize_and_generate_match_the_engine(engine, serve):
    _, address = serve(engine)
    text = "def f(x): return x"
    with TeacherClient(address) as client:
        (tok,) = client.tokenize([text])
        (plain,) = client.tokenize([text], add_special_tokens=False, return_tokens=False)
        greedy = client.generate(tok.token_ids, 6)
        sampled = client.generate(tok.token_ids, 6, temperature=0.8, top_p=0.9, seed=3)
        stopped = client.generate(tok.token_ids, 6, stop_token_ids=[int(greedy.token_ids[1])])
    enc = engine.tokenizer(text, return_offsets_mapping=True)
    assert tok.token_ids.tolist() == enc["input_ids"] and tok.tokens == enc.tokens()
    np.testing.assert_array_equal(tok.offsets, np.asarray(enc["offset_mapping"]))
    assert plain.token_ids.tolist() == enc["input_ids"][1:] and plain.tokens is None
    ref = engine.generate(tok.token_ids, 6)
    np.testing.assert_array_equal(greedy.token_ids, ref.token_ids)
    # to fp32 rounding: a generation that reuses the engine's prefix KV cache rounds differently than a full run
    np.testing.assert_allclose(greedy.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    ref_s = engine.generate(tok.token_ids, 6, temperature=0.8, top_p=0.9, seed=3)
    np.testing.assert_array_equal(sampled.token_ids, ref_s.token_ids)
    stop_at = greedy.token_ids.tolist().index(int(greedy.token_ids[1])) + 1
    assert stopped.finish_reason == "stop" and stopped.token_ids.tolist() == greedy.token_ids[:stop_at].tolist()


def test_concurrent_clients_get_their_own_results_merged_in_batches(engine, serve, texts):
    requests = [[texts[i], texts[(i + 3) % len(texts)]] for i in range(8)]
    total = sum(len(engine.tokenizer(t)["input_ids"]) for r in requests for t in r)
    # A long wait and a budget that only fills once every request is queued: they run as few large batches.
    server, address = serve(engine, max_wait_ms=2000, max_batch_tokens=total)
    barrier = threading.Barrier(len(requests))
    results: dict[int, list] = {}

    def client(i):
        with TeacherClient(address) as c:
            c.wait_ready(10)
            barrier.wait()
            results[i] = c.score_texts(requests[i], top_k=4 + i % 3)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, r in enumerate(requests):
        assert_same(results[i], engine.score_texts(r, top_k=4 + i % 3), exact=False)
    m = server.metrics
    batches, merged = m.value("batch_requests_count"), m.value("batch_requests_sum")
    assert merged == len(requests) and batches < len(requests)  # at least two requests shared an engine call
    assert m.value("requests_total", {"method": "Score", "code": "OK"}) == len(requests)
    assert m.value("tokens_scored_total") == total


def test_limits_and_bad_inputs_map_to_status_codes(engine, serve):
    server, address = serve(engine, max_texts=2, max_tokens=40, max_top_k=4)
    long_text = builtin_text(2000)

    def code_of(fn):
        with pytest.raises(TeacherRequestError) as err:
            fn()
        return err.value.code, err.value.index

    RES, INV = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT
    with TeacherClient(address) as c:
        assert code_of(lambda: c.score_texts(["a", "b", "c"], top_k=2)) == (RES, None)
        assert code_of(lambda: c.score_texts([long_text], top_k=2)) == (RES, None)
        assert code_of(lambda: c.tokenize(["a", "b", "c"])) == (RES, None)
        assert code_of(lambda: c.generate(np.arange(1, 30), 20)) == (RES, None)
        assert code_of(lambda: c.score_texts(["a"], top_k=5)) == (INV, None)
        assert code_of(lambda: c.score_texts(["a"], top_k=0)) == (INV, None)
        assert code_of(lambda: c.score_texts(["a"], top_k=2, temperature=0.0)) == (INV, None)
        assert code_of(lambda: c.score_texts(["ok", ""], top_k=2)) == (INV, 1)
        assert code_of(lambda: c.score_ids([np.array([1, 2]), np.array([3, 512])], top_k=2)) == (INV, 1)
        assert code_of(lambda: c.generate(np.array([1, 2]), 3, top_p=0.0)) == (INV, None)
        assert len(c.score_texts(["ok", "fine"], top_k=4)) == 2  # the server still serves
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.TeacherServiceStub(channel)
        bad = [
            pb.ScoreRequest(top_k=2),  # no input
            pb.ScoreRequest(texts=pb.Texts(texts=["a"]), top_k=2, logprob_dtype=pb.DTYPE_FLOAT64),
            pb.ScoreRequest(  # 3 bytes cannot be int32s
                token_ids=pb.TokenIdSequences(sequences=[pb.Array(data=b"abc", dtype=pb.DTYPE_INT32, shape=[1])]), top_k=2
            ),
        ]
        for request in bad:
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Score(request, timeout=30))
            assert err.value.code() == INV, request
    assert server.metrics.value("errors_total", {"method": "Score", "code": "RESOURCE_EXHAUSTED"}) == 2


class BrokenGenerate:
    """The hf engine, except that generate fails the way a bug would."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def generate(self, *args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")


def test_unexpected_errors_are_internal_and_logged(engine, serve, caplog):
    _, address = serve(BrokenGenerate(engine))
    with TeacherClient(address) as c, caplog.at_level(logging.ERROR, logger="fuseflow.teacher.server"):
        with pytest.raises(Exception) as err:
            c.generate(np.array([1, 2]), 2)
        assert c.score_texts(["still up"], top_k=1)[0].token_ids.size > 0
    assert err.value.code == grpc.StatusCode.INTERNAL and "device-side assert" in err.value.details
    assert any("Generate failed" in r.getMessage() and r.exc_info for r in caplog.records)


def health_status(address: str, service: str, credentials=None) -> int:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_bearer_token_guards_the_teacher_but_not_health(engine, serve):
    server, address = serve(engine, token="s3cret")
    for token in (None, "wrong"):
        with TeacherClient(address, token=token or "") as c:
            for call in (c.info, lambda: c.score_texts(["a b"], top_k=2), lambda: c.generate(np.array([1]), 1)):
                with pytest.raises(Exception) as err:
                    call()
                assert err.value.code == grpc.StatusCode.UNAUTHENTICATED, token
    with TeacherClient(address, token="s3cret") as c:
        assert c.info().vocab_size == 512
        assert len(c.score_texts(["a b"], top_k=2)) == 1
    assert health_status(address, "") == health_status(address, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    assert server.metrics.value("requests_total", {"method": "Score", "code": "UNAUTHENTICATED"}) == 2


def test_the_bearer_scheme_is_case_insensitive(engine, serve):
    """RFC 7235: ``authorization: bearer <token>`` is the same scheme as ``Bearer`` (issue 26); another scheme
    or a wrong token is still refused."""
    _, address = serve(engine, token="s3cret")
    with grpc.insecure_channel(address) as channel:
        info = channel.unary_unary(f"/{SERVICE_NAME}/Info", request_serializer=pb.InfoRequest.SerializeToString,
                                   response_deserializer=pb.InfoResponse.FromString)
        for header in ("bearer s3cret", "BEARER s3cret", "Bearer   s3cret"):
            assert info(pb.InfoRequest(), metadata=(("authorization", header),), timeout=10).vocab_size == 512
        for header in ("Basic s3cret", "bearer wrong", "s3cret", "bearer"):
            with pytest.raises(grpc.RpcError) as err:
                info(pb.InfoRequest(), metadata=(("authorization", header),), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, header


def self_signed_cert() -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_tls_with_a_self_signed_certificate(engine, serve, tmp_path, texts):
    cert, key = self_signed_cert()
    _, address = serve(engine, tls_cert=cert, tls_key=key, token="t")
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert)
    with TeacherClient(address, token="t", tls_ca=ca) as c:
        assert_same(c.score_texts(texts[:2], top_k=3), engine.score_texts(texts[:2], top_k=3))
    with TeacherClient(address, token="t", timeout_s=5) as plaintext:
        with pytest.raises(TeacherUnavailable):
            plaintext.info()
    creds = grpc.ssl_channel_credentials(root_certificates=cert)
    assert health_status(address, "", creds) == health_pb2.HealthCheckResponse.SERVING


def test_health_and_reflection(engine, serve):
    _, address = serve(engine)
    assert health_status(address, "") == health_pb2.HealthCheckResponse.SERVING
    assert health_status(address, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
        ]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b) for b in described.file_descriptor_response.file_descriptor_proto]
    services = {s.name: [m.name for m in s.method] for f in files for s in f.service}
    assert services["TeacherService"] == ["Info", "Tokenize", "Score", "Generate", "ScoreTails"]


class GatedEngine:
    """The hf engine whose scoring waits up to ``wait_s`` for ``gate`` (to hold requests in flight)."""

    def __init__(self, engine, wait_s: float = 30.0):
        self._engine = engine
        self.wait_s = wait_s
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def score_ids(self, *args, **kwargs):
        self.entered.set()
        self.gate.wait(self.wait_s)
        return self._engine.score_ids(*args, **kwargs)


def test_graceful_shutdown_finishes_the_request_in_flight(engine, serve, texts):
    gated = GatedEngine(engine)
    server, address = serve(gated)
    result = {}

    def in_flight():
        with TeacherClient(address) as c:
            result["scored"] = c.score_texts(texts[:3], top_k=4)

    thread = threading.Thread(target=in_flight)
    thread.start()
    assert gated.entered.wait(30)
    server.begin_drain()
    assert health_status(address, "") == health_status(address, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
    stopped = server.stop(grace=30)
    assert not stopped.is_set()
    gated.gate.set()
    thread.join(30)
    assert stopped.wait(30)
    assert_same(result["scored"], engine.score_texts(texts[:3], top_k=4))
    assert server.batcher.closed
    with TeacherClient(address, timeout_s=5) as c:
        with pytest.raises(TeacherUnavailable):
            c.info()


class CountingEngine:
    """The hf engine, counting the sequences each scoring call gets; each call takes at least 10 ms, so
    scoring every sequence takes far longer than a cancellation needs to arrive."""

    def __init__(self, engine):
        self._engine = engine
        self.calls: list[int] = []

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def score_ids(self, ids, *args, **kwargs):
        self.calls.append(len(ids))
        time.sleep(0.01)
        return self._engine.score_ids(ids, *args, **kwargs)


def test_a_cancelled_stream_stops_its_remaining_work(engine, serve, texts):
    counting = CountingEngine(engine)
    many = [t for t in texts if t] * 6  # 48 sequences
    server, address = serve(counting, max_batch_tokens=16)  # about one sequence per engine call
    with grpc.insecure_channel(address) as channel:
        stream = pb_grpc.TeacherServiceStub(channel).Score(pb.ScoreRequest(texts=pb.Texts(texts=many), top_k=2))
        next(stream)
        stream.cancel()
    # The queue empties when the request is dropped, or else once its last sequence went to the engine.
    deadline = time.monotonic() + 30
    while server.metrics.value("queue_depth") > 0 or not counting.calls:
        assert time.monotonic() < deadline, "the request never left the queue"
        time.sleep(0.01)
    assert sum(counting.calls) < len(many) // 2


def test_score_tails_over_grpc_and_the_fallback_for_engines_without_it(engine, serve, without_attribute):
    """ScoreTails returns the engine's tail logprobs; a server whose engine lacks it answers UNIMPLEMENTED
    and the client falls back to whole-sequence Score, with the same numbers."""
    rng = np.random.default_rng(5)
    context = rng.integers(5, 400, size=30)
    seqs = [np.concatenate([context, rng.integers(5, 400, size=n)]) for n in (2, 5)]
    starts = [30, 28]
    want = [s.gold_logprobs[start - 1 :] for s, start in zip(engine.score_ids(seqs, top_k=1), starts)]
    _, address = serve(engine)
    with TeacherClient(address) as client:
        got = client.score_tails(seqs, starts)
        assert not client._tails_unimplemented
    for g, w in zip(got, want):
        assert g.dtype == np.float32
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)

    _, address = serve(without_attribute(engine, "score_tails"))  # as a vllm engine
    with TeacherClient(address) as client:
        with pytest.raises(grpc.RpcError) as raw:  # what the server answers
            client._stub.ScoreTails(pb.ScoreTailsRequest(sequences=[encode_array(seqs[0], "<i4")], starts=[30]))
        assert raw.value.code() == grpc.StatusCode.UNIMPLEMENTED
        got = client.score_tails(seqs, starts)
        assert client._tails_unimplemented
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)

    _, address = serve(engine)
    with TeacherClient(address) as client, pytest.raises(TeacherRequestError, match="start must be in"):
        client.score_tails([seqs[0]], [0])
