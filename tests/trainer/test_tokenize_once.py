"""Tokenize once (issue 25): on ``fuseflow fuse``'s path each training sample's text goes through the target
tokenizer once — the corpus cut makes the encoding and it travels with the sample to the in-process teachers'
aligners, the trainer's check of their answers and the batch (it was 3 + N calls: the cut, each of N teachers,
the check, the batch). Counted on tiny models by wrapping the target tokenizer's one encoding method, every
entry point (``tokenizer(text)``, ``encode``) included, per training sample's text; teachers' own tokenizers
are not counted. Calls on other texts are not per sample: a document longer than ``train.max_length`` is
tokenized whole once more to find its cuts, and the vocab maps tokenize the teachers' token strings once. The
target tokenizer is loaded once."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from fuseflow.config import FuseConfig, load_config

pytestmark = pytest.mark.slow


def _count_target_calls(monkeypatch, target_path) -> Counter:
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    calls: Counter = Counter()
    real = TokenizersBackend._encode_plus

    def counting(self, text, *args, **kwargs):
        if self.name_or_path == str(target_path):
            for t in [text] if isinstance(text, str) else text:
                calls[t] += 1
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(TokenizersBackend, "_encode_plus", counting)
    return calls


def _count_target_loads(monkeypatch, target_path) -> list:
    from transformers import AutoTokenizer

    loads = []
    real = AutoTokenizer.from_pretrained.__func__

    def counting(cls, path, *args, **kwargs):
        if str(path) == str(target_path):
            loads.append(path)
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(counting))
    return loads


def test_the_fuse_path_tokenizes_each_training_sample_once(tmp_path, tiny_llama, tiny_gemma, tiny_qwen, monkeypatch):
    from fuseflow.trainer.data import prepare_corpus
    from fuseflow.trainer.recipe import fuse

    # Short documents (one sample each) and a long one (cut into several samples).
    docs = [f"Document {i} holds a short sentence or two for the tiny target." for i in range(8)]
    docs.insert(1, " ".join(f"word{i} and more text to cut." for i in range(60)))  # held out (seed 0): 3 and 5
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = tmp_path / "run.yaml"
    config.write_text(f"""
run_dir: {tmp_path / 'run'}
target: {{model: {tiny_llama}}}
sources: [{{name: gemma, model: {tiny_gemma}}}, {{name: qwen, model: {tiny_qwen}}}]
corpus: {{source: {tmp_path / 'corpus.jsonl'}, held_out_documents: 2}}
fusion: {{top_k: 4}}
train: {{max_length: 48, micro_batch_size: 2, checkpoint_every: 2}}
eval: {{max_length: 48, before: false}}
baseline: none
""")
    cfg = load_config(FuseConfig, config)
    calls = _count_target_calls(monkeypatch, tiny_llama)
    loads = _count_target_loads(monkeypatch, tiny_llama)
    fuse(cfg, progress=False)
    assert len(loads) == 1  # the target tokenizer, loaded once (three times before)
    trained = (tmp_path / "run" / "fused" / "trained_samples.log").read_text().split()
    from fuseflow.models import load_tokenizer

    monkeypatch.undo()
    texts = {s.id: s.text for s in prepare_corpus(cfg, load_tokenizer(cfg.target.model)).train}
    assert len(trained) == len(texts) and any(i.endswith(":1") for i in trained)  # the long one: several samples
    assert {i: calls[texts[i]] for i in trained} == {i: 1 for i in trained}
