"""``fuseflow eval-ensemble ENSEMBLE.yaml``: each source alone vs Cool-Fusion, on three measures.

1. **Accuracy** on a task set (:mod:`fuseflow.ensemble.tasks`, greedy decoding): generated arithmetic, or
   next-word prediction on held-out passages of the mixed corpus (``next-word``, per language). Each
   accuracy comes with its count and a 95 % Wilson interval; Cool-Fusion is compared with each source on
   the same problems (paired: the difference with a bootstrap interval, the problems only one of them got
   right, and McNemar's exact test on those; for next-word also an interval that resamples whole documents).
   Next-word runs also replay the first segment's recorded candidates under every rerank rule and give the
   **oracle bound**: the passages where any source's first candidate is right, the most any rule could score.
   An answer ends as soon as it is decided (:meth:`Task.answer_end`): the check is the same, the tokens past
   it are not generated.
2. **Latency per generated token**: decode wall time / completion tokens, each system in the tokens it
   counts (a source alone: its own; Cool-Fusion: the first source's), plus milliseconds per generated
   character, which compares across tokenizers.
3. **Held-out bits per byte.** Cool-Fusion's reranking picks among candidates; it defines no probability
   of a text, so it has no perplexity of its own. What is compared instead, on the same bytes: each
   source's bits per byte; the **uniform mixture** of the sources (``-log2 mean_j p_j(chunk | context)``
   per chunk, a proper density and the likelihood analogue of an ensemble); and the **best source per
   chunk** (an oracle that chooses after seeing the text: not a density, a bound on what choosing among
   the sources could gain). Chunks start and end on token boundaries common to every source (as
   Cool-Fusion's segments do), so every source scores exactly the same bytes, each after the same
   preceding context. Next-word: per language, on the documents its passages come from; otherwise on the
   built-in corpus.

Prints a markdown table; ``--out`` (or ``eval.out``) writes every number and every answer as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fuseflow.ensemble.boundaries import common_boundary_mask, token_boundary_mask
from fuseflow.ensemble.config import EnsembleConfig, build_decoder, build_sources, load_ensemble_config
from fuseflow.ensemble.decoder import CoolFusionDecoder, DecodeParams, generate_single
from fuseflow.ensemble.sources import EnsembleSource, completion_prompt
from fuseflow.ensemble.tasks import Problem, Task, get_task

log = logging.getLogger("fuseflow.ensemble.evaluate")

# Held-out text: the built-in corpus past the part the tiny test tokenizers are trained on.
HELDOUT_OFFSET = 300_000
CONTEXT_CHARS = 256


@dataclass
class SystemResult:
    system: str
    mode: str  # "single" | "cool-fusion"
    token_source: str  # whose tokenizer counts completion_tokens
    n: int = 0
    correct: int = 0
    completion_tokens: int = 0
    chars: int = 0
    seconds: float = 0.0
    segments: int = 0
    wins: dict[str, int] = field(default_factory=dict)  # segments whose winning text each source proposed
    contested: int = 0  # segments where distinct candidates were compared
    answers: list[dict] = field(default_factory=list)

    def groups(self) -> dict[str, tuple[int, int]]:
        """(correct, n) per problem group (language), in first-seen order."""
        out: dict[str, list[int]] = {}
        for a in self.answers:
            g = out.setdefault(a.get("group", ""), [0, 0])
            g[0] += int(a["correct"])
            g[1] += 1
        return {k: (v[0], v[1]) for k, v in out.items()}

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.seconds / self.completion_tokens if self.completion_tokens else float("nan")

    @property
    def ms_per_char(self) -> float:
        return 1e3 * self.seconds / self.chars if self.chars else float("nan")


# ----------------------------------------------------------------------------------------------------------
# Accuracy and latency.
# ----------------------------------------------------------------------------------------------------------


def run_task(
    decoder: CoolFusionDecoder, task: Task, num_problems: int, shots: int, seed: int, max_tokens: int,
    systems: Sequence[str] | None = None, **options,
) -> list[SystemResult]:
    """Each source alone, then Cool-Fusion, on the same problems with greedy decoding. ``options`` go to
    the task's problem maker (next-word: ``languages``, ``context_chars``)."""
    sources = decoder.sources
    problems, examples = task.problems(num_problems, seed, **options), task.shots(shots, seed)
    if not problems:
        raise ValueError(f"task {task.name!r} made no problems (eval.num_problems, eval.languages)")
    # An answer ends where it is decided (next-word: its first word is whole): the check is unchanged, the
    # tokens after it are not generated.
    params = DecodeParams(max_tokens=max_tokens, temperature=0.0, stop=task.stop, stop_at=task.answer_end)
    names = [s.name for s in sources] + ["cool-fusion"]
    wanted = set(systems) if systems else set(names)
    unknown = wanted - set(names)
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}; choose among {names}")
    results = []
    for name in names:
        if name not in wanted:
            continue
        fused = name == "cool-fusion"
        r = SystemResult(name, "cool-fusion" if fused else "single", sources[0].name if fused else name)
        for problem in problems:
            text = task.prompt(problem, examples)
            if fused:
                c = decoder.generate(completion_prompt(sources, text), params)
            else:
                c = generate_single(sources[names.index(name)], text, True, params)
            ok = task.correct(c.text, problem)
            r.n += 1
            r.correct += int(ok)
            r.completion_tokens += c.completion_tokens
            r.chars += len(c.text)
            r.seconds += c.seconds
            r.segments += len(c.segments)
            for s in c.segments:
                for source in s.proposers:  # every source that proposed the winning text (issue 16)
                    r.wins[source] = r.wins.get(source, 0) + 1
                r.contested += int(s.contested)
            r.answers.append({"id": problem.id, "group": problem.group, "answer": problem.answer, "output": c.text,
                              "correct": ok, "finish_reason": c.finish_reason,
                              "segments": [s.text for s in c.segments],
                              "first_candidates": c.segments[0].candidates if fused and c.segments else None})
        log.info("%s: %d/%d correct, %.1f ms/token", name, r.correct, r.n, r.ms_per_token)
        results.append(r)
    return results


