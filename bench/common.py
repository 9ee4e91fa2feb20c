"""Shared pieces of the GPU-performance benchmarks (``bench/score.py``, ``bench/train.py``).

Imports only torch, transformers and numpy (no pydantic, deepspeed, redis), so the scripts run on a bare
GPU box. Timing, the matmul peak (the MFU denominator), peak memory, FLOP counts, random-init models of real
shapes, a markdown table and the JSON writer.

FLOP conventions (both are reported, named):

- ``N`` = non-embedding parameters + lm_head (the tied embedding counted once, as the head): the input
  embedding is a lookup, the head a ``[V, H]`` matmul. Forward ``2·N`` FLOPs per token, training step
  ``6·N`` (``8·N`` with activation recompute). Attention score/value matmuls are not in ``N``.
- "issue convention": ``N + embedding`` (the input embedding counted as if it were a matmul, so a tied
  weight counts twice) plus the causal attention matmuls ``QKᵀ`` and ``AV``, ``2·L·d_q·T²`` forward FLOPs
  per sequence of ``T`` (half the ``4·L·d_q·T²`` of full attention), ``d_q`` = heads × head_dim. This is the
  count that reproduces the performance issue's MFU figures (1B scoring 114k tok/s → 0.45, 7B 32k → 0.56,
  1B train 38.0k → 0.45, all on 795 TFLOP/s), so it is reported next to the ``N`` figure for comparison.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Llama shapes. ``tiny`` runs on 2 CPU cores in seconds; the others are the issue's real shapes.
SHAPES: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=512, vocab_size=8192, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
    # meta-llama/Llama-3.2-1B config.json (rope_scaling llama3 left out: it changes no FLOP and no kernel).
    "llama-3.2-1b": dict(
        hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
        max_position_embeddings=131072,
    ),
    # meta-llama/Llama-2-7b-hf config.json.
    "llama-2-7b": dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False, rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA, fp32 elsewhere; else a name in ``_DTYPES``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"--dtype must be 'auto' or one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def make_shape_model(
    shape: str, dtype: torch.dtype, device: str | torch.device, attn_implementation: str | None = None, seed: int = 0
) -> torch.nn.Module:
    """A random-init ``LlamaForCausalLM`` of the named shape, allocated and initialised directly on ``device``
    in ``dtype``.

    How it stays fast for 7B: the model is built inside ``with torch.device(device)`` (every parameter is
    created on the GPU, so the init kernels run there, not in one CPU thread) and through
    ``PreTrainedModel._from_config(dtype=...)``, which sets the default dtype while the modules are built (no
    fp32 copy first). transformers computes the RoPE ``inv_freq`` buffer in fp32 explicitly, so the dtype
    switch does not round it.
    """
    import transformers

    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {shape!r}")
    config = transformers.LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    torch.manual_seed(seed)
    with torch.device(device):
        try:
            model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype, **kwargs)
        except TypeError:  # transformers < 4.56 spells it torch_dtype
            model = transformers.LlamaForCausalLM._from_config(config, torch_dtype=dtype, **kwargs)
    return model


# ----------------------------------------------------------------------------------------------------------
# FLOP counts.
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter once (a tied embedding/head counted once)
    embedding: int  # input embedding
    lm_head: int  # output projection (the embedding itself when tied)
    tied: bool

    @property
    def n(self) -> int:
        """The MFU ``N``: non-embedding parameters + lm_head."""
        return self.total - self.embedding + (self.lm_head if self.tied else 0)

    @property
    def n_issue(self) -> int:
        """``N`` + the input embedding (the performance issue's count; see the module docstring)."""
        return self.n + self.embedding

    @property
    def trunk(self) -> int:
        """``N`` without the head: what a trunk-only forward multiplies."""
        return self.n - self.lm_head


def param_counts(model: torch.nn.Module) -> ParamCounts:
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    return ParamCounts(total=total, embedding=emb.numel(), lm_head=head.numel(), tied=emb is head)


def attention_flops(config, seq_lens: Sequence[int]) -> float:
    """Causal ``QKᵀ`` + ``AV`` forward FLOPs of sequences of these lengths: ``Σ 2·L·d_q·T²``."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_q = cfg.num_attention_heads * head_dim
    return float(sum(2 * cfg.num_hidden_layers * d_q * t * t for t in seq_lens))


# ----------------------------------------------------------------------------------------------------------
# Devices, timing, memory.
# ----------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Best wall and process-CPU seconds over the timed runs, every run's wall time, and the peak memory."""

    wall_s: float
    cpu_s: float
    walls: list[float] = field(default_factory=list)
    peak_memory_bytes: int = 0

    @property
    def median_s(self) -> float:
        return statistics.median(self.walls)


def interleaved_times(
    fns: Mapping[str, Callable[[], object]], repeats: int, device: torch.device, warmup: int = 1
) -> dict[str, Timing]:
    """Time each function ``repeats`` times after ``warmup`` untimed calls, round-robin across functions.

    Interleaving makes load from other processes on a shared machine hit every contender alike; the best run
    is the figure least disturbed by it. Process CPU seconds (all threads) are the contention-proof figure on
    a shared CPU box. Peak memory: CUDA ``max_memory_allocated`` over each function's calls (reset before
    each); elsewhere the process max RSS after its calls (cumulative, so only an increase is attributable).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        for fn in fns.values():
            fn()  # allocator, kernels, thread pools, compilation
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    peaks = {name: 0 for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            runs[name].append((time.perf_counter() - t0, time.process_time() - c0))
            peaks[name] = max(peaks[name], peak_memory_bytes(device))
    return {
        name: Timing(
            wall_s=min(w for w, _ in rs),
            cpu_s=min(c for _, c in rs),
            walls=[w for w, _ in rs],
            peak_memory_bytes=peaks[name],
        )
        for name, rs in runs.items()
    }


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA ``max_memory_allocated`` since the last reset; elsewhere the process max RSS (``ru_maxrss``)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def peak_memory_kind(device: torch.device) -> str:
    return "CUDA max allocated" if device.type == "cuda" else "process max RSS (cumulative)"


@dataclass(frozen=True)
class MatmulPeak:
    flops: float  # FLOP/s
    dtype: str
    n: int

    @property
    def label(self) -> str:
        return f"{self.dtype} {self.n}³ matmul"


def matmul_peak_flops(
    device: torch.device, n: int | None = None, iters: int | None = None, rounds: int = 3
) -> MatmulPeak:
    """Measured dense matmul throughput of this device, the MFU denominator: bf16 ``8192³`` on CUDA; on a
    CPU fp32 ``1024³`` with torch's current thread count (a labelled stand-in: CPUs have no bf16 peak worth
    the name). Best of ``rounds`` timings of ``iters`` back-to-back matmuls."""
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    n = n or (8192 if cuda else 1024)
    iters = iters or (20 if cuda else 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = math.inf
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return MatmulPeak(flops=2 * n**3 * iters / best, dtype=str(dtype).replace("torch.", ""), n=n)


# ----------------------------------------------------------------------------------------------------------
# Output.
# ----------------------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    return {
        "device": str(device),
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "cuda": torch.version.cuda,
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, result: Mapping, device: torch.device) -> None:
    """Write ``result`` with an ``environment`` block (device name, versions, load average)."""
    with open(path, "w") as f:
        json.dump({**result, "environment": environment(device)}, f, indent=2)


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a parameter called ``name`` (options other work adds: pass them only then)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"
