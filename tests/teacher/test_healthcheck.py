"""The healthcheck CLI against a real gRPC server carrying the standard health service."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fuseflow.teacher.healthcheck import main

SERVICE = "fuseflow.v1.TeacherService"


@pytest.fixture
def health_server():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("localhost:0")
    server.start()
    yield servicer, port
    server.stop(grace=None)


def test_serving_not_serving_and_unknown(health_server, capsys):
    servicer, port = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["--port", str(port)]) == 0
    assert main(["--port", str(port), "--service", SERVICE]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    assert main(["--port", str(port), "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_no_server_fails_fast(capsys):
    with socket_port() as port:
        pass  # closed again: nothing listens there
    assert main(["--port", str(port), "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err or "DEADLINE_EXCEEDED" in err


def test_port_from_environment_as_a_module(health_server, monkeypatch):
    servicer, port = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    env = {"FUSEFLOW_TEACHER_PORT": str(port), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, "-m", "fuseflow.teacher.healthcheck"]
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    done = subprocess.run(cmd, env=env, capture_output=True, timeout=60)
    assert done.returncode == 1


class socket_port:
    """A free TCP port on localhost (bound while inside the block)."""

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("localhost", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc):
        self.sock.close()
