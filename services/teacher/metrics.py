"""Prometheus metrics of one teacher process: its gRPC server, its request batcher and its Redis worker.

Each :class:`TeacherMetrics` owns its own ``CollectorRegistry`` (not the process-global one), so several
servers can run in one process (tests, benchmarks) without colliding names, and serves it on its own HTTP
port (``--metrics-port``, 9400 by default) at ``/metrics``.

Useful queries: tokens/s ``rate(fuseflow_teacher_tokens_scored_total[1m])``; error ratio
``sum(rate(fuseflow_teacher_requests_total{code!="OK"}[5m])) / sum(rate(fuseflow_teacher_requests_total[5m]))``;
mean merge factor ``rate(fuseflow_teacher_batch_requests_sum[5m]) / rate(fuseflow_teacher_batch_requests_count[5m])``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from fuseflow.metrics import MetricsEndpoint

NAMESPACE = "fuseflow_teacher"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


class TeacherMetrics(MetricsEndpoint):
    """The teacher's metrics and the hooks that update them (server, batcher, worker)."""

    namespace = NAMESPACE

    def __init__(self, registry: CollectorRegistry | None = None):
        super().__init__(registry)
        r, ns = self.registry, NAMESPACE
        self.requests = Counter("requests", "gRPC requests finished, by method and status code",
                                ["method", "code"], namespace=ns, registry=r)
        self.errors = Counter("errors", "gRPC requests that ended with a status other than OK",
                              ["method", "code"], namespace=ns, registry=r)
        self.request_latency = Histogram("request_latency_seconds", "gRPC request latency, queueing included",
                                         ["method"], namespace=ns, registry=r, buckets=_LATENCY_BUCKETS)
        self.tokens_scored = Counter("tokens_scored", "tokens scored by the engine (rate = tokens/s)",
                                     namespace=ns, registry=r)
        self.sequences_scored = Counter("sequences_scored", "sequences scored by the engine", namespace=ns, registry=r)
        self.batch_requests = Histogram("batch_requests", "requests merged into one engine call",
                                        namespace=ns, registry=r, buckets=_COUNT_BUCKETS)
        self.batch_sequences = Histogram("batch_sequences", "sequences per engine call",
                                         namespace=ns, registry=r, buckets=_COUNT_BUCKETS)
        self.batch_tokens = Histogram("batch_tokens", "tokens per engine call", namespace=ns, registry=r,
                                      buckets=_TOKEN_BUCKETS)
        self.engine_seconds = Histogram("engine_call_seconds", "time of one engine call (score batch or generate)",
                                        namespace=ns, registry=r, buckets=_LATENCY_BUCKETS)
        self.queue_depth = Gauge("queue_depth", "requests waiting for the engine thread", namespace=ns, registry=r)
        # Redis worker (knowledge fusion): samples taken from the run's work stream.
        self.worker_samples = Counter("worker_samples", "samples the Redis worker finished, by outcome (ok, error)",
                                      ["outcome"], namespace=ns, registry=r)
        self.worker_tokens = Counter("worker_tokens", "source tokens the Redis worker scored", namespace=ns, registry=r)
        self.worker_lag = Gauge("worker_lag", "work entries not yet delivered to this teacher's consumer group",
                                namespace=ns, registry=r)
        self.worker_pending = Gauge("worker_pending", "work entries delivered to this teacher but not completed",
                                    namespace=ns, registry=r)

    # -- gRPC server ---------------------------------------------------------------------------------------

    def observe_request(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        if code != "OK":
            self.errors.labels(method, code).inc()
        self.request_latency.labels(method).observe(seconds)

    # -- request batcher (fuseflow.teacher.request_batcher.BatchObserver) -------------------------------------

    def observe_batch(self, requests: int, sequences: int, tokens: int, seconds: float) -> None:
        self.batch_requests.observe(requests)
        self.batch_sequences.observe(sequences)
        self.batch_tokens.observe(tokens)
        self.engine_seconds.observe(seconds)
        self.tokens_scored.inc(tokens)
        self.sequences_scored.inc(sequences)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    # -- Redis worker ----------------------------------------------------------------------------------------

    def worker_processed(self, ok: int = 0, failed: int = 0, tokens: int = 0) -> None:
        """``ok`` samples answered, ``failed`` dead-lettered, ``tokens`` source tokens scored for them."""
        if ok:
            self.worker_samples.labels("ok").inc(ok)
        if failed:
            self.worker_samples.labels("error").inc(failed)
        if tokens:
            self.worker_tokens.inc(tokens)

    def set_worker_lag(self, lag: int | None, pending: int | None = None) -> None:
        """The teacher's ``lag``/``pending`` from ``Transport.stats()["teachers"][name]`` (None: unknown)."""
        if lag is not None:
            self.worker_lag.set(lag)
        if pending is not None:
            self.worker_pending.set(pending)

    # -- exposition: fuseflow.metrics.MetricsEndpoint (value, start_http, stop_http) ------------------------------------------------------------------------------------------

