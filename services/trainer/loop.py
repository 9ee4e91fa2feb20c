"""The training recipe: setup → train → save_checkpoint → cleanup, on DeepSpeed.

One code path on CPU (gloo) and GPU (nccl). Loss = ``λ·CLM + (1−λ)·KL(fused ‖ target)`` on the aligned
sparse top-k (FuseLLM, arXiv 2401.10491 eq. 4); with no teachers it is plain CLM (the baseline).

The loop consumes *groups* of ready samples (a sample plus every teacher's aligned distribution) from
any iterator — the in-process pipeline or the Redis transport — and calls ``on_durable`` with the sample
ids whose training a checkpoint has made durable (the Redis trainer XACKs them then).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from fuseflow.align.fidelity import FIDELITY_FIELDS, fidelity_summary
from fuseflow.config import FusionConfig, TrainConfig
from fuseflow.fuse.fusion import FUSIONS, segment_ce, sequence_ce
from fuseflow.fuse.loss import LossParts, fusion_loss, student_gold
from fuseflow.fuse.stats import TeacherStats, teacher_stats
from fuseflow.models import split_head
from fuseflow.sparse import AlignedDist, Sample

from .batches import IGNORE, FusionBatch, collate

log = logging.getLogger(__name__)

ReadyGroup = Sequence[tuple[Sample, Mapping[str, AlignedDist] | None]]


# ----------------------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU); returns (rank, world).

    Under a launcher (deepspeed, torchrun, a k8s indexed Job) the env vars are set; a plain single process
    gets world size 1 over an in-memory store: no port at all. Probing a free port for a TCPStore and binding
    it later raced other processes (EADDRINUSE), and writing RANK/MASTER_PORT into ``os.environ`` made every
    child started afterwards (a stack's trainer) rendezvous on this process's port as a launched rank 0.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if "RANK" not in os.environ:
            os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's engine reads it; a child ignores it without RANK
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        announce_op_builds()
        deepspeed.init_distributed(dist_backend=backend, verbose=False)  # adopts an initialised group
    return dist.get_rank(), dist.get_world_size()


# DeepSpeed ops its first start compiles with a C++ compiler when the installed wheel lacks them (issue 15:
# minutes, unannounced): on the CPU accelerator, the shared-memory collectives of its comm backend.
_JIT_OPS = ("ShareMemCommBuilder",)


def pending_op_builds() -> list[tuple[str, str, Path]]:
    """``(op name, DS_BUILD_* variable, build directory)`` of every DeepSpeed op that initialising DeepSpeed
    here will compile: compatible, not prebuilt into the installed DeepSpeed, not in the JIT cache yet."""
    try:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # another DeepSpeed or torch layout: nothing to say rather than a wrong hint
        return []
    out = []
    for class_name in _JIT_OPS:
        builder = get_accelerator().create_op_builder(class_name)
        if builder is None or installed_ops.get(builder.NAME) or not deepspeed.ops.__compatible_ops__.get(builder.NAME):
            continue
        build_dir = Path(_get_build_directory(builder.NAME, verbose=False))
        if not any(build_dir.glob(f"{builder.NAME}*.so")):
            out.append((builder.NAME, builder.BUILD_VAR, build_dir))
    return out


def announce_op_builds() -> None:
    """Say before DeepSpeed starts that it is about to compile C++ ops, how long, and how to avoid it."""
    pending = pending_op_builds()
    if not pending:
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()._name
    for name, build_var, build_dir in pending:
        log.warning(
            "DeepSpeed compiles its C++ op %s now, once (a few minutes on a small CPU; cached in %s). To skip it: "
            "install DeepSpeed with the op prebuilt (DS_ACCELERATOR=%s %s=1 pip install --no-build-isolation "
            "deepspeed, after torch), or keep TORCH_EXTENSIONS_DIR on a persistent volume",
            name, build_dir, accelerator, build_var,
        )


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from (Python's, numpy's, torch's on every device) with the run
    config's ``seed``: dropout and the initialisation of anything new follow it (issue 25)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """Linear warmup then cosine decay to ``min_lr_ratio`` (FuseLLM: warmup 0.008 of the steps, cosine)."""
    warm = max(1, round(warmup_ratio * total_steps))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights (as HF Trainer, which FuseLLM trains with)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def deepspeed_config(cfg: TrainConfig, world: int) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.samples_per_step(world),
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    return ds


class FusionObjective(torch.nn.Module):
    """The target model and its objective as one module, so DeepSpeed wraps a forward that returns the loss.

    The head is applied by :func:`fusion_loss` in token chunks, so ``[B, T, V]`` fp32 logits never exist.
    """

    def __init__(
        self, model: torch.nn.Module, fusion: FusionConfig, chunk_tokens: int, zero_stage: int, loss_impl: str = "fused"
    ):
        super().__init__()
        self.model = model
        self.fusion = fusion
        self.chunk_tokens = chunk_tokens
        self.loss_impl = loss_impl
        head = split_head(model)
        self._trunk, self._softcap = head.trunk, head.logit_softcap
        self._head = model.get_output_embeddings()
        if zero_stage == 3:
            import deepspeed

            # The head weight is used outside its module's forward: tell ZeRO-3 to gather it for us.
            deepspeed.zero.register_external_parameter(self, self._head.weight)

    def forward(self, batch: FusionBatch) -> tuple[LossParts, TeacherStats | None]:
        # use_cache=False: no KV cache is built in training, and transformers only reads packed position ids
        # (restarts = sample boundaries) when there is no cache.
        hidden = self._trunk(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        hidden = hidden[:, :-1]  # [B, L-1, H]: position t predicts token t+1
        lam = self.fusion.lam
        fused_ids = fused_lp = stats = None
        if batch.teacher_ids is not None:
            ce = None
            if self.fusion.criterion == "text":
                if batch.teacher_text_ce is None:
                    raise ValueError("fusion.criterion 'text' needs each teacher's whole-text nll (AlignedDist.meta "
                                     "'nll', sent by fuseflow's aligner); a teacher's results carry none")
                ce = batch.teacher_text_ce
            with torch.no_grad():
                ids, lps, gold, aligned = (batch.teacher_ids, batch.teacher_logprobs, batch.teacher_gold,
                                           batch.teacher_aligned)
                if self.fusion.student_candidate:  # the student as it is now: one more candidate
                    ids, lps, gold, aligned, ce = self._with_student(hidden, batch, ids, lps, gold, aligned, ce)
                fused_ids, fused_lp = FUSIONS[self.fusion.function](
                    ids, lps, gold, aligned, batch.loss_mask,
                    top_k=self.fusion.top_k, segments=batch.segment_ids,
                    renormalise=self.fusion.kl == "renormalised", ce=ce,
                )  # [B, L-1, k] each
                if self.fusion.student_candidate:  # the teachers' statistics are of the teachers alone
                    ce = ce[:-1] if ce is not None else None
                stats = teacher_stats(
                    batch.teacher_ids, batch.teacher_logprobs, batch.teacher_gold, batch.teacher_aligned,
                    batch.labels, batch.loss_mask, self.fusion.function, segments=batch.segment_ids,
                    num_samples=len(batch.sample_ids), ce=ce,
                )
        else:
            lam = 1.0
        parts = fusion_loss(
            hidden,
            self._head.weight,
            batch.labels,
            fused_ids,
            fused_lp,
            batch.loss_mask,
            lam=lam,
            temperature=self.fusion.temperature,
            chunk_tokens=self.chunk_tokens,
            logit_softcap=self._softcap,
            lm_head_bias=getattr(self._head, "bias", None),
            impl=self.loss_impl,
            tail=self.fusion.kl == "tail",
        )
        return parts, stats

    def _with_student(self, hidden, batch: FusionBatch, ids, lps, gold, aligned, ce):
        """The teachers' inputs with the student as candidate N+1 (``fusion.student_candidate``): ranked by its own
        logprob of the text (aligned wherever the loss counts; ``text``: its mean nll over the sample's positions,
        as a teacher's whole-text nll per target position), its row the gold token alone. Where it is picked the
        KL is the CE of the gold token (either KL; × τ² at ``log_softmax(logits / τ)``), so at temperature 1 the
        loss there is CLM alone."""
        mask = batch.loss_mask
        s_gold = student_gold(hidden.detach(), self._head.weight, batch.labels, mask, self.chunk_tokens,
                              self._softcap, getattr(self._head, "bias", None))  # [B, T]
        s_ids = torch.zeros_like(ids[0])  # [B, T, k]: the gold id first, nothing else
        s_ids[..., 0] = batch.labels
        s_lp = torch.full_like(lps[0], -math.inf)
        s_lp[..., 0] = 0.0
        ids = torch.cat([ids, s_ids.unsqueeze(0)])
        lps = torch.cat([lps, s_lp.unsqueeze(0)])
        gold = torch.cat([gold, s_gold.unsqueeze(0).to(gold.dtype)])
        aligned = torch.cat([aligned, mask.unsqueeze(0)])
        if ce is not None:
            g, m = s_gold.unsqueeze(0), mask.unsqueeze(0)
            own = sequence_ce(g, m, mask).unsqueeze(-1) if batch.segment_ids is None else \
                segment_ce(g, m, mask, batch.segment_ids)  # [1, B, 1] or [1, B, T]
            ce = torch.cat([ce, own.expand(1, *ce.shape[1:]).to(ce.dtype)])
        return ids, lps, gold, aligned, ce


# ----------------------------------------------------------------------------------------------------------
# Train
# ----------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    steps: int
    samples: int
    tokens: int
    seconds: float
    final_loss: float | None
    model_dir: Path
    history: list[dict] = field(default_factory=list)
    # Per teacher over the whole run (all ranks; since the last start when resumed): the fidelity of its
    # aligned rows and its share of the samples per corpus under the fusion (issue 21). Empty for CLM.
    teachers: dict = field(default_factory=dict)


def trained_ids_path(run_dir: Path, rank: int, world: int) -> Path:
    """The log of sample ids this rank trained, one per line, up to the last optimizer step
    (``trained_samples.log``; one file per rank when there are several, their union is the run's)."""
    return Path(run_dir) / ("trained_samples.log" if world == 1 else f"trained_samples.rank{rank}.log")


def empty_batch(tokenizer) -> FusionBatch:
    """A batch with no counted position: a rank without a sample for this micro-step runs it (zero loss,
    zero gradients) so that every rank takes part in each step's collectives (the online trainer)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return FusionBatch(
        sample_ids=[],
        teachers=[],
        input_ids=torch.full((1, 2), pad, dtype=torch.int64),  # [1, 2]
        attention_mask=torch.ones((1, 2), dtype=torch.int64),  # [1, 2]
        labels=torch.full((1, 1), IGNORE, dtype=torch.int64),  # [1, 1]
        loss_mask=torch.zeros((1, 1), dtype=torch.bool),  # [1, 1]
        teacher_ids=None,
        teacher_logprobs=None,
        teacher_gold=None,
        teacher_aligned=None,
    )


def _batches(groups: Iterable[ReadyGroup], skip_samples: int) -> Iterator[ReadyGroup]:
    """Drop the first ``skip_samples`` (already trained before a resume), regrouping the rest."""
    for group in groups:
        if not group:  # a lockstep placeholder (see ``empty_batch``), not a sample
            yield group
            continue
        if skip_samples >= len(group):
            skip_samples -= len(group)
            continue
        yield group[skip_samples:]
        skip_samples = 0


def train(
    model: torch.nn.Module,
    tokenizer,
    groups: Iterable[ReadyGroup],
    *,
    teachers: Sequence[str],
    train_cfg: TrainConfig,
    fusion_cfg: FusionConfig,
    total_steps: int,
    run_dir: Path,
    seed: int = 0,
    on_durable: Callable[[list[str]], None] | None = None,
    progress: bool = True,
    skip_consumed: bool = True,
    on_log: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train ``model`` on ``groups`` (each a micro-batch of ready samples), checkpointing into ``run_dir``.

    Resumes from ``run_dir/checkpoints`` if one exists. With ``skip_consumed`` (deterministic in-process
    streams) the samples a checkpoint already covers are skipped; a Redis stream redelivers instead.
    An empty group is a micro-step without a sample on this rank (``empty_batch``). ``on_log`` gets every
    metrics row (each ``train.log_every`` steps, on every rank). ``seed`` (the run config's; the recipe
    passes it) seeds every generator before the first step, so a fused run and its CLM baseline start alike.
    """
    import deepspeed
    from tqdm import tqdm

    rank, world = init_distributed()
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)

    model.train()
    if train_cfg.activation_checkpointing:
        # transformers >= 5.x names it activation_checkpointing_enable (the old name is deprecated).
        enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
            model, "gradient_checkpointing_enable", None
        )
        if enable is None:
            raise ValueError(f"{type(model).__name__} cannot checkpoint activations (train.activation_checkpointing)")
        enable()
    objective = FusionObjective(
        model, fusion_cfg, train_cfg.loss_chunk_tokens, train_cfg.zero_stage, loss_impl=train_cfg.loss_impl
    )
    if train_cfg.compile:
        # In place (nn.Module.compile): the trunk keeps its parameters, so DeepSpeed and checkpoints see the
        # same module tree; dynamic shapes since (packed) batches vary in length.
        objective._trunk.compile(dynamic=True)
    attn_implementation = getattr(model.config, "_attn_implementation", None)
    optimizer = torch.optim.AdamW(
        param_groups(model, train_cfg.weight_decay), lr=train_cfg.lr, betas=tuple(train_cfg.betas)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(total_steps, train_cfg.warmup_ratio, train_cfg.min_lr_ratio)
    )
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(train_cfg, world)
    )

    state = {"step": 0, "samples": 0, "tokens": 0, "log_lines": 0}
    ids_log = trained_ids_path(run_dir, rank, world)
    metrics_path = run_dir / "metrics.jsonl"
    if (ckpt_dir / "latest").exists():
        _, client = engine.load_checkpoint(str(ckpt_dir))
        # DeepSpeed stores the client state of rank 0 only: each rank's own counters travel in "ranks".
        ranks = client.get("ranks") or [client]
        if rank >= len(ranks):
            raise ValueError(
                f"checkpoint {ckpt_dir} was written by {len(ranks)} ranks, this run has {world}: resume with the "
                "same number of ranks"
            )
        state.update({k: ranks[rank][k] for k in state if k in ranks[rank]})
        _truncate_lines(ids_log, state["log_lines"])
        if rank == 0 and metrics_path.exists():  # rows logged after the checkpoint are logged again
            rows = [line for line in metrics_path.read_text().splitlines(keepends=True) if line.strip()]
            metrics_path.write_text("".join(r for r in rows if json.loads(r)["step"] <= state["step"]))
        log.info("resumed from %s at step %d (%d samples)", ckpt_dir, state["step"], state["samples"])
    else:
        ids_log.unlink(missing_ok=True)
        if rank == 0:
            metrics_path.unlink(missing_ok=True)

    history: list[dict] = []
    pending_ids: list[str] = []  # trained since the last checkpoint
    step_ids: list[str] = []  # trained since the last optimizer step
    bar = tqdm(total=total_steps, initial=state["step"], disable=not progress or rank != 0, unit="step", dynamic_ncols=True)
    t0, tokens0 = time.perf_counter(), state["tokens"]
    window: dict[str, float] = {}
    totals: dict[str, float] = {}  # the same sums over the whole run (the report's per-teacher figures)
    last: LossParts | None = None
    stream = _batches(groups, state["samples"] if skip_consumed else 0)
    try:
        for group in stream:
            if state["step"] >= total_steps:
                break
            samples = [s for s, _ in group]
            dists = [d for _, d in group] if teachers else None
            batch = (
                collate(
                    samples, tokenizer, dists, teachers, fusion_cfg.top_k,
                    pack=train_cfg.pack, attn_implementation=attn_implementation,
                )
                if samples
                else empty_batch(tokenizer)
            )
            parts, stats = engine(batch)
            engine.backward(parts.loss)
            boundary = engine.is_gradient_accumulation_boundary()  # read before step() advances it
            engine.step()
            last = parts
            state["samples"] += len(samples)
            state["tokens"] += batch.num_tokens
            pending_ids.extend(batch.sample_ids)
            step_ids.extend(batch.sample_ids)
            _accumulate(window, parts, stats, teachers, batch.sample_ids)
            _accumulate(totals, parts, stats, teachers, batch.sample_ids)
            if not boundary:
                continue
            state["step"] += 1
            with ids_log.open("a") as f:
                f.write("".join(f"{i}\n" for i in step_ids))
            state["log_lines"] += len(step_ids)
            step_ids = []
            if state["step"] % train_cfg.log_every == 0 or state["step"] == total_steps:
                elapsed = time.perf_counter() - t0
                row = _metrics_row(window, state, scheduler.get_last_lr()[0], (state["tokens"] - tokens0) / max(elapsed, 1e-9),
                                   teachers)
                window.clear()
                history.append(row)
                if rank == 0:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                if on_log:
                    on_log(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if state["step"] % train_cfg.checkpoint_every == 0 and state["step"] < total_steps:
                _save_checkpoint(engine, ckpt_dir, state, train_cfg.keep_checkpoints)
                if on_durable:
                    on_durable(pending_ids)
                pending_ids = []
    finally:
        bar.close()
    _save_checkpoint(engine, ckpt_dir, state, train_cfg.keep_checkpoints)
    if on_durable and pending_ids:
        on_durable(pending_ids)
    model_dir = run_dir / "model"
    if rank == 0:
        save_hf(engine, model, tokenizer, model_dir, train_cfg.zero_stage)
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, totals)
        totals = {k: sum(t.get(k, 0.0) for t in every) for k in set().union(*every)}
    return TrainResult(
        steps=state["step"],
        samples=state["samples"],
        tokens=state["tokens"],
        seconds=time.perf_counter() - t0,
        final_loss=float(last.loss.detach()) if last is not None else None,
        model_dir=model_dir,
        history=history,
        teachers=_teacher_summary(totals, teachers),
    )


