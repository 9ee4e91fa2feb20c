"""``fuseflow train --redis`` with two DeepSpeed ranks (gloo, CPU): every sample id trained exactly once."""

from __future__ import annotations

import json
import math

import pytest
from online_helpers import WorkerThreads, build_aligners, start_trainer, trained_ids, wait_exit, write_run_config

from fuseflow.config import FuseConfig, load_config
from fuseflow.wire.redis_server import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_two_ranks_train_every_sample_exactly_once(tmp_path, tiny_llama, tiny_gemma, tiny_qwen, redis_server):
    from fuseflow.models import load_tokenizer
    from fuseflow.trainer.data import prepare_corpus
    from fuseflow.wire.redis_streams import RedisTransport

    config = write_run_config(tmp_path, tiny_llama, tiny_gemma, tiny_qwen, gemma_max_length=40)
    cfg = load_config(FuseConfig, config)
    corpus = prepare_corpus(cfg, load_tokenizer(cfg.target.model))
    teachers = [s.key for s in cfg.sources]
    run, out = "two-ranks", tmp_path / "run" / "fused"
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = [start_trainer(config, redis_server.url, run, logs[r], rank=r, world=2, master_port=port) for r in range(2)]
    with WorkerThreads(build_aligners(cfg), lambda: RedisTransport(redis_server.url, run, teachers)):
        for p, log in zip(procs, logs):
            assert wait_exit(p, log, 240) == 0, log.read_text()[-4000:]

    dead = {json.loads(line)["sample"] for line in (out / "dead_letter.jsonl").read_text().splitlines()}
    assert dead  # gemma's max_length 40 rejects a few samples; the run went on
    ids = trained_ids(out)
    assert len(ids) == len(set(ids)), "a sample was trained twice"
    assert sorted(ids) == sorted(s.id for s in corpus.train if s.id not in dead)
    per_rank = [(out / f"trained_samples.rank{r}.log").read_text().split() for r in range(2)]
    assert all(per_rank), "both ranks trained samples"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(math.isfinite(r["loss"]) and r["kl"] > 0 for r in rows)
    assert {"ce/gemma", "ce/qwen"} <= set(rows[0])
    assert (out / "model" / "model.safetensors").exists()
    with RedisTransport(redis_server.url, run, teachers) as tr:
        stats = tr.stats()
        assert tr.is_finished() and stats["in_flight"] == 0 and stats["ready"] == 0 and stats["work"] == 0
