"""Scoring throughput of the hf teacher engine: tokens/s for top-k next-token logprobs over the built-in text.

Compares the engine (length-sorted batches, trunk + chunked lm_head, top-k on the device) with the plain
dense path (``model(ids).logits`` → fp32 log-softmax over ``[B, T, V]`` → topk) on the same windows. On CUDA
it also reports MFU: forward FLOPs ``2 · N_params · tokens`` over a bf16 matmul peak measured in this run.

    python bench/score.py                                  # tiny random Llama, CPU
    python bench/score.py --model smollm2-135m --seq-len 512 --max-tokens 8192 --out score.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from fuseflow.models import builtin_text, make_tiny_model
from fuseflow.teacher.batching import padded_tokens, plan_batches
from fuseflow.teacher.hf_engine import HFEngine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="tiny", help="'tiny' (random 2-layer Llama), smollm2-135m, gemma3-270m, or a path"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per scored text (special tokens included)")
    p.add_argument("--batch-tokens", type=int, default=8192, help="engine max_batch_tokens (padded)")
    p.add_argument("--batch-size", type=int, default=64, help="engine max_batch_size")
    p.add_argument("--head-chunk-tokens", type=int, default=None, help="engine head_chunk_tokens (default: auto)")
    p.add_argument("--max-tokens", type=int, default=16384, help="score about this many tokens of the text")
    p.add_argument("--repeats", type=int, default=2, help="timed runs (best is reported) after one warm-up")
    p.add_argument(
        "--no-dense",
        action="store_true",
        help="skip the dense-logits baseline (it holds [B, T, V] fp32 logits twice: "
        "lower --batch-tokens for a 262k vocabulary)",
    )
    p.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (default: torch's choice); 1 is faster when other processes share the cores",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def make_texts(tokenizer, seq_len: int, max_tokens: int) -> list[str]:
    """Cut the built-in text into pieces of about ``seq_len`` tokens (room left for the special tokens)."""
    text = builtin_text()
    specials = len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"])
    body = seq_len - specials
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"])  # [L, 2]
    n_texts = max(1, min(len(offsets) // body, max_tokens // seq_len))
    return [text[offsets[i * body, 0] : offsets[(i + 1) * body - 1, 1]] for i in range(n_texts)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(fns: dict, repeats: int, device: torch.device) -> dict[str, tuple[float, float]]:
    """Best (wall, process CPU) seconds of each function. Runs are interleaved so that load from other
    processes on a shared machine hits every contender alike; CPU seconds are the contention-proof figure
    on a shared CPU box (with --threads 1 they are the time one uncontended core would take)."""
    for fn in fns.values():
        fn()  # warm-up: allocator, kernels, thread pools
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    return {name: (min(w for w, _ in ts), min(c for _, c in ts)) for name, ts in times.items()}


@torch.inference_mode()
def dense_topk(model, tokenizer, texts: list[str], batches: list[list[int]], k: int, device: torch.device) -> None:
    """The plain path, text in as the engine: tokenize, full ``[B, T, V]`` logits, fp32 log-softmax, topk,
    gold gather, on the engine's batches."""
    ids_list = tokenizer(texts)["input_ids"]
    for batch in batches:
        t = max(len(ids_list[i]) for i in batch)
        x = np.zeros((len(batch), t), dtype=np.int64)  # [B, T]
        for row, i in enumerate(batch):
            x[row, : len(ids_list[i])] = ids_list[i]
        x_t = torch.from_numpy(x).to(device)
        logprobs = torch.log_softmax(model(input_ids=x_t, use_cache=False).logits.float(), dim=-1)  # [B, T, V]
        torch.topk(logprobs[:, :-1], k, dim=-1)  # [B, T-1, k]
        logprobs[:, :-1].gather(2, x_t[:, 1:, None])  # [B, T-1, 1]
        del logprobs


