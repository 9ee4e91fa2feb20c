"""Scoring over gRPC against the engine called directly: what the server, the wire and the request batcher
cost or gain, for 1..N concurrent clients.

Each client sends ``--requests`` Score requests of ``--texts`` texts of about ``--seq-len`` tokens. The direct
baseline scores the same requests one after another on the engine in this process. Reported: tokens/s,
request latency (p50, p95), the mean number of requests the batcher merged into one engine call, and the
bytes per token on the wire (float32 and float16 logprobs).

    python bench/grpc_score.py                                   # tiny random Llama, CPU
    python bench/grpc_score.py --model smollm2-135m --clients 1 4 16 --out grpc_score.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from fuseflow.models import builtin_text, make_tiny_model
from fuseflow.score.engine import create_engine
from fuseflow.teacher.server import ServerOptions, build_server
from fuseflow.wire.client import TeacherClient


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="'tiny' (random 2-layer Llama), smollm2-135m, or a model path")
    p.add_argument("--engine", default="hf", choices=["hf", "vllm"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients to try")
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--texts", type=int, default=4, help="texts per request")
    p.add_argument("--seq-len", type=int, default=128, help="about this many tokens per text")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batcher wait for company")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="tokens per engine call")
    p.add_argument("--logprob-dtype", default="float16", choices=["float32", "float16"])
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def make_requests(tokenizer, n: int, texts: int, seq_len: int) -> list[list[str]]:
    """``n`` requests of ``texts`` distinct windows of the built-in text, ~``seq_len`` tokens each."""
    text = builtin_text()
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"])  # [L, 2]
    body = seq_len - 1
    windows = [text[offsets[i * body, 0] : offsets[(i + 1) * body - 1, 1]] for i in range(len(offsets) // body)]
    return [[windows[(r * texts + j) % len(windows)] for j in range(texts)] for r in range(n)]


def run_direct(engine, requests, top_k: int) -> dict:
    """The requests one after another on the engine, from a thread of their own as the batcher's: torch's
    intra-op threads behave differently on the main thread of a busy machine (2x slower measured here)."""
    out = {}

    def work() -> None:
        t0 = time.perf_counter()
        latencies, tokens = [], 0
        for r in requests:
            s = time.perf_counter()
            tokens += sum(len(x.token_ids) for x in engine.score_texts(r, top_k))
            latencies.append(time.perf_counter() - s)
        out["row"] = summary("engine, direct", 1, tokens, time.perf_counter() - t0, latencies, None)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return out["row"]


def run_grpc(address: str, server, clients: int, requests, top_k: int, dtype: str) -> dict:
    per_client = [requests[i::clients] for i in range(clients)]
    latencies: list[float] = []
    tokens = [0] * clients
    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()
    before = (server.metrics.value("batch_requests_sum"), server.metrics.value("batch_requests_count"))

    def client(i: int) -> None:
        with TeacherClient(address) as c:
            c.wait_ready(30)
            barrier.wait()
            for r in per_client[i]:
                s = time.perf_counter()
                tokens[i] += sum(len(x.token_ids) for x in c.score_texts(r, top_k, logprob_dtype=dtype))
                with lock:
                    latencies.append(time.perf_counter() - s)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    merged = server.metrics.value("batch_requests_sum") - before[0]
    calls = server.metrics.value("batch_requests_count") - before[1]
    return summary(f"gRPC, {clients} client{'s' if clients > 1 else ''}", clients, sum(tokens), seconds, latencies,
                   merged / calls if calls else None)


def summary(name, clients, tokens, seconds, latencies, merge) -> dict:
    lat = np.asarray(latencies) * 1000
    return {
        "setting": name, "clients": clients, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
        "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
        "requests_per_engine_call": merge,
    }


def wire_bytes_per_token(engine, texts, top_k: int) -> dict:
    """Serialized Score reply bytes per scored token (what travels), by logprob dtype."""
    from fuseflow.wire.codec import scored_to_proto

    scored = engine.score_texts(texts, top_k)
    n = sum(len(s.token_ids) for s in scored)
    return {
        dt: sum(len(scored_to_proto(s, i, getattr(np, dt)).SerializeToString()) for i, s in enumerate(scored)) / n
        for dt in ("float32", "float16")
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    model = args.model
    if model == "tiny":
        model = str(make_tiny_model(tempfile.mkdtemp(prefix="bench-grpc-"), "llama", seed=0))
    options = {"device": args.device} if args.engine == "hf" else {}
    engine = create_engine(args.engine, model, max_top_k=max(args.top_k, 64), **options)
    total = args.requests * max(args.clients)
    requests = make_requests(engine.tokenizer, total, args.texts, args.seq_len)

    server, port = build_server(engine, ServerOptions(
        host="127.0.0.1", port=0, max_wait_ms=args.max_wait_ms, max_batch_tokens=args.max_batch_tokens,
        max_texts=max(256, args.texts), max_tokens=max(16384, args.texts * args.seq_len * 2),
    ))
    server.start()
    address = f"127.0.0.1:{port}"
    try:
        run_direct(engine, requests[: args.requests], args.top_k)  # warm-up
        rows = [run_direct(engine, requests, args.top_k)]
        for clients in args.clients:
            rows.append(run_grpc(address, server, clients, requests, args.top_k, args.logprob_dtype))
    finally:
        server.stop(5).wait(10)
    wire = wire_bytes_per_token(engine, requests[0], args.top_k)

    print(f"\nScore over gRPC vs the engine directly — {args.model} ({args.engine}, {args.device}), "
          f"{total} requests × {args.texts} texts × ~{args.seq_len} tokens, top-k {args.top_k}, "
          f"logprobs {args.logprob_dtype} on the wire\n")
    print("| setting | tokens/s | vs direct | p50 ms | p95 ms | requests / engine call |")
    print("|---|---:|---:|---:|---:|---:|")
    base = rows[0]["tokens_per_s"]
    for r in rows:
        merge = f"{r['requests_per_engine_call']:.2f}" if r["requests_per_engine_call"] else "—"
        print(f"| {r['setting']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / base:.2f}× | {r['p50_ms']:.1f} | "
              f"{r['p95_ms']:.1f} | {merge} |")
    print(f"\nwire: {wire['float32']:.1f} bytes/token with float32 logprobs, {wire['float16']:.1f} with float16 "
          f"(top-k {args.top_k}, offsets and token strings included)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "platform": platform.platform(), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "rows": rows, "wire_bytes_per_token": wire}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
