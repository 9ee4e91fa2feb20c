"""No import circle in fuseflow/ or services/ (issue 25), function-level imports included: two modules that need
each other, however late, cannot be read, tested or moved one without the other. The graph is
``scripts/import_cycles.py``'s, the measurement the issue reports."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from import_cycles import circles, import_graph  # noqa: E402 - the measurement itself


def test_no_import_circle_in_the_library_or_the_services():
    graph = import_graph(ROOT)
    assert "fuseflow.trainer.recipe" in graph and "fuseflow.kernels.head" in graph  # the services are read too
    assert circles(graph) == []


def test_the_check_finds_a_circle_closed_inside_a_function(tmp_path):
    lib = tmp_path / "fuseflow"
    (lib / "sub").mkdir(parents=True)
    for folder in ("services/teacher", "services/trainer", "services/gateway"):
        (tmp_path / folder).mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "sub" / "__init__.py").write_text("")
    (lib / "a.py").write_text("from fuseflow.sub import b\n")
    (lib / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (lib / "c.py").write_text("import importlib\n\ndef g():\n    return importlib.import_module('fuseflow.a')\n")
    (tmp_path / "services" / "trainer" / "x.py").write_text("from .y import z\n")
    (tmp_path / "services" / "trainer" / "y.py").write_text("def z():\n    from fuseflow.trainer import x\n")
    assert circles(import_graph(tmp_path)) == [["fuseflow.a", "fuseflow.c", "fuseflow.sub.b"],
                                               ["fuseflow.trainer.x", "fuseflow.trainer.y"]]
