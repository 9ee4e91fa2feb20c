"""Corpus readers, the held-out split, chat rendering and cutting documents into samples."""

from __future__ import annotations

import gzip
import json
import re
from itertools import islice

import numpy as np
import pytest
from pydantic import ValidationError

from fuseflow.corpus import (
    CorpusConfig,
    CorpusError,
    CorpusTally,
    Document,
    DocumentError,
    best_cut,
    corpus_samples,
    count_documents,
    cut_scores,
    held_out_threshold,
    iter_documents,
    make_samples,
    newline_cuts_are_clean,
    render_chat,
    split_keys,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "More"},
    {"role": "assistant", "content": "Sure."},
]


def write_jsonl(path, records, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def builtin_texts(n=None):
    return [d.text for d in islice(iter_documents(CorpusConfig(), "all"), n)]


# ----------------------------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------------------------


def test_builtin_is_the_help_topics_in_key_order():
    from pydoc_data.topics import topics

    docs = list(iter_documents(CorpusConfig(), "all"))
    assert [d.text for d in docs] == [topics[k] for k in sorted(topics)]
    assert [d.index for d in docs] == list(range(len(topics)))
    assert count_documents(CorpusConfig()) == len(topics) > 50


def test_jsonl_text_and_chat_records(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": "one"}, "", {"messages": CHAT}, {"body": "x", "text": "three"}])
    docs = list(iter_documents(CorpusConfig(source=str(path)), "all"))
    assert [d.index for d in docs] == [0, 1, 2]
    assert docs[0].text == "one" and not docs[0].is_chat
    assert docs[1].messages == tuple(CHAT) and docs[1].origin == f"{path}:3"
    assert docs[2].text == "three"
    assert count_documents(CorpusConfig(source=str(path))) == 3


def test_jsonl_custom_fields_gzip_and_sharegpt(tmp_path):
    records = [{"body": "plain"}, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    path = write_jsonl(tmp_path / "c.jsonl.gz", records, opener=gzip.open)
    cfg = CorpusConfig(source=str(path), text_field="body", messages_field="conversations")
    docs = list(iter_documents(cfg, "all"))
    assert docs[0].text == "plain"
    assert docs[1].messages == ({"role": "user", "content": "q"}, {"role": "assistant", "content": "a"})


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "ok"}', '{"text": "broken'], "c.jsonl:2: invalid JSON"),
        (['{"text": "ok"}', '{"body": "x"}'], "c.jsonl:2: no 'text' (corpus.text_field)"),
        (['{"text": 3}'], "c.jsonl:1: field 'text' must be a string"),
        (['[1, 2]'], "c.jsonl:1: expected a JSON object"),
        (['{"messages": [{"role": "user"}]}'], "c.jsonl:1: messages[0] must have string 'role' and 'content'"),
        (['{"messages": []}'], "c.jsonl:1: 'messages' must be a non-empty list"),
        (["", "  "], "c.jsonl: empty file"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "c.jsonl", lines)
    with pytest.raises(CorpusError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        list(iter_documents(CorpusConfig(source=str(path)), "all"))


@pytest.mark.parametrize("line, message", [
    ('{"text": "tab\there"}', "invalid JSON at column 14 (invalid control character)"),
    ('{"text": "\\q"}', "invalid JSON at column 11 (invalid \\escape)"),
    ('{"text": "a"} x', "invalid JSON at column 15 (extra data)"),
])
def test_invalid_json_reasons_read_as_sentences(tmp_path, line, message):
    """Python's JSON messages end in " at" before the position it appends: "invalid JSON (Invalid control
    character at, column 23)" read as garbled (issue 26)."""
    path = write_jsonl(tmp_path / "c.jsonl", [line])
    with pytest.raises(CorpusError) as e:
        list(iter_documents(CorpusConfig(source=str(path)), "all"))
    assert str(e.value) == f"{path}:1: {message}"


def test_jsonl_is_streamed(tmp_path):
    # the bad line 3 is never parsed when only two documents are taken
    path = write_jsonl(tmp_path / "c.jsonl", ['{"text": "a"}', '{"text": "b"}', "{oops"])
    assert [d.text for d in islice(iter_documents(CorpusConfig(source=str(path)), "all"), 2)] == ["a", "b"]
    assert [d.text for d in iter_documents(CorpusConfig(source=str(path), max_documents=2), "all")] == ["a", "b"]


# Bad documents (issue 15): a lone surrogate crashed the trainer with a bare TypeError, invalid UTF-8 aborted the
# run naming the wrong line, empty documents vanished silently.
SURROGATE_LINE = '{"text": "caf\\ud800 au lait"}'  # valid JSON, invalid Unicode


def write_bad_corpus(path, n_good_before=400):
    """JSONL: ``n_good_before`` good lines (over 8 KiB, more than a text-mode reader decodes at once), then one
    bad line of each kind, an empty and a blank document, and a last good line. Returns {line: kind}."""
    lines = [json.dumps({"text": f"Document {i} says hello."}).encode() for i in range(n_good_before)]
    bad = {
        "surrogate": SURROGATE_LINE.encode(),
        "not utf-8": b'{"text": "caf\xe9 au lait"}',  # Latin-1
        "not json": b'{"text": "unterminated',
        "no text": b'{"body": "wrong field"}',
        "not an object": b'["a", "list"]',
    }
    kinds = {}
    for kind, raw in bad.items():
        lines.append(raw)
        kinds[len(lines)] = kind
    lines += [b'{"text": ""}', b'{"text": "  \\n "}', b"", b'{"text": "The last one."}']
    path.write_bytes(b"\n".join(lines) + b"\n")
    return kinds


def test_bad_documents_name_file_and_line_and_are_set_aside(tmp_path, bpe_tokenizer):
    path = tmp_path / "c.jsonl"
    kinds = write_bad_corpus(path)
    cfg = CorpusConfig(source=str(path))
    tally = CorpusTally()
    samples = list(corpus_samples(cfg, bpe_tokenizer, 64, "all", tally=tally))
    assert len(samples) == 401 and samples[-1].text == "The last one."  # the run goes on past every bad line
    assert all("\ud800" not in s.text and "\ufffd" not in s.text for s in samples)
    reasons = {int(r.reason.split(":")[1]): r.reason for r in tally.rejected}
    assert sorted(reasons) == sorted(kinds)  # the right line numbers, each once
    for line, reason in reasons.items():
        assert reason.startswith(f"{path}:{line}: "), reason
    by_kind = {kinds[line]: reason for line, reason in reasons.items()}
    assert "lone surrogate U+D800 at character 3" in by_kind["surrogate"]
    assert "not UTF-8 (invalid continuation byte at byte 13 of the line)" in by_kind["not utf-8"]
    assert "invalid JSON" in by_kind["not json"] and "no 'text' (corpus.text_field)" in by_kind["no text"]
    assert "expected a JSON object, got list" in by_kind["not an object"]
    # ids are the documents' (index = non-blank line ordinal), so a dead letter names the sample it replaces
    assert [r.id for r in tally.rejected] == [f"{i}:0" for i in range(400, 405)]
    rejected = {kinds[int(r.reason.split(":")[1])]: r for r in tally.rejected}
    assert rejected["surrogate"].text == "caf\\ud800 au lait" and rejected["not utf-8"].text.startswith('{"text": "caf\\xe9')
    for r in tally.rejected:
        r.text.encode("utf-8")  # a dead letter can be written anywhere (Redis, JSON, a terminal)
    assert tally.empty == [f"{path}:{len(kinds) + 401}", f"{path}:{len(kinds) + 402}"]  # counted, not dropped


def test_without_a_tally_a_bad_document_is_an_error_naming_its_line(tmp_path, bpe_tokenizer):
    path = tmp_path / "c.jsonl"
    kinds = write_bad_corpus(path)
    first = min(kinds)
    with pytest.raises(DocumentError, match=re.escape(f"c.jsonl:{first}: field 'text' holds a lone surrogate")):
        list(iter_documents(CorpusConfig(source=str(path)), "all"))
    lines = path.read_bytes().split(b"\n")
    del lines[first - 1]  # the invalid UTF-8 line comes first now: named by its own number, not a later one
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DocumentError, match=re.escape(f"c.jsonl:{first}: not UTF-8")):
        list(iter_documents(CorpusConfig(source=str(path)), "all"))
    # a document given directly: the tokenizer would raise a bare TypeError on the surrogate
    with pytest.raises(DocumentError, match=r"x.jsonl:7: text holds a lone surrogate U\+DC00 at character 2"):
        list(make_samples([Document(index=0, text="ab\udc00", origin="x.jsonl:7")], bpe_tokenizer, 32))


def test_bad_documents_of_a_mix_and_of_a_text_folder(tmp_path, bpe_tokenizer):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta")
    (folder / "b.txt").write_bytes(b"caf\xe9 au lait")
    (folder / "c.txt").write_text(" \n")
    jsonl = write_jsonl(tmp_path / "c.jsonl", ['{"text": "gamma"}', SURROGATE_LINE])
    mix = CorpusConfig(sources=[{"name": "txt", "source": str(folder)}, {"name": "js", "source": str(jsonl)}])
    tally = CorpusTally()
    samples = list(corpus_samples(mix, bpe_tokenizer, 32, "all", tally=tally))
    assert sorted(s.id for s in samples) == ["js/0:0", "txt/0:0"]
    assert {r.id: r.reason.split(": ", 1)[0] for r in tally.rejected} == {"txt/1:0": str(folder / "b.txt"),
                                                                         "js/1:0": f"{jsonl}:2"}
    assert "not UTF-8 text (invalid continuation byte at byte 3)" in tally.rejected[0].reason + tally.rejected[1].reason
    assert tally.empty == [str(folder / "c.txt")]
    # held-out and training parts each set aside their own bad documents: every one exactly once
    write_bad_corpus(tmp_path / "d.jsonl")
    cfg = CorpusConfig(source=str(tmp_path / "d.jsonl"), held_out_documents=100)
    parts = CorpusTally()
    list(corpus_samples(cfg, bpe_tokenizer, 64, "train", tally=parts))
    list(iter_documents(cfg, "held_out", parts))
    assert sorted(r.id for r in parts.rejected) == [f"{i}:0" for i in range(400, 405)]


@pytest.mark.slow
def test_fuse_dead_letters_bad_documents_and_trains_on_the_rest(tmp_path, tiny_llama, tiny_qwen):
    """`fuseflow fuse` on a corpus with one bad line of each kind: exit 0, each bad document a dead letter of the
    run naming its file and line, empty documents counted in the report, every good document trained."""
    from fuseflow.cli import main

    corpus = tmp_path / "c.jsonl"
    kinds = write_bad_corpus(corpus, n_good_before=12)
    config = tmp_path / "run.yaml"
    config.write_text(f"""
run_dir: {tmp_path / 'run'}
target: {{model: {tiny_llama}}}
sources: [{{name: qwen, model: {tiny_qwen}}}]
corpus: {{source: {corpus}, held_out_documents: 2}}
fusion: {{top_k: 4, lam: 0.5}}
train: {{max_length: 48, micro_batch_size: 2, lr: 1.0e-3, checkpoint_every: 4, warmup_ratio: 0.0,
        max_dead_letter_fraction: 0.5}}
eval: {{max_length: 48, before: false}}
baseline: none
""")
    assert main(["fuse", str(config)]) == 0
    run = tmp_path / "run"
    dead = [json.loads(line) for line in (run / "fused" / "dead_letter.jsonl").read_text().splitlines()]
    lines = sorted(int(d["reason"].split(":")[2]) for d in dead)
    assert lines == sorted(kinds) and all(d["reason"].startswith(f"corpus: {corpus}:") for d in dead)
    report = json.loads((run / "report.json").read_text())
    assert report["rejected_documents"] == len(kinds) and report["empty_documents"] == 2
    trained = (run / "fused" / "trained_samples.log").read_text().split()
    assert len(trained) == report["train_samples"] == 13 - report["held_out_documents"]


def test_parquet_batches_text_and_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"document {i}" for i in range(600)]
    pq.write_table(pa.table({"text": texts, "n": list(range(600))}), tmp_path / "a.parquet", row_group_size=100)
    docs = list(iter_documents(CorpusConfig(source=str(tmp_path / "a.parquet")), "all"))
    assert [d.text for d in docs] == texts and docs[599].origin.endswith("a.parquet#row 599")
    assert count_documents(CorpusConfig(source=str(tmp_path / "a.parquet"))) == 600

    pq.write_table(pa.table({"messages": [CHAT, CHAT[1:3]]}), tmp_path / "chat.parquet")
    docs = list(iter_documents(CorpusConfig(source=str(tmp_path / "chat.parquet")), "all"))
    assert docs[0].messages == tuple(CHAT) and docs[1].messages == tuple(CHAT[1:3])


def test_parquet_errors(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(CorpusError, match=r"a.parquet: no column 'text' \(corpus.text_field\).*\['body'\]"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "a.parquet")), "all"))
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(CorpusError, match="empty.parquet: empty file"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "empty.parquet")), "all"))


