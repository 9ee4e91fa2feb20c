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
    assert set(report["heldout_bits_per_byte"]["builtin"]["sources"]) == {"llama", "gemma"}
    assert main([str(cfg), "eval.task=nope"]) == 2


def test_next_word_measures_bits_per_byte_on_its_languages_documents(tiny_llama, tiny_gemma, tmp_path, capsys,
                                                                   _keep_logging):
    """Next-word: the likelihood is measured per language, on the held-out documents of the split the
    passages come from; the oracle bound is in the JSON and the table."""
    from fuseflow.ensemble.tasks import split_documents

    cfg = tmp_path / "ensemble.yaml"
    cfg.write_text(
        f"sources:\n  - {{name: llama, model: {tiny_llama}}}\n  - {{name: gemma, model: {tiny_gemma}}}\n"
        "eval: {task: next-word, languages: [en], num_problems: 2, context_chars: 100, max_tokens: 6, "
        "held_out_documents: 4, heldout_chars: 1200, heldout_chunk_chars: 400}\n"
    )
    out = tmp_path / "out.json"
    assert main([str(cfg), "--out", str(out), "--threads", "1"]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["heldout_bits_per_byte"]) == ["en"]
    en = report["heldout_bits_per_byte"]["en"]
    text = "\n\n".join(d.text for d in split_documents("en", 0, "test", 4))[:1200]
    # scored: the text from a common boundary after the first 256 characters (its context) to its end
    assert any(en["bytes"] == len(text[start:].encode()) for start in range(256, 320))
    assert report["oracle"]["oracle"] == sum(c[0] for c in report["first_segment_replay"][
        "oracle: any first candidate right (the bound of every rule)"].values())
    assert report["held_out_documents"] == 4 and "of the bound)" in table


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


def test_replay_oracle_is_any_right_first_candidate_and_bounds_every_rule():
    from fuseflow.ensemble.evaluate import ORACLE, SystemResult, format_replay, oracle_share, replay_first_segment

    def cand(text, sources, sums):
        return {"sources": sources, "text": text, "final": False, "score": 0.0,
                "logprob_sum": dict(zip("ab", sums)), "token_count": {"a": 1, "b": 1}, "bytes": len(text.encode())}

    fused = SystemResult("cool-fusion", "cool-fusion", "a")
    right_unlikely = [cand(" Datei", ["a"], [np.log(0.5), np.log(0.001)]), cand(" Datum", ["b"], [np.log(0.05)] * 2)]
    both_wrong = [cand(" Daten", ["a"], [np.log(0.5)] * 2), cand(" Dateien", ["b"], [np.log(0.1)] * 2)]
    for i, cands in enumerate([right_unlikely, both_wrong]):
        fused.answers.append({"id": str(i), "group": "de", "answer": "Datei", "correct": False, "first_candidates": cands})
    replay = replay_first_segment(get_task("next-word"), fused)
    assert replay[ORACLE] == {"de": [1, 2]}
    for name, cells in replay.items():  # no rule, and no source alone, scores above the bound
        assert cells["de"][0] <= replay[ORACLE]["de"][0]
    assert oracle_share(replay, "mean_logprob") == {"rule": 0, "oracle": 1, "share": 0.0}
    assert oracle_share(replay, "mixture_likelihood") == {"rule": 1, "oracle": 1, "share": 1.0}
    assert "rerank mixture_likelihood: 1 of the oracle's 1 (100% of the bound)" in format_replay(replay, "mixture_likelihood")


@pytest.mark.parametrize(
    "text,end", [(" Datei", None), (" Datei.", 6), (" Datei ist", 6), (". Die", 1), ("  ", None), (" über x", 5)]
)
def test_next_word_answer_is_decided_at_its_first_whole_word(text, end):
    task = get_task("next-word")
    assert task.answer_end(text) == end
    if end is not None:  # ending there never changes the check
        assert task.first_word(text[:end]) == task.first_word(text + " more words")
    assert get_task("arithmetic").answer_end(text) is None


