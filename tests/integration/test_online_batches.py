"""The recipe feeds the trainer the same fused batches over Redis as over the in-process transport (issue 13).

Two teachers with different tokenizers (tiny Gemma, SentencePiece-style; tiny Qwen, BPE) aligned to a tiny
Llama target; the dispatcher, the teacher workers and the trainer's feed talk through a real Redis server, then
through ``InProcessTransport`` (``fuseflow fuse``'s). Both hand the trainer the wire's float16 logprobs, so the
batches compare bitwise; the float32 gold logprobs to 1e-5 (forward-pass rounding depends on batch composition).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from fuseflow.config import FuseConfig, load_config
from fuseflow.sparse import AlignedDist

from online_helpers import WorkerThreads, build_aligners, write_run_config

pytestmark = pytest.mark.integration


def feed_groups(transport, transport_factory, samples, aligners, micro, tmp_path):
    """Dispatch ``samples``, then let the teachers answer in micro-batch-sized batches (a forward pass's float
    results depend on what it is batched with) and read the trainer's micro-batches; every step acked."""
    from fuseflow.trainer.dispatcher import Dispatcher, dispatch_sequence
    from fuseflow.trainer.ready import ReadyFeed

    dispatcher = Dispatcher(transport, dispatch_sequence(samples), chunk=5)
    dispatcher.start()
    dispatcher.join_checked(30)
    groups = []
    with WorkerThreads(aligners, transport_factory, batch_size=micro):
        feed = ReadyFeed(transport, "rank0", micro, 1, tmp_path / "none.log", poll_ms=50)
        for g in feed:
            groups.append(g)
            feed.ack_durable([s.id for s, _ in g])  # as if a checkpoint followed every step
    assert transport.is_finished()
    return groups, {d["sample_id"]: d for d in transport.dead_letters()}


