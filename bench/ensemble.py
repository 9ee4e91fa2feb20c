"""Cool-Fusion cost benchmark: forward calls and milliseconds per generated token, each source alone vs the
ensemble, on the same prompts in one run (issue 16).

Default sources: smollm2-135m and gemma3-270m (``fuseflow models prepare smollm2-135m gemma3-270m``), in-process
``hf`` engines. ``--tiny``: the tests' tiny random models. Prompts: passages of the built-in corpus (Python's
own documentation) past the part the tiny tokenizers are trained on, cut on a space; greedy decoding, no stop
string, ``--max-tokens`` tokens each (fewer when a source ends the text).

Forward calls are counted with a pre-hook on each model's decoder trunk, so generation steps, prompt
prefills and the rerank's scoring forwards all count once per call. Per system: generated tokens (a source
alone: its own tokens; the ensemble: the first source's, as its ``usage`` counts), characters, wall time,
ms/token, ms/char (which compares across tokenizers), forward calls per generated token; for the ensemble
also the segments, how many were contested (distinct candidates scored) and the forward calls per source.

``--config ENSEMBLE.yaml``: that ensemble's in-process sources, rerank rule and segment length instead (issue 23:
``examples/ensemble-experts.yaml``); with a next-word ``eval`` section the prompts are passages of its
languages' held-out documents (the dev split: the test split's passages stay unseen), one language after another.

    nice -n 10 python bench/ensemble.py --threads 2 --out runs/bench-ensemble.json
    python bench/ensemble.py --config examples/ensemble-experts.yaml --threads 2 --out runs/bench-ensemble-experts.json
    python bench/ensemble.py --tiny --prompts 2 --max-tokens 16
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _after_a_word(piece: str) -> str:
    """``piece`` cut at its last space (so it ends after a word), on one line, no trailing space."""
    cut = piece.rfind(" ")
    return " ".join(piece[: cut if cut > 0 else len(piece)].split())


def prompts_from_corpus(n: int, chars: int, offset: int = 300_000) -> list[str]:
    """``n`` passages of about ``chars`` characters, each cut after a word (ending before a space)."""
    from fuseflow.models import builtin_text

    text = builtin_text(offset + n * (chars + 500))[offset:]
    return [_after_a_word(text[pos : pos + chars]) for pos in range(0, n * (chars + 500), chars + 500)]


def prompts_from_documents(n: int, chars: int, languages, seed: int, held_out_documents: int | None,
                           corpora=None) -> list[str]:
    """``n`` passages of about ``chars`` characters, taken in turn from each language's dev-split held-out
    documents (:func:`fuseflow.ensemble.tasks.split_documents`), each cut after a word."""
    from fuseflow.ensemble.tasks import split_documents

    pools = [[d.text for d in split_documents(lang, seed, "dev", held_out_documents, corpora=corpora) if len(d.text) > chars]
             for lang in languages]
    out = []
    for i in range(n):
        pool = pools[i % len(pools)]
        if not pool:
            raise SystemExit(f"no dev document of {languages[i % len(pools)]!r} is longer than {chars} characters")
        out.append(_after_a_word(pool[(i // len(pools)) % len(pool)][:chars]))
    return out


# The engine methods whose forwards are told apart: a proposal's generation, the rerank's scoring.
PHASES = ("generate", "score_continuations", "score_tails", "score_ids")


class ForwardCounter:
    """Counts forward calls of an engine's decoder trunk (or of the whole model when it has none), and the
    positions they run, per phase: which engine method made the call (:data:`PHASES`). Within ``generate``
    the first forward of a call (the prompt's uncached tail: a prefill) is told from the one-token steps."""

    def __init__(self, engine):
        model = engine.model
        trunk = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.calls = 0
        self.by_phase: dict[str, list[int]] = {}  # phase → [calls, positions]
        self._phase, self._first = "other", False
        (trunk if trunk is not None and trunk is not model else model).register_forward_pre_hook(
            self._hook, with_kwargs=True
        )
        for name in PHASES:
            if hasattr(engine, name):
                setattr(engine, name, self._wrap(name, getattr(engine, name)))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self._phase, self._first = name, True
            try:
                return fn(*args, **kwargs)
            finally:
                self._phase = "other"

        wrapped.__signature__ = __import__("inspect").signature(fn)  # the decoder checks for stop_when
        return wrapped

    def _hook(self, module, args, kwargs):
        self.calls += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        positions = int(ids.numel()) if ids is not None else int(emb.shape[0] * emb.shape[1]) if emb is not None else 0
        phase = self._phase
        if phase == "generate":
            phase = "generate: prefill" if self._first else "generate: step"
        self._first = False
        row = self.by_phase.setdefault(phase, [0, 0])
        row[0] += 1
        row[1] += positions

    def snapshot(self) -> dict[str, list[int]]:
        return {k: list(v) for k, v in self.by_phase.items()}


def build_sources(args):
    from fuseflow.ensemble.sources import EnsembleSource
    from fuseflow.score.engine import create_engine

    if args.config:
        from fuseflow.ensemble.config import build_sources as from_config

        sources = from_config(args.ensemble)
        if any(s.remote for s in sources):
            raise SystemExit("--config: every source must be in-process (`model:`); forwards are counted on the model")
        return sources
    if args.tiny:
        from fuseflow.models import make_tiny_model, make_tiny_tokenizer

        root = Path(tempfile.mkdtemp(prefix="bench-ensemble-"))
        refs = [
            ("llama", str(make_tiny_model(root / "llama", "llama", tokenizer=make_tiny_tokenizer("bpe", 512), seed=0))),
            ("gemma", str(make_tiny_model(root / "gemma", "gemma3", tokenizer=make_tiny_tokenizer("spm", 640), seed=1))),
        ]
    else:
        refs = [(m, m) for m in args.models]
    sources = []
    for name, ref in refs:
        engine = create_engine("hf", ref, name=name)
        sources.append(EnsembleSource.from_engine(engine, name=name))
    return sources


def run_system(name, sources, counters, decoder, prompts, max_tokens):
    from fuseflow.ensemble.decoder import DecodeParams, generate_single
    from fuseflow.ensemble.sources import completion_prompt

    params = DecodeParams(max_tokens=max_tokens, temperature=0.0)
    names = [s.name for s in sources]
    row = {"system": name, "tokens": 0, "chars": 0, "seconds": 0.0, "forward_calls": {n: 0 for n in names},
           "segments": 0, "contested": 0, "texts": [], "phases": {}}
    for text in prompts:
        for s in sources:
            s.teacher.prefix_cache.clear()  # every request starts cold, as a new prompt would
        before = [c.calls for c in counters]
        phases_before = [c.snapshot() for c in counters]
        t0 = time.perf_counter()
        if name == "cool-fusion":
            c = decoder.generate(completion_prompt(sources, text), params)
        else:
            c = generate_single(sources[names.index(name)], text, True, params)
        row["seconds"] += time.perf_counter() - t0
        for n, counter, b, pb in zip(names, counters, before, phases_before):
            row["forward_calls"][n] += counter.calls - b
            for phase, (calls, positions) in counter.snapshot().items():
                acc = row["phases"].setdefault(n, {}).setdefault(phase, [0, 0])
                acc[0] += calls - pb.get(phase, [0, 0])[0]
                acc[1] += positions - pb.get(phase, [0, 0])[1]
        row["tokens"] += c.completion_tokens
        row["chars"] += len(c.text)
        row["segments"] += len(c.segments)
        row["contested"] += sum(s.contested for s in c.segments)
        row["texts"].append(c.text)
    calls = sum(row["forward_calls"].values())
    row["token_source"] = names[0] if name == "cool-fusion" else name
    row["ms_per_token"] = 1e3 * row["seconds"] / max(row["tokens"], 1)
    row["ms_per_char"] = 1e3 * row["seconds"] / max(row["chars"], 1)
    row["forward_calls_per_token"] = calls / max(row["tokens"], 1)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"], help="model references (short names)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny random models instead")
    p.add_argument("--prompts", type=int, default=4, help="number of prompts")
    p.add_argument("--prompt-chars", type=int, default=400, help="characters per prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--config", default=None, help="ensemble config: its sources, rerank and segment length "
                   "(and, for a next-word eval, prompts from its languages' dev documents)")
    p.add_argument("--rerank", default=None, help="rerank rule (default: the config's, else mean_perplexity)")
    p.add_argument("--segment-max-tokens", type=int, default=None, help="default: the config's, else 8")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON results file")
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fuseflow.ensemble.decoder import CoolFusionDecoder

    args.ensemble = None
    if args.config:
        from fuseflow.ensemble.config import load_ensemble_config

        args.ensemble = load_ensemble_config(args.config)
    d = args.ensemble.decoding if args.ensemble else None
    args.rerank = args.rerank or (d.rerank if d else "mean_perplexity")
    args.segment_max_tokens = args.segment_max_tokens or (d.segment_max_tokens if d else 8)
    sources = build_sources(args)
    counters = [ForwardCounter(s.teacher) for s in sources]
    decoder = CoolFusionDecoder(sources, rerank=args.rerank, segment_max_tokens=args.segment_max_tokens,
                                **({"segment_min_chars": d.segment_min_chars, "boundary": d.boundary} if d else {}))
    e = args.ensemble.eval if args.ensemble else None
    if e is not None and e.task == "next-word":
        prompts = prompts_from_documents(args.prompts, args.prompt_chars, e.languages, e.seed, e.held_out_documents,
                                         e.corpora)
    else:
        prompts = prompts_from_corpus(args.prompts, args.prompt_chars)
    systems = [s.name for s in sources] + ["cool-fusion"]
    run_system("cool-fusion", sources, counters, decoder, prompts[:1], 4)  # warm-up: first-call costs
    rows = [run_system(name, sources, counters, decoder, prompts, args.max_tokens) for name in systems]

    slowest = max(r["ms_per_token"] for r in rows if r["system"] != "cool-fusion")
    slowest_char = max(r["ms_per_char"] for r in rows if r["system"] != "cool-fusion")
    fused = rows[-1]
    header = ["system", "tokens (of)", "chars", "ms / token", "ms / char", "forward calls", "calls / token",
              "segments (contested)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        calls = sum(r["forward_calls"].values())
        per = ", ".join(f"{k} {v}" for k, v in r["forward_calls"].items() if v)
        seg = f"{r['segments']} ({r['contested']})" if r["system"] == "cool-fusion" else "—"
        lines.append(
            f"| {r['system']} | {r['tokens']} ({r['token_source']}) | {r['chars']} | {r['ms_per_token']:.1f} | "
            f"{r['ms_per_char']:.1f} | {calls} ({per}) | {r['forward_calls_per_token']:.2f} | {seg} |"
        )
    summary = (
        f"\ncool-fusion / slower source: {fused['ms_per_token'] / slowest:.2f}x per token, "
        f"{fused['ms_per_char'] / slowest_char:.2f}x per character "
        f"({len(prompts)} prompts, {args.max_tokens} max tokens, torch threads {torch.get_num_threads()})"
    )
    lines.append("")
    lines.append("| system | source | phase | forward calls | positions run | calls / generated token |")
    lines.append("|---|---|---|---|---|---|")
    for r in rows:
        for n, phases in r["phases"].items():
            for phase, (calls, positions) in sorted(phases.items()):
                if calls:
                    lines.append(f"| {r['system']} | {n} | {phase} | {calls} | {positions} | "
                                 f"{calls / max(r['tokens'], 1):.2f} |")
    print("\n".join(lines) + summary)
    result = {
        "sources": [s.name for s in sources],
        "config": args.config,
        "tiny": args.tiny,
        "prompts": prompts,
        "max_tokens": args.max_tokens,
        "rerank": args.rerank,
        "segment_max_tokens": args.segment_max_tokens,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "systems": rows,
        "ratio_ms_per_token_vs_slower_source": fused["ms_per_token"] / slowest,
        "ratio_ms_per_char_vs_slower_source": fused["ms_per_char"] / slowest_char,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
