"""Quality benchmark (issue 11): does the fused target beat the same-budget CLM-only target, per corpus?

On the same training samples, in the same order, from the same start, it trains one copy of the target per
*arm* — CLM only, distillation from each single source, fusion (``min_ce``, ``avg_ce``, token-level) —
exactly as ``fuseflow fuse`` trains (``fuseflow.trainer.loop.train``, the run config's fusion and train
sections), and evaluates each arm at several token budgets within its one run (a learning curve):
held-out bits/byte per corpus and overall, and the paired bootstrap over documents of ``arm − CLM``.

Every teacher scores each training sample once (``--cache DIR`` keeps its own top-k on disk across runs,
keyed by teacher and samples); the scores are aligned once per alignment setting (``align.*``, which an arm
may override: ``distil:gemma@align.vocab_map=mined``) and every arm with that setting reuses them.

Settings are tuned on ``--split dev``: documents of the training part that the bench keeps out of training
(per corpus, chosen by a hash of the document index); ``--split held_out`` (the default) evaluates on the
run config's held-out documents and is what docs/quality.md reports for the chosen settings only.

    python bench/quality.py                                   # the default size: ~45 min on 2 shared CPU cores
    python bench/quality.py --split dev --arms clm,fuse:min_ce fusion.lam=0.5 train.lr=1e-4
    python bench/quality.py --size gpu --config examples/fuse-gpu.yaml device=cuda
    python bench/quality.py --report runs/quality.json --vs distil:smollm     # compare a finished run anew

Writes ``--out`` (JSON: every figure, per-document nll included) and ``--plot`` (PNG learning curves).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import math
import pickle
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# steps: optimizer steps of every arm; budgets: the steps at which each arm is evaluated (step 0, the start,
# is evaluated once); eval_documents: per corpus; eval_chars: the first characters of each evaluated document
# default: 24 min of training and evaluation plus ~22 min of teacher scoring on 2 shared CPU cores (docs/quality.md).
SIZES: dict[str, dict] = {
    "tiny": dict(steps=4, budgets=(1, 2, 4), eval_documents=2, eval_chars=300, dev_documents=2),
    "default": dict(steps=24, budgets=(6, 12, 24), eval_documents=10, eval_chars=1000, dev_documents=10),
    "gpu": dict(steps=600, budgets=(50, 150, 300, 600), eval_documents=100, eval_chars=8000, dev_documents=100),
}
DEFAULT_ARMS = "clm,distil:gemma,distil:smollm,fuse:min_ce,fuse:avg_ce"

log = logging.getLogger("bench.quality")


@dataclass(frozen=True)
class Arm:
    """One way of training the target: ``kind`` clm | distil (one teacher) | fuse (every teacher, ``function``),
    with its own run-config ``overrides`` (``fusion.lam=0.5``) on top of the shared ones."""

    name: str
    kind: str
    teachers: tuple[str, ...] = ()
    function: str | None = None
    overrides: tuple[str, ...] = ()


def parse_arm(item: str, teachers: Sequence[str]) -> Arm:
    """``"fuse:min_ce@fusion.lam=0.5@train.lr=1e-4"`` → one arm (``@`` adds the arm's own overrides, so one run
    compares settings against one CLM baseline); ``distil:NAME`` needs a source NAME."""
    head, *overrides = item.split("@")
    kind, _, arg = head.partition(":")
    if kind == "clm" and not arg:
        return Arm(item, "clm", overrides=tuple(overrides))
    if kind == "distil" and arg in teachers:
        return Arm(item, "distil", (arg,), overrides=tuple(overrides))
    if kind == "fuse" and arg:
        return Arm(item, "fuse", tuple(teachers), arg, tuple(overrides))
    raise SystemExit(f"--arms: cannot read {item!r} (clm, distil:SOURCE with SOURCE in {list(teachers)}, "
                     "fuse:FUNCTION, each optionally @key=value…)")


def parse_arms(spec: str, teachers: Sequence[str]) -> list[Arm]:
    """``"clm,distil:gemma,fuse:min_ce,fuse:min_ce@fusion.lam=0.5"`` → arms (:func:`parse_arm`); clm first."""
    arms = [parse_arm(item, teachers) for item in (s.strip() for s in spec.split(",")) if item]
    if not arms or arms[0].kind != "clm":
        raise SystemExit("--arms: the first arm must be clm (every other arm is compared with it)")
    return arms


# ----------------------------------------------------------------------------------------------------------
# Data: training samples, dev and held-out documents, per corpus.
# ----------------------------------------------------------------------------------------------------------


def dev_indices(indices: np.ndarray, seed: int, count: int) -> set[int]:
    """The ``count`` training documents of one corpus kept out of training for tuning: those with the smallest
    keys under a salt other than the held-out split's, so dev is neither train nor held-out, on every run."""
    from fuseflow.corpus import split_keys

    if count <= 0 or len(indices) == 0:
        return set()
    keys = split_keys(indices, seed + 0x5EED)  # [N]
    return {int(i) for i in indices[np.argsort(keys, kind="stable")[:count]]}


