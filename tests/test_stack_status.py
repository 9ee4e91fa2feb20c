"""``fuseflow stack up``'s status line shows the trainer's dispatch window (issue 15: it showed the window of
the stack's own Redis client, a default the trainer does not use)."""

from __future__ import annotations

from fuseflow.stack import TRAINER_WINDOW, Rate, format_status, scrape, status_line
from fuseflow.trainer.metrics import TrainerMetrics

STATS = {"submitted": 52, "done": 40, "in_flight": 12, "window": 256, "ready": 3, "work": 9, "dead_letters": 2,
         "teachers": {"gemma": {"lag": 1, "pending": 2}}, "trainer": {"lag": 0, "pending": 3}}


class FixedStats:
    """A transport whose stats are those of the stack's own client: a window of 256, its default."""

    def stats(self):
        return dict(STATS)


def test_the_status_line_shows_the_trainers_window():
    trainer = TrainerMetrics(["gemma"])
    port = trainer.start_http(0, host="127.0.0.1")
    try:
        line = status_line(FixedStats(), {}, {}, Rate(), port, now=0.0)
        assert "queue: 12 in flight," in line  # the trainer has not reported its queue yet: no window shown
        trainer.observe_queue({**STATS, "window": 1024})  # online.window=1024 in the trainer
        assert scrape(f"http://127.0.0.1:{port}/metrics", {TRAINER_WINDOW}) == {TRAINER_WINDOW: 1024.0}
        line = status_line(FixedStats(), {}, {}, Rate(), port, now=1.0)
        assert "queue: 12/1024 in flight, 3 ready, 40/52 done" in line and "/256" not in line
    finally:
        trainer.stop_http()
    assert "queue: 12 in flight," in status_line(FixedStats(), {}, {}, Rate(), port, now=2.0)  # trainer gone


def test_format_status_without_a_known_window():
    assert format_status({**STATS, "window": None}, {}, None).startswith("queue: 12 in flight, 3 ready, 40/52 done")