def test_text_folder_sorted_recursive_and_hidden_skipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "z.md").write_text("# zed")
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "c.txt").write_text("")
    (tmp_path / ".git" / "x.txt").write_text("hidden")
    (tmp_path / "notes.bin").write_bytes(b"\x00")
    docs = list(iter_documents(CorpusConfig(source=str(tmp_path)), "all"))
    assert [(d.index, d.text) for d in docs] == [(0, "alpha"), (1, "# zed"), (2, "")]
    assert count_documents(CorpusConfig(source=str(tmp_path))) == 3


def test_source_errors(tmp_path):
    with pytest.raises(CorpusError, match="corpus.source .* does not exist"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "nope.jsonl"))))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(CorpusError, match="unknown file type; set corpus.format"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "a.csv"))))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CorpusError, match="empty.txt: empty file"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "empty.txt"))))
    write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}])
    with pytest.raises(CorpusError, match="cannot pick a format .*1 jsonl, 1 text.*set corpus.format"):
        list(iter_documents(CorpusConfig(source=str(tmp_path))))
    assert [d.text for d in iter_documents(CorpusConfig(source=str(tmp_path), format="jsonl"), "all")] == ["x"]


def test_hf_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["a", "b", "c"]}).save_to_disk(str(tmp_path / "plain"))
    assert [d.text for d in iter_documents(CorpusConfig(source=str(tmp_path / "plain")), "all")] == ["a", "b", "c"]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"messages": [CHAT]}),
                               "test": datasets.Dataset.from_dict({"messages": [CHAT[:3]]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    docs = list(iter_documents(CorpusConfig(source=str(tmp_path / "dd"), hf_split="test"), "all"))
    assert docs[0].messages == tuple(CHAT[:3])
    assert count_documents(CorpusConfig(source=str(tmp_path / "dd"))) == 1
    with pytest.raises(CorpusError, match=r"no split 'valid' \(corpus.hf_split\)"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "dd"), hf_split="valid")))