def matmul_peak_flops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 dense matmul throughput (FLOP/s) of this GPU, the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.model == "tiny":
        ref = make_tiny_model(tempfile.mkdtemp(prefix="fuseflow-bench-"), "llama", vocab_size=512)
    else:
        ref = args.model
    engine = HFEngine(
        ref,
        device=device,
        dtype=args.dtype,
        max_batch_tokens=args.batch_tokens,
        max_batch_size=args.batch_size,
        head_chunk_tokens=args.head_chunk_tokens,
        name=args.model,
    )
    load_s = time.perf_counter() - t0
    texts = make_texts(engine.tokenizer, min(args.seq_len, engine.max_length), args.max_tokens)

    ids = [np.asarray(x) for x in engine.tokenizer(texts)["input_ids"]]
    tokens = int(sum(len(x) for x in ids))
    lengths = [len(x) - 1 for x in ids]
    batches = plan_batches(lengths, engine.max_batch_tokens, engine.max_batch_size)
    contenders = {"engine": lambda: engine.score_texts(texts, top_k=args.top_k)}
    if not args.no_dense:
        contenders["dense"] = lambda: dense_topk(engine.model, engine.tokenizer, texts, batches, args.top_k, device)
    times = best_times(contenders, args.repeats, device)
    engine_s, engine_cpu_s = times["engine"]
    n_params = sum(p.numel() for p in engine.model.parameters())
    result = {
        "model": args.model,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "params": n_params,
        "vocab": engine.vocab_size,
        "texts": len(texts),
        "seq_len": args.seq_len,
        "tokens": tokens,
        "forward_tokens": padded_tokens(lengths, batches),  # what the trunk computes: L-1 each, padded
        "top_k": args.top_k,
        "batch_tokens": args.batch_tokens,
        "head_chunk_tokens": engine.head_chunk_tokens,
        "load_s": round(load_s, 2),
        "engine_s": round(engine_s, 3),
        "engine_tok_s": round(tokens / engine_s, 1),
        "engine_cpu_s": round(engine_cpu_s, 3),
        "engine_tok_per_cpu_s": round(tokens / engine_cpu_s, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if "dense" in times:
        dense_s, dense_cpu_s = times["dense"]
        result["dense_s"] = round(dense_s, 3)
        result["dense_tok_s"] = round(tokens / dense_s, 1)
        result["dense_cpu_s"] = round(dense_cpu_s, 3)
        result["dense_tok_per_cpu_s"] = round(tokens / dense_cpu_s, 1)
    if device.type == "cuda":
        peak = matmul_peak_flops(device)
        result["matmul_peak_tflops"] = round(peak / 1e12, 1)
        result["engine_mfu"] = round(2 * n_params * tokens / engine_s / peak, 4)
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    rows = [
        ("model", result["model"]),
        ("device / dtype / threads", f"{result['device']} / {result['dtype']} / {result['threads']}"),
        ("load average (1 min)", f"{result['load_average']}"),
        ("params / vocab", f"{n_params / 1e6:.1f} M / {engine.vocab_size}"),
        ("texts × seq-len", f"{len(texts)} × {args.seq_len}"),
        ("tokens (forward incl. padding)", f"{tokens} ({result['forward_tokens']})"),
        ("top-k / head chunk", f"{args.top_k} / {engine.head_chunk_tokens}"),
        ("engine tokens/s", f"{result['engine_tok_s']:.0f} ({engine_s:.2f} s)"),
        ("engine tokens per CPU-second", f"{result['engine_tok_per_cpu_s']:.0f} ({engine_cpu_s:.2f} CPU-s)"),
    ]
    if "dense_tok_s" in result:
        rows.append(("dense logits tokens/s", f"{result['dense_tok_s']:.0f} ({result['dense_s']:.2f} s)"))
        rows.append(
            ("dense tokens per CPU-second", f"{result['dense_tok_per_cpu_s']:.0f} ({dense_cpu_s:.2f} CPU-s)")
        )
    if "engine_mfu" in result:
        rows.append(("bf16 matmul peak", f"{result['matmul_peak_tflops']} TFLOP/s"))
        rows.append(("engine MFU", f"{100 * result['engine_mfu']:.1f} %"))
        rows.append(("max GPU memory", f"{result['max_memory_gib']} GiB"))
    print("| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
