"""Session-scoped tiny models (random weights, own small tokenizers) shared by every test.

Two tokenizers that segment the same text differently — byte-level BPE (``Ġ``) and SentencePiece-style
Unigram (``▁``) — so alignment is exercised across real differences, as between SmolLM2 and Gemma-3.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FUSEFLOW_CACHE", "")  # replaced per session below
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["FUSEFLOW_CACHE"] = str(tmp_path_factory.mktemp("fuseflow-cache"))
    yield


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from fuseflow.models import make_tiny_tokenizer

    return make_tiny_tokenizer("bpe", 512)


@pytest.fixture(scope="session")
def spm_tokenizer():
    from fuseflow.models import make_tiny_tokenizer

    return make_tiny_tokenizer("spm", 640)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, bpe_tokenizer):
    """HF dir: Llama, hidden 32, 2 layers, byte-level BPE vocab 512 (the 'target' in most tests)."""
    from fuseflow.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer=bpe_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory, spm_tokenizer):
    """HF dir: Gemma-3 text, hidden 32, 2 layers, SentencePiece-style vocab 640."""
    from fuseflow.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-gemma"), "gemma3", tokenizer=spm_tokenizer, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory, bpe_tokenizer):
    """HF dir: Qwen2 (untied head) sharing the BPE tokenizer with ``tiny_llama``."""
    from fuseflow.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen"), "qwen2", tokenizer=bpe_tokenizer, seed=2)


def _redis_binary_or_skip() -> None:
    from fuseflow.wire.redis_server import RedisServerError, find_server_binary

    try:
        find_server_binary()
    except RedisServerError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def redis_server():
    """One Redis-protocol server (valkey/redis) for the session. Tests share it: each uses its own run name and
    none stops it; a test that stops, kills or restarts its server takes ``restartable_redis_server``."""
    from fuseflow.wire.redis_server import RedisServer

    _redis_binary_or_skip()
    with RedisServer(appendonly=False) as server:
        yield server


@pytest.fixture
def restartable_redis_server(tmp_path_factory):
    """A Redis-protocol server of this test alone, with the append-only file on (``appendfsync always``) and its
    data dir (``server.log`` too) kept under the test's tmp dirs: it survives ``stop()``/``kill()`` +
    ``start()``/``restart()``."""
    from fuseflow.wire.redis_server import RedisServer

    _redis_binary_or_skip()
    with RedisServer(data_dir=tmp_path_factory.mktemp("redis"), appendonly=True, appendfsync="always") as server:
        yield server


class _Without:
    """``obj`` with attribute ``name`` hidden (``hasattr`` is False), everything else delegated."""

    def __init__(self, obj, name: str):
        self._obj, self._hidden = obj, name

    def __getattr__(self, name):
        if name == self._hidden:
            raise AttributeError(name)
        return getattr(self._obj, name)


@pytest.fixture(scope="session")
def without_attribute():
    """``without_attribute(obj, name)``: ``obj`` as a caller sees one that lacks ``name`` (an engine without
    ``score_tails``, as vllm's)."""
    return _Without


@pytest.fixture(params=["inprocess", pytest.param("redis", marks=pytest.mark.integration)])
def make_transport(request):
    """``make_transport(teachers=None, window=64, run=None)``: a fresh transport of the parametrised kind, the
    in-process one or Redis streams on the session's server; ``teachers`` defaults to the test module's
    ``TEACHERS``. Every transport made is reset and closed at teardown."""
    import uuid

    from fuseflow.wire.inprocess import InProcessTransport

    made = []

    def make(teachers=None, window=64, run=None):
        teachers = request.module.TEACHERS if teachers is None else teachers
        if request.param == "inprocess":
            tr = InProcessTransport(run or "test", teachers, window=window)
        else:
            from fuseflow.wire.redis_streams import RedisTransport

            server = request.getfixturevalue("redis_server")
            tr = RedisTransport(server.url, run or f"t-{uuid.uuid4().hex[:8]}", teachers, window=window, poll_s=0.01)
        made.append(tr)
        return tr

    yield make
    for tr in made:
        if hasattr(tr, "reset"):
            tr.reset()
        tr.close()


# In-process engines over the session's tiny models, wrapped as Cool-Fusion sources (ensemble, gateway).


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models do microsecond-sized ops: on a shared CPU, torch's thread pool costs far more than it
    saves (measured: SDPA on [1, 4, 30, 8] takes 7 ms with 2 busy threads, 0.04 ms with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llama_engine(tiny_llama):
    from fuseflow.score.engine import create_engine

    return create_engine("hf", str(tiny_llama), name="llama")


@pytest.fixture(scope="session")
def gemma_engine(tiny_gemma):
    from fuseflow.score.engine import create_engine

    return create_engine("hf", str(tiny_gemma), name="gemma")


@pytest.fixture(scope="session")
def llama_source(llama_engine):
    from fuseflow.ensemble.sources import EnsembleSource

    return EnsembleSource.from_engine(llama_engine, name="llama")


@pytest.fixture(scope="session")
def gemma_source(gemma_engine):
    from fuseflow.ensemble.sources import EnsembleSource

    return EnsembleSource.from_engine(gemma_engine, name="gemma")


@pytest.fixture(scope="session")
def serve_app():
    """``with serve_app(app) as url``: an ASGI app on a real uvicorn server (port 0) in a thread, as
    ``fuseflow serve-ensemble`` runs the gateway; stopped on exit."""
    import contextlib
    import threading
    import time

    @contextlib.contextmanager
    def serve(app):
        import uvicorn

        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(10)

    return serve
