"""Token-alignment benchmark (issue 21): how much of a teacher's knowledge reaches the target's tokens, and
what the projection costs.

Default: teacher Gemma-3-270M (262k SentencePiece vocab) → target SmolLM2-135M (49k byte-level BPE), both
real models, on German manual pages (Debian's ``manpages-de``; documents of the corpus's training part, none
of the held-out split). Each page is scored once by Gemma-3 (top-``k``) and by SmolLM2 (the target's own
top-``k``, the yardstick), then aligned with every vocab map, with and without the chain rule.

Tables (printed as markdown, all figures in ``--out`` JSON):

1. **Vocab maps**: build time on a fresh cache, share of text tokens mapped; the target splits of every
   teacher token (what ``first-token`` and the chain rule read).
2. **Fidelity** over every target position: coverage (share with a teacher row, not the one-hot gold
   fallback), gold-token miss rate and mean p(gold) of those rows (top-``k`` renormalised), per map ×
   chain rule, with ``k`` and with ``--score-k`` candidates scored (``align.score_top_k``), and over the
   positions the offsets alignment links (what FuseLLM's position-to-position alignment can give), next to
   the target's own top-``k``.
3. **Cost**, one core: sequence alignment (offsets, mined-dp) and projection tokens/s per map and for the chain
   rule's inner rows, next to the teacher's own scoring tokens/s measured in the same run; FuseLLM's DTW in
   pure Python and fuseflow's mined-dp on the same short token window (measured, not extrapolated).

    python bench/align.py --out runs/bench-align.json                 # ~5 min on 2 CPU cores
    python bench/align.py --tiny --out /tmp/align-tiny.json           # tiny random models (the tests run it)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time

import numpy as np



def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _fusellm_dtw_python(src: list[str], tgt: list[str]) -> None:
    """FuseLLM's cost profile: one edit-distance call per DP cell, full matrix, pure Python."""
    from fuseflow.align.levenshtein import levenshtein_python

    n, m = len(src), len(tgt)
    d = [[math.inf] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0
    for i in range(n):
        a = src[i].replace(" ", "")
        for j in range(m):
            d[i + 1][j + 1] = levenshtein_python(a, tgt[j].replace(" ", "")) + min(d[i][j + 1], d[i + 1][j], d[i][j])


def documents(args) -> tuple[list[str], list[str]]:
    """(texts to measure on, other texts for the ``stats`` map): real manual pages, or the built-in text."""
    if args.tiny:
        from fuseflow.models import builtin_text

        text = builtin_text((args.documents + args.stats_docs) * args.doc_chars)
        cut = [text[i : i + args.doc_chars] for i in range(0, len(text), args.doc_chars)]
        return cut[: args.documents], cut[args.documents : args.documents + args.stats_docs]
    from fuseflow.corpus import CorpusConfig, iter_documents

    docs = (d.text for d in iter_documents(CorpusConfig(source=f"manpages:{args.language}"), "train"))
    docs = [t for t in docs if t and len(t) >= 500]
    if len(docs) < args.documents:
        raise SystemExit(f"manpages:{args.language} gives {len(docs)} pages of 500+ characters; need {args.documents}")
    return [t[: args.doc_chars] for t in docs[: args.documents]], docs[args.documents : args.documents + args.stats_docs]


def _cut(scored, k: int):
    """A teacher's scores with only its top ``k`` candidates (rows are sorted: the first ``k`` columns)."""
    from dataclasses import replace

    return replace(scored, topk_ids=scored.topk_ids[:, :k], topk_logprobs=scored.topk_logprobs[:, :k])


def fidelity_row(dists, golds, linked=None) -> dict:
    """Summed :func:`fuseflow.align.fidelity.row_fidelity` over the documents (``linked``: only those positions)."""
    import torch

    from fuseflow.align.fidelity import fidelity_summary, row_fidelity

    total = torch.zeros(4, dtype=torch.float64)
    for i, (d, gold) in enumerate(zip(dists, golds)):
        mask = torch.ones(len(gold), dtype=torch.bool) if linked is None else torch.from_numpy(linked[i])
        total += row_fidelity(torch.from_numpy(d.ids).long(), torch.from_numpy(d.logprobs),
                              torch.from_numpy(d.aligned), torch.from_numpy(gold).long(), mask)
    return fidelity_summary(total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--tiny", action="store_true", help="tiny random models with the tests' tokenizers")
    p.add_argument("--source", default="gemma3-270m", help="teacher model reference")
    p.add_argument("--target", default="smollm2-135m", help="target model reference")
    p.add_argument("--language", default="de", help="manual pages of this language (manpages:LANG)")
    p.add_argument("--documents", type=int, default=30, help="pages measured")
    p.add_argument("--doc-chars", type=int, default=2000, help="first characters of each page")
    p.add_argument("--stats-docs", type=int, default=200, help="other pages counted by the 'stats' map")
    p.add_argument("--k", type=int, default=10, help="top-k of the projected rows (fusion.top_k)")
    p.add_argument("--score-k", type=int, default=64, help="candidates scored before projecting (align.score_top_k)")
    p.add_argument("--methods", default="exact,mined,first-token,stats", help="vocab maps")
    p.add_argument("--dtw-tokens", type=int, default=150, help="tokens per side of the DTW timing (0 = skip)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for scoring (the projection is numpy)")
    p.add_argument("--out", default=None, help="write every figure here as JSON")
    args = p.parse_args(argv)

    import torch

    from fuseflow.align.project import align_scored, chain_rule_rows
    from fuseflow.align.sequence import align_mined_dp, align_offsets
    from fuseflow.align.tokens import token_strings, vocab_info
    from fuseflow.align.vocab import build_vocab_map, target_splits
    from fuseflow.models import encode, make_tiny_model, make_tiny_tokenizer
    from fuseflow.score.engine import create_engine

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    work = tempfile.TemporaryDirectory(prefix="fuseflow-bench-align-")
    if args.tiny:
        src_ref = str(make_tiny_model(f"{work.name}/src", "gemma3", tokenizer=make_tiny_tokenizer("spm", 640), seed=1))
        tgt_ref = str(make_tiny_model(f"{work.name}/tgt", "llama", tokenizer=make_tiny_tokenizer("bpe", 512), seed=0))
        pair = "tiny gemma3 (spm 640) → tiny llama (bpe 512)"
    else:
        src_ref, tgt_ref = args.source, args.target
        pair = f"{args.source} → {args.target}"
    texts, stats_texts = documents(args)
    teacher = create_engine("hf", src_ref)
    own = create_engine("hf", tgt_ref)
    src_tok, tgt_tok = teacher.tokenizer, own.tokenizer
    src_info, tgt_info = vocab_info(src_tok), vocab_info(tgt_tok)

    # 1. Vocab maps and splits, on a fresh cache.
    map_rows, maps = [], {}
    cache = f"{work.name}/cache"
    splits, sec = _timed(target_splits, src_tok, tgt_tok, cache)
    text_tok = ~src_info.special
    map_rows.append({"stage": "target splits of every teacher token", "seconds": sec,
                     "detail": f"{int(splits.lengths.sum()):,} characters; a target token begins at "
                               f"{np.mean(splits.next_id >= 0):.1%} of them"})
    for method in [m for m in args.methods.split(",") if m]:
        vm, sec = _timed(build_vocab_map, method, src_tok, tgt_tok, texts=stats_texts, cache_dir=cache)
        maps[method] = vm
        detail = f"mapped {np.mean(vm[text_tok] >= 0):.1%} of text tokens"
        if method == "stats":
            detail += f" (counted over {len(stats_texts)} other pages; first-token fallback from the cache)"
        if method == "first-token":
            detail += " (splits from the cache)"
        map_rows.append({"stage": f"vocab map: {method}", "seconds": sec, "detail": detail})

    # 2. Score every page once: the teacher's top-k and the target's own.
    k_scored = max(args.k, args.score_k)
    _, warm = _timed(teacher.score_texts, texts[:1], top_k=k_scored)
    scored_all, score_s = _timed(teacher.score_texts, texts, top_k=k_scored)
    scored = [_cut(s, args.k) for s in scored_all]
    own_scored = own.score_texts(texts, top_k=args.k)
    enc = [encode(tgt_tok, t) for t in texts]
    golds = [e.ids[1:] for e in enc]
    n_tgt = sum(len(g) for g in golds)
    n_src = sum(len(s.token_ids) - 1 for s in scored)
    pos_maps = [align_offsets(s.offsets, e.offsets) for s, e in zip(scored, enc)]
    linked = [pm >= 0 for pm in pos_maps]

    fid_rows = []
    from fuseflow.sparse import AlignedDist

    own_dists = [AlignedDist(s.topk_ids, s.topk_logprobs, s.gold_logprobs, np.ones(len(s.gold_logprobs), bool))
                 for s in own_scored]
    fid_rows.append({"rows": "the target's own top-k (SmolLM2 scoring itself)" if not args.tiny else "the target's own",
                     "all": fidelity_row(own_dists, golds), "linked": fidelity_row(own_dists, golds, linked)})
    proj_rows = []
    variants = [(m, chain, args.k) for m in maps for chain in (False, True)]
    if args.score_k != args.k:
        variants += [(m, True, args.score_k) for m in maps]
    for method, chain, cand in variants:
        vm = maps[method]
        sc_k = scored if cand == args.k else [_cut(s, cand) for s in scored_all]
        dists, sec = _timed(lambda: [
            align_scored(s, e.ids, e.offsets, None, vm, "offsets", args.k, text=t, splits=splits if chain else None)
            for s, e, t in zip(sc_k, enc, texts)
        ])
        name = f"{method}" + (" + chain rule" if chain else "") + (f", {cand} candidates" if cand != args.k else "")
        fid_rows.append({"rows": f"teacher via {name}", "all": fidelity_row(dists, golds),
                         "linked": fidelity_row(dists, golds, linked)})
        proj_rows.append({"stage": f"offsets + projection: {name}", "seconds": sec, "tokens_per_s": n_tgt / sec})
    for cand in dict.fromkeys((args.k, args.score_k)):
        sc_k = scored if cand == args.k else [_cut(s, cand) for s in scored_all]
        _, sec = _timed(lambda: [chain_rule_rows(s, t, e.offsets, pm, splits)
                                 for s, e, t, pm in zip(sc_k, enc, texts, pos_maps)])
        proj_rows.append({"stage": f"chain rule rows alone (inner positions), {cand} candidates", "seconds": sec,
                          "tokens_per_s": n_tgt / sec})
    _, sec = _timed(lambda: [align_offsets(s.offsets, e.offsets) for s, e in zip(scored, enc)])
    proj_rows.append({"stage": "sequence: offsets", "seconds": sec, "tokens_per_s": n_tgt / sec})
    src_strings, tgt_strings = token_strings(src_tok), token_strings(tgt_tok)
    strings = [([src_strings[i] for i in s.token_ids], [tgt_strings[i] for i in e.ids]) for s, e in zip(scored, enc)]
    dp, sec = _timed(lambda: [align_mined_dp(a, b, src_info.special[s.token_ids], tgt_info.special[e.ids])
                              for (a, b), s, e in zip(strings, scored, enc)])
    agree = np.concatenate(dp)[np.concatenate(linked)] == np.concatenate(pos_maps)[np.concatenate(linked)]
    proj_rows.append({"stage": "sequence: mined-dp", "seconds": sec, "tokens_per_s": n_tgt / sec,
                      "detail": f"links {np.mean(np.concatenate(dp) >= 0):.1%} of positions; "
                                f"{agree.mean():.2%} of the offsets' links found"})
    proj_rows.append({"stage": f"teacher scoring ({args.threads} torch thread{'s' if args.threads > 1 else ''})",
                      "seconds": score_s, "tokens_per_s": n_tgt / score_s,
                      "detail": f"{n_src} teacher tokens, hf engine, top-{k_scored} (warm-up {warm:.1f} s not counted)"})
    dtw = None
    if args.dtw_tokens:
        a, b = strings[0][0][: args.dtw_tokens], strings[0][1][: args.dtw_tokens]
        _, ours = _timed(align_mined_dp, a, b)
        _, ref = _timed(_fusellm_dtw_python, a, b)
        dtw = {"tokens": [len(a), len(b)], "fuseflow_s": ours, "fusellm_python_s": ref}

    result = {"pair": pair, "documents": len(texts), "doc_chars": args.doc_chars, "target_positions": n_tgt,
              "teacher_tokens": n_src, "args": vars(args),
              "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__,
                          "torch": torch.__version__},
              "maps": map_rows, "fidelity": fid_rows, "cost": proj_rows, "dtw": dtw,
              "seconds": time.perf_counter() - t_start}
    print(f"## Token alignment: {pair}, {len(texts)} pages × {args.doc_chars} characters, "
          f"{n_tgt} target positions, rows of top-{args.k}\n")
    print("| vocab map | build s | detail |\n|---|---:|---|")
    for r in map_rows:
        print(f"| {r['stage']} | {r['seconds']:.2f} | {r['detail']} |")
    print("\n| aligned rows | coverage | gold missing | mean p(gold) | on the offsets' links: gold missing "
          "| mean p(gold) |\n|---|---:|---:|---:|---:|---:|")
    for r in fid_rows:
        a, l_ = r["all"], r["linked"]
        print(f"| {r['rows']} | {a['coverage']:.1%} | {a['miss_rate']:.1%} | {a['p_gold']:.3f} | "
              f"{l_['miss_rate']:.1%} | {l_['p_gold']:.3f} |")
    print("\n| stage (one core) | seconds | target tokens/s | detail |\n|---|---:|---:|---|")
    for r in proj_rows:
        print(f"| {r['stage']} | {r['seconds']:.3f} | {r['tokens_per_s']:,.0f} | {r.get('detail', '')} |")
    if dtw:
        print(f"\nDTW on the first {dtw['tokens'][0]}×{dtw['tokens'][1]} tokens of one page: fuseflow mined-dp "
              f"{dtw['fuseflow_s'] * 1e3:.1f} ms, FuseLLM-style pure Python {dtw['fusellm_python_s'] * 1e3:.0f} ms.")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    work.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