def prepare(cfg, size: dict, split: str, num_samples: int, tokenizer):
    """(training samples, evaluation texts, their corpus names). Dev documents never reach training."""
    from dataclasses import replace
    from itertools import islice

    from fuseflow.corpus import interleave, iter_documents, make_samples

    streams, train_docs, dev = [], [], set()
    for name, weight, sub in cfg.corpus.corpora():  # as fuseflow.corpus.corpus_samples, less the dev documents
        docs = [replace(d, corpus=name) for d in iter_documents(sub, "train")]
        dev |= {(name, i) for i in dev_indices(np.array([d.index for d in docs]), cfg.corpus.seed, size["dev_documents"])}
        train_docs += docs
        kept = [d for d in docs if (name, d.index) not in dev]
        streams.append((weight, make_samples(kept, tokenizer, cfg.train.max_length)))
    samples = list(islice(interleave(streams), num_samples))
    if len(samples) < num_samples:
        raise SystemExit(f"the corpus gives {len(samples)} training samples; this size needs {num_samples}")
    if split == "dev":
        docs = [d for d in train_docs if (d.corpus, d.index) in dev]
    else:
        docs = list(iter_documents(cfg.corpus, "held_out"))
    kept: dict[str, int] = {}
    texts, groups = [], []
    for d in docs:  # the first eval_documents of each corpus, in order
        if d.text and d.text.strip() and kept.get(d.corpus, 0) < size["eval_documents"]:
            kept[d.corpus] = kept.get(d.corpus, 0) + 1
            texts.append(d.text[: size["eval_chars"]])
            groups.append(d.corpus or "corpus")
    if not texts:
        raise SystemExit(f"no {split} documents to evaluate on (corpus.held_out_documents, --size)")
    return samples, texts, groups


# ----------------------------------------------------------------------------------------------------------
# Scoring once: every teacher's aligned top-k for every sample, cached.
# ----------------------------------------------------------------------------------------------------------


