"""Training-step throughput of the fusion objective: forward + backward + optimizer step on random batches.

Modes, interleaved across repeats on one model and one optimizer:

- ``clm``: no teachers, λ = 1 (the CLM-only baseline);
- ``fusion``: two teachers' random sparse top-k rows (descending logprobs holding 60–99 % of the mass, 90 %
  of the positions aligned, the rest the one-hot gold fallback), fused by a ``FUSIONS`` function (default
  ``min_ce``) and trained with ``λ·CLM + (1−λ)·KL``, λ = 0.9.

The step is ``FusionObjective.forward`` of ``fuseflow.trainer.loop`` rebuilt from the same functions
(``split_head`` → trunk → ``hidden[:, :-1]`` → ``FUSIONS[fn]`` and ``teacher_stats`` under no_grad →
``fusion_loss``, fused or chunked per ``--loss-impl``), because ``loop`` imports the run config (pydantic)
and DeepSpeed, which a bare GPU box lacks. Then backward, clip-norm 1.0 and AdamW (β 0.9/0.95, wd 0.1 off
norms; fused on CUDA) — DeepSpeed's engine only with ``--deepspeed``. Batches live on the device (no host copy is timed).

Tokens are ``B × T`` (the positions the trunk runs); MFU = ``6·N·tokens/s`` over a bf16 matmul peak measured
in the run (``8·N`` "with recompute" under ``--activation-checkpointing``), ``N`` = non-embedding params +
lm_head; the issue's convention (embedding counted, causal attention added) is reported next to it.

    python bench/train.py                                        # tiny shape on CPU
    python bench/train.py --shape llama-3.2-1b --activation-checkpointing --out train-1b.json   # GPU, 8×2048
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

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

from fuseflow.fuse.fusion import FUSIONS  # noqa: E402
from fuseflow.fuse.loss import LossParts, fusion_loss  # noqa: E402
from fuseflow.fuse.stats import TeacherStats, teacher_stats  # noqa: E402
from fuseflow.models import split_head  # noqa: E402

MODES = ("clm", "fusion")


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--shape", default="tiny" if not cuda else "llama-3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument(
        "--dtype", default="auto", help="parameter dtype: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16"
    )
    p.add_argument("--batch-size", type=int, default=8 if cuda else 4)
    p.add_argument("--seq-len", type=int, default=2048 if cuda else 128, help="T: tokens per sequence (trunk input)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    p.add_argument("--fusion", default="min_ce", help="a name in fuseflow.fuse.fusion.FUSIONS")
    p.add_argument("--teachers", type=int, default=2)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--lam", type=float, default=0.9, help="λ of the fusion mode (clm uses 1)")
    p.add_argument("--loss-chunk-tokens", type=int, default=1024, help="fusion_loss chunk_tokens")
    p.add_argument("--loss-impl", default=None, help="fusion_loss impl= (chunked, fused, …) when it has the option")
    p.add_argument("--activation-checkpointing", action="store_true", help="model.gradient_checkpointing_enable()")
    p.add_argument(
        "--attn-implementation", default=None, help="sdpa (default), eager, flex_attention, flash_attention_2"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the trunk")
    p.add_argument("--deepspeed", action="store_true", help="step through a DeepSpeed engine (needs deepspeed)")
    p.add_argument("--zero-stage", type=int, default=0, help="ZeRO stage with --deepspeed")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (best reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or not args.modes:
        p.error(f"--modes must be a comma-separated subset of {MODES}, got {bad or args.modes}")
    if args.fusion not in FUSIONS:
        p.error(f"--fusion must be one of {sorted(FUSIONS)}, got {args.fusion!r}")
    if args.batch_size < 1 or args.seq_len < 2 or args.teachers < 1 or args.top_k < 1 or args.steps < 1:
        p.error("--batch-size, --teachers, --top-k and --steps must be >= 1 and --seq-len >= 2")
    if args.loss_impl is not None and not accepts(fusion_loss, "impl"):
        p.error("--loss-impl: this fusion_loss has no impl= parameter")
    return args


# ----------------------------------------------------------------------------------------------------------
# Random batches (pure functions of a generator).
# ----------------------------------------------------------------------------------------------------------


def random_batch(batch_size: int, seq_len: int, vocab: int, generator: torch.Generator, device) -> dict:
    """Full-length CLM batch as ``collate`` builds it: ``input_ids [B, T]``, all-ones ``attention_mask``,
    ``labels [B, T-1]`` (the next token), ``loss_mask [B, T-1]`` all counted."""
    ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator)  # [B, T]
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": ids[:, 1:].contiguous().to(device),  # [B, T-1]
        "loss_mask": torch.ones((batch_size, seq_len - 1), dtype=torch.bool).to(device),  # [B, T-1]
    }


def random_teacher_rows(
    labels: torch.Tensor, n_teachers: int, k: int, vocab: int, generator: torch.Generator,
    aligned_frac: float = 0.9, gold_hit_frac: float = 0.5,
) -> dict:
    """Teachers' aligned sparse top-k rows as ``collate`` stacks them (``AlignedDist`` convention).

    ``labels [B, T]`` (CPU) → ``teacher_ids [N, B, T, k]`` int64, ``teacher_logprobs [N, B, T, k]`` fp32
    descending, ``teacher_gold [N, B, T]``, ``teacher_aligned [N, B, T]`` bool. A row is the log-softmax of
    ``k`` sorted N(0, 1.5²) logits shifted by ``log m``, ``m ~ U(0.6, 0.99)`` the top-k mass; the gold token is
    the row's top entry with probability ``gold_hit_frac`` (gold logprob = that entry), else absent (gold
    logprob below the row's last entry). Unaligned positions hold the one-hot gold fallback.
    """
    b, t = labels.shape
    shape = (n_teachers, b, t)
    ids = torch.randint(0, vocab, (*shape, k), generator=generator)  # [N, B, T, k]
    logits = (torch.randn((*shape, k), generator=generator) * 1.5).sort(dim=-1, descending=True).values
    mass = 0.6 + 0.39 * torch.rand(shape, generator=generator)  # [N, B, T]
    logprobs = torch.log_softmax(logits, dim=-1) + mass.log().unsqueeze(-1)  # [N, B, T, k]
    gold_ids = labels.unsqueeze(0).expand(shape)  # [N, B, T]
    hit = torch.rand(shape, generator=generator) < gold_hit_frac  # [N, B, T]
    ids[..., 0] = torch.where(hit, gold_ids, ids[..., 0])
    below = logprobs[..., -1] - torch.empty(shape).exponential_(1.0, generator=generator)  # [N, B, T]
    gold = torch.where(hit, logprobs[..., 0], below)  # [N, B, T]
    aligned = torch.rand(shape, generator=generator) < aligned_frac  # [N, B, T]
    onehot_ids = torch.zeros_like(ids)
    onehot_ids[..., 0] = gold_ids
    onehot_lp = torch.full_like(logprobs, -math.inf)
    onehot_lp[..., 0] = 0.0
    return {
        "teacher_ids": torch.where(aligned.unsqueeze(-1), ids, onehot_ids),
        "teacher_logprobs": torch.where(aligned.unsqueeze(-1), logprobs, onehot_lp),
        "teacher_gold": torch.where(aligned, gold, torch.zeros_like(gold)),
        "teacher_aligned": aligned,
    }


# ----------------------------------------------------------------------------------------------------------
# The objective (FusionObjective.forward of fuseflow.trainer.loop, same functions).
# ----------------------------------------------------------------------------------------------------------


class BenchObjective(torch.nn.Module):
    """The target model and its loss as one module (so ``--deepspeed`` can wrap it as the trainer does)."""

    def __init__(self, model, fusion: str, top_k: int, chunk_tokens: int, loss_impl: str | None, compile_trunk: bool):
        super().__init__()
        self.model = model
        head = split_head(model)
        self._trunk = torch.compile(head.trunk) if compile_trunk else head.trunk
        self._softcap = head.logit_softcap
        self._head = model.get_output_embeddings()
        self.fusion, self.fusion_name, self.top_k, self.chunk_tokens = FUSIONS[fusion], fusion, top_k, chunk_tokens
        self._loss_kw = {} if loss_impl is None else {"impl": loss_impl}

    def forward(self, batch: dict, lam: float) -> tuple[LossParts, TeacherStats | None]:
        hidden = self._trunk(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=None, use_cache=False
        ).last_hidden_state  # [B, T, H]; full-length rows, one sample each: nothing to pack
        hidden = hidden[:, :-1]  # [B, T-1, H]: position t predicts token t+1
        fused_ids = fused_lp = teacher_ce = None
        if "teacher_ids" in batch:
            with torch.no_grad():
                fused_ids, fused_lp = self.fusion(
                    batch["teacher_ids"], batch["teacher_logprobs"], batch["teacher_gold"], batch["teacher_aligned"],
                    batch["loss_mask"], top_k=self.top_k,
                )  # [B, T-1, k] each
                teacher_ce = teacher_stats(  # CE, fidelity and choices, as the trainer logs them
                    batch["teacher_ids"], batch["teacher_logprobs"], batch["teacher_gold"], batch["teacher_aligned"],
                    batch["labels"], batch["loss_mask"], self.fusion_name,
                )
        else:
            lam = 1.0
        parts = fusion_loss(
            hidden, self._head.weight, batch["labels"], fused_ids, fused_lp, batch["loss_mask"], lam=lam,
            chunk_tokens=self.chunk_tokens, logit_softcap=self._softcap, lm_head_bias=getattr(self._head, "bias", None),
            **self._loss_kw,
        )
        return parts, teacher_ce


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (as ``fuseflow.trainer.loop.param_groups``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def torch_stepper(objective: BenchObjective, device: torch.device, lr: float = 1e-5, clip: float = 1.0):
    """One optimizer step per call: loss, backward, clip-norm, AdamW (fused on CUDA), zero_grad."""
    opt = torch.optim.AdamW(
        param_groups(objective.model, 0.1), lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda"
    )
    params = [p for p in objective.model.parameters() if p.requires_grad]

    def step(batch: dict, lam: float) -> LossParts:
        parts, _ = objective(batch, lam)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return parts

    return step


def deepspeed_stepper(
    objective: BenchObjective, device: torch.device, dtype: torch.dtype, zero_stage: int, batch_size: int
):
    """The trainer's DeepSpeed path (``fuseflow.trainer.loop.train``): engine(batch) → backward → step."""
    if device.type != "cuda":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    opt = torch.optim.AdamW(param_groups(objective.model, 0.1), lr=1e-5, betas=(0.9, 0.95))
    config = {
        "train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": 1, "train_batch_size": batch_size,
        "gradient_clipping": 1.0, "zero_optimization": {"stage": zero_stage}, "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if dtype == torch.bfloat16:
        config["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=objective, optimizer=opt, config=config)

    def step(batch: dict, lam: float) -> LossParts:
        parts, _ = engine(batch, lam)
        engine.backward(parts.loss)
        engine.step()
        return parts

    return step


# ----------------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = make_shape_model(args.shape, dtype, device, args.attn_implementation, seed=args.seed)
    model.train()
    if args.activation_checkpointing:
        # The trainer calls gradient_checkpointing_enable; transformers 5.x renamed it (same behaviour).
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    build_s = time.perf_counter() - t0
    counts = param_counts(model)
    vocab = model.config.vocab_size

    gen = torch.Generator().manual_seed(args.seed)
    clm_batch = random_batch(args.batch_size, args.seq_len, vocab, gen, device)
    batches = {"clm": (clm_batch, 1.0)}
    if "fusion" in args.modes:
        rows = random_teacher_rows(clm_batch["labels"].cpu(), args.teachers, args.top_k, vocab, gen)
        batches["fusion"] = ({**clm_batch, **{k: v.to(device) for k, v in rows.items()}}, args.lam)

    objective = BenchObjective(model, args.fusion, args.top_k, args.loss_chunk_tokens, args.loss_impl, args.compile)
    if args.deepspeed:
        step = deepspeed_stepper(objective, device, dtype, args.zero_stage, args.batch_size)
    else:
        step = torch_stepper(objective, device)
    losses: dict[str, list[float]] = {m: [] for m in args.modes}

    def runner(mode: str):
        batch, lam = batches[mode]

        def run() -> None:
            parts = step(batch, lam)
            losses[mode].append(float(parts.loss.detach()))  # the trainer reads the loss every step too

        return run

    times = interleaved_times({m: runner(m) for m in args.modes}, args.steps, device, warmup=args.warmup)
    peak = matmul_peak_flops(device)

    tokens = args.batch_size * args.seq_len  # [B, T] trunk positions per step
    attn = 3 * attention_flops(model.config, [args.seq_len] * args.batch_size)  # forward + backward (2×)
    recompute = args.activation_checkpointing
    modes_out = {}
    for mode in args.modes:
        tm = times[mode]
        tok_s = tokens / tm.wall_s
        row = {
            "step_s": round(tm.wall_s, 5),
            "step_median_s": round(tm.median_s, 5),
            "step_cpu_s": round(tm.cpu_s, 5),
            "steps_wall_s": [round(w, 5) for w in tm.walls],
            "tokens_per_s": round(tok_s, 1),
            "mfu": round(6 * counts.n * tok_s / peak.flops, 4),
            "mfu_issue_convention": round((6 * counts.n_issue * tokens + attn) / tm.wall_s / peak.flops, 4),
            "peak_memory_bytes": tm.peak_memory_bytes,
            "loss_last": losses[mode][-1],
        }
        if recompute:
            row["mfu_with_recompute"] = round(8 * counts.n * tok_s / peak.flops, 4)
        if not all(math.isfinite(x) for x in losses[mode]):
            raise RuntimeError(f"mode {mode}: non-finite loss {losses[mode]}")
        modes_out[mode] = row
    if "clm" in modes_out and "fusion" in modes_out:
        ratio = modes_out["fusion"]["step_s"] / modes_out["clm"]["step_s"]
        modes_out["fusion"]["overhead_vs_clm"] = round(ratio - 1, 4)

    result = {
        "bench": "train",
        "shape": args.shape,
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "tokens_per_step": tokens,
        "params_n": counts.n,
        "params_total": counts.total,
        "params_n_issue": counts.n_issue,
        "fusion": args.fusion,
        "teachers": args.teachers,
        "top_k": args.top_k,
        "lam": args.lam,
        "loss_chunk_tokens": args.loss_chunk_tokens,
        "loss_impl": args.loss_impl,
        "activation_checkpointing": recompute,
        "attn_implementation": model.config._attn_implementation,
        "compile": args.compile,
        "optimizer": "deepspeed" if args.deepspeed else "torch AdamW" + (" fused" if device.type == "cuda" else ""),
        "warmup": args.warmup,
        "steps": args.steps,
        "build_s": round(build_s, 2),
        "matmul_peak_flops": peak.flops,
        "matmul_peak_label": peak.label,
        "peak_memory_kind": peak_memory_kind(device),
        "modes": modes_out,
    }

    print(
        f"shape {args.shape} (N = non-embedding + lm_head = {counts.n:,} params; {counts.total:,} total), "
        f"{result['dtype']}, B×T = {args.batch_size}×{args.seq_len}, attn {result['attn_implementation']}, "
        f"checkpointing {recompute}, compile {args.compile}, {result['optimizer']}, "
        f"peak {peak.flops / 1e12:.3f} TFLOP/s ({peak.label}), best of {args.steps} after {args.warmup} warm-up\n"
    )
    header = ["mode", "step s (median)", "CPU s", "tokens/s", "MFU 6·N", "MFU issue conv."]
    if recompute:
        header.append("MFU 8·N (recompute)")
    header += ["peak memory", "overhead vs clm"]
    rows = []
    for mode, r in modes_out.items():
        row = [
            mode, f"{r['step_s']:.4f} ({r['step_median_s']:.4f})", f"{r['step_cpu_s']:.4f}", f"{r['tokens_per_s']:.0f}",
            f"{r['mfu']:.3f}", f"{r['mfu_issue_convention']:.3f}",
        ]
        if recompute:
            row.append(f"{r['mfu_with_recompute']:.3f}")
        ovh = r.get("overhead_vs_clm")
        row += [gib(r["peak_memory_bytes"]), "" if ovh is None else f"{100 * ovh:+.1f} %"]
        rows.append(row)
    print(markdown_table(header, rows))
    if args.out:
        write_json(args.out, result, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