@pytest.mark.slow
def test_redis_batches_equal_the_in_process_batches(tmp_path, tiny_llama, tiny_gemma, tiny_qwen, redis_server):
    from fuseflow.models import load_tokenizer
    from fuseflow.trainer.batches import collate
    from fuseflow.trainer.data import prepare_corpus
    from fuseflow.wire.inprocess import InProcessTransport
    from fuseflow.wire.redis_streams import RedisTransport

    cfg = load_config(FuseConfig, write_run_config(tmp_path, tiny_llama, tiny_gemma, tiny_qwen, gemma_max_length=40))
    tok = load_tokenizer(cfg.target.model)
    corpus = prepare_corpus(cfg, tok)
    aligners = build_aligners(cfg)
    teachers = [a.name for a in aligners]
    micro, k = cfg.train.micro_batch_size, cfg.fusion.top_k

    local = InProcessTransport("batches", teachers, window=64)
    ref_groups, ref_dead = feed_groups(local, lambda: local, corpus.train, aligners, micro, tmp_path)
    ref = {s.id: d for g in ref_groups for s, d in g}
    ref_order = [s.id for g in ref_groups for s, _ in g]
    assert ref_dead and len(ref_order) >= 10, "the corpus must give trained and dead-lettered samples"

    run = "batches"
    with RedisTransport(redis_server.url, run, teachers, window=64) as tr:
        tr.reset()
        factory = lambda: RedisTransport(redis_server.url, run, teachers)  # noqa: E731
        groups, dead = feed_groups(tr, factory, corpus.train, aligners, micro, tmp_path)

    assert [s.id for g in groups for s, _ in g] == ref_order  # same samples, same order
    assert all(len(g) == micro for g in groups[:-1]) and groups[-1]
    assert set(dead) == set(ref_dead)
    assert all(d["teacher"] == "gemma" and "max_length 40" in d["reason"] for d in dead.values())
    for g in groups:
        samples = [s for s, _ in g]
        got = collate(samples, tok, [d for _, d in g], teachers, k)
        want = collate(samples, tok, [ref[s.id] for s in samples], teachers, k)
        for name in ("input_ids", "attention_mask", "labels", "loss_mask", "teacher_ids", "teacher_logprobs",
                     "teacher_gold", "teacher_aligned"):
            a, b = getattr(got, name), getattr(want, name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            if name == "teacher_gold":
                # float32 on the wire: equal up to the teachers' own forward-pass rounding, which depends on
                # what a sample is batched with (a retried batch after a dead letter is scored one by one).
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{name} differs for {[s.id for s in samples]}")
                continue
            assert torch.equal(a, b), f"{name} differs for samples {[s.id for s in samples]}"
    # the in-process transport hands over the wire's precision: float16 logprobs
    lp = ref[ref_order[0]]["gemma"].logprobs
    assert np.array_equal(lp, lp.astype(np.float16).astype(lp.dtype))


def test_feed_keeps_ranks_in_lockstep_and_pads_the_accumulation(monkeypatch, tmp_path):
    """A rank without data yields ``[]`` while another still trains; the epoch ends on a gradient-accumulation
    boundary. Two ranks are simulated by threads sharing an in-process transport and a fake all-reduce."""
    from fuseflow.sparse import Sample
    from fuseflow.trainer import ready
    from fuseflow.wire.inprocess import InProcessTransport

    tr = InProcessTransport("lockstep", ["t"], window=64)
    samples = [Sample(f"s{i}", f"text {i}") for i in range(6)]
    tr.submit(samples)
    tr.finish_submissions()
    # Every sample answered before the ranks start: rank 0 takes what it can, rank 1 the rest.
    while items := tr.claim_work("t", "w", 10, 0):
        for it in items:
            tr.complete_work("t", it, dist=AlignedDist(np.zeros((3, 2), np.int32), np.zeros((3, 2), np.float32),
                                                        np.zeros(3, np.float32), np.ones(3, bool)))

    barrier = threading.Barrier(2)
    slots: dict[int, list[int]] = {}
    rank_of = {}

    def fake_all_reduce(values, op="sum"):
        r = rank_of[threading.get_ident()]
        slots[r] = values
        barrier.wait()
        rows = [slots[0], slots[1]]
        out = [{"sum": sum, "min": min, "max": max}[op](col) for col in zip(*rows)]
        barrier.wait()
        return out

    monkeypatch.setattr(ready, "all_reduce", fake_all_reduce)
    seen: dict[int, list[list[str]]] = {0: [], 1: []}

    def rank(r, micro):
        rank_of[threading.get_ident()] = r
        feed = ready.ReadyFeed(tr, f"rank{r}", micro_batch=micro, grad_accum=2, trained_log=tmp_path / "none",
                                poll_ms=10)
        for g in feed:
            seen[r].append([s.id for s, _ in g])
            feed.ack_durable([s.id for s, _ in g])

    t0 = threading.Thread(target=rank, args=(0, 4))
    t0.start()
    time.sleep(0.3)  # rank 0 takes 4 samples first; rank 1 (micro-batch 1 here) takes the next
    t1 = threading.Thread(target=rank, args=(1, 1))
    t1.start()
    t0.join(10)
    t1.join(10)
    assert not t0.is_alive() and not t1.is_alive()
    assert len(seen[0]) == len(seen[1])  # lockstep: same number of micro-steps
    assert len(seen[0]) == 2  # ends on an accumulation boundary
    flat = [i for r in (0, 1) for g in seen[r] for i in g]
    assert sorted(flat) == sorted(s.id for s in samples)  # each sample once
    assert seen[0][0] == ["s0", "s1", "s2", "s3"] and seen[1][0] == ["s4"]
    # step 2: one rank gets the last sample, the other steps without data
    assert sorted([seen[0][1], seen[1][1]]) == [[], ["s5"]]
    assert tr.is_finished()


def test_feed_pads_the_last_accumulation_and_skips_checkpointed_samples(tmp_path):
    """The epoch ends on a gradient-accumulation boundary; a redelivered sample listed in the rank's trained
    log (covered by the checkpoint) is acked, not trained again."""
    from fuseflow.sparse import Sample
    from fuseflow.trainer.ready import ReadyFeed
    from fuseflow.wire.inprocess import InProcessTransport

    tr = InProcessTransport("pad", ["t"], window=64)
    tr.submit([Sample(f"s{i}", f"text {i}") for i in range(5)])
    tr.finish_submissions()
    while items := tr.claim_work("t", "w", 10, 0):
        for it in items:
            tr.complete_work("t", it, dist=AlignedDist(np.zeros((3, 2), np.int32), np.zeros((3, 2), np.float32),
                                                        np.zeros(3, np.float32), np.ones(3, bool)))
    log = tmp_path / "trained_samples.log"
    log.write_text("s2\n")
    feed = ReadyFeed(tr, "rank0", micro_batch=2, grad_accum=3, trained_log=log, poll_ms=10)
    groups = []
    for g in feed:
        groups.append([s.id for s, _ in g])
        feed.ack_durable([s.id for s, _ in g])
    assert groups == [["s0", "s1"], ["s3", "s4"], []]
    assert feed.skipped == 1 and tr.is_finished()