def _cache_key(cfg, src) -> str:
    """The raw scores depend on the teacher model and how it scores, not on the alignment (done on load)."""
    h = hashlib.sha256()
    for part in ("raw-v2", src.model, src.dtype, src.engine, cfg.align.score_top_k):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def score_all(cfg, samples, tokenizer, cache: Path | None) -> tuple[dict[str, dict], dict[str, float]]:
    """{sample id: {teacher: ScoredText}} — every source's own top-k of every sample, in its own vocabulary —
    and seconds spent scoring per teacher. The cache file of a teacher maps sample id → (text hash, scores):
    only samples it lacks are scored, and every alignment setting reuses them (:func:`align_all`).
    Samples that a teacher cannot score are dropped (as ``fuseflow fuse`` dead-letters them)."""
    from fuseflow.score.aligner import score_samples
    from fuseflow.score.engine import engine_from_source

    raw: dict[str, dict] = {s.id: {} for s in samples}
    seconds: dict[str, float] = {}
    for src in cfg.sources:
        path = cache / f"{src.key}-{_cache_key(cfg, src)}.pkl" if cache else None
        stored = pickle.loads(path.read_bytes()) if path is not None and path.exists() else {}
        todo = [s for s in samples if stored.get(s.id, ("",))[0] != _text_hash(s.text)]
        t0 = time.perf_counter()
        if todo:
            engine = engine_from_source(src, cfg.device, cfg.serve.engine_defaults())  # as fuseflow fuse builds it
            for start in range(0, len(todo), 8):
                chunk = todo[start : start + 8]
                for s, sc in zip(chunk, score_samples(engine, chunk, cfg.align.score_top_k)):
                    if isinstance(sc, str):
                        log.warning("teacher %s: sample %s dropped: %s", src.key, s.id, sc)
                    else:
                        stored[s.id] = (_text_hash(s.text), sc)
            del engine
            gc.collect()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(pickle.dumps(stored))
        seconds[src.key] = time.perf_counter() - t0
        log.info("teacher %s: scored %d samples in %.0f s, %d from the cache", src.key, len(todo), seconds[src.key],
                 len(samples) - len(todo))
        for s in samples:
            if s.id in stored and stored[s.id][0] == _text_hash(s.text):
                raw[s.id][src.key] = stored[s.id][1]
    return raw, seconds


def align_all(cfg, samples, raw: dict, tokenizer) -> dict[str, dict]:
    """{sample id: {teacher: AlignedDist}} under ``cfg.align`` — the teachers' aligners as ``fuseflow fuse``
    builds them (vocab map, chain rule), over tokenizer-only engines: the scores come from :func:`score_all`.
    Samples an aligner rejects are dropped, as the run would dead-letter them."""
    from types import SimpleNamespace

    from fuseflow.models import load_tokenizer
    from fuseflow.score.aligner import TeacherAligner

    from dataclasses import replace

    stats = [s.text for s in samples[: cfg.align.stats_documents]] if cfg.align.vocab_map == "stats" else None
    dists: dict[str, dict] = {s.id: {} for s in samples}
    k = cfg.align.score_top_k
    for src in cfg.sources:
        engine = SimpleNamespace(tokenizer=load_tokenizer(src.model), max_length=None, max_top_k=None)
        aligner = TeacherAligner.for_run(cfg, src.key, engine, tokenizer, stats)
        for s in samples:
            sc = raw[s.id].get(src.key)
            if sc is None:
                continue
            if sc.topk_ids.shape[1] < k:
                raise SystemExit(f"align.score_top_k {k} exceeds the top-{sc.topk_ids.shape[1]} scored: give the base "
                                 "config the largest score_top_k of the arms")
            # Rows are sorted: the first k columns of a larger top-k are the top-k.
            sc = replace(sc, topk_ids=sc.topk_ids[:, :k], topk_logprobs=sc.topk_logprobs[:, :k])
            res = aligner.align_result(s, sc)
            if res.error is None:
                dists[s.id][src.key] = res.dist
            else:
                log.warning("teacher %s: sample %s dropped: %s", src.key, s.id, res.error)
    return dists


# ----------------------------------------------------------------------------------------------------------
# Training the arms, evaluating along the way.
# ----------------------------------------------------------------------------------------------------------


def evaluate(model, tokenizer, texts, groups, cfg) -> dict:
    from fuseflow.trainer.evaluate import evaluate_lm, group_bpb

    res = evaluate_lm(model, tokenizer, texts, max_length=cfg.eval.max_length, batch_tokens=cfg.eval.batch_tokens,
                      progress=False)
    return {"bpb": res["bpb"], "per_corpus": group_bpb(res["text_nll"], res["text_bytes"], groups),
            "text_nll": res["text_nll"], "text_bytes": res["text_bytes"], "eval_tokens": res["tokens"]}


