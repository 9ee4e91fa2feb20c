"""Prometheus metrics of the online trainer, served by rank 0 on ``--metrics-port`` (9401) at ``/metrics``.

Own ``CollectorRegistry`` (not the process-global one), as ``fuseflow.teacher.metrics``, so tests and several
trainers in one process do not collide. Samples and tokens count every rank (the lockstep all-reduce of the
online feed carries them); loss parts and per-teacher CE are rank 0's window means, as ``metrics.jsonl``.

Useful queries: tokens/s ``rate(fuseflow_trainer_tokens_total[1m])``; samples waiting for the trainer
``fuseflow_trainer_queue_ready``; a teacher falling behind ``fuseflow_trainer_teacher_lag{teacher="…"}``.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge

from fuseflow.metrics import MetricsEndpoint
from fuseflow.wire.transport import TransportUnavailable

log = logging.getLogger(__name__)

NAMESPACE = "fuseflow_trainer"
LOSS_PARTS = ("loss", "clm", "kl")


class TrainerMetrics(MetricsEndpoint):
    """The trainer's metrics and the hooks that update them (online feed, training loop, queue poller)."""

    namespace = NAMESPACE
    flag = "--metrics-port (0 turns the endpoint off)"

    def __init__(self, teachers: list[str] | tuple[str, ...] = (), registry: CollectorRegistry | None = None):
        super().__init__(registry)
        r, ns = self.registry, NAMESPACE
        self.step = Gauge("step", "optimizer steps done (resumed runs continue from the checkpoint)",
                          namespace=ns, registry=r)
        self.samples = Counter("samples", "samples trained, all ranks", namespace=ns, registry=r)
        self.tokens = Counter("tokens", "target positions trained, all ranks (rate = tokens/s)",
                              namespace=ns, registry=r)
        self.loss = Gauge("loss", "loss parts, mean over the last log window (rank 0)", ["part"],
                          namespace=ns, registry=r)
        self.teacher_ce = Gauge("teacher_ce", "teacher's cross-entropy of the gold text, last log window (rank 0)",
                                ["teacher"], namespace=ns, registry=r)
        # Fidelity of each teacher's aligned rows and its share of the samples under the fusion (issue 21).
        self.teacher_fidelity = Gauge(
            "teacher_fidelity", "a teacher's aligned rows, last log window (rank 0): coverage (share of target "
            "positions with a teacher row), miss_rate (rows without the gold token), p_gold (mean p(gold) of its "
            "rows)", ["teacher", "measure"], namespace=ns, registry=r)
        self.teacher_chosen = Gauge("teacher_chosen", "a teacher's share of the samples of a corpus under the fusion "
                                    "(MinCE: how often it is picked), last log window (rank 0)", ["teacher", "corpus"],
                                    namespace=ns, registry=r)
        self.lr = Gauge("learning_rate", "learning rate after the last step", namespace=ns, registry=r)
        # Queue (Transport.stats()).
        self.queue = Gauge("queue", "run-wide queue counters: submitted, done, in_flight, window, ready, work, "
                           "dead_letters", ["kind"], namespace=ns, registry=r)
        self.teacher_lag = Gauge("teacher_lag", "samples not yet delivered to a teacher", ["teacher"],
                                 namespace=ns, registry=r)
        self.teacher_pending = Gauge("teacher_pending", "samples delivered to a teacher, not answered", ["teacher"],
                                     namespace=ns, registry=r)
        self.ready_lag = Gauge("ready_lag", "ready samples not yet read by a trainer rank", namespace=ns, registry=r)
        self.ready_pending = Gauge("ready_pending", "ready samples read by a trainer rank, not yet acked "
                                   "(trained since the last checkpoint, or in a batch being filled)",
                                   namespace=ns, registry=r)
        for t in teachers:  # export 0 from the start, not "absent"
            self.teacher_lag.labels(t)
            self.teacher_pending.labels(t)

    # -- online feed and training loop --------------------------------------------------------------------------

    def observe_batch(self, samples: int, tokens: int) -> None:
        """One lockstep micro-step: ``samples`` and ``tokens`` summed over the ranks."""
        self.samples.inc(samples)
        self.tokens.inc(tokens)

    def observe_log(self, row: dict) -> None:
        """A metrics row of ``fuseflow.trainer.loop.train`` (``step``, ``lr``, ``loss``, ``clm``, ``kl``,
        ``ce/<teacher>``, ``coverage/<teacher>``, ``miss_rate/…``, ``p_gold/…``, ``chosen/<teacher>/<corpus>``)."""
        self.step.set(row["step"])
        if "lr" in row:
            self.lr.set(row["lr"])
        for part in LOSS_PARTS:
            if part in row:
                self.loss.labels(part).set(row[part])
        for key, value in row.items():
            head, _, rest = key.partition("/")
            if head == "ce":
                self.teacher_ce.labels(rest).set(value)
            elif head in ("coverage", "miss_rate", "p_gold"):
                self.teacher_fidelity.labels(rest, head).set(value)
            elif head == "chosen":
                teacher, _, corpus = rest.rpartition("/")
                self.teacher_chosen.labels(teacher, corpus).set(value)

    def observe_queue(self, stats: dict) -> None:
        """``Transport.stats()``; unknown lags (``None``) leave the gauge as it was."""
        for kind in ("submitted", "done", "in_flight", "window", "ready", "work", "dead_letters"):
            self.queue.labels(kind).set(int(stats[kind]))
        for name, q in stats["teachers"].items():
            if q.get("lag") is not None:
                self.teacher_lag.labels(name).set(q["lag"])
            self.teacher_pending.labels(name).set(q["pending"])
        trainer = stats["trainer"]
        if trainer.get("lag") is not None:
            self.ready_lag.set(trainer["lag"])
        self.ready_pending.set(trainer["pending"])

    # -- exposition: fuseflow.metrics.MetricsEndpoint (value, start_http, stop_http) ---------------------------------------------------------------------------------------------


def poll_queue(transport, metrics: TrainerMetrics, every_s: float = 2.0) -> threading.Event:
    """Update ``metrics``' queue gauges from ``transport.stats()`` every ``every_s`` on a daemon thread; set the
    returned event to stop it."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(every_s):
            try:
                metrics.observe_queue(transport.stats())
            except TransportUnavailable as e:  # an outage: the trainer's own retries report it
                log.debug("queue poll failed: %s", e)

    threading.Thread(target=poll, daemon=True, name="queue-poll").start()
    return stop