def _accumulate(window: dict, parts: LossParts, stats: TeacherStats | None, teachers, sample_ids) -> None:
    """Add a micro-batch to ``window``: token-weighted sums of the loss parts and teacher CEs, and raw sums
    (keys starting with ``_``) of each teacher's fidelity and of its choices per corpus (a sample id's corpus
    is the part before its first ``/``, as :mod:`fuseflow.corpus` names them)."""
    n = float(parts.n_tokens)
    for key in ("loss", "clm", "kl"):
        window[key] = window.get(key, 0.0) + float(getattr(parts, key).detach()) * n
    window["n"] = window.get("n", 0.0) + n
    if stats is None:
        return
    for name, ce in zip(teachers, stats.ce.tolist()):
        window[f"ce/{name}"] = window.get(f"ce/{name}", 0.0) + ce * n
    for name, sums in zip(teachers, stats.fidelity.tolist()):
        for field_, value in zip(FIDELITY_FIELDS, sums):
            window[f"_fid/{name}/{field_}"] = window.get(f"_fid/{name}/{field_}", 0.0) + value
    if stats.choice is not None:
        corpora = [i.partition("/")[0] if "/" in i else "corpus" for i in sample_ids]
        for s, corpus in enumerate(corpora):
            window[f"_pick/{corpus}"] = window.get(f"_pick/{corpus}", 0.0) + 1.0
            for name, share in zip(teachers, stats.choice[:, s].tolist()):
                window[f"_pick/{corpus}/{name}"] = window.get(f"_pick/{corpus}/{name}", 0.0) + share


