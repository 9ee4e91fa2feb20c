"""Fixtures for the merge tests: fine-tuned variants of the session's ``tiny_llama``."""

from __future__ import annotations

import pytest
from merge_helpers import perturbed_copy


@pytest.fixture(scope="session")
def finetuned_llamas(tiny_llama, tmp_path_factory):
    """Three perturbed copies of ``tiny_llama`` with updates of different sizes."""
    root = tmp_path_factory.mktemp("finetuned-llama")
    return [perturbed_copy(tiny_llama, root / f"ft{j}", seed=100 + j, scale=0.01 * (j + 1)) for j in range(3)]
