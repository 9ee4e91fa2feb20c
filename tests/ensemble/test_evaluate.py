"""The eval: held-out bits per byte against a direct forward pass, the bounds between the mixture, the
oracle and the sources, and the CLI end to end on tiny models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fuseflow.cli import main as cli
from fuseflow.ensemble.evaluate import common_cuts, heldout_bits_per_byte, run_task
from fuseflow.ensemble.decoder import CoolFusionDecoder
from fuseflow.ensemble.tasks import get_task
from fuseflow.models import builtin_text


def main(argv):
    """``fuseflow eval-ensemble ARGV``, through the one CLI wrapper."""
    return cli(["eval-ensemble", *argv])


@pytest.fixture(scope="module")
def heldout():
    return builtin_text(302_500)[300_000:]


def reference_nll(engine, context: str, chunk: str) -> float:
    """NLL (nats) of the tokens that end inside ``chunk``, from the model's full logits."""
    enc = engine.tokenizer(context + chunk, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])[None]
    with torch.no_grad():
        logp = torch.log_softmax(engine.model(input_ids=ids).logits[0].double(), dim=-1)  # [L, V]
    total = 0.0
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        if e > len(context) and t > 0:
            total -= float(logp[t - 1, enc["input_ids"][t]])
    return total


def test_heldout_matches_a_direct_forward_and_bounds_hold(llama_source, gemma_source, heldout):
    sources = [llama_source, gemma_source]
    result = heldout_bits_per_byte(sources, heldout, chunk_chars=600, context_chars=200)
    cuts = common_cuts(sources, heldout, 600, start=200)
    chunks = [(heldout[max(0, a - 200) : a], heldout[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    nbytes = sum(len(x.encode()) for _, x in chunks)
    assert result["chunks"] == len(chunks) >= 3 and result["bytes"] == nbytes
    for source in sources:
        ref = sum(reference_nll(source.teacher, c, x) for c, x in chunks) / math.log(2) / nbytes
        assert result["sources"][source.name] == pytest.approx(ref, rel=1e-4)
    best = min(result["sources"].values())
    # oracle <= mixture <= oracle + log2(S) per chunk; oracle <= every source
    assert result["best_source_per_chunk"] <= result["mixture"] <= result["best_source_per_chunk"] + len(chunks) / nbytes + 1e-9
    assert result["best_source_per_chunk"] <= best


def test_chunks_start_on_common_boundaries(llama_source, gemma_source, heldout):
    cuts = common_cuts([llama_source, gemma_source], heldout, 500, start=100)
    assert cuts[-1] == len(heldout) and np.all(np.diff(cuts) > 0) and cuts[0] >= 100
    for source in (llama_source, gemma_source):
        (enc,) = source.encode([heldout], True)
        ends = set(enc.offsets[:, 1].tolist())
        assert all(int(c) in ends for c in cuts)


def test_run_task_counts(llama_source, gemma_source):
    decoder = CoolFusionDecoder([llama_source, gemma_source])
    results = run_task(decoder, get_task("arithmetic"), num_problems=2, shots=1, seed=0, max_tokens=4)
    assert [r.system for r in results] == ["llama", "gemma", "cool-fusion"]
    for r in results:
        assert r.n == 2 and len(r.answers) == 2 and 0 <= r.correct <= 2
        assert 0 < r.completion_tokens <= 8 and r.seconds > 0
    fused = results[-1]
    # every proposer of a winning segment is credited (issue 16): at least one source, at most all, per segment
    assert 0 < fused.segments <= sum(fused.wins.values()) <= 2 * fused.segments
    with pytest.raises(ValueError, match="unknown systems"):
        run_task(decoder, get_task("arithmetic"), 1, 0, 0, 2, systems=["gpt"])


@pytest.fixture
def _keep_logging():
    """``main`` installs its own root handler on the captured stderr; later threads must not log into it."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_writes_table_and_json(tiny_llama, tiny_gemma, tmp_path, capsys, _keep_logging):
    cfg = tmp_path / "ensemble.yaml"
    cfg.write_text(
        f"sources:\n  - {{name: llama, model: {tiny_llama}}}\n  - {{name: gemma, model: {tiny_gemma}}}\n"
        "eval: {num_problems: 2, shots: 1, max_tokens: 4, heldout_chars: 1500, heldout_chunk_chars: 500}\n"
    )
    out = tmp_path / "out.json"
    assert main([str(cfg), "--out", str(out), "--threads", "1"]) == 0
    table = capsys.readouterr().out
    assert "| cool-fusion |" in table and "| uniform mixture of the sources |" in table
    report = json.loads(out.read_text())
    assert [s["system"] for s in report["systems"]] == ["llama", "gemma", "cool-fusion"]
    assert set(report["heldout_bits_per_byte"]["sources"]) == {"llama", "gemma"}
    assert main([str(cfg), "eval.task=nope"]) == 2


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (10, 10), (17, 40), (1, 1)])
def test_wilson_interval_matches_its_formula(k, n):
    from fuseflow.ensemble.evaluate import wilson_interval

    lo, hi = wilson_interval(k, n)
    # The interval's ends are the proportions p0 whose score test |p - p0| / sqrt(p0 (1 - p0) / n) = 1.96.
    p = k / n
    for end in (lo, hi):
        if 0 < end < 1:
            assert abs(p - end) / math.sqrt(end * (1 - end) / n) == pytest.approx(1.96, rel=1e-6)
    assert lo <= p <= hi


def test_paired_comparison_counts_and_bounds():
    from fuseflow.ensemble.evaluate import paired_comparison

    a = np.array([1, 1, 1, 0, 1, 0] * 10, dtype=bool)
    b = np.array([1, 0, 0, 0, 1, 1] * 10, dtype=bool)
    c = paired_comparison(a, b)
    assert (c["only_first_right"], c["only_second_right"]) == (20, 10)
    assert c["difference"] == pytest.approx(10 / 60)
    assert c["ci95"][0] < c["difference"] < c["ci95"][1]
    assert c["mcnemar_p"] == pytest.approx(2 * sum(math.comb(30, i) for i in range(11)) / 2**30)
    same = paired_comparison(a, a)
    assert same["difference"] == 0 and same["mcnemar_p"] == 1.0 and same["ci95"] == [0.0, 0.0]


def test_next_word_task_reports_per_language_with_intervals(llama_source, gemma_source):
    from fuseflow.ensemble.evaluate import comparisons, format_table

    decoder = CoolFusionDecoder([llama_source, gemma_source])
    results = run_task(decoder, get_task("next-word"), num_problems=2, shots=0, seed=0, max_tokens=3,
                       languages=["en"], context_chars=120)
    for r in results:
        assert r.n == 2 and r.groups() == {"en": (r.correct, 2)}
        assert all(a["group"] == "en" for a in r.answers)
    assert set(comparisons(results)) == {"llama", "gemma"}
    table = format_table(results, None)
    assert "| system | en | all |" in table and "cool-fusion vs llama alone (paired, n = 2)" in table


def test_replay_first_segment_reranks_the_trace_by_every_rule():
    from fuseflow.ensemble.evaluate import SystemResult, format_replay, replay_first_segment
    from fuseflow.ensemble.rerank import RERANKERS

    def cand(text, sources, sums, counts):
        return {"sources": sources, "text": text, "final": False, "score": 0.0,
                "logprob_sum": dict(zip("ab", sums)), "token_count": dict(zip("ab", counts)),
                "bytes": len(text.encode())}

    fused = SystemResult("cool-fusion", "cool-fusion", "a")
    # Problem 1: a proposes the right word, which b finds unlikely; b proposes a wrong word both find so-so.
    fused.answers.append({"id": "1", "group": "de", "answer": "Datei", "correct": False, "first_candidates": [
        cand(" Datei", ["a"], [np.log(0.5), np.log(0.001)], [1, 1]),
        cand(" Datum", ["b"], [np.log(0.05), np.log(0.05)], [1, 1])]})
    # Problem 2: uncontested, right for every rule and both sources.
    fused.answers.append({"id": "2", "group": "en", "answer": "file", "correct": True, "first_candidates": [
        {"sources": ["a", "b"], "text": " file", "final": False, "score": None, "logprob_per_token": {}}]})
    replay = replay_first_segment(get_task("next-word"), fused)
    assert replay["a (first proposal)"] == {"de": [1, 1], "en": [1, 1]}
    assert replay["b (first proposal)"] == {"de": [0, 1], "en": [1, 1]}
    assert replay["cool-fusion, rerank mixture_likelihood (first segment)"] == {"de": [1, 1], "en": [1, 1]}
    assert replay["cool-fusion, rerank mean_logprob (first segment)"] == {"de": [0, 1], "en": [1, 1]}
    assert {k for k in replay if k.startswith("cool-fusion")} == {f"cool-fusion, rerank {r} (first segment)" for r in RERANKERS}
    assert "| a (first proposal) | 1/1 | 1/1 | 2/2 |" in format_replay(replay)
