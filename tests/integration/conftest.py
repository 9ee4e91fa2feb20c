"""Fixtures of the online-path integration tests; the helpers are in ``online_helpers.py``."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def redis_server():
    """A Redis-protocol server for the module (append-only file on: some tests restart it)."""
    from fuseflow.wire.redis_server import RedisServer, RedisServerError, find_server_binary

    try:
        find_server_binary()
    except RedisServerError as e:
        pytest.skip(str(e))
    with RedisServer(appendonly=True) as server:
        yield server