def train_arm(arm: Arm, cfg, samples, aligned_for, texts, groups, budgets: Sequence[int], work: Path,
              keep: bool = False) -> dict:
    """Train a fresh copy of the target on ``samples`` as ``arm``; evaluate at every step in ``budgets``.
    ``aligned_for(cfg)`` gives the teachers' distributions under the arm's alignment settings. ``keep``: leave
    the trained model (an HF directory, ``model_dir`` in the result) under ``work`` (FuseChat merges it)."""
    import torch

    from fuseflow.models import load
    from fuseflow.trainer.loop import train

    from fuseflow.config import FuseConfig, apply_overrides

    if arm.overrides:
        cfg = FuseConfig.model_validate(apply_overrides(cfg.model_dump(), list(arm.overrides)))
    dists = aligned_for(cfg) if arm.teachers else {s.id: {} for s in samples}
    fusion = cfg.fusion if arm.function is None else cfg.fusion.model_copy(update={"function": arm.function})
    k = fusion.top_k
    if k > cfg_top_k(dists):
        raise SystemExit(f"arm {arm.name}: fusion.top_k {k} exceeds the scored top-k {cfg_top_k(dists)}")
    usable = [s for s in samples if all(t in dists[s.id] for t in arm.teachers)]
    mb = cfg.train.micro_batch_size

    def groups_iter():
        for start in range(0, len(usable), mb):
            chunk = usable[start : start + mb]
            yield [(s, {t: _top(dists[s.id][t], k) for t in arm.teachers} if arm.teachers else None) for s in chunk]

    target = load(cfg.target.model, device=cfg.device, attn_implementation=cfg.target.attn_implementation)
    torch.manual_seed(cfg.seed)
    curve: list[dict] = []
    run_dir = work / "".join(c if c.isalnum() else "-" for c in arm.name)
    shutil.rmtree(run_dir, ignore_errors=True)

    def on_log(row: dict) -> None:
        if row["step"] in budgets:
            t0 = time.perf_counter()
            point = {"step": row["step"], "tokens": row["tokens"], **evaluate(target.model, target.tokenizer, texts, groups, cfg)}
            point["eval_seconds"] = time.perf_counter() - t0
            curve.append(point)
            log.info("%s step %d (%d tokens): %.4f bits/byte %s", arm.name, row["step"], row["tokens"], point["bpb"],
                     {g: round(v, 4) for g, v in point["per_corpus"].items()})

    t0 = time.perf_counter()
    result = train(
        target.model, target.tokenizer, groups_iter(), teachers=list(arm.teachers), train_cfg=cfg.train,
        fusion_cfg=fusion, total_steps=max(budgets), run_dir=run_dir, progress=False, on_log=on_log, seed=cfg.seed,
    )
    seconds = time.perf_counter() - t0
    history, teachers_summary = result.history, result.teachers
    model_dir = str(result.model_dir) if keep else None
    del target, result
    gc.collect()
    if not keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"model_dir": model_dir, "kind": arm.kind, "teachers": list(arm.teachers), "function": fusion.function if arm.teachers else None,
            "overrides": list(arm.overrides), "lam": fusion.lam, "temperature": fusion.temperature, "top_k": k,
            "align": cfg.align.model_dump(mode="json"), "teacher_stats": teachers_summary,
            "lr": cfg.train.lr, "min_lr_ratio": cfg.train.min_lr_ratio,
            "samples": len(usable), "seconds": seconds, "curve": curve,
            "loss": [{k_: r.get(k_) for k_ in ("step", "loss", "clm", "kl", "lr")} for r in history]}


def cfg_top_k(dists: dict) -> int:
    """The top-k the teachers scored with (arms may use fewer)."""
    for per_teacher in dists.values():
        for d in per_teacher.values():
            return d.top_k
    return 1 << 30


def _top(dist, k: int):
    """A cached distribution cut to the arm's top-k (rows are sorted, so the first k columns are its top-k)."""
    if dist.top_k <= k:
        return dist
    from fuseflow.sparse import AlignedDist

    return AlignedDist(dist.ids[:, :k], dist.logprobs[:, :k], dist.gold_logprobs, dist.aligned, dist.meta)