def test_answers_end_where_decided_with_the_text_greedy_decoding_gives(llama_source, gemma_source):
    """``stop_at`` cuts the completion where the answer is decided: the same text as the long greedy
    completion cut there, in fewer tokens, for a source alone and for Cool-Fusion."""
    from fuseflow.ensemble.decoder import DecodeParams, generate_single
    from fuseflow.ensemble.sources import completion_prompt

    task = get_task("next-word")
    problems = task.problems(3, 0, languages=["en"], context_chars=120)
    decoder = CoolFusionDecoder([llama_source, gemma_source])
    long, short = DecodeParams(max_tokens=12), DecodeParams(max_tokens=12, stop_at=task.answer_end)
    cut_somewhere = False
    for p in problems:
        runs = [lambda params: generate_single(llama_source, p.question, True, params),
                lambda params: decoder.generate(completion_prompt(decoder.sources, p.question), params)]
        for run in runs:
            full, cut = run(long), run(short)
            end = task.answer_end(full.text)
            if end is None:
                assert cut.text == full.text
                continue
            cut_somewhere = True
            assert cut.text == full.text[:end] and cut.finish_reason == "stop"
            assert cut.completion_tokens <= full.completion_tokens
            assert task.correct(cut.text, p) == task.correct(full.text, p)
    assert cut_somewhere


def test_next_word_held_out_documents_are_the_run_configs(tmp_path):
    """``held_out_documents``: passages come only from the documents a run config with that many held out
    (same seed) never trains on, split between test and dev."""
    from fuseflow.corpus import CorpusConfig, iter_documents

    held = {d.index for d in iter_documents(CorpusConfig(source="builtin", held_out_documents=4, seed=0), "held_out")}
    docs = {}
    for split in ("test", "dev"):
        problems = get_task("next-word").problems(6, 0, languages=["en"], context_chars=120, split=split,
                                                  held_out_documents=4)
        assert len(problems) == 6
        docs[split] = {int(p.id.split("/")[1].split("@")[0]) for p in problems}
        assert docs[split] <= held
    assert not docs["test"] & docs["dev"]


def test_cluster_bootstrap_resamples_whole_documents():
    from fuseflow.ensemble.evaluate import cluster_bootstrap, paired_comparison

    # One cluster carries the whole difference: resampling clusters can lose it, resampling problems cannot.
    a = np.array([1] * 10 + [0] * 30, dtype=bool)
    b = np.zeros(40, dtype=bool)
    docs = [f"d{i // 10}" for i in range(40)]  # 4 documents of 10 passages
    by_doc = cluster_bootstrap(a, b, docs)
    assert by_doc["clusters"] == 4
    assert by_doc["ci95"][0] == pytest.approx(0.0)  # a draw without d0 has no difference at all
    assert paired_comparison(a, b)["ci95"][0] > 0.1
    # One problem per cluster: the ordinary paired bootstrap, up to resampling noise.
    a2 = np.random.default_rng(1).random(200) < 0.6
    b2 = np.random.default_rng(2).random(200) < 0.4
    ci_c = cluster_bootstrap(a2, b2, [str(i) for i in range(200)])["ci95"]
    ci_p = paired_comparison(a2, b2)["ci95"]
    assert ci_c == pytest.approx(ci_p, abs=0.03)


def test_next_word_corpora_take_a_language_from_a_file(tmp_path):
    """``corpora``: a language's passages come from the given corpus (a JSONL file), split as any other."""
    texts = [f"Document {i}: " + " ".join(f"wort{i}x{j} und mehr" for j in range(60)) for i in range(6)]
    path = tmp_path / "de.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    problems = get_task("next-word").problems(4, 0, languages=["de"], context_chars=100, held_out_documents=6,
                                              corpora={"de": str(path)})
    assert len(problems) == 4 and all(p.group == "de" for p in problems)
    assert all(any(p.question in t for t in texts) for p in problems)
