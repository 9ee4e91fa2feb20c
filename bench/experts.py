"""Experts bench (issue 22): does knowledge reach the target from sources that know more than it does, in
different places — FuseLLM, FuseChat and single-teacher distillation against CLM and self-distillation?

1. **Experts, built once by ``fuseflow finetune``** (the recipe with no teachers, as a user makes one): by
   default Gemma-3-270M tuned on German manual pages (``gemma-de``: another tokenizer than the target's, so its
   knowledge reaches the target through the projection) and SmolLM2-135M tuned on French ones (``smollm-fr``:
   the target's tokenizer). Each trains on documents of its corpus that no evaluation split holds (the run
   config's held-out documents are not read; the dev documents of every size are left out), on ≥ 10× the
   target's training bytes in that domain. Cached under ``--experts-cache`` keyed by what makes them; the build
   time is recorded and reported.
2. **Arms** on the same samples, in the same order, from the same start, by ``bench/quality.py``'s machinery
   (each teacher scores every sample once, cached): ``clm``; ``distil:target`` (self-distillation, the control
   to beat); ``distil:EXPERT``; ``fuse:min_ce`` / ``fuse:avg_ce`` over the experts and the target;
   ``pair:EXPERT`` (FuseChat's pairwise fusion: the expert and the target, MinCE) and, after them, the
   pairwise targets merged by ``fuseflow merge`` (``--merges``: VaRM, SCE, linear), evaluated like the arms.
3. **Report**: the experts' lead over the target's same-budget CLM run (first), every arm's learning curve
   against CLM and against self-distillation (paired bootstrap over documents, 95 %), and the training tokens
   each arm needs to reach CLM's final bits/byte.

Tune on ``--split dev`` (documents of the training part kept out of training and out of the experts); run
``--split held_out`` once for the chosen settings.

    python bench/experts.py --split dev --arms …              # tuning runs
    python bench/experts.py                                   # held-out, the default size and arms
    python bench/experts.py --experts-only                    # build (or find) the experts, print their lead
    python bench/experts.py --build-only                      # build (or find) them, link runs/experts/NAME
    python bench/experts.py --build-only --write-unread DIR   # … and write each domain's unread documents
    python bench/experts.py --experts en=HF_DIR:en:200:1e-4,…   # other experts (NAME=BASE:DOMAIN:STEPS:LR)

Writes ``--out`` (JSON: every figure) and ``--plot`` (PNG learning curves).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality as q  # noqa: E402  (bench/quality.py: the arms' machinery)

ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("bench.experts")


@dataclass(frozen=True)
class Expert:
    """``base`` CLM-tuned by ``fuseflow finetune`` on the corpus ``domain`` of the run config (a name in
    ``corpus.sources``): ``steps`` optimizer steps of the run config's micro-batch, at ``lr``."""

    name: str
    base: str
    domain: str
    steps: int
    lr: float


# NAME=BASE:DOMAIN:STEPS:LR. Gemma-3-270M diverged at lr 3e-4 in a probe (loss 3.8 → 14 at step 2); 1e-4 trains.
DEFAULT_EXPERTS = "gemma-de=gemma3-270m:de:100:1e-4,smollm-fr=smollm2-135m:fr:100:2e-4"


