import ast
import json
import logging
from pathlib import Path

import pytest

from fuseflow.cli import commands, main

ROOT = Path(__file__).resolve().parents[1]
EVERY_COMMAND = ["config", "eval-ensemble", "evaluate", "finetune", "fuse", "merge", "models", "query", "serve-ensemble", "stack",
                 "teacher serve", "train"]


def test_the_services_register_their_commands():
    assert sorted(c.name for c in commands().values()) == EVERY_COMMAND


@pytest.mark.parametrize("name", EVERY_COMMAND)
def test_every_command_has_help_and_an_example(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([*name.split(), "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: fuseflow " + name in out and "--log-format" in out
    assert "example: fuseflow " + name in out or name == "merge"  # merge's epilog lists its methods instead


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in EVERY_COMMAND)


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fusee", "x.yaml"])
    assert e.value.code == 2 and "unknown command 'fusee x.yaml'" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["before", "after"])
def test_global_log_flags_reach_every_command(tmp_path, capsys, where):
    """`fuseflow --log-format json train x.yaml` failed: the passthrough dropped the global flags (issue 13)."""
    p = tmp_path / "run.yaml"
    p.write_text("target: {model: x}\nsources: [{model: y}]\n")
    flags = ["--log-format", "json", "--log-level", "DEBUG"]
    argv = [*flags, "config", str(p)] if where == "before" else ["config", str(p), *flags]
    try:
        assert main(argv) == 0
        root = logging.getLogger()
        assert root.level == logging.DEBUG and type(root.handlers[0].formatter).__name__ == "JsonFormatter"
        record = logging.LogRecord("fuseflow.test", logging.INFO, __file__, 1, "hello", None, None)
        assert json.loads(root.handlers[0].format(record))["msg"] == "hello"
    finally:
        main(["config", str(p), "--log-format", "text", "--log-level", "INFO"])


def service_imports(library: Path, services: set[str]) -> list[str]:
    """Every import of a module of ``services`` in the ``.py`` files under ``library``, at any depth (function-level
    imports and ``importlib.import_module("…")`` with a literal name too), as ``path:line imports name``."""

    def service(name: str) -> bool:
        return ".".join(name.split(".")[:2]) in services

    bad = []
    for path in sorted(library.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
                names = [str(node.args[0].value)]
            else:
                continue
            bad += [f"{path.relative_to(library.parent)}:{node.lineno} imports {n}" for n in names if service(n)]
    return bad


def test_the_library_never_imports_a_service():
    """fuseflow/ is the library; services/ (fuseflow.teacher, .trainer, .gateway) are processes around it (issue 13)."""
    services = {f"fuseflow.{p.name}" for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists()}
    assert services == {"fuseflow.teacher", "fuseflow.trainer", "fuseflow.gateway"}
    bad = service_imports(ROOT / "fuseflow", services)
    assert not bad, "\n".join(bad)


def test_the_import_direction_check_finds_hidden_imports(tmp_path):
    lib = tmp_path / "fuseflow"
    lib.mkdir()
    (lib / "a.py").write_text("import fuseflow.teacher\nfrom fuseflow.trainerx import y\n")
    (lib / "b.py").write_text("def f():\n    from fuseflow.trainer.online import run\n"
                              "def g():\n    import importlib\n    return importlib.import_module('fuseflow.gateway.server')\n")
    assert service_imports(lib, {"fuseflow.teacher", "fuseflow.trainer", "fuseflow.gateway"}) == [
        "fuseflow/a.py:1 imports fuseflow.teacher", "fuseflow/b.py:2 imports fuseflow.trainer.online",
        "fuseflow/b.py:5 imports fuseflow.gateway.server"]


def test_config_error_is_one_line_naming_the_field(tmp_path, capsys):
    p = tmp_path / "run.yaml"
    p.write_text("target: {model: x}\nsources: [{model: y}]\ntrain: {lrr: 1}\n")
    assert main(["config", str(p)]) == 2
    err = capsys.readouterr().err
    assert "train.lrr: unknown field" in err and "Traceback" not in err


def test_merge_config_errors_name_the_field_and_the_override(tmp_path, capsys):
    p = tmp_path / "merge.yaml"
    p.write_text("method: linear\nbase: b\nmodels: [m]\noutput: o\nmodles: [a]\n")
    assert main(["merge", str(p)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fuseflow merge: error: ") and "Traceback" not in err
    assert "modles: unknown field (typo?)" in err
    assert main(["merge", str(p), "threads"]) == 2
    assert "override 'threads' is not of the form key=value" in capsys.readouterr().err


def test_config_prints_every_default(tmp_path, capsys):
    p = tmp_path / "run.yaml"
    p.write_text("target: {model: x}\nsources: [{model: y}]\n")
    assert main(["config", str(p), "fusion.lam=0.5"]) == 0
    out = capsys.readouterr().out
    assert "lam: 0.5" in out and "warmup_ratio: 0.008" in out