# ----------------------------------------------------------------------------------------------------------
# Uncertainty.
# ----------------------------------------------------------------------------------------------------------


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95 % at z = 1.96); (0, 1) when ``n == 0``."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_comparison(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict:
    """``a`` vs ``b``: per-problem correctness [N] bool of two systems on the same problems.

    Accuracy difference with a 95 % paired bootstrap interval (problems resampled together), the counts of
    problems only ``a`` / only ``b`` got right, and McNemar's exact two-sided p-value on those.
    """
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    n = a.size
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # [B, N]
    diffs = a[idx].mean(axis=1) - b[idx].mean(axis=1)  # [B]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    m, k = a_only + b_only, min(a_only, b_only)
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2**m) if m else 1.0
    return {"n": n, "difference": float(a.mean() - b.mean()) if n else 0.0, "ci95": [float(lo), float(hi)],
            "only_first_right": a_only, "only_second_right": b_only, "mcnemar_p": p}


def cluster_bootstrap(a: np.ndarray, b: np.ndarray, clusters: Sequence[str], n_boot: int = 2000,
                      seed: int = 0) -> dict:
    """95 % interval of ``mean(a) - mean(b)`` resampling whole clusters (the documents the problems come
    from) with replacement: passages of one document are not independent, and this interval says how much
    of the difference a different draw of documents could undo. {"clusters": K, "ci95": [lo, hi]}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    names, k = np.unique(np.asarray(clusters), return_inverse=True)  # k [N] cluster of each problem
    K = names.size
    diff_k = np.bincount(k, weights=a - b, minlength=K)  # [K] summed difference per cluster
    n_k = np.bincount(k, minlength=K).astype(np.float64)  # [K] problems per cluster
    draws = np.random.default_rng(seed).integers(0, K, size=(n_boot, K))  # [B, K]
    mult = np.zeros((n_boot, K))
    np.add.at(mult, (np.arange(n_boot)[:, None], draws), 1.0)  # [B, K] times each cluster is drawn
    diffs = (mult @ diff_k) / (mult @ n_k)  # [B]
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return {"clusters": int(K), "ci95": [float(lo), float(hi)]}


def comparisons(results: list[SystemResult]) -> dict[str, dict]:
    """Cool-Fusion vs each source alone, paired on the same problems (whole set)."""
    fused = next((r for r in results if r.mode == "cool-fusion"), None)
    if fused is None:
        return {}
    ok = {r.system: np.array([a["correct"] for a in r.answers], dtype=bool) for r in results}
    docs = [a["id"].rsplit("@", 1)[0] for a in fused.answers]  # next-word ids: LANG/DOC@POSITION
    by_doc = len(set(docs)) < len(docs)
    out = {}
    for r in results:
        if r.mode == "single":
            out[r.system] = paired_comparison(ok[fused.system], ok[r.system])
            if by_doc:
                out[r.system]["documents"] = cluster_bootstrap(ok[fused.system], ok[r.system], docs)
    return out


ORACLE = "oracle: any first candidate right (the bound of every rule)"


def oracle_share(replay: dict[str, dict[str, list[int]]], rule: str) -> dict[str, float | int]:
    """The rule's first-segment score against the oracle bound, over all groups: {rule, oracle, share}."""
    total = lambda name: sum(c[0] for c in replay.get(name, {}).values())  # noqa: E731
    got, bound = total(f"cool-fusion, rerank {rule} (first segment)"), total(ORACLE)
    return {"rule": got, "oracle": bound, "share": got / bound if bound else float("nan")}


