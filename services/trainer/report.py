"""What a run shows a person: the held-out evaluation of the models it starts from and of those it trained, the
table, ``report.json`` and the loss curve (the one report of ``fuseflow fuse`` and ``fuseflow train``, issue 15),
and its dead letters (``dead_letter.jsonl``; a run that lost too many samples fails)."""

from __future__ import annotations

import gc
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from fuseflow.config import FuseConfig, RunFailed
from fuseflow.wire.transport import Transport, retrying

if TYPE_CHECKING:
    from .data import Corpus

log = logging.getLogger(__name__)


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of held-out perplexity (per own token) and bits per byte (comparable across
    tokenizers: the column to compare models by). Rows with ``per_corpus`` bits/byte (a ``corpus.sources``
    mix, issue 11) get one column per corpus before the overall figure."""
    corpora = list(dict.fromkeys(c for r in rows for c in r.get("per_corpus") or {}))
    per = "".join(f" {c} bits/byte |" for c in corpora)
    head = f"| model |{per} held-out bits/byte | perplexity (own tokens) | eval tokens | train tokens |"
    lines = [head, "|---|" + "---:|" * len(corpora) + "---:|---:|---:|---:|"]
    for r in rows:
        cells = "".join(f" {r['per_corpus'][c]:.4f} |" if c in (r.get("per_corpus") or {}) else " — |" for c in corpora)
        lines.append(
            f"| {r['model']} |{cells} {r['bpb']:.4f} | {r['perplexity']:.2f} | {r['tokens']} | {r.get('train_tokens', '—')} |"
        )
    return "\n".join(lines)


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_loss(metrics: Mapping[str, Path], out: Path) -> Path | None:
    """One PNG: training loss (and its CLM / KL parts for fused runs) against step, for every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {name: read_metrics(p) for name, p in metrics.items()}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, rows in series.items():
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["clm"] for r in rows], label=f"{name}: CLM")
        if any(r.get("kl", 0) for r in rows):
            ax.plot(steps, [r["kl"] for r in rows], linestyle="--", label=f"{name}: KL(fused‖target)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def evaluate_model(name: str, model_ref, cfg: FuseConfig, corpus: "Corpus", progress: bool) -> dict:
    """One row of the table: ``model_ref``'s held-out bits/byte and perplexity (per corpus too, for a mix)."""
    from fuseflow.models import load

    from .evaluate import evaluate_lm, group_bpb

    lm = load(model_ref, device=cfg.device)
    res = evaluate_lm(
        lm.model, lm.tokenizer, corpus.held_out, max_length=cfg.eval.max_length, batch_tokens=cfg.eval.batch_tokens,
        progress=progress,
    )
    del lm
    gc.collect()
    text_nll, text_bytes = res.pop("text_nll"), res.pop("text_bytes")
    if any(corpus.held_out_corpus):  # a mix: held-out bits/byte per corpus too (issue 11)
        res["per_corpus"] = group_bpb(text_nll, text_bytes, corpus.held_out_corpus)
    return {"model": name, **res}


def evaluate_before(cfg: FuseConfig, corpus: "Corpus", progress: bool = True) -> list[dict]:
    """The rows of the models a run starts from (``eval.before``): every source, then the target."""
    rows: list[dict] = []
    if cfg.eval.before:
        for src in cfg.sources:
            rows.append(evaluate_model(f"source {src.key}", src.model, cfg, corpus, progress))
        rows.append(evaluate_model("target before", cfg.target.model, cfg, corpus, progress))
    return rows


def report_runs(cfg: FuseConfig, corpus: "Corpus", runs: dict, rows_before: Sequence[dict] = (),
                progress: bool = True, notes: Sequence[str] = ()) -> dict:
    """Evaluate each trained run (``{name: TrainResult}``) on the held-out documents and report them after
    ``rows_before`` (:func:`evaluate_before`): ``run_dir/report.json``, ``run_dir/loss.png`` and the table on
    stdout. The one report of ``fuseflow fuse`` and of the online trainer, ``fuseflow train`` (issue 15).
    ``notes``: what the table leaves out and why, printed under it and kept in the report."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = list(rows_before)
    for name, res in runs.items():
        rows.append({**evaluate_model(f"target {name}", res.model_dir, cfg, corpus, progress), "train_tokens": res.tokens,
                     "train_seconds": round(res.seconds, 1)})
    report = {
        "config": json.loads(json.dumps(cfg.model_dump(mode="json"))),
        "train_samples": len(corpus.train),
        "held_out_documents": len(corpus.held_out),
        "rejected_documents": len(corpus.rejected),
        "empty_documents": corpus.empty,
        "rows": rows,
        "runs": {name: {"model_dir": str(r.model_dir), "steps": r.steps, "tokens": r.tokens,
                        "final_loss": r.final_loss, "teachers": r.teachers} for name, r in runs.items()},
        "notes": list(notes),
    }
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    plot_loss({name: Path(r.model_dir).parent / "metrics.jsonl" for name, r in runs.items()}, run_dir / "loss.png")
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    return report


# `fuseflow train` (and so `fuseflow stack up`) trains the fused target only; said where its table is printed
# instead of dropping the config's row silently (issue 26).
ONLINE_BASELINE_NOTE = ("baseline: clm is not trained by the online trainer (fuseflow train, fuseflow stack up), so "
                        "the table has no 'target baseline clm' row: run `fuseflow fuse RUN.yaml` for it (the same "
                        "samples, in one process), or set baseline: none")


def evaluate_models(cfg: FuseConfig, models: dict[str, str], progress: bool = True) -> list[dict]:
    """``fuseflow evaluate``: the table of ``fuseflow fuse`` for any models (pivot, pairwise, merged …) on the
    run config's held-out documents."""
    from fuseflow.models import load_tokenizer

    from .data import Corpus, held_out_documents

    held, held_corpus = held_out_documents(cfg, load_tokenizer(cfg.target.model))  # no training part cut
    corpus = Corpus(train=[], held_out=held, held_out_corpus=held_corpus)
    rows = [evaluate_model(name, ref, cfg, corpus, progress) for name, ref in models.items()]
    print(format_table(rows))
    return rows


def write_dead_letters(transport: Transport, out: Path, rank: int, metrics=None) -> dict:
    """The dispatching rank's end of a run: its dead letters into ``out/dead_letter.jsonl`` (``…rank<r>.jsonl``
    on other ranks of an in-process run), the queue's last stats to ``metrics``; returns those stats."""
    stats = retrying(transport.stats, "trainer stats")
    if metrics is not None:
        metrics.observe_queue(stats)
    dead = retrying(lambda: transport.dead_letters(count=100_000), "dead letters")
    with (out / ("dead_letter.jsonl" if rank == 0 else f"dead_letter.rank{rank}.jsonl")).open("w") as f:
        for d in dead:
            f.write(json.dumps({"sample": d["sample_id"], "reason": f"{d['teacher']}: {d['reason']}"}) + "\n")
    if not retrying(transport.is_finished, "trainer stats"):
        log.warning("online run %r ended with samples still in flight: %s", transport.run, stats)
    return stats


def check_dead_letters(stats: dict, max_fraction: float, out: Path) -> None:
    """Raise :class:`RunFailed` when more than ``max_fraction`` of the run's samples were dead-lettered: a run
    that lost most of its data must not exit 0 (issue 15)."""
    submitted, dead = int(stats["submitted"]), int(stats["dead_letters"])
    if submitted and dead / submitted > max_fraction:
        raise RunFailed(
            f"{dead} of {submitted} samples ({dead / submitted:.0%}) were dead-lettered, more than "
            f"train.max_dead_letter_fraction={max_fraction}: see {out / 'dead_letter.jsonl'} for each reason"
        )
