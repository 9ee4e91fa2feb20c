"""``python -m fuseflow.teacher.healthcheck``: exit 0 if the teacher on this host answers SERVING, else 1.

For Docker's ``HEALTHCHECK`` and Kubernetes exec probes, which cannot speak gRPC themselves. It calls the
standard ``grpc.health.v1.Health/Check`` (https://github.com/grpc/grpc/blob/master/doc/health-checking.md)
that ``fuseflow teacher serve`` registers on its port: service "" for the server as a whole,
``fuseflow.v1.TeacherService`` for the scoring service. Prints one line saying why it failed.

Port: ``--port``, else ``$FUSEFLOW_TEACHER_PORT``, else 50051. A teacher served with TLS needs
``--tls-ca`` (and ``--tls-server-name`` when the certificate does not name localhost).
"""

from __future__ import annotations

import argparse
import os
import sys

DEFAULT_PORT = 50051


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fuseflow.teacher.healthcheck",
        description="Check a fuseflow teacher's gRPC health service; exit 0 when SERVING, 1 otherwise.",
    )
    p.add_argument("--host", default="localhost")
    p.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("FUSEFLOW_TEACHER_PORT", DEFAULT_PORT)),
        help="teacher gRPC port (default: $FUSEFLOW_TEACHER_PORT or 50051)",
    )
    p.add_argument("--service", default="", help='health service name ("" = the whole server)')
    p.add_argument("--timeout", type=float, default=3.0, help="seconds before the check counts as failed")
    p.add_argument("--tls-ca", default=None, help="PEM file of the CA that signed the teacher's certificate")
    p.add_argument("--tls-server-name", default=None, help="name the certificate was issued for")
    return p


def check(
    host: str,
    port: int,
    service: str = "",
    timeout: float = 3.0,
    tls_ca: str | None = None,
    tls_server_name: str | None = None,
) -> tuple[bool, str]:
    """Ask ``host:port`` for the health of ``service``; return (serving, a one-line reason)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    target = f"{host}:{port}"
    if tls_ca:
        with open(tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        options = [("grpc.ssl_target_name_override", tls_server_name)] if tls_server_name else []
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return False, f"{target}: {e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target} service {service!r}: {status}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ok, reason = check(args.host, args.port, args.service, args.timeout, args.tls_ca, args.tls_server_name)
    print(reason, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
