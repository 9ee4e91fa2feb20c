"""Wire throughput: the AlignedDist codec and the transports' round trip, in tokens/s per teacher.

Round trip = what one sample costs between a teacher's answer and the trainer's ack, done the way the
transport does it: ``claim_work`` + ``complete_many`` (one pipelined Lua call per sample and teacher, one
round trip per batch; ``redis_per_item`` rows: ``complete_work``, one round trip per sample) →
``next_ready`` (one XREADGROUP + one pipelined HGETALL per batch, decode included) → ``ack_ready`` (one
pipeline per batch). Phases run one after the other from one client each, so the figure is a single-worker
lower bound; several teacher replicas and trainer ranks add up.

    python bench/wire.py                       # starts a local valkey-server/redis-server
    python bench/wire.py --redis-url redis://host:6379/0 --samples 128 --out wire.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import uuid

import numpy as np

from fuseflow.sparse import AlignedDist, Sample
from fuseflow.wire.codec import decode_aligned, encode_aligned
from fuseflow.wire.inprocess import InProcessTransport
from fuseflow.wire.redis_server import RedisServer
from fuseflow.wire.redis_streams import RedisTransport


def random_dist(t: int, k: int, seed: int) -> AlignedDist:
    rng = np.random.default_rng(seed)
    return AlignedDist(
        ids=rng.integers(0, 150_000, size=(t, k)).astype(np.int32),  # [T, k]
        logprobs=-np.sort(rng.exponential(3.0, size=(t, k)), axis=1).astype(np.float32),  # [T, k]
        gold_logprobs=-rng.exponential(2.0, size=t).astype(np.float32),  # [T]
        aligned=rng.random(t) < 0.95,  # [T]
        meta={"teacher": "bench", "source_tokens": t + 17},
    )


def bench_codec(dists: list[AlignedDist], repeat: int) -> dict:
    t = dists[0].num_positions
    encoded = [encode_aligned(d) for d in dists]
    best_enc = best_dec = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for d in dists:
            encode_aligned(d)
        best_enc = min(best_enc, time.perf_counter() - start)
        start = time.perf_counter()
        for f in encoded:
            decode_aligned(f)
        best_dec = min(best_dec, time.perf_counter() - start)
    n_tokens = t * len(dists)
    return {
        "bytes_per_token": sum(len(v) for v in encoded[0].values()) / t,
        "encode_tokens_per_s": n_tokens / best_enc,
        "decode_tokens_per_s": n_tokens / best_dec,
    }


def cpu_seconds(proc) -> float:
    """CPU time of this process, plus of ``proc`` (a psutil.Process: the local server) if given."""
    own = time.process_time()
    if proc is None:
        return own
    t = proc.cpu_times()
    return own + t.user + t.system


def round_trip(
    transport, dists: list[AlignedDist], teachers: list[str], batch: int, batched: bool, server_proc=None
) -> dict:
    """One pass of len(dists) samples through ``transport``; seconds per phase, and the CPU seconds the
    client and the server spent (wall time on a shared machine also counts other people's work)."""
    n = len(dists)
    transport.submit([Sample(f"s{i}", f"sample {i}") for i in range(n)])
    cpu0 = cpu_seconds(server_proc)
    start = time.perf_counter()
    for teacher in teachers:
        done = 0
        while done < n:
            items = transport.claim_work(teacher, f"{teacher}-0", count=batch, block_ms=1000)
            results = [(it, dists[int(it.sample.id[1:])], None) for it in items]
            if batched:
                transport.complete_many(teacher, results)
            else:
                for it, dist, _ in results:
                    transport.complete_work(teacher, it, dist=dist)
            done += len(items)
    answered = time.perf_counter()
    t_read = t_ack = 0.0
    got = 0
    while got < n:
        t0 = time.perf_counter()
        ready = transport.next_ready("rank0", count=batch, block_ms=1000)
        t1 = time.perf_counter()
        transport.ack_ready(ready)
        t_ack += time.perf_counter() - t1
        t_read += t1 - t0
        got += len(ready)
    total = time.perf_counter() - start
    cpu = cpu_seconds(server_proc) - cpu0
    if not transport.stats()["in_flight"] == 0:
        raise RuntimeError("round trip left samples in flight")
    return {"answer_s": answered - start, "next_ready_s": t_read, "ack_s": t_ack, "total_s": total, "cpu_s": cpu}


def bench_transport(make, dists, teachers, batch, repeat, batched=True, server_proc=None) -> dict:
    t = dists[0].num_positions
    n = len(dists)
    best = None
    for _ in range(repeat):
        transport = make()
        try:
            r = round_trip(transport, dists, teachers, batch, batched, server_proc)
        finally:
            if hasattr(transport, "reset"):
                transport.reset()
            transport.close()
        best = r if best is None or r["total_s"] < best["total_s"] else best
    pairs = t * n * len(teachers)  # (token, teacher) pairs moved
    return {
        **best,
        "answer_tokens_per_s_per_teacher": pairs / best["answer_s"],
        "trainer_tokens_per_s_per_teacher": pairs / (best["next_ready_s"] + best["ack_s"]),
        "round_trip_tokens_per_s_per_teacher": pairs / best["total_s"],
        "round_trip_tokens_per_cpu_s_per_teacher": pairs / best["cpu_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048, help="T: target positions per sample")
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--samples", type=int, default=64, help="samples per round trip (also the window)")
    ap.add_argument("--teachers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8, help="count of claim_work / next_ready")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many passes")
    ap.add_argument("--redis-url", help="use this server instead of starting a local one")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    dists = [random_dist(args.tokens, args.top_k, seed=i) for i in range(args.samples)]
    teachers = [f"teacher{i}" for i in range(args.teachers)]
    results: dict = {
        "config": {**vars(args), "machine": platform.machine(), "python": platform.python_version()},
        "codec": bench_codec(dists, args.repeat),
    }
    results["inprocess"] = bench_transport(
        lambda: InProcessTransport("bench", teachers, window=args.samples), dists, teachers, args.batch, args.repeat
    )

    def run_redis(url: str, server_proc=None) -> dict:
        def make():
            return RedisTransport(url, f"bench-{uuid.uuid4().hex[:8]}", teachers, window=args.samples)

        return {
            name: bench_transport(make, dists, teachers, args.batch, args.repeat, batched, server_proc)
            for name, batched in (("redis", True), ("redis_per_item", False))
        }

    if args.redis_url:
        results.update(run_redis(args.redis_url))
    else:
        with RedisServer(appendonly=False) as server:
            try:
                import psutil

                server_proc = psutil.Process(server.pid)
            except ImportError:
                server_proc = None
            results.update(run_redis(server.url, server_proc))
            info = server.client().info("server")
            results["config"]["redis_server"] = (
                f"valkey {info['valkey_version']}" if "valkey_version" in info else f"redis {info['redis_version']}"
            )

    c = results["codec"]
    print(
        f"T = {args.tokens}, k = {args.top_k}, {args.samples} samples, {args.teachers} teachers, "
        f"batch {args.batch}; {c['bytes_per_token']:.3f} bytes per token per teacher on the wire\n"
    )
    print("| measure | tokens/s per teacher (wall) | tokens per CPU-second per teacher |")
    print("|---|---:|---:|")
    print(f"| encode_aligned | {c['encode_tokens_per_s']:,.0f} | |")
    print(f"| decode_aligned | {c['decode_tokens_per_s']:,.0f} | |")
    for name in ("inprocess", "redis", "redis_per_item"):
        r = results[name]
        answer = "complete_work per item" if name == "redis_per_item" else "complete_many per batch"
        print(f"| {name}: claim_work + {answer} | {r['answer_tokens_per_s_per_teacher']:,.0f} | |")
        print(f"| {name}: next_ready + ack_ready | {r['trainer_tokens_per_s_per_teacher']:,.0f} | |")
        print(
            f"| {name}: round trip | {r['round_trip_tokens_per_s_per_teacher']:,.0f} "
            f"| {r['round_trip_tokens_per_cpu_s_per_teacher']:,.0f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
