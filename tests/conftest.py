"""Session-scoped tiny models (random weights, own small tokenizers) shared by every test.

Two tokenizers that segment the same text differently — byte-level BPE (``Ġ``) and SentencePiece-style
Unigram (``▁``) — so alignment is exercised across real differences, as between SmolLM2 and Gemma-3.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("FUSEFLOW_CACHE", "")  # replaced per session below
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ["FUSEFLOW_CACHE"] = str(tmp_path_factory.mktemp("fuseflow-cache"))
    yield


@pytest.fixture(scope="session")
def bpe_tokenizer():
    from fuseflow.models import make_tiny_tokenizer

    return make_tiny_tokenizer("bpe", 512)


@pytest.fixture(scope="session")
def spm_tokenizer():
    from fuseflow.models import make_tiny_tokenizer

    return make_tiny_tokenizer("spm", 640)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, bpe_tokenizer):
    """HF dir: Llama, hidden 32, 2 layers, byte-level BPE vocab 512 (the 'target' in most tests)."""
    from fuseflow.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer=bpe_tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory, spm_tokenizer):
    """HF dir: Gemma-3 text, hidden 32, 2 layers, SentencePiece-style vocab 640."""
    from fuseflow.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-gemma"), "gemma3", tokenizer=spm_tokenizer, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory, bpe_tokenizer):
    """HF dir: Qwen2 (untied head) sharing the BPE tokenizer with ``tiny_llama``."""
    from fuseflow.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen"), "qwen2", tokenizer=bpe_tokenizer, seed=2)