def test_config_validation():
    with pytest.raises(ValidationError, match="not both"):
        CorpusConfig(held_out_fraction=0.1, held_out_documents=3)
    with pytest.raises(ValidationError):
        CorpusConfig(held_out_fraction=1.0)
    with pytest.raises(ValidationError):
        CorpusConfig(sorce="builtin")


# ----------------------------------------------------------------------------------------------------------
# Held-out split.
# ----------------------------------------------------------------------------------------------------------


def splitmix64_reference(index: int, seed: int) -> int:
    mask = (1 << 64) - 1
    gamma = 0x9E3779B97F4A7C15
    z = ((index ^ ((seed * gamma) & mask)) + gamma) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_split_keys_match_a_scalar_reference():
    idx = np.array([0, 1, 2, 77, 2**40 + 3])
    for seed in (0, 1, 12345):
        assert split_keys(idx, seed).tolist() == [splitmix64_reference(int(i), seed) for i in idx]


def test_held_out_threshold_streams_in_chunks():
    keys = [splitmix64_reference(i, 5) for i in range(1000)]
    for n in (1, 37, 250):
        assert int(held_out_threshold(1000, n, seed=5, chunk=7)) == sorted(keys)[n - 1]
    with pytest.raises(CorpusError, match="held_out_documents"):
        held_out_threshold(10, 11, seed=0)


