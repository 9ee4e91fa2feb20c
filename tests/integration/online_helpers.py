"""Helpers of the online-path integration tests, imported by name (as ``tests/merge/merge_helpers.py``): a
small corpus and run config on the tiny models, teacher workers (threads of the test process, or processes to
kill), trainer processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fuseflow.teacher.worker import WorkerThreads  # noqa: F401 - the tests' teacher threads, re-exported
from fuseflow.wire.redis_server import free_port

# Torch threads of the child processes: one each, the machine has few cores and several processes share it.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
             "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}

_WORDS = ("alpha beta gamma delta value return import class lambda yield while print string number list "
          "tuple module object method attribute function default keyword python error raise").split()


def write_corpus(path: Path, n_docs: int = 26, seed: int = 0) -> Path:
    """JSONL of ``n_docs`` short documents of 3–12 words: 13–47 tokens of the tiny SentencePiece tokenizer,
    so a teacher with max_length 40 rejects a few."""
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(n_docs):
            n = int(rng.integers(3, 13))
            words = rng.choice(_WORDS, size=n)
            f.write(json.dumps({"text": f"Doc {i}: " + " ".join(words) + "."}) + "\n")
    return path


def write_run_config(tmp_path: Path, tiny_llama, tiny_gemma, tiny_qwen, *, gemma_max_length: int | None = None,
                     extra: str = "", n_docs: int = 26) -> Path:
    """Run config: target tiny Llama (BPE), teachers tiny Gemma (SentencePiece-style) and tiny Qwen."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs)
    gemma_len = f", max_length: {gemma_max_length}" if gemma_max_length else ""
    text = f"""
run_dir: {tmp_path / 'run'}
target: {{model: {tiny_llama}}}
sources:
  - {{name: gemma, model: {tiny_gemma}{gemma_len}}}
  - {{name: qwen, model: {tiny_qwen}}}
corpus: {{source: {corpus}, held_out_documents: 2}}
align: {{vocab_map: mined, sequence: offsets}}
fusion: {{top_k: 4, lam: 0.5}}
train: {{max_length: 48, micro_batch_size: 2, lr: 1.0e-3, checkpoint_every: 2, warmup_ratio: 0.0,
        max_dead_letter_fraction: 0.5}}
eval: {{max_length: 48, before: false}}
baseline: none
{extra}
"""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def build_aligners(cfg, names=None):
    from fuseflow.models import load_tokenizer
    from fuseflow.trainer.teachers import build_teachers

    sources = [s for s in cfg.sources if names is None or s.key in names]
    return build_teachers(cfg, sources, load_tokenizer(cfg.target.model))


def start_trainer(config: Path, redis_url: str, run: str, log_path: Path, rank: int = 0, world: int = 1,
                  master_port: int | None = None, extra_args=()) -> subprocess.Popen:
    """``fuseflow train`` (``python -m fuseflow.cli train``) as rank ``rank`` of ``world`` (the env a launcher would set)."""
    env = dict(os.environ, **CHILD_ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port or free_port()))
    cmd = [sys.executable, "-m", "fuseflow.cli", "train", str(config), "--redis", redis_url, "--run", run,
           "--metrics-port", "0", "--no-progress", *extra_args]
    with log_path.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


_WORKER_SNIPPET = """
import sys, threading, signal
from fuseflow.config import FuseConfig, load_config
from fuseflow.wire.redis_streams import RedisTransport
from fuseflow.teacher.worker import run_worker
from fuseflow.models import load_tokenizer
from fuseflow.trainer.teachers import build_teachers
cfg = load_config(FuseConfig, {config!r})
aligner, = build_teachers(cfg, [s for s in cfg.sources if s.key == {source!r}], load_tokenizer(cfg.target.model))
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *a: stop.set())
tr = RedisTransport({url!r}, {run!r}, [s.key for s in cfg.sources])
print("worker ready", flush=True)
run_worker(aligner, tr, {consumer!r}, stop, batch_size={batch_size}, block_ms=100, reclaim_idle_ms={reclaim_idle_ms})
"""


def start_worker_process(config: Path, source: str, redis_url: str, run: str, consumer: str, log_path: Path,
                         reclaim_idle_ms: int = 1000, batch_size: int = 2) -> subprocess.Popen:
    """A teacher worker in its own process (to be killed with SIGKILL): the run's aligner + ``run_worker``."""
    code = _WORKER_SNIPPET.format(config=str(config), source=source,
                                  url=redis_url, run=run, consumer=consumer, batch_size=batch_size,
                                  reclaim_idle_ms=reclaim_idle_ms)
    with log_path.open("ab") as out:
        return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
                                env=dict(os.environ, **CHILD_ENV), start_new_session=True)


def wait_for(predicate, timeout_s: float, what: str, procs=(), poll_s: float = 0.1):
    """Poll ``predicate`` until true; fail with ``what`` (and the logs of ``procs`` that died) otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for p, log in procs:
            if p.poll() is not None and p.returncode != 0:
                pytest.fail(f"{what}: process exited with {p.returncode}:\n{Path(log).read_text()[-4000:]}")
        time.sleep(poll_s)
    logs = "\n".join(f"--- {log}:\n{Path(log).read_text()[-3000:]}" for _, log in procs)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{logs}")


def wait_exit(proc: subprocess.Popen, log: Path, timeout_s: float) -> int:
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"process did not finish within {timeout_s} s:\n{log.read_text()[-4000:]}")


def trained_ids(out: Path) -> list[str]:
    """Sample ids in the trained-ids logs of a run's ``fused`` dir, every rank's."""
    ids = []
    for p in sorted(out.glob("trained_samples*.log")):
        ids += p.read_text().split()
    return ids


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, 9)
        proc.wait()


class SlowAligner:
    """An aligner that takes ``delay_s`` longer per batch: makes a run last long enough to break it mid-way."""

    def __init__(self, aligner, delay_s: float):
        self.aligner, self.delay_s, self.name = aligner, delay_s, aligner.name

    def run(self, samples):
        time.sleep(self.delay_s)
        return self.aligner.run(samples)


def line_count(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0
