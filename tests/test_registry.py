"""fuseflow.registry.Registry: the one registry type of engines, fusion functions, vocab maps, aligners."""

import pytest

from fuseflow.registry import Registry


def test_register_lookup_and_errors():
    reg = Registry("widget", field="x.widget")

    @reg.register("a")
    def a():
        return 1

    assert reg.lookup("a") is a and "a" in reg and sorted(reg) == ["a"]
    reg.register("a", a)  # the same entry again (a module imported twice) is harmless
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(lambda: 2)
    with pytest.raises(ValueError, match=r"^x\.widget: unknown widget 'b'; choose one of a$"):
        reg.lookup("b")


def test_builtins_are_imported_on_first_lookup():
    """In a fresh interpreter (this one has imported the engines long ago): importing the registry's module
    imports no built-in engine, a lookup imports that one alone. An eager import of either fails it (issue 25)."""
    import subprocess
    import sys

    code = """
import sys
from fuseflow.score.engine import ENGINES
eager = [m for m in ("fuseflow.score.hf_engine", "fuseflow.score.vllm_engine") if m in sys.modules]
assert not eager, f"imported before any lookup: {eager}"
assert ENGINES.names() == sorted(set(ENGINES.names()) | {"hf", "vllm"})
assert ENGINES.lookup("hf").kind == "hf"
assert "fuseflow.score.hf_engine" in sys.modules and "fuseflow.score.vllm_engine" not in sys.modules
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_the_families_share_the_type():
    from fuseflow.align.sequence import SEQUENCE_ALIGNERS
    from fuseflow.align.vocab import VOCAB_MAPS
    from fuseflow.fuse.fusion import FUSIONS
    from fuseflow.score.engine import ENGINES

    from fuseflow.ensemble.rerank import RERANKERS
    from fuseflow.ensemble.tasks import TASKS
    from fuseflow.merge.methods import MERGE_METHODS

    for reg in (SEQUENCE_ALIGNERS, VOCAB_MAPS, FUSIONS, ENGINES, RERANKERS, MERGE_METHODS, TASKS):
        assert isinstance(reg, Registry)
