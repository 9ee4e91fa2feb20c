"""The online trainer's Prometheus metrics (``fuseflow.trainer.metrics``), scraped over HTTP as the stack's
status line and Prometheus read them."""

from __future__ import annotations

import pytest

from fuseflow.stack import scrape
from fuseflow.trainer.metrics import TrainerMetrics


def test_trainer_metrics_from_feed_loop_and_queue():
    m = TrainerMetrics(["gemma", "qwen"])
    m.observe_batch(samples=4, tokens=180)
    m.observe_batch(samples=3, tokens=100)
    m.observe_log({"step": 5, "samples": 7, "tokens": 280, "lr": 1e-4, "loss": 2.5, "clm": 3.0, "kl": 0.5,
                   "ce/gemma": 4.25, "ce/qwen": 3.5, "tokens_per_s": 10.0})
    m.observe_queue({"submitted": 40, "done": 30, "in_flight": 10, "window": 64, "finished": False, "work": 10,
                     "ready": 4, "dead_letters": 2,
                     "teachers": {"gemma": {"pending": 3, "lag": 5}, "qwen": {"pending": 1, "lag": None}},
                     "trainer": {"pending": 2, "lag": 2}})
    assert m.value("samples_total") == 7 and m.value("tokens_total") == 280
    assert m.value("step") == 5 and m.value("learning_rate") == pytest.approx(1e-4)
    assert m.value("loss", {"part": "kl"}) == 0.5 and m.value("loss", {"part": "clm"}) == 3.0
    assert m.value("teacher_ce", {"teacher": "gemma"}) == 4.25
    assert m.value("queue", {"kind": "dead_letters"}) == 2 and m.value("queue", {"kind": "in_flight"}) == 10
    assert m.value("teacher_lag", {"teacher": "gemma"}) == 5
    assert m.value("teacher_lag", {"teacher": "qwen"}) == 0  # unknown lag: left as it was
    assert m.value("ready_pending") == 2


def test_trainer_metrics_over_http():
    m = TrainerMetrics(["gemma"])
    port = m.start_http(0, host="127.0.0.1")
    try:
        m.observe_batch(samples=2, tokens=64)
        m.observe_log({"step": 3, "loss": 1.0})
        got = scrape(f"http://127.0.0.1:{port}/metrics", {"fuseflow_trainer_tokens_total", "fuseflow_trainer_step"})
        assert got == {"fuseflow_trainer_tokens_total": 64.0, "fuseflow_trainer_step": 3.0}
        with pytest.raises(RuntimeError):
            m.start_http(0)
    finally:
        m.stop_http()
    assert scrape(f"http://127.0.0.1:{port}/metrics", {"fuseflow_trainer_step"}) is None  # stopped


def test_two_trainers_in_one_process_do_not_collide():
    a, b = TrainerMetrics(), TrainerMetrics()
    a.observe_batch(1, 10)
    assert b.value("samples_total") == 0