def compare(arms: dict, groups: Sequence[str], num_resamples: int = 2000, reference: str | None = None) -> None:
    """Add to every point of every arm the paired bootstrap of ``arm − reference`` at the same budget (overall and
    per corpus), in place: under ``vs_clm`` for the first arm (CLM), under ``vs[reference]`` for another arm."""
    from fuseflow.trainer.evaluate import bootstrap_bpb

    name = reference or next(iter(arms))
    base = {p["step"]: p for p in arms[name]["curve"]}
    for arm in arms.values():
        for point in arm["curve"]:
            ref = base.get(point["step"])
            if ref is None:
                continue
            diff = {"overall": bootstrap_bpb(point["text_nll"], point["text_bytes"], ref["text_nll"], num_resamples)}
            for g in dict.fromkeys(groups):
                sel = [i for i, x in enumerate(groups) if x == g]
                diff[g] = bootstrap_bpb([point["text_nll"][i] for i in sel], [point["text_bytes"][i] for i in sel],
                                        [ref["text_nll"][i] for i in sel], num_resamples)
            if reference is None:
                point["vs_clm"] = diff
            else:
                point.setdefault("vs", {})[reference] = diff


# ----------------------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------------------


def table(result: dict, reference: str | None = None) -> str:
    """The markdown table of every arm's curve with its difference from CLM (or from the arm ``reference``)."""
    corpora = list(result["corpora"])
    label = reference or "clm"
    head = "| arm | step | train tokens | " + " | ".join(f"{c} bits/byte" for c in corpora) + \
        f" | overall | Δ vs {label} overall [95 % CI] | " + " | ".join(f"Δ {c} [95 % CI]" for c in corpora) + " |"
    lines = [head, "|" + "---|" * (4 + 2 * len(corpora) + 1)]
    start, first = result["start"], reference or next(iter(result["arms"]))
    lines.append(f"| start | 0 | 0 | " + " | ".join(f"{start['per_corpus'][c]:.4f}" for c in corpora) +
                 f" | {start['bpb']:.4f} | | " + " | ".join("" for _ in corpora) + " |")
    for name, arm in result["arms"].items():
        for p in arm["curve"]:
            d = p.get("vs_clm", {}) if reference is None else p.get("vs", {}).get(reference, {})
            ci = lambda x: f"{x['value']:+.4f} [{x['low']:+.4f}, {x['high']:+.4f}]" if x and name != first else ""  # noqa: E731
            lines.append(
                f"| {name} | {p['step']} | {p['tokens']} | " + " | ".join(f"{p['per_corpus'][c]:.4f}" for c in corpora)
                + f" | {p['bpb']:.4f} | {ci(d.get('overall'))} | " + " | ".join(ci(d.get(c)) for c in corpora) + " |"
            )
    return "\n".join(lines)


def sources_table(result: dict) -> str:
    corpora = list(result["corpora"])
    lines = ["| model | " + " | ".join(corpora) + " | overall |", "|---|" + "---:|" * (len(corpora) + 1)]
    for name, r in result["sources"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['per_corpus'][c]:.4f}" for c in corpora) + f" | {r['bpb']:.4f} |")
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["overall", *result["corpora"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, arm in result["arms"].items():
            xs = [0] + [p["tokens"] for p in arm["curve"]]
            if arm is next(iter(result["arms"].values())):
                ax.plot(xs, [0.0] * len(xs), color="black", lw=1, label=name)
                continue
            ys, lo, hi = [0.0], [0.0], [0.0]
            for p in arm["curve"]:
                d = p["vs_clm"][panel]
                ys.append(d["value"])
                lo.append(d["low"])
                hi.append(d["high"])
            line, = ax.plot(xs, ys, marker="o", ms=3, label=name)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_title(f"{panel}: Δ bits/byte vs CLM", fontsize=9)
        ax.set_xlabel("training tokens")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("arm − CLM (bits/byte, 95 % CI)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# The run's shape and its start, shared with bench/experts.py.
# ----------------------------------------------------------------------------------------------------------


def schedule(cfg, size_name: str, steps: int | None, budgets: str | None):
    """``(cfg, size, steps, budgets)``: the size's settings, the steps of every arm (``--steps``, else the largest
    budget) and the budgets it is evaluated at (``--budgets``, else the size's), and the run config with its train
    section set to one epoch of exactly those steps (no checkpoint within, a log row per step)."""
    size = dict(SIZES[size_name])
    budgets = tuple(int(b) for b in budgets.split(",")) if budgets else size["budgets"]
    steps = steps or max(budgets)
    budgets = tuple(b for b in budgets if b <= steps) or (steps,)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={
        "max_steps": steps, "checkpoint_every": steps + 1, "log_every": 1, "epochs": 1})})
    return cfg, size, steps, budgets


