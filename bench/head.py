"""Micro-benchmark of the lm_head epilogue: hidden ``[N, H]`` → logits ``[N, V]`` → fp32 logsumexp, top-k ids
and logprobs, gold logprob (:func:`fuseflow.kernels.head.topk_logprobs`).

Contenders, all chunked by ``--chunk-tokens`` except the naive path:

- ``matmul``: the lm_head matmul alone (the floor: the target is ≤ 1.3 × this);
- ``naive``: full ``[N, V]`` logits → fp32 ``log_softmax`` → ``topk`` → gold gather;
- ``topk_logprobs[<method>]``: each method of the shared epilogue (``torch``, ``block``; ``triton`` on CUDA);
- ``compiled`` (CUDA only): a ``torch.compile``-d per-chunk epilogue (fp32 logsumexp + topk + gather), if
  it compiles.

Inputs are random (bf16 on CUDA, fp32 on a CPU unless ``--dtype``); agreement is against fp32 logits of the
same (rounded) numbers: top-1 id equal fraction, max |Δ logprob| over the top-k and over the gold token.
Timing: CUDA events on a GPU, ``perf_counter`` on a CPU; contenders interleaved, best of ``--repeats``.

    python bench/head.py --shape tiny                       # CPU: V=32000, H=512, 2048 tokens
    python bench/head.py --shape llama-3.2-1b --out head.json   # CUDA: V=128256, H=2048, 16384 tokens
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, parse_dtype, write_json  # noqa: E402

from fuseflow.kernels import head as kh  # noqa: E402

# (vocab, hidden) of the head. tiny: sized for a 2-core CPU; the others from the models' config.json.
HEAD_SHAPES = {
    "tiny": (32000, 512),
    "llama-3.2-1b": (128256, 2048),
    "llama-2-7b": (32000, 4096),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="tiny", choices=sorted(HEAD_SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16")
    p.add_argument("--tokens", type=int, default=None, help="rows N (default: 16384 on CUDA, 2048 on CPU)")
    p.add_argument("--chunk-tokens", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--block", type=int, default=kh.DEFAULT_BLOCK, help="vocabulary entries per top-k block")
    p.add_argument("--softcap", type=float, default=None, help="apply a Gemma-style soft-cap (default: none)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--logit-std", type=float, default=3.0, help="std of the random logits (sets how peaked)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per contender (best is reported)")
    p.add_argument("--methods", default=None, help="comma-separated subset of torch,block,triton")
    p.add_argument("--no-naive", action="store_true", help="skip the naive path (it holds [N, V] fp32 twice)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def make_inputs(v: int, h: int, n: int, dtype: torch.dtype, device: torch.device, logit_std: float, seed: int = 0):
    """hidden ``[N, H]``, weight ``[V, H]`` scaled so that logits have std ``logit_std``, gold ids ``[N]``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(v, h, generator=g) * (logit_std / h**0.5)).to(device=device, dtype=dtype)
    gold = torch.randint(0, v, (n,), generator=g).to(device)
    return hidden, weight, gold


