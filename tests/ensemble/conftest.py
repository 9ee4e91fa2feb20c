"""In-process engines over the session's tiny models, wrapped as Cool-Fusion sources."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models do microsecond-sized ops: on a shared CPU, torch's thread pool costs far more than it
    saves (measured: SDPA on [1, 4, 30, 8] takes 7 ms with 2 busy threads, 0.04 ms with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def llama_engine(tiny_llama):
    from fuseflow.teacher.engine import create_engine

    return create_engine("hf", str(tiny_llama), name="llama")


@pytest.fixture(scope="session")
def gemma_engine(tiny_gemma):
    from fuseflow.teacher.engine import create_engine

    return create_engine("hf", str(tiny_gemma), name="gemma")


@pytest.fixture(scope="session")
def llama_source(llama_engine):
    from fuseflow.ensemble.sources import EnsembleSource

    return EnsembleSource.from_engine(llama_engine, name="llama")


@pytest.fixture(scope="session")
def gemma_source(gemma_engine):
    from fuseflow.ensemble.sources import EnsembleSource

    return EnsembleSource.from_engine(gemma_engine, name="gemma")