def corpus_of(sample) -> str:
    """The corpus a training sample came from (its id's prefix in a mix; "corpus" for a single source)."""
    return sample.id.partition("/")[0] if "/" in sample.id else "corpus"


def describe(samples, texts, groups) -> tuple[dict, dict]:
    """``(corpora, mix)``: the evaluated documents and bytes per corpus, and the training samples per corpus."""
    corpora = {g: {"documents": groups.count(g), "bytes": sum(len(t.encode()) for t, x in zip(texts, groups) if x == g)}
               for g in dict.fromkeys(groups)}
    return corpora, {g: sum(1 for s in samples if corpus_of(s) == g) for g in corpora}


def evaluate_start(cfg, texts, groups, result: dict, sources: bool = True) -> None:
    """Into ``result``: every source that is not the target (``sources``), then the target as the arms start
    (``start``, and ``target (start)`` among the sources), on the evaluated texts."""
    from fuseflow.models import load

    for src in cfg.sources if sources else ():
        if src.model == cfg.target.model:
            continue  # the target's start is evaluated below
        lm = load(src.model, device=cfg.device)
        r = evaluate(lm.model, lm.tokenizer, texts, groups, cfg)
        result["sources"][f"source {src.key}"] = {"bpb": r["bpb"], "per_corpus": r["per_corpus"]}
        del lm
        gc.collect()
    target = load(cfg.target.model, device=cfg.device)
    result["start"] = evaluate(target.model, target.tokenizer, texts, groups, cfg)
    result["sources"]["target (start)"] = {"bpb": result["start"]["bpb"], "per_corpus": result["start"]["per_corpus"]}
    del target
    gc.collect()


def alignments(samples, raw: dict, tokenizer, sources=None):
    """``aligned_for(arm_cfg)``: the teachers' distributions under an arm's alignment settings, aligned once per
    setting (arms that share one share them) from the raw scores; ``sources``: the teachers to align (default:
    the arm config's)."""
    aligned: dict[str, dict] = {}

    def aligned_for(arm_cfg) -> dict:
        key = arm_cfg.align.model_dump_json() + f"k={arm_cfg.fusion.top_k}"
        if key not in aligned:
            use = arm_cfg if sources is None else arm_cfg.model_copy(update={"sources": sources})
            aligned[key] = align_all(use, samples, raw, tokenizer)
        return aligned[key]

    return aligned_for


