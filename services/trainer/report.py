"""What a run shows a person: the evaluation table and the loss curve."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence


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