def split(cfg):
    train = [d.index for d in iter_documents(cfg)]
    held = [d.index for d in iter_documents(cfg, "held_out")]
    return train, held


def test_split_by_fraction_is_deterministic_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(2000)])
    cfg = CorpusConfig(source=str(path), held_out_fraction=0.1, seed=7)
    train, held = split(cfg)
    assert sorted(train + held) == list(range(2000)) and not set(train) & set(held)
    assert 150 <= len(held) <= 250
    assert split(cfg) == (train, held)
    assert split(cfg.model_copy(update={"seed": 8}))[1] != held
    # held-out membership depends on the document alone: truncating the corpus keeps it
    small_train, small_held = split(cfg.model_copy(update={"max_documents": 500}))
    assert small_held == [i for i in held if i < 500]
    assert split(cfg.model_copy(update={"held_out_fraction": 0.0})) == (list(range(2000)), [])


def test_split_by_count_takes_the_smallest_keys(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(300)])
    cfg = CorpusConfig(source=str(path), held_out_documents=12, seed=3)
    train, held = split(cfg)
    expected = sorted(sorted(range(300), key=lambda i: splitmix64_reference(i, 3))[:12])
    assert held == expected and len(train) == 288 and not set(train) & set(held)
    with pytest.raises(CorpusError, match="held_out_documents = 301"):
        split(cfg.model_copy(update={"held_out_documents": 301}))


