"""The gateway's API key (issue 26): ``Authorization: Bearer <key>`` on ``/v1/*`` (the scheme in any case), 401 in
OpenAI's error shape otherwise, ``/healthz`` and ``/metrics`` open; the key from env or a file, never argv;
127.0.0.1 by default and no open non-loopback start. Driven by the real ``openai`` client on a real server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from fuseflow.config import ConfigError
from fuseflow.ensemble.config import EnsembleConfig, ServerConfig
from fuseflow.gateway.server import (
    API_KEY_ENV,
    EnsembleService,
    check_exposure,
    create_app,
    is_loopback,
    read_api_key,
)

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def service(llama_source, gemma_source):
    cfg = EnsembleConfig(sources=[{"name": "llama", "model": "unused"}, {"name": "gemma", "model": "unused"}],
                         decoding={"max_tokens_limit": 16})
    return EnsembleService(cfg, [llama_source, gemma_source])


@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient

    with TestClient(create_app(service, api_key=KEY)) as c:
        yield c


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": KEY}])
@pytest.mark.parametrize("path", ["/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/nonexistent"])
def test_v1_without_the_key_is_401_in_openais_error_shape(client, path, headers):
    if path.endswith("models"):
        r = client.get(path, headers=headers)
    else:
        r = client.post(path, headers=headers, json={"model": "cool-fusion", "prompt": "x", "max_tokens": 1})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_api_key"
    expected = "invalid API key" if headers.get("Authorization", "").startswith("Bearer") else "missing API key"
    assert error["message"].startswith(expected)
    assert KEY not in r.text


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_key_in_any_case_of_the_scheme(client, scheme):
    r = client.get("/v1/models", headers={"Authorization": f"{scheme} {KEY}"})
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["cool-fusion", "llama", "gemma"]


def test_health_and_metrics_stay_open(client):
    assert client.get("/healthz").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and 'status="401"' in metrics.text  # refused requests are counted


def test_the_key_comes_from_the_file_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert read_api_key(ServerConfig()) is None
    monkeypatch.setenv(API_KEY_ENV, " from-env\n")
    assert read_api_key(ServerConfig()) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert read_api_key(ServerConfig(api_key_file=str(tmp_path / "key"))) == "from-file"  # the file wins
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match=r"server.api_key_file \(--api-key-file\) .*empty is empty"):
        read_api_key(ServerConfig(api_key_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match=r"cannot read server.api_key_file \(--api-key-file\) .*missing"):
        read_api_key(ServerConfig(api_key_file=str(tmp_path / "missing")))


def test_loopback_by_default_and_no_open_gateway_on_other_addresses():
    assert ServerConfig().host == "127.0.0.1"
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert is_loopback(host)
        check_exposure(ServerConfig(host=host), None)
    for host in ("0.0.0.0", "::", "10.0.0.5", "gateway.example"):
        assert not is_loopback(host)
        with pytest.raises(ConfigError, match=f"set env {API_KEY_ENV} or server.api_key_file .*--allow-unauthenticated"):
            check_exposure(ServerConfig(host=host), None)
        check_exposure(ServerConfig(host=host), "a key")
        check_exposure(ServerConfig(host=host, allow_unauthenticated=True), None)


def test_the_cli_refuses_an_open_exposed_gateway_and_a_key_in_argv(tmp_path, monkeypatch, capsys):
    """Both before any source is loaded (the config names a teacher address nobody serves)."""
    from fuseflow.cli import main

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    cfg = tmp_path / "ensemble.yaml"
    cfg.write_text("sources: [{name: a, address: '127.0.0.1:1'}]\n")
    assert main(["serve-ensemble", str(cfg), "--host", "0.0.0.0"]) == 2
    assert "has no API key: set env FUSEFLOW_GATEWAY_API_KEY" in capsys.readouterr().err
    for argv in (["--api-key", "sekrit"], ["--api-key=sekrit"]):
        with pytest.raises(SystemExit) as e:
            main(["serve-ensemble", str(cfg), *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "never given on the command line" in err and "sekrit" not in err


@pytest.fixture(scope="module")
def served(service, serve_app):
    """The app with a key on a real uvicorn server (port 0), as ``fuseflow serve-ensemble`` runs it."""
    with serve_app(create_app(service, api_key=KEY)) as url:
        yield url


def test_the_openai_client_with_the_right_key_and_without(served):
    openai = pytest.importorskip("openai")

    def client(key):
        return openai.OpenAI(base_url=served + "/v1", api_key=key, max_retries=0, timeout=60)

    ok = client(KEY)
    assert [m.id for m in ok.models.list()] == ["cool-fusion", "llama", "gemma"]
    done = ok.completions.create(model="cool-fusion", prompt="The value of", max_tokens=3, temperature=0)
    assert done.choices[0].finish_reason in ("length", "stop")
    chat = ok.chat.completions.create(model="llama", messages=[{"role": "user", "content": "2 + 3?"}], max_tokens=2)
    assert chat.choices[0].message.role == "assistant"
    with pytest.raises(openai.AuthenticationError) as e:
        client("wrong").completions.create(model="cool-fusion", prompt="x", max_tokens=1)
    assert e.value.status_code == 401 and e.value.body["message"] == "invalid API key"
    assert e.value.body["code"] == "invalid_api_key" and e.value.body["type"] == "invalid_request_error"
    # No key at all (the openai client always sends one): a bare HTTP request.
    request = urllib.request.Request(served + "/v1/models")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 401
    assert json.loads(e.value.read())["error"]["message"].startswith("missing API key")
    with urllib.request.urlopen(served + "/healthz", timeout=30) as r:
        assert r.status == 200
