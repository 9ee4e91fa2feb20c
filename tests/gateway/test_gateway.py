"""The OpenAI-compatible gateway in-process (FastAPI's TestClient) over tiny in-process sources: response
shapes, streaming, equality with the decoder called directly, errors in OpenAI's shape, metrics."""

from __future__ import annotations

import json

import pytest

from fuseflow.ensemble.config import EnsembleConfig
from fuseflow.ensemble.decoder import DecodeParams, generate_single
from fuseflow.gateway.server import EnsembleService, create_app
from fuseflow.ensemble.sources import chat_prompt, completion_prompt

PROMPT = "The value of the expression is"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def service(llama_source, gemma_source):
    cfg = EnsembleConfig(
        sources=[{"name": "llama", "model": "unused"}, {"name": "gemma", "model": "unused"}],
        decoding={"max_tokens_limit": 64},
    )
    return EnsembleService(cfg, [llama_source, gemma_source])


@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient

    with TestClient(create_app(service)) as c:
        yield c


def events(resp) -> list:
    assert resp.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in resp.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_models_and_health(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["cool-fusion", "llama", "gemma"]
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json()["sources"] == {"llama": "ok", "gemma": "ok"}


def test_completion_equals_the_decoder(client, service):
    body = {"model": "cool-fusion", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    expected = service.decoder.generate(completion_prompt(service.sources, PROMPT), DecodeParams(max_tokens=10))
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "cool-fusion"
    (choice,) = out["choices"]
    assert choice["text"] == expected.text and choice["finish_reason"] == expected.finish_reason
    assert choice["index"] == 0 and choice["logprobs"] is None and "fuseflow_trace" not in choice
    u = out["usage"]
    assert u["prompt_tokens"] == len(service.sources[0].tokenizer(PROMPT)["input_ids"])
    assert u["completion_tokens"] == expected.completion_tokens and u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_a_source_alone_is_served_under_its_name(client, gemma_source):
    r = client.post("/v1/completions", json={"model": "gemma", "prompt": PROMPT, "max_tokens": 10, "temperature": 0})
    expected = generate_single(gemma_source, PROMPT, True, DecodeParams(max_tokens=10))
    assert r.json()["choices"][0]["text"] == expected.text
    assert r.json()["usage"]["completion_tokens"] == expected.completion_tokens


def test_chat_completion_uses_each_sources_template(client, service):
    r = client.post("/v1/chat/completions", json={"model": "cool-fusion", "messages": MESSAGES, "max_tokens": 8,
                                                  "temperature": 0, "fuseflow_trace": True})
    assert r.status_code == 200, r.text
    out = r.json()
    expected = service.decoder.generate(chat_prompt(service.sources, MESSAGES), DecodeParams(max_tokens=8))
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    trace = choice["fuseflow_trace"]
    assert "".join(s["text"] for s in trace) == expected.text and all(s["winner"] in ("llama", "gemma") for s in trace)


def test_streamed_completion_concatenates_to_the_plain_one(client):
    body = {"model": "cool-fusion", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
    plain = client.post("/v1/completions", json=body).json()
    evs = events(client.post("/v1/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}))
    text_chunks = [e for e in evs if e["choices"]]
    assert all(e["object"] == "text_completion" for e in evs) and len({e["id"] for e in evs}) == 1
    assert "".join(e["choices"][0]["text"] for e in text_chunks) == plain["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert all(e["choices"][0]["finish_reason"] is None for e in text_chunks[:-1])
    assert evs[-1]["choices"] == [] and evs[-1]["usage"] == plain["usage"]
    assert len(text_chunks) > 2  # streamed segment by segment


def test_streamed_chat_opens_with_the_role(client):
    evs = events(client.post("/v1/chat/completions", json={"model": "llama", "messages": MESSAGES, "max_tokens": 6,
                                                           "temperature": 0, "stream": True}))
    assert evs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" and "usage" not in e for e in evs)
    assert evs[-1]["choices"][0]["finish_reason"] in ("stop", "length") and evs[-1]["choices"][0]["delta"] == {}


def test_n_choices_are_seeded(client):
    body = {"model": "cool-fusion", "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 5, "n": 2}
    first, second = client.post("/v1/completions", json=body).json(), client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1]
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 404, "model"),
        ("/v1/completions", {"model": "cool-fusion"}, 400, "prompt"),
        ("/v1/completions", {"model": "cool-fusion", "prompt": "x", "temperature": 3}, 400, "temperature"),
        ("/v1/completions", {"model": "cool-fusion", "prompt": "x", "logprobs": 2}, 400, "logprobs"),
        ("/v1/completions", {"model": "cool-fusion", "prompt": "x", "max_tokens": 65}, 400, "max_tokens"),
        ("/v1/completions", {"model": "cool-fusion", "prompt": "x", "stop": list("abcde")}, 400, "stop"),
        ("/v1/completions", {"model": "cool-fusion", "prompt": [1, 2, 3]}, 400, "prompt"),
        ("/v1/completions", {"model": "cool-fusion", "prompt": "word " * 2000}, 400, "prompt"),
        ("/v1/completions", {"model": "cool-fusion", "prompt": "x", "n": 9}, 400, "n"),
        ("/v1/completions", {"model": "cool-fusion", "prompt": "x", "presence_penalty": 1}, 400, "presence_penalty"),
        ("/v1/chat/completions", {"model": "cool-fusion", "messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"model": "llama", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         400, "messages[0].content"),
        ("/v1/chat/completions", {"model": "llama", "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "tools"),
    ],
)
def test_errors_have_openais_shape(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if status == 404:
        assert error["code"] == "model_not_found"


def test_metrics_count_requests_and_segment_wins(client):
    client.post("/v1/completions", json={"model": "cool-fusion", "prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    text = client.get("/metrics").text
    assert 'fuseflow_gateway_requests_total{endpoint="/v1/completions",model="cool-fusion",status="200"}' in text
    assert "fuseflow_gateway_segment_wins_total{source=" in text
    assert 'fuseflow_gateway_completion_tokens_total{model="cool-fusion"}' in text


def test_busy_gateway_answers_503_before_the_stream_opens(llama_source, gemma_source):
    """A streamed request that finds no free slot gets a plain 503 JSON error, not a 200 stream carrying one;
    a stream gives its slot back when it ends."""
    from fastapi.testclient import TestClient

    cfg = EnsembleConfig(
        sources=[{"name": "llama", "model": "unused"}, {"name": "gemma", "model": "unused"}],
        server={"max_concurrent": 1, "queue_timeout_s": 0.05},
    )
    busy = EnsembleService(cfg, [llama_source, gemma_source])
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with TestClient(create_app(busy)) as c:
        held = busy.slot().acquire()
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == "server_busy"
        held.release()
        for _ in range(2):  # the slot comes back after each stream
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200 and events(r)[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert busy._slots.acquire(timeout=0)
        busy._slots.release()
