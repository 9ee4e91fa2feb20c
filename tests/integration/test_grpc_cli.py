"""``fuseflow query`` against a real server, and ``fuseflow teacher serve``'s main in this process."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import urllib.request

import numpy as np
import pytest
import yaml

from fuseflow.cli import main as cli_main
from fuseflow.teacher import serve as serve_cli
from fuseflow.score.engine import create_engine
from fuseflow.teacher.server import ServerOptions, build_server
from fuseflow.wire.client import TeacherClient

pytestmark = pytest.mark.integration

TEXT = "def f(x): return x + 1"


@pytest.fixture(autouse=True)
def keep_logging():
    """serve's main sets up logging for the process (a handler on the captured stderr): undo it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return create_engine("hf", str(tiny_llama))


@pytest.fixture(scope="module")
def address(engine):
    server, port = build_server(engine, ServerOptions(host="127.0.0.1", port=0, token="tok", max_top_k=8))
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait(10)


@pytest.fixture
def run(capsys, monkeypatch, address):
    """``run(*args) -> (exit code, stdout, stderr)`` of ``fuseflow query --address <server> args``."""
    monkeypatch.setenv("FUSEFLOW_TEACHER_TOKEN", "tok")

    def call(*args, addr=address):
        code = cli_main(["query", "--address", addr, *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_info(run, engine):
    code, out, _ = run("info")
    assert code == 0 and "vocab_size  512" in out and "engine      hf" in out
    code, out, _ = run("info", "--json")
    info = json.loads(out)
    assert code == 0 and info["vocab_size"] == 512 and info["max_top_k"] == 8 and info["max_length"] == engine.max_length


def test_tokenize(run, engine):
    code, out, _ = run("tokenize", TEXT, "--json")
    rows = json.loads(out)["tokens"]
    enc = engine.tokenizer(TEXT, return_offsets_mapping=True)
    assert code == 0 and [r["id"] for r in rows] == enc["input_ids"] and [r["token"] for r in rows] == enc.tokens()
    assert "".join(r["text"] for r in rows) == TEXT
    code, table, _ = run("tokenize", TEXT)
    lines = table.strip().splitlines()
    assert code == 0 and lines[0].split() == ["pos", "id", "token", "span", "text"] and len(lines) == len(rows) + 1


def test_score_json_is_the_engines_scores(run, engine):
    code, out, _ = run("score", TEXT, "--top-k", "3", "--json")
    assert code == 0
    got = json.loads(out)
    (ref,) = engine.score_texts([TEXT], top_k=3)
    tokens = engine.tokenizer.convert_ids_to_tokens
    assert len(got["positions"]) == len(ref.gold_logprobs) and got["tokens"] == len(ref.token_ids)
    assert got["nll"] == pytest.approx(ref.nll, rel=1e-6)
    for t, p in enumerate(got["positions"]):
        assert p["position"] == t + 1 and p["id"] == int(ref.token_ids[t + 1]) and p["token"] == tokens([p["id"]])[0]
        assert p["logprob"] == float(ref.gold_logprobs[t])
        assert [a["id"] for a in p["top_k"]] == ref.topk_ids[t].tolist()
        assert [a["logprob"] for a in p["top_k"]] == ref.topk_logprobs[t].tolist()
        assert [a["token"] for a in p["top_k"]] == tokens(ref.topk_ids[t].tolist())
        in_top = ref.topk_ids[t].tolist()
        assert p["rank"] == (in_top.index(p["id"]) + 1 if p["id"] in in_top else None)


def test_score_table(run, engine):
    code, out, _ = run("score", TEXT, "--top-k", "2")
    (ref,) = engine.score_texts([TEXT], top_k=2)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].split()[:4] == ["pos", "token", "logprob", "rank"]
    rows = lines[1:-1]
    assert len(rows) == len(ref.gold_logprobs)
    for t, row in enumerate(rows):
        token = json.dumps(engine.tokenizer.convert_ids_to_tokens(int(ref.token_ids[t + 1])), ensure_ascii=False)
        assert row.split()[0] == str(t + 1) and token in row and f"{ref.gold_logprobs[t]:.3f}" in row
        alt = json.dumps(engine.tokenizer.convert_ids_to_tokens(int(ref.topk_ids[t, 0])), ensure_ascii=False)
        assert f"{alt} ({ref.topk_logprobs[t, 0]:.3f})" in row
    assert lines[-1].startswith(f"{len(ref.token_ids)} tokens, NLL {ref.nll:.3f} nats")


def test_generate(run, engine):
    code, out, _ = run("generate", "Once upon", "--max-new-tokens", "5", "--json")
    got = json.loads(out)
    prompt = np.asarray(engine.tokenizer("Once upon")["input_ids"])
    ref = engine.generate(prompt, 5)
    assert code == 0 and [t["id"] for t in got["tokens"]] == ref.token_ids.tolist()
    # to fp32 rounding: a generation that reuses the engine's prefix KV cache rounds differently than a full run
    np.testing.assert_allclose([t["logprob"] for t in got["tokens"]], ref.logprobs, atol=1e-5, rtol=0)
    assert got["text"] == engine.tokenizer.decode(ref.token_ids.tolist()) and got["finish_reason"] == "length"
    code, out, _ = run("generate", "Once upon", "--max-new-tokens", "3")
    assert code == 0 and "finish_reason: length" in out and len(out.strip().splitlines()) == 1 + 3 + 2


def test_errors_are_one_line_without_traceback(run, monkeypatch):
    code, _, err = run("score", TEXT, "--top-k", "9")
    assert code == 1 and "INVALID_ARGUMENT" in err and "max_top_k 8" in err and "Traceback" not in err
    monkeypatch.delenv("FUSEFLOW_TEACHER_TOKEN")
    code, _, err = run("info")
    assert code == 1 and "UNAUTHENTICATED" in err and "Traceback" not in err
    code, _, err = run("--connect-timeout", "0.5", "info", addr=f"127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach the teacher" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------
# fuseflow teacher serve
# ----------------------------------------------------------------------------------------------------------


def serve_in_this_process(argv: list[str], port: int, probe) -> int:
    """Run ``fuseflow teacher serve argv`` on this (main) thread; ``probe(client)`` runs on another once the
    server answers, then SIGTERM asks the server to drain. Returns the exit code."""
    failure = []

    def run_probe():
        try:
            with TeacherClient(f"127.0.0.1:{port}", token=os.environ.get("PROBE_TOKEN")) as c:
                c.wait_ready(60)
                probe(c)
        except BaseException as e:  # reported by the test, after the server has stopped
            failure.append(e)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    prober = threading.Thread(target=run_probe)
    prober.start()
    code = cli_main(["teacher", "serve", *argv])
    prober.join(60)
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    if failure:
        raise failure[0]
    return code


def test_serve_main_serves_until_sigterm_then_drains(tiny_llama, tmp_path, monkeypatch):
    port, metrics_port = free_port(), free_port()
    (tmp_path / "token").write_text("abc\n")
    monkeypatch.delenv("FUSEFLOW_TEACHER_TOKEN", raising=False)
    monkeypatch.setenv("PROBE_TOKEN", "abc")
    seen = {}

    def probe(c):
        seen["info"] = c.info()
        seen["scored"] = c.score_texts([TEXT], top_k=2)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            seen["metrics"] = r.read().decode()

    code = serve_in_this_process([
        "--model", str(tiny_llama), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
        "--metrics-port", str(metrics_port), "--token-file", str(tmp_path / "token"), "--grace-s", "5",
    ], port, probe)
    assert code == 0
    assert seen["info"].vocab_size == 512 and seen["info"].model == str(tiny_llama)
    assert len(seen["scored"][0].gold_logprobs) == len(seen["scored"][0].token_ids) - 1
    assert 'fuseflow_teacher_requests_total{code="OK",method="Score"} 1.0' in seen["metrics"]


def test_serve_with_redis_is_also_the_runs_worker(tiny_llama, tmp_path, monkeypatch, redis_server):
    from fuseflow.models import load_tokenizer
    from fuseflow.sparse import Sample
    from fuseflow.score.aligner import TeacherAligner
    from fuseflow.wire.redis_streams import RedisTransport

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "demo"), "target": {"model": str(tiny_llama)},
        "sources": [{"name": "llama", "model": str(tiny_llama)}],
        "align": {"vocab_map": "exact"}, "fusion": {"top_k": 4},
    }))
    samples = [Sample(f"s{i}", text) for i, text in enumerate(["def f(x):", "return x + 1", "print('hello')"])]
    port = free_port()
    monkeypatch.delenv("PROBE_TOKEN", raising=False)
    monkeypatch.delenv("FUSEFLOW_TEACHER_TOKEN", raising=False)
    seen = {}

    def probe(c):
        with RedisTransport(redis_server.url, "demo", teachers=["llama"]) as dispatcher:
            dispatcher.submit(samples)
            ready = []
            while len(ready) < len(samples):
                ready += dispatcher.next_ready("rank0", count=8, block_ms=30_000)
            dispatcher.ack_ready(ready)
        seen["ready"] = {r.sample.id: r.dists["llama"] for r in ready}
        seen["scored"] = c.score_texts([TEXT], top_k=2)  # gRPC clients share the engine meanwhile

    code = serve_in_this_process([
        "--config", str(config), "--source", "llama", "--redis", redis_server.url, "--host", "127.0.0.1",
        "--port", str(port), "--metrics-port", str(free_port()), "--grace-s", "5",
    ], port, probe)
    assert code == 0 and sorted(seen["ready"]) == ["s0", "s1", "s2"]
    tok = load_tokenizer(tiny_llama)
    reference = TeacherAligner("llama", create_engine("hf", str(tiny_llama)), tok, vocab_map_method="exact", top_k=4)
    for sample, want in zip(samples, reference.run(samples)):
        got = seen["ready"][sample.id]
        np.testing.assert_array_equal(got.ids, want.dist.ids)
        np.testing.assert_array_equal(got.aligned, want.dist.aligned)
        np.testing.assert_array_equal(got.logprobs, want.dist.logprobs.astype(np.float16).astype(np.float32))