# ----------------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="run-config overrides key=value (fusion.lam=0.5 train.lr=1e-4 …)")
    p.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"), help="run config (fuseflow fuse)")
    p.add_argument("--size", choices=sorted(SIZES), default="default")
    p.add_argument("--steps", type=int, help="optimizer steps per arm (default: the size's)")
    p.add_argument("--budgets", help="comma-separated steps to evaluate at (default: the size's)")
    p.add_argument("--split", choices=("held_out", "dev"), default="held_out", help="tune on dev, report held_out")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated (default {DEFAULT_ARMS})")
    p.add_argument("--no-sources", action="store_true", help="skip evaluating the source models on the eval texts")
    p.add_argument("--cache", default=str(ROOT / "runs" / "quality-cache"), help="teacher-score cache ('' for none)")
    p.add_argument("--vs", default="", help="comma-separated arms every arm is also compared with (paired "
                   "bootstrap), e.g. distil:smollm (self-distillation)")
    p.add_argument("--report", metavar="JSON", help="no training: recompute the comparisons (--vs) of a finished "
                   "run's JSON and print its tables")
    p.add_argument("--out", default="quality.json")
    p.add_argument("--plot", default="quality.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    vs = [a for a in args.vs.split(",") if a]
    if args.report:
        result = json.loads(Path(args.report).read_text())
        _compare_and_print(result, vs)
        return 0
    for name in ("fuseflow", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from fuseflow.config import FuseConfig, load_config
    from fuseflow.models import load_tokenizer

    t_start = time.perf_counter()
    cfg, size, steps, budgets = schedule(load_config(FuseConfig, args.config, list(args.overrides)), args.size,
                                         args.steps, args.budgets)
    teachers = [s.key for s in cfg.sources]
    arms = parse_arms(args.arms, teachers)
    num_samples = steps * cfg.train.samples_per_step()

    tokenizer = load_tokenizer(cfg.target.model)
    samples, texts, groups = prepare(cfg, size, args.split, num_samples, tokenizer)
    corpora, mix = describe(samples, texts, groups)
    log.info("%d training samples %s; %d %s documents %s", len(samples), mix, len(texts), args.split, corpora)

    needs_teachers = any(a.teachers for a in arms)
    raw, score_seconds = score_all(cfg, samples, tokenizer, Path(args.cache) if args.cache else None) if needs_teachers else ({}, {})
    aligned_for = alignments(samples, raw, tokenizer)

    result: dict = {
        "command": "python bench/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "size": args.size, "split": args.split, "steps": steps, "budgets": list(budgets),
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
        "train_samples": len(samples), "train_mix": mix, "corpora": corpora, "eval_groups": groups, "score_seconds": score_seconds,
        "sources": {}, "arms": {},
    }
    evaluate_start(cfg, texts, groups, result, sources=not args.no_sources)

    with tempfile.TemporaryDirectory(prefix="fuseflow-quality-") as work:
        for arm in arms:
            result["arms"][arm.name] = train_arm(arm, cfg, samples, aligned_for, texts, groups, budgets, Path(work))
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=1))  # every arm so far, should the run stop
    compare(result["arms"], groups)
    for ref in vs:
        compare(result["arms"], groups, reference=ref)
    result["total_seconds"] = time.perf_counter() - t_start

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(result, Path(args.plot))
    _compare_and_print(result, vs, compared=True)
    print(f"\n{args.split} documents: {corpora}; train samples {mix}; "
          f"{result['total_seconds'] / 60:.1f} min (scoring {sum(score_seconds.values()):.0f} s)")
    return 0


def _compare_and_print(result: dict, vs: Sequence[str], compared: bool = False) -> None:
    """The sources' table, the arms against CLM, against each ``vs`` arm, and the teachers' statistics."""
    if not compared:  # a finished run's JSON, or one an interrupted run left (written after every arm)
        compare(result["arms"], result["eval_groups"])
    for ref in vs:
        if ref not in result["arms"]:
            raise SystemExit(f"--vs {ref}: no such arm (arms: {list(result['arms'])})")
        if not compared:
            compare(result["arms"], result["eval_groups"], reference=ref)
    print(sources_table(result))
    print()
    print(table(result))
    for ref in vs:
        print()
        print(table(result, ref))
    stats = teachers_table(result)
    if stats:
        print()
        print(stats)


def teachers_table(result: dict) -> str:
    """Per arm and teacher, over the arm's run: the fidelity of its aligned rows and the fusion's choices."""
    lines = ["| arm | teacher | coverage | gold missing | mean p(gold) | chosen (share of samples per corpus) |",
             "|---|---|---:|---:|---:|---|"]
    for name, arm in result["arms"].items():
        for teacher, st in (arm.get("teacher_stats") or {}).items():
            chosen = ", ".join(f"{c} {v:.0%}" for c, v in st.get("chosen", {}).items())
            lines.append(f"| {name} | {teacher} | {st['coverage']:.1%} | {st['miss_rate']:.1%} | {st['p_gold']:.3f} | "
                         f"{chosen} |")
    return "\n".join(lines) if len(lines) > 2 else ""


if __name__ == "__main__":
    sys.exit(main())