def corpus_with_bad_documents_first(path, n: int, seed: int) -> tuple[set[int], set[int]]:
    """JSONL of ``n`` documents where the five with the smallest split keys (the held-out split's first choices)
    cannot be used: not JSON, not UTF-8, no text field (unreadable), empty, blank (empty). Returns (unreadable,
    empty) indices."""
    first = sorted(range(n), key=lambda i: splitmix64_reference(i, seed))[:5]
    kinds = [b'{"text": "unterminated', b'{"text": "caf\xe9"}', b'{"body": "x"}', b'{"text": ""}', b'{"text": "  "}']
    lines = [kinds[first.index(i)] if i in first else json.dumps({"text": f"doc {i}"}).encode() for i in range(n)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return set(first[:3]), set(first[3:])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("held_out", [1, 2, 7])
def test_held_out_documents_are_drawn_from_good_documents(tmp_path, seed, held_out):
    """held_out_documents: N evaluates N documents whenever the corpus has N good ones: a document that cannot be
    read or is empty never takes a held-out slot (one went missing silently, and counted as a dead training
    sample although it was none: issue 26). It stays in the training part, set aside there as any bad line."""
    path = tmp_path / "c.jsonl"
    unreadable, empty = corpus_with_bad_documents_first(path, 40, seed)
    cfg = CorpusConfig(source=str(path), held_out_documents=held_out, seed=seed)
    held = list(iter_documents(cfg, "held_out"))  # no tally: a bad held-out document would raise
    tally = CorpusTally()
    train = [d.index for d in iter_documents(cfg, "train", tally)]
    assert len(held) == held_out and all(d.text.strip() for d in held)
    good = sorted(set(range(40)) - unreadable - empty, key=lambda i: splitmix64_reference(i, seed))
    assert sorted(d.index for d in held) == sorted(good[:held_out])  # the smallest keys among the good ones
    rejected = {int(r.id.split(":")[0]) for r in tally.rejected}
    assert rejected == unreadable and empty <= set(train)  # the training part's, as any bad or empty line
    assert sorted(train + [d.index for d in held] + sorted(rejected)) == list(range(40))
    with pytest.raises(CorpusError, match=r"held_out_documents = 36 must be in 1..35 \(the documents that can be "
                                          r"read and are not empty, of 40 in all\)"):
        list(iter_documents(cfg.model_copy(update={"held_out_documents": 36}), "held_out"))


def test_held_out_fraction_never_takes_a_bad_document(tmp_path):
    path = tmp_path / "c.jsonl"
    unreadable, empty = corpus_with_bad_documents_first(path, 200, 0)
    cfg = CorpusConfig(source=str(path), held_out_fraction=0.2, seed=0)
    held = [d.index for d in iter_documents(cfg, "held_out")]
    assert held and not set(held) & (unreadable | empty)
    tally = CorpusTally()
    train = [d.index for d in iter_documents(cfg, "train", tally)]
    assert sorted(train + held + [int(r.id.split(":")[0]) for r in tally.rejected]) == list(range(200))


# ----------------------------------------------------------------------------------------------------------
# Cutting into samples.
# ----------------------------------------------------------------------------------------------------------


def cut_scores_reference(text, offsets, newline_cuts):
    out = []
    for i, (s, _) in enumerate(offsets):
        if i > 0 and s < offsets[i - 1][1]:
            out.append(-1)
            continue
        if not newline_cuts:
            out.append(int(s < len(text) and text[s] == " "))
            continue
        p1 = text[s - 1] if s >= 1 else "\n"
        p2 = text[s - 2] if s >= 2 else "\n"
        cur = text[s] if s < len(text) else ""
        if p1 == "\n" and p2 == "\n":
            out.append(3)
        elif p1 == "\n":
            out.append(2)
        else:
            out.append(int(p1 in " \t\r\x0b\x0c\xa0\u3000" or (cur != "" and cur in " \t\n\r\x0b\x0c\xa0\u3000")))
    return out


@pytest.mark.parametrize("tok_name", ["bpe_tokenizer", "spm_tokenizer"])
@pytest.mark.parametrize("newline_cuts", [True, False])
def test_cut_scores_match_reference(request, tok_name, newline_cuts):
    tok = request.getfixturevalue(tok_name)
    text = "Intro line\n\nSecond  paragraph, café — naïve 日本語.\nNext line\tend  "
    offsets = np.asarray(tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    expected = cut_scores_reference(text, offsets.tolist(), newline_cuts)
    assert cut_scores(codepoints, offsets, newline_cuts).tolist() == expected
    assert max(expected) == (3 if newline_cuts else 1)
    if tok_name == "bpe_tokenizer":
        assert -1 in expected  # byte pieces of one multi-byte character


def test_newline_cuts_are_clean_only_without_a_dummy_prefix(bpe_tokenizer, spm_tokenizer):
    assert newline_cuts_are_clean(bpe_tokenizer)  # byte-level BPE: no space marker added
    assert not newline_cuts_are_clean(spm_tokenizer)  # Metaspace prepends "▁" to every text


def test_best_cut_prefers_best_and_latest():
    scores = np.array([0, 1, 0, 2, 0, 2, 1, 0, -1, -1], dtype=np.int8)
    assert best_cut(scores, 2, 7, floor=1) == 5
    assert best_cut(scores, 6, 7, floor=1) == 6
    assert best_cut(scores, 8, 9, floor=1) == 5  # only forbidden cuts in the window: search back
    assert best_cut(np.full(5, -1, np.int8), 2, 4, floor=1) == 4


def piece_positions(text, samples):
    """Character (start, end) of each non-overlapping piece: they tile the text, except for skipped
    whitespace-only pieces."""
    cursor, bounds = 0, []
    for s in samples:
        start = text.index(s.text, cursor)
        assert not text[cursor:start].strip(), f"{s.id}: text lost before the piece"
        bounds.append((start, start + len(s.text)))
        cursor = start + len(s.text)
    assert not text[cursor:].strip()
    return bounds


@pytest.mark.parametrize("tok_name, max_tokens", [("bpe_tokenizer", 64), ("spm_tokenizer", 48)])
def test_pieces_fit_and_retokenize_to_the_same_tokens(request, tok_name, max_tokens):
    tok = request.getfixturevalue(tok_name)
    texts = builtin_texts(8)
    identical = total = 0
    for index, text in enumerate(texts):
        samples = list(make_samples([Document(index=index, text=text)], tok, max_tokens))
        assert [s.id for s in samples] == [f"{index}:{k}" for k in range(len(samples))]
        bounds = piece_positions(text, samples)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = np.asarray(enc["input_ids"]), np.asarray(enc["offset_mapping"])
        for k, s in enumerate(samples):
            assert len(tok(s.text)["input_ids"]) <= max_tokens, s.id
            inside = (offsets[:, 0] >= bounds[k][0]) & (offsets[:, 0] < bounds[k][1])
            identical += tok(s.text, add_special_tokens=False)["input_ids"] == ids[inside].tolist()
            total += 1
        if len(samples) > 1:  # cuts waste little of the budget
            assert np.mean([len(tok(s.text)["input_ids"]) for s in samples[:-1]]) >= 0.7 * max_tokens
    assert total > 50 and identical / total >= 0.95, (identical, total)  # measured: bpe 1.0, spm 0.98


def test_multibyte_text_and_small_blocks(bpe_tokenizer):
    text = ("naïve café 日本語のテキスト 🙂🙃 " * 40 + "\n") * 6
    samples = list(make_samples([text], bpe_tokenizer, 40, block_chars=500))
    piece_positions(text, samples)
    assert len(samples) > 10
    assert all(len(bpe_tokenizer(s.text)["input_ids"]) <= 40 for s in samples)


def test_ids_stable_and_whitespace_pieces_skipped(bpe_tokenizer):
    docs = ["   \n\t ", "hello world", Document(index=41, text="kept id"), ""]
    samples = list(make_samples(docs, bpe_tokenizer, 32))
    assert [(s.id, s.text) for s in samples] == [("1:0", "hello world"), ("41:0", "kept id")]
    long_docs = builtin_texts(3)
    assert [s.id for s in make_samples(long_docs, bpe_tokenizer, 50)] == [
        s.id for s in make_samples(long_docs, bpe_tokenizer, 50)
    ]
    ids = [s.id for s in make_samples(long_docs, bpe_tokenizer, 50)]
    assert len(ids) == len(set(ids))


def test_stride_gives_overlapping_pieces(bpe_tokenizer):
    text = builtin_texts(1)[0]
    plain = list(make_samples([text], bpe_tokenizer, 64))
    strided = list(make_samples([text], bpe_tokenizer, 64, stride=32))
    assert len(strided) > 1.6 * len(plain)
    assert all(len(bpe_tokenizer(s.text)["input_ids"]) <= 64 for s in strided)
    pos = [text.find(s.text) for s in strided]
    assert pos == sorted(pos) and all(p >= 0 for p in pos)
    assert all(pos[k + 1] < pos[k] + len(strided[k].text) for k in range(len(strided) - 1))
    assert strided[0].text == plain[0].text
    with pytest.raises(ValueError, match="stride"):
        list(make_samples([text], bpe_tokenizer, 64, stride=64))


def test_max_tokens_too_small(bpe_tokenizer):
    with pytest.raises(ValueError, match="max_tokens = 2"):
        list(make_samples(["text"], bpe_tokenizer, 2))


# ----------------------------------------------------------------------------------------------------------
# Chat.
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tok_name", ["bpe_tokenizer", "spm_tokenizer"])
def test_render_chat_spans_are_the_assistant_turns(request, tok_name):
    tok = request.getfixturevalue(tok_name)
    text, spans = render_chat(CHAT, tok)
    # the tiny template: "<s>{role}\n{content}</s>\n" per message; the leading BOS is left to the tokenizer
    expected = "".join(f"<s>{m['role']}\n{m['content']}</s>\n" for m in CHAT)[len("<s>"):]
    assert text == expected
    assert [text[s:e] for s, e in spans] == ["Hello!</s>", "Sure.</s>"]
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id


def test_render_chat_falls_back_to_content_search(bpe_tokenizer):
    import copy

    tok = copy.deepcopy(bpe_tokenizer)
    # a template whose output changes with the number of messages: prefix renders are not prefixes
    tok.chat_template = "[{{ messages | length }}]{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    text, spans = render_chat(CHAT, tok)
    assert [text[s:e] for s, e in spans] == ["Hello!", "Sure."]


def test_chat_without_template_is_an_error(bpe_tokenizer):
    import copy

    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = None
    with pytest.raises(CorpusError, match="c.jsonl:4: chat document, but tokenizer .* has no chat_template"):
        list(make_samples([Document(index=0, messages=tuple(CHAT), origin="c.jsonl:4")], tok, 64))


def test_long_chat_pieces_carry_clipped_spans(bpe_tokenizer):
    topics = builtin_texts(4)
    chat = [
        {"role": "user", "content": topics[0][:1500]},
        {"role": "assistant", "content": topics[1][:1500]},
        {"role": "user", "content": topics[2][:300]},
        {"role": "assistant", "content": topics[3][:1500]},
    ]
    text, spans = render_chat(chat, bpe_tokenizer)
    samples = list(make_samples([chat], bpe_tokenizer, 96))
    assert len(samples) > 5
    assistant_chars = np.zeros(len(text), dtype=bool)
    for s, e in spans:
        assistant_chars[s:e] = True
    covered = np.zeros(len(text), dtype=bool)
    for sample in samples:
        assert len(bpe_tokenizer(sample.text)["input_ids"]) <= 96
        assert sample.loss_spans  # pieces of pure user text are dropped
        start = text.find(sample.text)
        piece_mask = np.zeros(len(sample.text), dtype=bool)
        for s, e in sample.loss_spans:
            assert 0 <= s < e <= len(sample.text)
            piece_mask[s:e] = True
        assert (piece_mask == assistant_chars[start : start + len(sample.text)]).all(), sample.id
        covered[start : start + len(sample.text)] |= piece_mask
    assert (covered == assistant_chars).all()  # every assistant character lands in some piece's spans


# ----------------------------------------------------------------------------------------------------------
# Mixing corpora (corpus.sources) and the translated manual pages (issue 11).
# ----------------------------------------------------------------------------------------------------------


def write_texts(folder, prefix, n):
    folder.mkdir()
    for i in range(n):
        (folder / f"{i:03d}.txt").write_text(f"{prefix} document number {i}.\n\nIt has two paragraphs.\n")
    return str(folder)


def test_interleave_keeps_weights_on_every_prefix_and_uses_every_document_once():
    from fuseflow.corpus import interleave

    a = [Document(index=i, text="a", corpus="a") for i in range(30)]
    b = [Document(index=i, text="b", corpus="b") for i in range(10)]
    out = list(interleave([(2.0, a), (1.0, b)]))
    names = [d.corpus for d in out]
    for n in (3, 9, 30):  # b runs out after 30 documents of the mix
        assert names[:n].count("a") == 2 * n // 3
    assert sorted((d.corpus, d.index) for d in out) == sorted([("a", i) for i in range(30)] + [("b", i) for i in range(10)])
    assert [d.index for d in out if d.corpus == "a"] == list(range(30))  # each stream keeps its order


def test_mix_holds_out_per_corpus_and_tags_documents(tmp_path):
    cfg = CorpusConfig(
        sources=[
            {"name": "en", "source": write_texts(tmp_path / "en", "English", 20)},
            {"name": "de", "source": write_texts(tmp_path / "de", "Deutsch", 12), "weight": 0.5, "held_out_documents": 2},
        ],
        held_out_documents=3,
    )
    held = list(iter_documents(cfg, "held_out"))
    assert sorted(d.corpus for d in held) == ["de", "de", "en", "en", "en"]
    train = list(iter_documents(cfg, "train"))
    assert len(train) == 20 + 12 - 5
    assert not {(d.corpus, d.index) for d in held} & {(d.corpus, d.index) for d in train}
    assert count_documents(cfg) == 32
    capped = CorpusConfig(sources=[{"name": "en", "source": str(tmp_path / "en")},
                                   {"name": "de", "source": str(tmp_path / "de"), "max_documents": 3}], max_documents=5)
    assert count_documents(capped) == 5 + 3  # the section's max_documents applies to each corpus lacking its own
    # each corpus splits exactly as it would alone: adding a corpus never moves another's held-out documents
    alone = CorpusConfig(source=str(tmp_path / "en"), held_out_documents=3)
    assert [d.index for d in held if d.corpus == "en"] == [d.index for d in iter_documents(alone, "held_out")]


def test_mixed_sample_ids_carry_the_corpus_and_are_stable(tmp_path, bpe_tokenizer):
    from fuseflow.corpus import corpus_of

    cfg = CorpusConfig(sources=[
        {"name": "en", "source": write_texts(tmp_path / "en", "English", 4)},
        {"name": "de", "source": write_texts(tmp_path / "de", "Deutsch", 4)},
    ])
    ids = [s.id for s in make_samples(iter_documents(cfg), bpe_tokenizer, 64)]
    assert ids == [s.id for s in make_samples(iter_documents(cfg), bpe_tokenizer, 64)]
    assert ids[:4] == ["en/0:0", "de/0:0", "en/1:0", "de/1:0"]
    assert [corpus_of(i) for i in ids[:2]] == ["en", "de"] and corpus_of("3:0") == ""
    single = [s.id for s in make_samples(iter_documents(CorpusConfig(source=str(tmp_path / "en"))), bpe_tokenizer, 64)]
    assert single[:2] == ["0:0", "1:0"]  # a single corpus keeps its unprefixed ids


@pytest.mark.parametrize(
    "corpus, field",
    [
        ({"sources": [{"name": "en", "source": "builtin", "weight": 0}]}, "corpus.sources[0].weight"),
        ({"sources": [{"name": "a b", "source": "builtin"}]}, "corpus.sources[0].name"),
        ({"sources": [{"name": "en"}]}, "corpus.sources[0].source"),
        ({"sources": [{"name": "en", "source": "builtin", "typo": 1}]}, "corpus.sources[0].typo"),
        ({"sources": [{"name": "en", "source": "builtin"}, {"name": "en", "source": "builtin"}]}, "names must be unique"),
        ({"source": "x.jsonl", "sources": [{"name": "en", "source": "builtin"}]}, "give source per source"),
        ({"sources": []}, "corpus.sources"),
    ],
)
def test_mix_config_errors_name_the_field(corpus, field):
    from fuseflow.config import ConfigError, FuseConfig, load_config

    overrides = [f"target.model=x", "sources=[{model: x}]", f"corpus={json.dumps(corpus)}"]
    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(FuseConfig, None, overrides)


TROFF = r""".\" a comment
.de XX
.  ft B
..
.TH LS 1 "2023" "GNU" "Benutzerbefehle"
.SH BEZEICHNUNG
ls \- Verzeichnisinhalte auflisten
.SH BESCHREIBUNG
Auflistung von Informationen über die \fIDATEI\fPen (standardmäßig
das aktuelle Verzeichnis).
.PP
Siehe
.BR dir (1)
und \(lqmehr\(rq.
.TP
\fB\-a\fR, \fB\-\-all\fR
Einträge nicht ignorieren.
"""


def test_troff_to_prose_keeps_the_words_and_drops_the_markup():
    from fuseflow.manpages import troff_to_prose

    assert troff_to_prose(TROFF) == (
        "BEZEICHNUNG\n\nls - Verzeichnisinhalte auflisten\n\nBESCHREIBUNG\n\n"
        "Auflistung von Informationen über die DATEIen (standardmäßig das aktuelle Verzeichnis).\n\n"
        "Siehe dir(1) und “mehr”.\n\n-a, --all Einträge nicht ignorieren.\n"
    )


def test_manpages_source_reads_pages_in_path_order(tmp_path, monkeypatch):
    import fuseflow.manpages as manpages

    (tmp_path / "xx" / "man1").mkdir(parents=True)
    for name in ("b.1.gz", "a.1.gz"):
        (tmp_path / "xx" / "man1" / name).write_bytes(gzip.compress(TROFF.replace("ls", name[0]).encode()))
    monkeypatch.setattr(manpages, "MAN_ROOT", tmp_path)
    docs = list(iter_documents(CorpusConfig(source="manpages:xx"), "all"))
    assert [d.origin.rsplit("/", 1)[1] for d in docs] == ["a.1.gz", "b.1.gz"]
    assert docs[0].text.startswith("BEZEICHNUNG\n\na - Verzeichnisinhalte")
    assert count_documents(CorpusConfig(source="manpages:xx")) == 2


def test_missing_manpages_say_how_to_install_them(tmp_path, monkeypatch):
    import fuseflow.manpages as manpages

    monkeypatch.setattr(manpages, "MAN_ROOT", tmp_path)
    with pytest.raises(CorpusError, match=r"apt-get install -y --no-install-recommends manpages-zz"):
        list(iter_documents(CorpusConfig(source="manpages:zz"), "all"))
    with pytest.raises(CorpusError, match="manpages:LANG"):
        list(iter_documents(CorpusConfig(source="manpages:../x"), "all"))


def test_corpus_samples_mix_samples_by_weight_whatever_the_document_lengths(tmp_path, bpe_tokenizer):
    from fuseflow.corpus import corpus_samples, corpus_of

    long_dir = tmp_path / "long"
    long_dir.mkdir()
    for i in range(3):
        (long_dir / f"{i}.txt").write_text(" ".join(f"Lang{i} wort{j}." for j in range(400)))
    cfg = CorpusConfig(sources=[
        {"name": "short", "source": write_texts(tmp_path / "short", "Short", 40)},
        {"name": "long", "source": str(long_dir), "weight": 3},
    ])
    samples = list(corpus_samples(cfg, bpe_tokenizer, 64))
    names = [corpus_of(s.id) for s in samples]
    assert names[:20].count("long") == 15  # 3 : 1 in samples, though a long document makes many samples
    assert names.count("short") == 40
    assert [s.id for s in corpus_samples(CorpusConfig(source=str(long_dir)), bpe_tokenizer, 64)] == [
        s.id for s in make_samples(iter_documents(CorpusConfig(source=str(long_dir))), bpe_tokenizer, 64)
    ]


def test_a_dumped_mix_config_loads_again():
    from fuseflow.config import FuseConfig, dump_config, load_config

    cfg = load_config(FuseConfig, None, ["target.model=x", "sources=[{model: x}]",
                                         "corpus={sources: [{name: en, source: builtin}], held_out_documents: 2}"])
    again = FuseConfig.model_validate(__import__("yaml").safe_load(dump_config(cfg)))
    assert again.corpus == cfg.corpus
