"""Fixtures of the teacher's gRPC server tests (``test_grpc_server.py``, ``test_grpc_limits.py``): one engine and
one way to start a server, shared (issue 25: the fixture was copied between the two files)."""

from __future__ import annotations

import pytest

from fuseflow.score.engine import create_engine
from fuseflow.teacher.server import ServerOptions, build_server


@pytest.fixture(scope="module")
def engine(tiny_llama):
    """The tiny Llama on the hf engine, top-k up to 32."""
    return create_engine("hf", str(tiny_llama), max_top_k=32)


@pytest.fixture
def serve():
    """``serve(engine, **options) -> (server, address)``: a teacher server on a free localhost port with
    :class:`ServerOptions` ``options``; every server is stopped at teardown."""
    servers = []

    def start(engine, **options):
        server, port = build_server(engine, ServerOptions(host="127.0.0.1", port=0, **options))
        server.start()
        servers.append(server)
        return server, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(0).wait(10)