def replay_first_segment(task: Task, fused: SystemResult) -> dict[str, dict[str, list[int]]]:
    """What-if, from one Cool-Fusion run's trace: the first segment reranked by every rule (and each source's
    own first proposal, which is what the source alone writes first), checked as an answer. For choosing a
    rule on the dev split without a run per rule.

    Exact for the first segment (the first-step candidates do not depend on the rule); an answer decided
    after it (a first segment that is only punctuation or is cut inside a long word) counts as its first
    segment does. :data:`ORACLE` is the bound: a passage where any first candidate is right (what a rule that
    knew the answer would score with these proposals). Returns {rule, "<source> (first proposal)" or
    ORACLE: {group: [correct, n]}}."""
    from fuseflow.ensemble.rerank import RERANKERS

    out: dict[str, dict[str, list[int]]] = {}

    def tally(name: str, group: str, ok: bool) -> None:
        cell = out.setdefault(name, {}).setdefault(group, [0, 0])
        cell[0] += int(ok)
        cell[1] += 1

    for a in fused.answers:
        cands, problem = a.get("first_candidates"), Problem(a["id"], "", a["answer"], a["group"])
        if not cands:
            continue
        for c in cands:
            for source in c["sources"]:
                tally(f"{source} (first proposal)", a["group"], task.correct(c["text"], problem))
        tally(ORACLE, a["group"], any(task.correct(c["text"], problem) for c in cands))
        scored = [c for c in cands if "logprob_sum" in c]
        for rule in sorted(RERANKERS):
            if len(scored) < 2:  # uncontested: every rule keeps the one candidate
                pick = cands[0]
            else:
                names = list(scored[0]["logprob_sum"])
                sums = np.array([[c["logprob_sum"][n] for c in scored] for n in names])  # [S, C]
                counts = np.array([[c["token_count"][n] for c in scored] for n in names])  # [S, C]
                nbytes = np.array([c["bytes"] for c in scored])  # [C]
                ok = np.isfinite(sums).all(axis=0)
                scores = np.where(ok, RERANKERS[rule](np.where(ok, sums, 0.0), counts, nbytes), -np.inf)
                pick = scored[int(np.argmax(scores))]
            tally(f"cool-fusion, rerank {rule} (first segment)", a["group"], task.correct(pick["text"], problem))
    return out


