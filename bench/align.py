"""Token-alignment benchmark: vocab-map build time per method, sequence-alignment and projection throughput.

Default pair: source gemma3-270m (262k SentencePiece vocab) → target smollm2-135m (49k byte-level BPE),
tokenizers only. ``--tiny``: the tests' tiny SentencePiece (640) → BPE (512) tokenizers. Text: the built-in
corpus (``fuseflow.models.builtin_text``), cut into samples of ``--sample-chars`` characters.

    python bench/align.py --out runs/bench-align.json
    python bench/align.py --tiny --out /tmp/align-tiny.json
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

from fuseflow.align.project import project_to_target
from fuseflow.align.sequence import align_mined_dp, align_offsets
from fuseflow.align.levenshtein import levenshtein_python
from fuseflow.align.tokens import as_numpy_strings, vocab_info
from fuseflow.align.vocab import build_vocab_map, mined_map
from fuseflow.models import builtin_text, encode, load_tokenizer, make_tiny_tokenizer
from fuseflow.sparse import ScoredText


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def _fusellm_dtw_python(src: list[str], tgt: list[str]) -> None:
    """The reference's cost profile: one edit-distance call per DP cell, full matrix, pure Python."""
    n, m = len(src), len(tgt)
    d = [[math.inf] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0
    for i in range(n):
        a = src[i].replace(" ", "")
        for j in range(m):
            d[i + 1][j + 1] = levenshtein_python(a, tgt[j].replace(" ", "")) + min(d[i][j + 1], d[i + 1][j], d[i][j])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny test tokenizers instead of gemma3-270m → smollm2-135m")
    p.add_argument("--source", default="gemma3-270m", help="source (teacher) tokenizer reference")
    p.add_argument("--target", default="smollm2-135m", help="target tokenizer reference")
    p.add_argument("--samples", type=int, default=8, help="texts aligned per sequence method")
    p.add_argument("--sample-chars", type=int, default=8000, help="characters per text (~2k target tokens)")
    p.add_argument("--stats-docs", type=int, default=200, help="documents counted by the 'stats' vocab map")
    p.add_argument("--k", type=int, default=10, help="top-k of the projection")
    p.add_argument("--methods", default="exact,mined,stats", help="vocab-map methods to time")
    p.add_argument("--reference-tokens", type=int, default=200,
                   help="tokens per side for the pure-Python FuseLLM-style DTW timing (0 = skip)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    if args.tiny:
        src_tok, tgt_tok = make_tiny_tokenizer("spm", 640), make_tiny_tokenizer("bpe", 512)
        pair = "tiny-spm-640 → tiny-bpe-512"
    else:
        src_tok, tgt_tok = load_tokenizer(args.source), load_tokenizer(args.target)
        pair = f"{args.source} → {args.target}"
    (src_info, tgt_info), t_info = _timed(lambda: (vocab_info(src_tok), vocab_info(tgt_tok)))
    rows: list[dict] = []
    rows.append({"stage": "token_strings (both vocabularies, once)", "seconds": t_info,
                 "detail": f"V_src={src_info.size}, V_tgt={tgt_info.size}"})

    corpus = builtin_text()
    texts = [corpus[i : i + args.sample_chars] for i in range(0, len(corpus), args.sample_chars)][: args.samples]
    docs = [d for d in corpus.split("\n\n") if d.strip()][: args.stats_docs]

    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: time the computation, not the disk read
        vocab_maps = {}
        for method in [m for m in args.methods.split(",") if m]:
            vm, sec = _timed(build_vocab_map, method, src_tok, tgt_tok, texts=docs, cache_dir=cache)
            vocab_maps[method] = vm
            src_text = ~src_info.special
            detail = f"mapped {np.mean(vm[src_text] >= 0):.1%} of text tokens"
            if method == "stats":
                detail += f" (counted over {len(docs)} documents"
                detail += "; MinED fallback read from the cache)" if "mined" in vocab_maps else "; includes MinED)"
            rows.append({"stage": f"vocab map: {method}", "seconds": sec, "detail": detail})
            if method == "mined":
                _, dist = mined_map(as_numpy_strings(src_info.strings), as_numpy_strings(tgt_info.strings),
                                    src_info.special, tgt_info.special, return_distance=True)
                d = dist[src_text]
                rows[-1]["detail"] += (f"; exact {np.mean(d == 0):.1%}, distance 1 (certified optimal) "
                                       f"{np.mean(d == 1):.1%}, ≥2 {np.mean(d >= 2):.1%}")
            _, sec2 = _timed(build_vocab_map, method, src_tok, tgt_tok, texts=docs, cache_dir=cache)
            rows.append({"stage": f"vocab map: {method} (cached)", "seconds": sec2, "detail": "read from disk"})
    vocab_map = vocab_maps.get("mined", next(iter(vocab_maps.values()), None))

    encoded = [(encode(src_tok, t), encode(tgt_tok, t)) for t in texts]
    n_tgt = sum(len(t.ids) for _, t in encoded)
    n_src = sum(len(s.ids) for s, _ in encoded)
    strings = [([src_info.strings[i] for i in s.ids], [tgt_info.strings[i] for i in t.ids]) for s, t in encoded]

    pos_maps, sec = _timed(lambda: [align_offsets(s.offsets, t.offsets) for s, t in encoded])
    linked = float(np.mean(np.concatenate(pos_maps) >= 0))
    rows.append({"stage": "sequence: offsets", "seconds": sec, "tokens_per_s": n_tgt / sec,
                 "detail": f"{len(texts)} texts, {n_tgt} target / {n_src} source tokens, linked {linked:.1%}"})
    dp_maps, sec = _timed(lambda: [
        align_mined_dp(a, b, src_info.special[s.ids], tgt_info.special[t.ids])
        for (s, t), (a, b) in zip(encoded, strings)
    ])
    both = np.concatenate(pos_maps)
    dp = np.concatenate(dp_maps)
    agree = float(np.mean(dp[dp >= 0] == both[dp >= 0])) if (dp >= 0).any() else float("nan")
    rows.append({"stage": "sequence: mined-dp", "seconds": sec, "tokens_per_s": n_tgt / sec,
                 "detail": f"linked {np.mean(dp >= 0):.1%}; links agreeing with offsets {agree:.2%}"})
    if args.reference_tokens:
        a, b = strings[0][0][: args.reference_tokens], strings[0][1][: args.reference_tokens]
        _, sec = _timed(_fusellm_dtw_python, a, b)
        full_a, full_b = len(strings[0][0]), len(strings[0][1])
        est = sec * (full_a * full_b) / max(len(a) * len(b), 1)  # cost is per cell: L_src × L_tgt
        rows.append({"stage": "sequence: FuseLLM-style DTW, pure Python (reference)", "seconds": sec,
                     "tokens_per_s": full_b / est,
                     "detail": f"timed on {len(a)}×{len(b)} tokens, extrapolated per cell to one "
                               f"{full_a}×{full_b}-token text: {est:.1f} s (tokens/s column)"})

    if vocab_map is not None:
        rng = np.random.default_rng(0)
        scored = []
        for s, _ in encoded:
            n = len(s.ids) - 1
            lp = np.sort(np.log(rng.dirichlet(np.ones(args.k + 5), n)[:, : args.k]), axis=1)[:, ::-1]
            scored.append(ScoredText(
                token_ids=s.ids, offsets=s.offsets, tokens=None,
                topk_ids=rng.integers(0, src_info.size, (n, args.k)).astype(np.int32),
                topk_logprobs=np.ascontiguousarray(lp, dtype=np.float32), gold_logprobs=lp[:, 0].astype(np.float32),
            ))
        _, sec = _timed(lambda: [
            project_to_target(sc, pm, vocab_map, t.ids, args.k) for sc, pm, (_, t) in zip(scored, pos_maps, encoded)
        ])
        rows.append({"stage": f"projection (k={args.k})", "seconds": sec, "tokens_per_s": n_tgt / sec,
                     "detail": "random source top-k, mined vocab map, offsets pos_map"})

    print(f"## Token alignment: {pair}\n")
    print("| stage | seconds | target tokens/s | detail |")
    print("|---|---:|---:|---|")
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if "tokens_per_s" in r else ""
        print(f"| {r['stage']} | {r['seconds']:.3f} | {tps} | {r['detail']} |")
    result = {
        "pair": pair,
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "numpy": np.__version__},
        "args": vars(args),
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
