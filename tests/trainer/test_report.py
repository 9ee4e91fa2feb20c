"""The run's evaluation table: one column per corpus of a mix (issue 11), the overall figure after them."""

from fuseflow.trainer.report import format_table


def row(model, bpb, per_corpus=None, **extra):
    return {"model": model, "bpb": bpb, "perplexity": 12.345, "tokens": 100, **({"per_corpus": per_corpus} if per_corpus else {}), **extra}


def test_single_corpus_table_keeps_its_columns():
    lines = format_table([row("target before", 1.0398)]).splitlines()
    assert lines[0] == "| model | held-out bits/byte | perplexity (own tokens) | eval tokens | train tokens |"
    assert lines[2] == "| target before | 1.0398 | 12.35 | 100 | — |"


def test_mixed_corpus_table_breaks_bits_per_byte_down_per_corpus():
    rows = [row("source gemma", 1.5, {"en": 1.4, "de": 1.61234}), row("target fused", 1.2, {"en": 1.0, "de": 1.3}, train_tokens=8070)]
    lines = format_table(rows).splitlines()
    assert lines[0].startswith("| model | en bits/byte | de bits/byte | held-out bits/byte |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)
    assert lines[2] == "| source gemma | 1.4000 | 1.6123 | 1.5000 | 12.35 | 100 | — |"
    assert lines[3].endswith("| 1.2000 | 12.35 | 100 | 8070 |")
