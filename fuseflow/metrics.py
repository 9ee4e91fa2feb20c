"""The exposition half every service's Prometheus metrics share: an own ``CollectorRegistry`` (not the
process-global one, so several servers run in one process in tests and benchmarks), reading a sample back,
and a ``/metrics`` HTTP endpoint on a port of its own. Each service declares its metrics in a subclass
(``fuseflow.teacher.metrics``, ``fuseflow.trainer.metrics``)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, start_http_server


class MetricsEndpoint:
    namespace: str = "fuseflow"
    flag: str = "--metrics-port"  # named in the error when the port is taken

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self._http = None
        self._lock = threading.Lock()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """Current value of a sample (``requests_total``, ``loss`` with ``{"part": "kl"}`` …), 0 if never set."""
        v = self.registry.get_sample_value(f"{self.namespace}_{name}", labels or {})
        return 0.0 if v is None else float(v)

    def start_http(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) in a daemon thread; returns the port."""
        with self._lock:
            if self._http is not None:
                raise RuntimeError("metrics HTTP server already started")
            try:
                server, _thread = start_http_server(port, addr=host, registry=self.registry)
            except OSError as e:
                raise OSError(f"cannot serve metrics on {host}:{port} ({e}); set {self.flag}") from e
            self._http = server
            return int(server.server_port)

    def stop_http(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
                self._http = None