def parse_experts(spec: str) -> list[Expert]:
    """``"gemma-de=gemma3-270m:de:100:1e-4,…"`` → experts (BASE: a short name, HF directory or .gguf file)."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, rest = item.partition("=")
        parts = rest.rsplit(":", 3)
        if not name or len(parts) != 4:
            raise SystemExit(f"--experts: cannot read {item!r} (NAME=BASE:DOMAIN:STEPS:LR)")
        try:
            out.append(Expert(name, parts[0], parts[1], int(parts[2]), float(parts[3])))
        except ValueError:
            raise SystemExit(f"--experts: {item!r}: STEPS must be an integer and LR a number") from None
    if len({e.name for e in out}) != len(out) or not out:
        raise SystemExit(f"--experts: {spec!r}: give one or more experts with unique names")
    return out


TARGET = "target"  # the frozen target as a source: self-distillation, and MinCE's candidate of its own


# The settings tuned on the dev documents (docs/quality.md, "Experts"): MinCE by each candidate's whole-text nll,
# the student itself a candidate (where no teacher beats it the loss is CLM alone), the tail KL, λ 0.5.
TUNED = "@fusion.criterion=text@fusion.kl=tail@fusion.student_candidate=true@fusion.lam=0.5"


def default_arms(experts: Sequence[Expert], target_model: str) -> str:
    """clm; self-distillation and FuseLLM's MinCE at the run config's settings (the quickstart's: λ 0.9); then at
    the tuned settings each expert (through FuseLLM's MinED map too, when its base is another model than the
    target: what the faithful projection carries across tokenizers), MinCE and AvgCE over all, and FuseChat's
    pairs."""
    arms = ["clm", f"distil:{TARGET}", "fuse:min_ce"]
    for e in experts:
        arms.append(f"distil:{e.name}{TUNED}")
        if e.base != target_model:
            arms.append(f"distil:{e.name}{TUNED}@align.vocab_map=mined")
    return ",".join([*arms, f"fuse:min_ce{TUNED}", f"fuse:avg_ce{TUNED}", *(f"pair:{e.name}{TUNED}" for e in experts)])


MERGES = {"varm": {}, "sce": {"select_topk": 0.1}, "linear": {}}  # parameters of each merge method (FuseChat-2: 0.1)
EXPERT_VERSION = "expert-v1"


# ----------------------------------------------------------------------------------------------------------
# The experts.
# ----------------------------------------------------------------------------------------------------------


def _domain(cfg, name: str):
    for corpus, _, sub in cfg.corpus.corpora():
        if corpus == name:
            return sub
    raise SystemExit(f"expert domain {name!r} is not a corpus of the run config ({[c for c, _, _ in cfg.corpus.corpora()]})")


def expert_documents(cfg, expert: Expert) -> list[str]:
    """The texts an expert trains on: its corpus's training part (the held-out documents are never read) less
    the dev documents of every bench size (the most any size keeps out: the smaller sets are its prefix)."""
    docs, dev = _train_part(cfg, expert.domain)
    return [d.text for d in docs if d.index not in dev]


def _train_part(cfg, domain: str) -> tuple[list, set[int]]:
    """The domain corpus's training-part documents (with text) and the indices of its dev documents of every
    bench size (the most any size keeps out: the smaller sets are its prefix)."""
    from fuseflow.corpus import iter_documents

    docs = [d for d in iter_documents(_domain(cfg, domain), "train") if d.text and d.text.strip()]
    dev = q.dev_indices(np.array([d.index for d in docs]), cfg.corpus.seed, max(s["dev_documents"] for s in q.SIZES.values()))
    return docs, dev


def write_unread(cfg, domain: str, out_dir: Path) -> Path:
    """``OUT_DIR/DOMAIN.jsonl``: the domain corpus's documents of the training part that :func:`expert_documents`
    leaves out (the dev documents of every bench size), in corpus order; no expert of that domain reads them,
    nor are they the run config's held-out documents. A document whose text is also a trained one's (a corpus
    can hold the same page twice) is left out too."""
    docs, dev = _train_part(cfg, domain)
    trained = {d.text for d in docs if d.index not in dev}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{domain}.jsonl"
    with path.open("w") as f:
        for d in docs:
            if d.index in dev and d.text not in trained:
                f.write(json.dumps({"text": d.text}, ensure_ascii=False) + "\n")
    return path


def _expert_key(cfg, expert: Expert) -> str:
    h = hashlib.sha256()
    for part in (EXPERT_VERSION, expert, cfg.seed, _domain(cfg, expert.domain).model_dump_json(),
                 cfg.train.max_length, cfg.train.micro_batch_size, max(s["dev_documents"] for s in q.SIZES.values())):
        h.update(repr(part).encode())
    return h.hexdigest()[:12]


def link_expert(cache: Path, name: str, model_dir: Path) -> None:
    """``CACHE/NAME`` → the expert's HF directory (relative link): the stable path configs name the expert by
    (``examples/ensemble-experts.yaml``), pointing at the newest build of that name."""
    link = cache / name
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise SystemExit(f"{link} exists and is not a link; move it away to let the bench link expert {name!r} there")
    link.symlink_to(os.path.relpath(model_dir.resolve(), cache.resolve()), target_is_directory=True)


def build_expert(cfg, expert: Expert, cache: Path) -> dict:
    """The expert's HF directory, built by ``fuseflow finetune`` unless the cache has it; ``{model_dir, seconds
    (the build's, when it was built), train_tokens (its own), train_bytes, documents, cached}``."""
    from fuseflow.corpus import make_samples
    from fuseflow.models import load_tokenizer

    home = cache / f"{expert.name}-{_expert_key(cfg, expert)}"
    meta_path = home / "expert.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        log.info("expert %s: cached at %s (built in %.0f s)", expert.name, meta["model_dir"], meta["seconds"])
        link_expert(cache, expert.name, Path(meta["model_dir"]))
        return {**meta, "cached": True}
    texts = expert_documents(cfg, expert)
    n_samples = expert.steps * cfg.train.micro_batch_size
    trained = list(islice(make_samples(texts, load_tokenizer(expert.base), cfg.train.max_length), n_samples))
    home.mkdir(parents=True, exist_ok=True)
    corpus = home / "corpus.jsonl"
    with corpus.open("w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    run_cfg = {
        "run_dir": str(home / "run"), "seed": cfg.seed, "device": cfg.device,
        "target": {"model": expert.base},
        # 4 documents of its own held out: finetune's report; the bench evaluates the expert on its own splits
        "corpus": {"source": str(corpus), "format": "jsonl", "held_out_documents": 4},
        "train": {**cfg.train.model_dump(mode="json", exclude={"max_steps", "lr", "checkpoint_every"}),
                  "max_steps": expert.steps, "lr": expert.lr, "checkpoint_every": max(25, expert.steps // 4)},
        "eval": {"before": False, "max_length": cfg.eval.max_length, "max_chars_per_document": 1000},
    }
    import yaml

    (home / "finetune.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    command = [str(Path(sys.executable).with_name("fuseflow")), "finetune", str(home / "finetune.yaml"), "--no-progress"]
    log.info("expert %s: %s (%d documents, %d samples)", expert.name, " ".join(command), len(texts), n_samples)
    t0 = time.perf_counter()
    with (home / "finetune.log").open("w") as logf:
        done = subprocess.run(command, stdout=logf, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"expert {expert.name}: fuseflow finetune failed (exit {done.returncode}): see {home / 'finetune.log'}")
    report = json.loads((home / "run" / "report.json").read_text())
    shutil.rmtree(home / "run" / "finetuned" / "checkpoints", ignore_errors=True)  # optimizer state: GBs, not needed
    meta = {"name": expert.name, "base": expert.base, "domain": expert.domain, "steps": expert.steps, "lr": expert.lr,
            "model_dir": report["runs"]["finetuned"]["model_dir"], "seconds": seconds,
            "train_tokens": report["runs"]["finetuned"]["tokens"],
            "train_bytes": sum(len(s.text.encode()) for s in trained), "documents": len(texts),
            "command": " ".join(shlex.quote(c) for c in command)}
    meta_path.write_text(json.dumps(meta, indent=1))
    link_expert(cache, expert.name, Path(meta["model_dir"]))
    log.info("expert %s: built in %.0f s", expert.name, seconds)
    return {**meta, "cached": False}


def lead_table(result: dict) -> str:
    """Each expert against the target's same-budget CLM run, in the expert's domain and overall."""
    clm = result["arms"]["clm"]["curve"][-1]
    lines = ["| expert | domain | built in | train bytes (× target's in domain) | expert bits/byte | target CLM "
             f"({clm['tokens']} tokens) | lead | ≥ 0.1 |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for e in result["experts"].values():
        mine = result["sources"][f"source {e['name']}"]["per_corpus"][e["domain"]]
        theirs = clm["per_corpus"][e["domain"]]
        ratio = e["train_bytes"] / max(1, result["train_bytes"].get(e["domain"], 0))
        lines.append(f"| {e['name']} ({e['base']}) | {e['domain']} | {e['seconds'] / 60:.1f} min | {e['train_bytes']:,} "
                     f"({ratio:.0f}×) | {mine:.4f} | {theirs:.4f} | {theirs - mine:+.4f} | "
                     f"{'yes' if theirs - mine >= 0.1 else 'NO'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Arms: quality.py's, with FuseChat's pairwise fusion and the merges of its pairwise targets.
# ----------------------------------------------------------------------------------------------------------


def parse_arms(spec: str, experts: Sequence[str]) -> list[q.Arm]:
    """quality.py's arms plus ``pair:EXPERT`` (that expert and the target, MinCE: FuseChat's pairwise fusion)."""
    arms = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        head, *overrides = item.split("@")
        kind, _, arg = head.partition(":")
        if kind == "pair":
            if arg not in experts:
                raise SystemExit(f"--arms: {item!r}: no expert {arg!r} (experts: {list(experts)})")
            arms.append(q.Arm(item, "fuse", (arg, TARGET), "min_ce", tuple(overrides)))
        else:
            arms.append(q.parse_arm(item, [*experts, TARGET]))
    if not arms or arms[0].kind != "clm":
        raise SystemExit("--arms: the first arm must be clm (every other arm is compared with it)")
    return arms


def merge_pairwise(cfg, arms: dict, methods: Sequence[str], work: Path) -> dict[str, str]:
    """``fuseflow merge`` of the pairwise targets (FuseChat's second stage) by each method: {arm name: model dir}."""
    import yaml

    from fuseflow.cli import run_command

    pairs = [a["model_dir"] for name, a in arms.items() if name.startswith("pair:") and a.get("model_dir")]
    if len(pairs) < 2:
        return {}
    out = {}
    for method in methods:
        spec = {"method": method, "base": cfg.target.model, "models": pairs, "parameters": MERGES.get(method, {}),
                "output": str(work / f"merged-{method}"), "overwrite": True, "threads": 1}
        path = work / f"merge-{method}.yaml"
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
        t0 = time.perf_counter()
        if run_command("merge", [str(path)]) != 0:
            raise SystemExit(f"fuseflow merge {path} failed")
        log.info("merged the pairwise targets by %s in %.0f s", method, time.perf_counter() - t0)
        out[f"merge:{method}"] = spec["output"]
    return out


def tokens_to_reach(curve: Sequence[dict], goal: float) -> float | None:
    """Training tokens at which a learning curve (with its start at 0 tokens) first reaches ``goal`` bits/byte,
    linearly interpolated between evaluated budgets; None if it never does."""
    for a, b in zip(curve, curve[1:]):
        if b["bpb"] <= goal:
            if a["bpb"] <= goal:
                return float(a["tokens"])
            return a["tokens"] + (a["bpb"] - goal) / (a["bpb"] - b["bpb"]) * (b["tokens"] - a["tokens"])
    return None


def efficiency_table(result: dict) -> str:
    clm = result["arms"]["clm"]["curve"]
    goal, budget = clm[-1]["bpb"], clm[-1]["tokens"]
    lines = [f"| arm | tokens to reach CLM's final {goal:.4f} bits/byte | fraction of CLM's {budget} |", "|---|---:|---:|"]
    start = {"tokens": 0, "bpb": result["start"]["bpb"]}
    for name, arm in result["arms"].items():
        if len(arm["curve"]) < 2 and name != "clm":
            continue  # a merged model: one point
        t = tokens_to_reach([start, *arm["curve"]], goal)
        lines.append(f"| {name} | {'—' if t is None else f'{t:.0f}'} | {'not reached' if t is None else f'{t / budget:.2f}'} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="run-config overrides key=value (fusion.lam=0.5 …)")
    p.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"),
                   help="run config: its target, corpus mix, train and fusion sections (its sources are replaced)")
    p.add_argument("--size", choices=sorted(q.SIZES), default="default")
    p.add_argument("--steps", type=int, help="optimizer steps per arm (default: the size's)")
    p.add_argument("--budgets", help="comma-separated steps to evaluate at (default: the size's)")
    p.add_argument("--split", choices=("held_out", "dev"), default="held_out", help="tune on dev, report held_out")
    p.add_argument("--arms", help="comma-separated: clm, distil:SOURCE, fuse:FUNCTION, pair:EXPERT, each optionally "
                   "@key=value… (default: clm, distil:target, fuse:min_ce, then at the settings tuned on dev: "
                   "distil:EXPERT each, fuse:min_ce, fuse:avg_ce, pair:EXPERT each)")
    p.add_argument("--merges", default="varm,sce,linear", help="fuseflow merge methods for the pairwise targets ('' none)")
    p.add_argument("--experts", default=DEFAULT_EXPERTS, help=f"NAME=BASE:DOMAIN:STEPS:LR,… (default {DEFAULT_EXPERTS}); "
                   "DOMAIN: a corpus of the run config's corpus.sources")
    p.add_argument("--experts-only", action="store_true", help="build (or find) the experts, evaluate them, stop")
    p.add_argument("--write-unread", metavar="DIR", help="write DIR/DOMAIN.jsonl: each expert domain's documents "
                   "that no expert reads (the dev documents every bench size keeps out of training), for "
                   "`fuseflow eval-ensemble … eval.corpora` (with --build-only: no evaluation)")
    p.add_argument("--build-only", action="store_true",
                   help="build (or find) the experts and link each as EXPERTS_CACHE/NAME (what "
                   "examples/ensemble-experts.yaml loads), no evaluation")
    p.add_argument("--experts-cache", default=str(ROOT / "runs" / "experts"), help="where the experts are kept")
    p.add_argument("--cache", default=str(ROOT / "runs" / "quality-cache"), help="teacher-score cache ('' for none)")
    p.add_argument("--vs", help="comma-separated arms every arm is also compared with (default: distil:target, "
                   "self-distillation, when it is an arm)")
    p.add_argument("--report", metavar="JSON", help="no training: print a finished run's tables anew")
    p.add_argument("--out", default="experts.json")
    p.add_argument("--plot", default="experts.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    vs = [a for a in (args.vs or "").split(",") if a]
    if args.report:
        result = json.loads(Path(args.report).read_text())
        vs = vs if args.vs is not None else [a for a in (f"distil:{TARGET}",) if a in result["arms"]]
        _print(result, vs, compared=False)
        return 0
    for name in ("fuseflow", "deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)

    from fuseflow.config import FuseConfig, SourceConfig, load_config
    from fuseflow.models import load, load_tokenizer

    t_start = time.perf_counter()
    cfg, size, steps, budgets = q.schedule(load_config(FuseConfig, args.config, list(args.overrides)), args.size,
                                           args.steps, args.budgets)

    experts = parse_experts(args.experts)
    built = {e.name: build_expert(cfg, e, Path(args.experts_cache)) for e in experts}
    if args.write_unread:
        for domain in dict.fromkeys(e.domain for e in experts):
            path = write_unread(cfg, domain, Path(args.write_unread))
            print(f"{domain}: {path} ({sum(1 for _ in path.open())} documents no expert read)")
    if args.build_only:
        for e in experts:
            print(f"{e.name}: {Path(args.experts_cache) / e.name} -> {built[e.name]['model_dir']}")
        return 0
    sources = [SourceConfig(name=e.name, model=built[e.name]["model_dir"]) for e in experts]
    sources.append(SourceConfig(name=TARGET, model=cfg.target.model))
    gemma = next((s for s in cfg.sources if "gemma" in s.model), None)  # the quickstart's Gemma settings
    sources = [s.model_copy(update={k: getattr(gemma, k) for k in ("batch_tokens", "head_chunk_tokens")})
               if gemma is not None and s.name.startswith("gemma") else s for s in sources]
    cfg = cfg.model_copy(update={"sources": sources})
    arms = parse_arms(args.arms or default_arms(experts, cfg.target.model), [e.name for e in experts])
    if args.vs is None:  # self-distillation, the control to beat, when it is an arm
        vs = [a.name for a in arms if a.name == f"distil:{TARGET}"]
    num_samples = steps * cfg.train.samples_per_step()

    tokenizer = load_tokenizer(cfg.target.model)
    samples, texts, groups = q.prepare(cfg, size, args.split, num_samples, tokenizer)
    corpora, mix = q.describe(samples, texts, groups)
    train_bytes = {g: sum(len(s.text.encode()) for s in samples if q.corpus_of(s) == g) for g in corpora}
    log.info("%d training samples %s; %d %s documents %s", len(samples), mix, len(texts), args.split, corpora)

    result: dict = {
        "command": "python bench/experts.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "size": args.size, "split": args.split, "steps": steps, "budgets": list(budgets),
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))), "experts": built,
        "train_samples": len(samples), "train_mix": mix, "train_bytes": train_bytes, "corpora": corpora,
        "eval_groups": groups, "sources": {}, "arms": {},
    }
    q.evaluate_start(cfg, texts, groups, result)  # the experts (the target source is the start)
    print(q.sources_table(result), flush=True)
    if args.experts_only:
        Path(args.out).write_text(json.dumps(result, indent=1))
        return 0

    needs = {t for a in arms for t in a.teachers}
    scored = cfg.model_copy(update={"sources": [s for s in cfg.sources if s.key in needs]})
    raw, result["score_seconds"] = q.score_all(scored, samples, tokenizer, Path(args.cache) if args.cache else None)
    aligned_for = q.alignments(samples, raw, tokenizer, scored.sources)

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))  # every arm so far, should the run stop

    with tempfile.TemporaryDirectory(prefix="fuseflow-experts-") as work:
        for arm in arms:
            keep = arm.name.startswith("pair:")
            result["arms"][arm.name] = q.train_arm(arm, cfg, samples, aligned_for, texts, groups, budgets, Path(work), keep)
            if keep:
                shutil.rmtree(Path(result["arms"][arm.name]["model_dir"]).parent / "checkpoints", ignore_errors=True)
            if arm.name == "clm":
                print("\n" + lead_table(result) + "\n", flush=True)  # the experts' lead, first
            save()
        merged = merge_pairwise(cfg, result["arms"], [m for m in args.merges.split(",") if m], Path(work))
        tokens = next((a["curve"][-1]["tokens"] for n, a in result["arms"].items() if n.startswith("pair:")), 0)
        for name, model_dir in merged.items():
            lm = load(model_dir, device=cfg.device)
            t0 = time.perf_counter()
            point = {"step": steps, "tokens": tokens, **q.evaluate(lm.model, lm.tokenizer, texts, groups, cfg)}
            point["eval_seconds"] = time.perf_counter() - t0
            result["arms"][name] = {"kind": "merge", "teachers": [], "curve": [point], "model_dir": None}
            del lm
            gc.collect()
            save()
        for a in result["arms"].values():
            a["model_dir"] = None  # the temporary folder is gone
    result["total_seconds"] = time.perf_counter() - t_start
    _print(result, vs, compared=False)
    save()
    if args.plot:
        q.plot(result, Path(args.plot))
    print(f"\n{args.split} documents: {corpora}; train samples {mix}; {result['total_seconds'] / 60:.1f} min "
          f"(scoring {sum(result['score_seconds'].values()):.0f} s; experts "
          + ", ".join(f"{e['name']} {'cached' if e['cached'] else 'built in %.1f min' % (e['seconds'] / 60)}"
                      for e in built.values()) + ")")
    return 0


def _print(result: dict, vs: Sequence[str], compared: bool) -> None:
    if not compared:
        q.compare(result["arms"], result["eval_groups"])
        for ref in vs:
            if ref not in result["arms"]:
                raise SystemExit(f"--vs {ref}: no such arm (arms: {list(result['arms'])})")
            q.compare(result["arms"], result["eval_groups"], reference=ref)
    print(q.sources_table(result))
    print()
    print(lead_table(result))
    print()
    print(q.table(result))
    for ref in vs:
        print()
        print(q.table(result, ref))
    print()
    print(efficiency_table(result))
    stats = q.teachers_table(result)
    if stats:
        print()
        print(stats)


if __name__ == "__main__":
    sys.exit(main())
