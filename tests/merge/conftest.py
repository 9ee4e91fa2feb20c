"""Fixtures for the merge tests: fine-tuned variants of the session's ``tiny_llama``."""

from __future__ import annotations

import pytest
from merge_helpers import perturbed_copy


@pytest.fixture(scope="session")
def finetuned_llamas(tiny_llama, tmp_path_factory):
    """Three perturbed copies of ``tiny_llama`` with updates of different sizes."""
    root = tmp_path_factory.mktemp("finetuned-llama")
    return [perturbed_copy(tiny_llama, root / f"ft{j}", seed=100 + j, scale=0.01 * (j + 1)) for j in range(3)]


@pytest.fixture(scope="session")
def llama5(tmp_path_factory, bpe_tokenizer):
    """A 5-layer tiny Llama: enough layers for mergekit's per-layer gradients and layer slices."""
    from fuseflow.models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("llama5"), "llama", tokenizer=bpe_tokenizer, num_layers=5, seed=5)


@pytest.fixture(scope="session")
def llama5_finetuned(llama5, tmp_path_factory):
    """Three perturbed copies of ``llama5``."""
    root = tmp_path_factory.mktemp("llama5-ft")
    return [perturbed_copy(llama5, root / f"ft{j}", seed=200 + j, scale=0.01 * (j + 1)) for j in range(3)]