def best_times(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1) -> dict:
    """Best milliseconds per contender: CUDA events around each call on a GPU (``perf_counter`` on a CPU),
    contenders interleaved so that any background load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    runs: dict[str, list[float]] = {name: [] for name in fns}
    peaks = {name: 0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                runs[name].append(start.elapsed_time(end))
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device))
            else:
                t0 = time.perf_counter()
                fn()
                runs[name].append(1e3 * (time.perf_counter() - t0))
    return {
        name: {"ms": min(ms), "runs_ms": [round(x, 3) for x in ms], "peak_bytes": peaks[name]}
        for name, ms in runs.items()
    }


@torch.no_grad()
def matmul_only(hidden, weight, chunk):
    for s in range(0, hidden.shape[0], chunk):
        F.linear(hidden[s : s + chunk], weight)


@torch.no_grad()
def naive(hidden, weight, gold, k, transform):
    """The plain path: every logit in fp32 at once, log_softmax, topk, gather."""
    z = kh.apply_logit_transform(F.linear(hidden, weight).float(), transform, inplace=True)  # [N, V]
    lp = torch.log_softmax(z, dim=-1)  # [N, V]
    values, ids = torch.topk(lp, k, dim=-1)
    return ids, values, lp.gather(1, gold[:, None])[:, 0]


def compiled_epilogue_fn(transform: kh.LogitTransform):
    """A torch.compile-d per-chunk epilogue (what inductor makes of fp32 lse + topk + gather)."""

    def epilogue(logits, gold, k: int):
        z = kh.apply_logit_transform(logits.float(), transform)  # [c, V]
        lse = torch.logsumexp(z, dim=-1)  # [c]
        values, ids = torch.topk(z, k, dim=-1)  # [c, k]
        return ids, values - lse[:, None], z.gather(1, gold[:, None])[:, 0] - lse

    return torch.compile(epilogue, dynamic=False)


@torch.no_grad()
def chunked_compiled(fn, hidden, weight, gold, k, chunk):
    outs = [
        fn(F.linear(hidden[s : s + chunk], weight), gold[s : s + chunk], k) for s in range(0, hidden.shape[0], chunk)
    ]
    return tuple(torch.cat(parts) for parts in zip(*outs))


@torch.no_grad()
def reference(hidden, weight, gold, k, transform, chunk):
    """fp32 logits of the same (rounded) inputs, fp64 log-softmax: ids [N, k], logprobs [N, k], gold [N]."""
    w = weight.float()
    ids, lps, golds = [], [], []
    for s in range(0, hidden.shape[0], chunk):
        z = kh.apply_logit_transform(F.linear(hidden[s : s + chunk].float(), w), transform)  # [c, V]
        lp = torch.log_softmax(z.double(), dim=-1)
        values, i = torch.topk(lp, k, dim=-1)
        ids.append(i)
        lps.append(values.float())
        golds.append(lp.gather(1, gold[s : s + chunk, None])[:, 0].float())
    return torch.cat(ids), torch.cat(lps), torch.cat(golds)


def agreement(out, ref) -> dict:
    ids, lp, gl = out
    rids, rlp, rgl = ref
    return {
        "top1_equal": float((ids[:, 0] == rids[:, 0]).float().mean()),
        "max_abs_dlogprob_topk": float((lp.float() - rlp).abs().max()),
        "max_abs_dlogprob_gold": float((gl.float() - rgl).abs().max()),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = parse_dtype(args.dtype, device)
    v, h = HEAD_SHAPES[args.shape]
    n = args.tokens or (16384 if device.type == "cuda" else 2048)
    k, chunk = args.top_k, args.chunk_tokens
    transform = kh.LogitTransform(softcap=args.softcap, temperature=args.temperature)
    hidden, weight, gold = make_inputs(v, h, n, dtype, device, args.logit_std)

    default_methods = ["torch", "block"] + (["triton"] if device.type == "cuda" else [])
    methods = args.methods.split(",") if args.methods else default_methods
    fns: dict[str, Callable[[], object]] = {"matmul": lambda: matmul_only(hidden, weight, chunk)}
    runs: dict[str, Callable[[], tuple]] = {}
    if not args.no_naive:
        runs["naive"] = lambda: naive(hidden, weight, gold, k, transform)
    for m in methods:
        runs[f"topk_logprobs[{m}]"] = lambda m=m: kh.topk_logprobs(
            hidden, weight, None, gold, k, transform=transform, chunk_tokens=chunk, method=m, block=args.block
        )
    notes: dict[str, str] = {}
    if device.type == "cuda" and not args.no_compile:
        try:
            fn = compiled_epilogue_fn(transform)
            chunked_compiled(fn, hidden, weight, gold, k, chunk)  # compiles here
            runs["compiled"] = lambda: chunked_compiled(fn, hidden, weight, gold, k, chunk)
        except Exception as e:  # report, do not fail the benchmark
            notes["compiled"] = f"did not compile: {type(e).__name__}: {str(e)[:200]}"

    ref = reference(hidden, weight, gold, k, transform, chunk)
    agree = {}
    for name, fn in list(runs.items()):
        try:
            agree[name] = agreement(fn(), ref)
        except Exception as e:
            notes[name] = f"failed: {type(e).__name__}: {str(e)[:200]}"
            del runs[name]
    fns.update(runs)
    times = best_times(fns, args.repeats, device)
    base = times["matmul"]["ms"]

    header = ["contender", "ms (best)", "× matmul", "top-1 = fp32 ref", "max |Δ lp| top-k", "max |Δ lp| gold"]
    if device.type == "cuda":
        header.append("peak GiB")
    rows = []
    for name, t in times.items():
        a = agree.get(name)
        row = [
            name,
            f"{t['ms']:.2f}",
            f"{t['ms'] / base:.2f}",
            f"{a['top1_equal']:.4f}" if a else "",
            f"{a['max_abs_dlogprob_topk']:.2e}" if a else "",
            f"{a['max_abs_dlogprob_gold']:.2e}" if a else "",
        ]
        if device.type == "cuda":
            row.append(f"{t['peak_bytes'] / 2**30:.2f}")
        rows.append(row)
    print(
        f"shape {args.shape} (V={v}, H={h}), N={n}, chunk {chunk}, k={k}, {str(dtype).replace('torch.', '')} on "
        f"{device} ({torch.get_num_threads()} threads), block {args.block}, {transform}, best of {args.repeats}\n"
    )
    print(markdown_table(header, rows))
    for name, note in notes.items():
        print(f"\n{name}: {note}")
    if args.out:
        result = {
            "shape": args.shape, "vocab": v, "hidden": h, "tokens": n, "chunk_tokens": chunk, "top_k": k,
            "block": args.block, "dtype": str(dtype).replace("torch.", ""), "transform": repr(transform),
            "repeats": args.repeats, "cpu_default_method": kh.CPU_DEFAULT_METHOD,
            "results": {
                name: {**times[name], **agree.get(name, {}), "x_matmul": times[name]["ms"] / base} for name in times
            },
            "notes": notes,
        }
        if device.type == "cuda":
            result["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            result["triton"] = triton.__version__
        except ImportError:
            result["triton"] = None
        write_json(args.out, result, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
