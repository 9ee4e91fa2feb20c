"""Prometheus metrics of the Cool-Fusion gateway, served by the gateway itself at ``/metrics``.

Own ``CollectorRegistry`` per gateway (as :class:`fuseflow.teacher.metrics.TeacherMetrics`), so tests can run
several in one process. Useful queries: which source wins how often
``sum by (source) (rate(fuseflow_gateway_segment_wins_total[5m]))``; generation speed
``rate(fuseflow_gateway_completion_tokens_total[1m])``; mean latency per token
``rate(fuseflow_gateway_seconds_per_token_sum[5m]) / rate(fuseflow_gateway_seconds_per_token_count[5m])``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the app)

NAMESPACE = "fuseflow_gateway"

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        self.requests = Counter("requests", "HTTP requests by endpoint, model and status code",
                                ["endpoint", "model", "status"], namespace=ns, registry=r)
        self.latency = Histogram("request_latency_seconds", "request latency (streamed: until the last event)",
                                 ["endpoint", "model"], namespace=ns, registry=r, buckets=_LATENCY_BUCKETS)
        self.prompt_tokens = Counter("prompt_tokens", "prompt tokens (primary source's tokenizer)", ["model"],
                                     namespace=ns, registry=r)
        self.completion_tokens = Counter("completion_tokens", "generated tokens (primary source's tokenizer)",
                                         ["model"], namespace=ns, registry=r)
        self.seconds_per_token = Histogram("seconds_per_token", "decode time per generated token, per choice",
                                           ["model"], namespace=ns, registry=r, buckets=_PER_TOKEN_BUCKETS)
        self.segments = Counter("segments", "Cool-Fusion segments decoded", namespace=ns, registry=r)
        self.segment_wins = Counter("segment_wins", "Cool-Fusion segments won, by each source that proposed the winning text",
                                    ["source"], namespace=ns, registry=r)
        self.in_flight = Gauge("in_flight", "requests being decoded", namespace=ns, registry=r)
        self.waiting = Gauge("waiting", "requests waiting for a decoding slot", namespace=ns, registry=r)

    def observe_completion(self, model: str, completion) -> None:
        self.prompt_tokens.labels(model).inc(completion.prompt_tokens)
        self.completion_tokens.labels(model).inc(completion.completion_tokens)
        if completion.completion_tokens:
            self.seconds_per_token.labels(model).observe(completion.seconds / completion.completion_tokens)
        for segment in completion.segments:
            self.segments.inc()
            for source in segment.proposers:  # every source that proposed the winning text (issue 16)
                self.segment_wins.labels(source).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