def write_config(path, tiny_llama, tiny_gemma) -> str:
    cfg = {
        "run_dir": str(path / "runs" / "demo"),
        "target": {"model": str(tiny_llama)},
        "sources": [
            {"name": "gemma", "model": str(tiny_gemma), "batch_tokens": 1024, "max_length": 256,
             "engine_options": {"head_method": "torch", "pack": False}},
            {"name": "llama", "model": str(tiny_llama)},
        ],
    }
    out = path / "run.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return str(out)


def test_config_source_sets_the_engine_options(tiny_llama, tiny_gemma, tmp_path):
    config = write_config(tmp_path, tiny_llama, tiny_gemma)
    args = serve_cli.build_parser().parse_args(["--config", config, "--source", "gemma", "--max-top-k", "16"])
    spec = serve_cli.resolve_spec(args)
    assert (spec.name, spec.kind, spec.model) == ("gemma", "hf", str(tiny_gemma))
    assert spec.options == {
        "dtype": "float32", "max_batch_tokens": 1024, "head_chunk_tokens": 1024, "max_top_k": 16,
        "name": "gemma", "max_length": 256, "device": "cpu", "head_method": "torch", "pack": False,
    }
    assert spec.serve.max_top_k == 16 and spec.serve.port == 50051
    # --engine serves the source on another engine: its options are that engine's (checked at config load).
    args = serve_cli.build_parser().parse_args(["--config", config, "--source", "llama", "--engine", "vllm"])
    spec = serve_cli.resolve_spec(args)
    assert (spec.name, spec.kind, spec.model) == ("llama", "vllm", str(tiny_llama))
    assert spec.source.engine == "vllm" and "device" not in spec.options and "head_method" not in spec.options
    assert [s.engine for s in spec.config.sources] == ["hf", "vllm"]  # the other source keeps its own
    # Standalone (no run config): flags and overrides set the serve section alone.
    args = serve_cli.build_parser().parse_intermixed_args(["--model", "m", "--device", "cpu", "serve.port=0",
                                                           "--max-texts", "4"])
    spec = serve_cli.resolve_spec(args)
    assert (spec.serve.port, spec.serve.max_texts, spec.options["device"]) == (0, 4, "cpu")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--source", "nope"], "--source 'nope' is not in"),
        ([], "--source is required"),
        (["--source", "gemma", "--model", "x"], "either --config"),
        (["--source", "gemma", "--tls-cert", "c.pem"], "TLS needs both serve.tls_cert and serve.tls_key"),
        (["--source", "gemma", "--token-file", "/nonexistent/token"], "cannot read serve.token_file (--token-file)"),
        (["--source", "gemma", "--port", "http"], "serve.port (--port): Input should be a valid integer"),
        # A bare --redis takes the next word when it is not a flag: named as what it is, not used as a URL.
        (["--source", "gemma", "--redis", "serve.port=1"], "online.redis (--redis): not a Redis URL"),
        (["--source", "gemma", "serve.worker=true"], "serve.worker (--redis) needs a Redis URL"),
        # gemma's engine_options are the hf engine's: on vllm they are errors, named as in the file
        (["--source", "gemma", "--engine", "vllm"], "--engine vllm: "),
        (["--source", "gemma", "--engine", "vllm"], "sources[0].engine_options.head_method: unknown field"),
    ],
)
def test_serve_usage_errors_exit_2_before_loading(tiny_llama, tiny_gemma, tmp_path, capsys, monkeypatch, argv,
                                                  message):
    monkeypatch.delenv("FUSEFLOW_REDIS_URL", raising=False)
    config = write_config(tmp_path, tiny_llama, tiny_gemma)
    code = cli_main(["teacher", "serve", "--config", config, *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_serve_help_names_the_command(capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(["teacher", "serve", "--help"])
    assert done.value.code == 0 and "usage: fuseflow teacher serve" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["query", "--help"])
    assert "usage: fuseflow query" in capsys.readouterr().out
