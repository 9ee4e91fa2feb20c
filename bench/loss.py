"""Time and peak tensor memory of ``fusion_loss``'s two implementations, forward + backward, on CPU.

``impl="chunked"`` (checkpointed chunks: 4 head matmuls per chunk) against ``impl="fused"`` (gradients in the
forward: 3), on random inputs: ``n`` counted positions of hidden size H, a vocabulary V, k teacher ids per
position. Two objectives: the fusion loss (λ = 0.9, τ = 2, k ids) and CLM alone. Time: best of ``--repeats``
runs of forward + backward (after one warm-up; the two impls' runs interleaved). Peak: the most bytes held
at once by tensors that the ops of one forward + backward create (storages tracked by a dispatch mode, freed
ones dropped; the inputs and parameters themselves are not counted, the weight gradient is).

    python bench/loss.py
    python bench/loss.py --n 2048 --vocab 32000 --hidden 256 --chunk-tokens 1024 --out /tmp/bench-loss.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fuseflow.fuse.loss import LOSS_IMPLS, fusion_loss
from fuseflow.measure import PeakTensorBytes


def make_inputs(n: int, v: int, h: int, k: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, n, h, generator=g).to(dtype).requires_grad_()  # [1, n, H]
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).requires_grad_()  # [V, H]
    labels = torch.randint(0, v, (1, n), generator=g)  # [1, n]
    ids = torch.rand(n, v, generator=g).argsort(-1)[:, :k].unsqueeze(0).contiguous()  # [1, n, k]
    lps = torch.randn(1, n, k, generator=g).log_softmax(-1).sort(-1, descending=True).values  # [1, n, k]
    mask = torch.ones(1, n, dtype=torch.bool)
    return hidden, weight, labels, ids, lps, mask


def step(impl: str, objective: str, inputs, chunk_tokens: int) -> None:
    hidden, weight, labels, ids, lps, mask = inputs
    hidden.grad = weight.grad = None
    if objective == "fusion":
        parts = fusion_loss(hidden, weight, labels, ids, lps, mask, lam=0.9, temperature=2.0,
                            chunk_tokens=chunk_tokens, impl=impl)
    else:
        parts = fusion_loss(hidden, weight, labels, None, None, mask, lam=1.0, chunk_tokens=chunk_tokens, impl=impl)
    parts.loss.backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="counted positions")
    ap.add_argument("--vocab", type=int, default=32000, help="V")
    ap.add_argument("--hidden", type=int, default=256, help="H")
    ap.add_argument("--k", type=int, default=10, help="teacher ids per position")
    ap.add_argument("--chunk-tokens", type=int, default=1024, help="fusion_loss's chunk_tokens")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per cell; the best is reported")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    inputs = make_inputs(args.n, args.vocab, args.hidden, args.k, dtype)
    rows = []
    for objective in ("fusion", "clm"):
        times = {impl: [] for impl in LOSS_IMPLS}
        for impl in LOSS_IMPLS:
            step(impl, objective, inputs, args.chunk_tokens)  # warm-up
        for _ in range(args.repeats):
            for impl in LOSS_IMPLS:  # interleaved, so that a change in the machine's load hits both
                t0 = time.perf_counter()
                step(impl, objective, inputs, args.chunk_tokens)
                times[impl].append(time.perf_counter() - t0)
        for impl in LOSS_IMPLS:
            with PeakTensorBytes() as peak:
                step(impl, objective, inputs, args.chunk_tokens)
            rows.append({"objective": objective, "impl": impl, "best_s": min(times[impl]), "times_s": times[impl],
                         "peak_tensor_bytes": peak.peak})
    print(f"n={args.n} V={args.vocab} H={args.hidden} k={args.k} chunk_tokens={args.chunk_tokens} {args.dtype}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {args.repeats}\n")
    print("| objective | impl | fwd+bwd best (s) | all runs (s) | peak tensor MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        runs = " ".join(f"{t:.3f}" for t in r["times_s"])
        print(f"| {r['objective']} | {r['impl']} | {r['best_s']:.3f} | {runs} | {r['peak_tensor_bytes'] / 2**20:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
                      f, indent=2)


if __name__ == "__main__":
    main()