def format_replay(replay: dict[str, dict[str, list[int]]], rule: str | None = None) -> str:
    groups = list(dict.fromkeys(g for cells in replay.values() for g in cells))
    lines = ["| what-if, first segment only | " + " | ".join(groups) + " | all |", "|---|" + "---|" * (len(groups) + 1)]
    for name, cells in replay.items():
        row = [cells.get(g, [0, 0]) for g in groups]
        total = [sum(c[0] for c in row), sum(c[1] for c in row)]
        lines.append(f"| {name} | " + " | ".join(f"{k}/{n}" for k, n in row + [total]) + " |")
    if rule is not None and ORACLE in replay:
        o = oracle_share(replay, rule)
        lines.append(f"\nrerank {rule}: {o['rule']} of the oracle's {o['oracle']} ({o['share']:.0%} of the bound)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Held-out bits per byte.
# ----------------------------------------------------------------------------------------------------------


def common_cuts(sources: Sequence[EnsembleSource], text: str, every: int, start: int) -> np.ndarray:
    """Positions near ``start``, ``start + every``, … that are token boundaries of every source on ``text``."""
    masks = [token_boundary_mask(s.encode([text], True)[0].offsets, 0, len(text)) for s in sources]
    common = np.flatnonzero(common_boundary_mask(np.stack(masks)))  # [P] positions
    common = common[(common >= start) & (common < len(text))]
    if common.size == 0:
        return common
    targets = np.arange(start, len(text), every)  # [T]
    picks = np.searchsorted(common, targets)
    picks = picks[picks < common.size]
    return np.unique(np.append(common[picks], len(text)))


def heldout_texts(task: Task, e) -> dict[str, str] | None:
    """The held-out text(s) of the bits-per-byte measure, ``eval.heldout_chars`` of each, or ``None`` (0).
    Next-word: per language, the documents of the split its passages come from (joined by blank lines), so
    the likelihood is measured in the domains the accuracy is; otherwise the built-in corpus past the part
    the tiny test tokenizers are trained on."""
    if not e.heldout_chars:
        return None
    if task.kind == "next-word":
        from fuseflow.ensemble.tasks import split_documents

        return {lang: "\n\n".join(d.text for d in split_documents(lang, e.seed, e.split, e.held_out_documents,
                                                                   corpora=e.corpora))[: e.heldout_chars]
                for lang in e.languages}
    from fuseflow.models import builtin_text

    return {"builtin": builtin_text(HELDOUT_OFFSET + e.heldout_chars)[HELDOUT_OFFSET:]}


def heldout_bits_per_byte(sources: Sequence[EnsembleSource], text: str, chunk_chars: int,
                          context_chars: int = CONTEXT_CHARS) -> dict:
    """Bits per byte of ``text`` under each source, their uniform mixture and the best source per chunk."""
    cuts = common_cuts(sources, text, chunk_chars, start=context_chars)
    if cuts.size < 2:
        raise ValueError(
            f"held-out text of {len(text)} chars is too short for chunks of {chunk_chars} (eval.heldout_chars)"
        )
    contexts = [text[max(0, a - context_chars) : a] for a in cuts[:-1]]
    chunks = [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    nll = np.zeros((len(sources), len(chunks)))  # [S, N] nats, each chunk given its context
    for j, source in enumerate(sources):
        encs = source.encode([c + x for c, x in zip(contexts, chunks)], True)
        firsts, seqs = [], []
        for i, (ctx, enc) in enumerate(zip(contexts, encs)):
            if enc.ids.size > source.max_length:
                raise ValueError(
                    f"held-out chunk {i} has {enc.ids.size} tokens of {source.name!r}, more than its max_length "
                    f"{source.max_length}; lower eval.heldout_chunk_chars"
                )
            hits = np.flatnonzero(enc.offsets[:, 1] > len(ctx))
            firsts.append(int(hits[0]) if hits.size else enc.ids.size)
            seqs.append(enc.ids)
        for i, (k, scored) in enumerate(zip(firsts, source.teacher.score_ids(seqs, top_k=1))):
            nll[j, i] = -np.asarray(scored.gold_logprobs, dtype=np.float64)[max(k - 1, 0) :].sum()
    nbytes = np.array([len(x.encode("utf-8")) for x in chunks], dtype=np.float64)  # [N]
    total = nbytes.sum()
    ln2 = np.log(2.0)
    # log mean_j p_j = logsumexp_j(-nll_j) - log S, per chunk
    top = (-nll).max(axis=0)  # [N]
    mix = top + np.log(np.exp(-nll - top).sum(axis=0)) - np.log(len(sources))  # [N]
    return {
        "bytes": int(total),
        "chunks": len(chunks),
        "sources": {s.name: float(nll[j].sum() / ln2 / total) for j, s in enumerate(sources)},
        "mixture": float(-mix.sum() / ln2 / total),
        "best_source_per_chunk": float(nll.min(axis=0).sum() / ln2 / total),
    }


# ----------------------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------------------


def format_table(results: list[SystemResult], bpb: dict[str, dict] | None) -> str:
    """``bpb``: {held-out text name: :func:`heldout_bits_per_byte`}, one column each."""
    texts = list(bpb or {}) or [None]
    heads = "".join(f"| held-out bits / byte{f' ({t})' if t and len(texts) > 1 else ''} " for t in texts)
    lines = [
        "| system | accuracy | correct / n | ms / token | tokens of | ms / char | segments / answer " + heads + "|",
        "|---|---|---|---|---|---|---|" + "---|" * len(texts),
    ]
    for r in results:
        if bpb is None:
            b = ["—"]
        elif r.mode == "single":
            b = [f"{bpb[t]['sources'][r.system]:.3f}" for t in texts]
        else:
            b = ["n/a (no density)"] * len(texts)
        seg = f"{r.segments / r.n:.1f}" if r.mode == "cool-fusion" and r.n else "—"
        lines.append(
            f"| {r.system}{' alone' if r.mode == 'single' else ''} | {r.accuracy:.1%} | {r.correct} / {r.n} | "
            f"{r.ms_per_token:.1f} | {r.token_source} | {r.ms_per_char:.1f} | {seg} | " + " | ".join(b) + " |"
        )
    if bpb is not None:
        dash = "| — " * 6
        lines.append(f"| uniform mixture of the sources {dash}| " + " | ".join(f"{bpb[t]['mixture']:.3f}" for t in texts) + " |")
        lines.append(f"| best source per chunk (oracle, no density) {dash}| "
                     + " | ".join(f"{bpb[t]['best_source_per_chunk']:.3f}" for t in texts) + " |")
    groups = list(dict.fromkeys(g for r in results for g in r.groups()))
    if len(groups) > 1 or groups != [""]:
        lines += ["", "| system | " + " | ".join(groups) + " | all |", "|---|" + "---|" * (len(groups) + 1)]
        for r in results:
            cells = []
            for k, n in [r.groups().get(g, (0, 0)) for g in groups] + [(r.correct, r.n)]:
                lo, hi = wilson_interval(k, n)
                cells.append(f"{k}/{n} = {k / n if n else 0:.0%} [{lo:.0%}, {hi:.0%}]")
            lines.append(f"| {r.system} | " + " | ".join(cells) + " |")
        lines.append("(correct / n = accuracy [95 % Wilson interval])")
    for name, c in comparisons(results).items():
        lines.append(
            f"\ncool-fusion vs {name} alone (paired, n = {c['n']}): {c['difference']:+.1%} "
            f"[{c['ci95'][0]:+.1%}, {c['ci95'][1]:+.1%}] (95 % bootstrap); right only with cool-fusion "
            f"{c['only_first_right']}, only with {name} {c['only_second_right']}; McNemar p = {c['mcnemar_p']:.3f}"
            + (f"; resampling the {c['documents']['clusters']} documents instead: [{c['documents']['ci95'][0]:+.1%}, "
               f"{c['documents']['ci95'][1]:+.1%}]" if "documents" in c else "")
        )
    for r in results:
        if r.mode == "cool-fusion" and r.segments:
            share = ", ".join(f"{k} {v / r.segments:.0%}" for k, v in sorted(r.wins.items()))
            lines.append(
                f"\nCool-Fusion segments proposed by each source (every proposer of the winning text credited): "
                f"{share} ({r.segments} segments, {r.contested} contested)."
            )
    return "\n".join(lines)


def evaluate(cfg: EnsembleConfig, sources: Sequence[EnsembleSource], systems: Sequence[str] | None = None) -> dict:
    e = cfg.eval
    decoder = build_decoder(cfg, sources)
    try:
        task = get_task(e.task)
        t0 = time.perf_counter()
        results = run_task(decoder, task, e.num_problems, e.shots, e.seed, e.max_tokens, systems,
                           languages=e.languages, context_chars=e.context_chars, split=e.split,
                           held_out_documents=e.held_out_documents, corpora=e.corpora)
        replay = None
        fused = next((r for r in results if r.mode == "cool-fusion"), None)
        if task.kind == "next-word" and fused is not None:
            replay = replay_first_segment(task, fused)
        texts = heldout_texts(task, e)
        bpb = None if texts is None else {
            name: heldout_bits_per_byte(sources, text, e.heldout_chunk_chars) for name, text in texts.items()
        }
        return {
            "task": e.task,
            "split": e.split,
            "held_out_documents": e.held_out_documents,
            "corpora": dict(e.corpora),
            "context_chars": e.context_chars,
            "languages": list(e.languages),
            "num_problems": e.num_problems,
            "shots": e.shots,
            "seed": e.seed,
            "max_tokens": e.max_tokens,
            "rerank": cfg.decoding.rerank,
            "segment_max_tokens": cfg.decoding.segment_max_tokens,
            "sources": [s.name for s in sources],
            "systems": [
                {**asdict(r), "accuracy": r.accuracy, "accuracy_ci95": wilson_interval(r.correct, r.n),
                 "groups": {g: {"correct": k, "n": n, "ci95": wilson_interval(k, n)} for g, (k, n) in r.groups().items()},
                 "ms_per_token": r.ms_per_token, "ms_per_char": r.ms_per_char}
                for r in results
            ],
            "paired": comparisons(results),
            "heldout_bits_per_byte": bpb,
            "first_segment_replay": replay,
            "oracle": oracle_share(replay, cfg.decoding.rerank) if replay else None,
            "seconds": time.perf_counter() - t0,
            "table": format_table(results, bpb) + (f"\n\n{format_replay(replay, cfg.decoding.rerank)}" if replay else ""),
        }
    finally:
        decoder.close()


def build_parser() -> argparse.ArgumentParser:
    from fuseflow.config import config_parser

    p = config_parser(
        "Each source alone vs Cool-Fusion: task accuracy, latency per generated token, held-out bits per byte. "
        "Prints a markdown table and writes JSON.",
        "example: fuseflow eval-ensemble examples/ensemble.yaml eval.num_problems=5 --out ensemble.json",
        "ensemble config (see examples/ensemble.yaml)",
        "key=value overrides, e.g. eval.num_problems=5 eval.task=arithmetic-1step",
        config_metavar="ENSEMBLE.yaml", prog="fuseflow eval-ensemble",
    )
    p.add_argument("--out", default=None, help="JSON results file (default: eval.out)")
    p.add_argument("--systems", nargs="+", default=None, help="evaluate only these: source names and/or cool-fusion")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = load_ensemble_config(args.config, args.overrides)
    get_task(cfg.eval.task)
    sources = build_sources(cfg)
    try:
        report = evaluate(cfg, sources, args.systems)
    finally:
        for s in sources:
            s.close()
    print(report["table"])
    out = args.out or cfg.eval.out
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2, default=float))
        print(f"\nwrote {out}")
    return 0