def _teacher_summary(sums: dict, teachers: Sequence[str]) -> dict:
    """``{teacher: {coverage, miss_rate, p_gold, positions, chosen: {corpus: share of samples}}}`` from
    :func:`_accumulate`'s raw sums."""
    out = {}
    for name in teachers:
        if f"_fid/{name}/positions" not in sums:
            continue
        out[name] = fidelity_summary([sums[f"_fid/{name}/{f}"] for f in FIDELITY_FIELDS])
        corpora = sorted({k.split("/")[1] for k in sums if k.startswith("_pick/")})
        chosen = {c: sums.get(f"_pick/{c}/{name}", 0.0) / sums[f"_pick/{c}"] for c in corpora if sums.get(f"_pick/{c}")}
        if chosen:
            out[name]["chosen"] = chosen
    return out


def _metrics_row(window: dict, state: dict, lr: float, tokens_per_s: float, teachers: Sequence[str] = ()) -> dict:
    n = max(window.get("n", 0.0), 1.0)
    row = {"step": state["step"], "samples": state["samples"], "tokens": state["tokens"], "lr": lr}
    row.update({k: v / n for k, v in window.items() if k != "n" and not k.startswith("_")})
    for name, summary in _teacher_summary(window, teachers).items():
        for key in ("coverage", "miss_rate", "p_gold"):
            row[f"{key}/{name}"] = summary[key]
        for corpus, share in summary.get("chosen", {}).items():
            row[f"chosen/{name}/{corpus}"] = share
    row["tokens_per_s"] = tokens_per_s
    row["time"] = time.time()
    return row


def _truncate_lines(path: Path, n: int) -> None:
    """Drop lines written after the checkpoint a resume starts from (those samples are trained again)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:n]))


def _save_checkpoint(engine, ckpt_dir: Path, state: dict, keep: int) -> None:
    import torch.distributed as dist

    tag = f"step{state['step']:08d}"
    ranks = [dict(state)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, dict(state))
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=dict(state, ranks=ranks))
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
    for old in tags[:-keep]:
        shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def save_hf(engine, model: torch.nn.Module, tokenizer, out: Path, zero_stage: int) -> None:
    """Write an HF model directory (safetensors + config + tokenizer) loadable with ``from_pretrained``."""
    out.mkdir(parents=True, exist_ok=True)
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            model.save_pretrained(out, safe_serialization=True)
    else:
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
