"""Cool-Fusion tests: tiny models on one torch thread."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Tiny models on one torch thread (see ``one_torch_thread`` in tests/conftest.py)."""
    yield
