"""End to end: two tiny models served as real gRPC teachers (``build_server``, one behind a bearer token),
the Cool-Fusion gateway over them on a real uvicorn server, driven by the ``openai`` Python package —
completions, chat, streaming, errors — and compared with the same engines decoded in-process."""

from __future__ import annotations


import pytest

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")

PROMPT = "The value of the expression is"
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared CPU: the thread pool costs more than it saves
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engines(tiny_llama, tiny_gemma):
    from fuseflow.score.engine import create_engine

    return {"llama": create_engine("hf", str(tiny_llama), name="llama"),
            "gemma": create_engine("hf", str(tiny_gemma), name="gemma")}


@pytest.fixture(scope="module")
def teachers(engines):
    from fuseflow.teacher.server import ServerOptions, build_server

    servers, addresses = [], {}
    for name, engine in engines.items():
        token = "s3cret" if name == "gemma" else None
        server, port = build_server(engine, ServerOptions(host="127.0.0.1", port=0, token=token))
        server.start()
        servers.append(server)
        addresses[name] = f"127.0.0.1:{port}"
    yield addresses
    for server in servers:
        server.stop(grace=1.0).wait(10)


@pytest.fixture(scope="module")
def gateway(teachers, tiny_llama, tiny_gemma, tmp_path_factory, serve_app):
    from fuseflow.ensemble.config import build_sources, load_ensemble_config
    from fuseflow.gateway.server import EnsembleService, create_app

    tmp = tmp_path_factory.mktemp("gateway")
    (tmp / "token").write_text("s3cret\n")
    cfg_path = tmp / "ensemble.yaml"
    cfg_path.write_text(
        "sources:\n"
        f"  - {{name: llama, address: '{teachers['llama']}', tokenizer: '{tiny_llama}'}}\n"
        f"  - {{name: gemma, address: '{teachers['gemma']}', tokenizer: '{tiny_gemma}', token_file: '{tmp / 'token'}'}}\n"
        "server: {host: 127.0.0.1, port: 0}\n"
    )
    cfg = load_ensemble_config(cfg_path)
    service = EnsembleService(cfg, build_sources(cfg))
    with serve_app(create_app(service)) as url:
        yield url, service
    service.close()


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=gateway[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local_decoder(engines):
    from fuseflow.ensemble.decoder import CoolFusionDecoder
    from fuseflow.ensemble.sources import EnsembleSource

    return CoolFusionDecoder([EnsembleSource.from_engine(engines["llama"], "llama"),
                              EnsembleSource.from_engine(engines["gemma"], "gemma")])


def test_sources_are_remote_and_called_in_parallel(gateway):
    service = gateway[1]
    assert all(s.remote for s in service.sources) and service.decoder.parallel


def test_models_list(client):
    assert [m.id for m in client.models.list()] == ["cool-fusion", "llama", "gemma"]


def test_completion_over_grpc_equals_in_process(client, local_decoder):
    from fuseflow.ensemble.decoder import DecodeParams
    from fuseflow.ensemble.sources import completion_prompt

    r = client.completions.create(model="cool-fusion", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"fuseflow_trace": True})
    local = local_decoder.generate(completion_prompt(local_decoder.sources, PROMPT), DecodeParams(max_tokens=12))
    assert r.choices[0].text == local.text and r.choices[0].finish_reason == local.finish_reason
    assert r.usage.completion_tokens == local.completion_tokens
    trace = r.choices[0].model_extra["fuseflow_trace"]
    assert [s["winner"] for s in trace] == [s.winner for s in local.segments]


def test_streamed_completion(client):
    plain = client.completions.create(model="cool-fusion", prompt=PROMPT, max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model="cool-fusion", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_chat_and_streamed_chat(client):
    plain = client.chat.completions.create(model="cool-fusion", messages=MESSAGES, max_tokens=8, temperature=0)
    assert plain.choices[0].message.role == "assistant" and plain.usage.total_tokens > 0
    stream = client.chat.completions.create(model="cool-fusion", messages=MESSAGES, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_single_source_over_grpc(client, engines):
    from fuseflow.ensemble.decoder import DecodeParams, generate_single
    from fuseflow.ensemble.sources import EnsembleSource

    r = client.completions.create(model="gemma", prompt=PROMPT, max_tokens=10, temperature=0)
    local = generate_single(EnsembleSource.from_engine(engines["gemma"], "gemma"), PROMPT, True, DecodeParams(max_tokens=10))
    assert r.choices[0].text == local.text


def test_errors_reach_the_client_as_openai_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="cool-fusion", prompt=PROMPT, max_tokens=2, logprobs=2)
    assert e.value.body["param"] == "logprobs"


def test_health(gateway):
    import urllib.request

    with urllib.request.urlopen(gateway[0] + "/healthz", timeout=10) as r:
        assert r.status == 200
