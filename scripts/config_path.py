"""The path of a run's config through the code (issue 25): ``fuseflow fuse`` on tiny random models, traced
from the command to the first optimizer step. Every call of a fuseflow function (fuseflow/ or services/) that
receives the config or one of its sections (a pydantic model of ``fuseflow.config`` / ``fuseflow.corpus``) as an
argument is a stop (a generator once, not at each item it yields); the config's own methods (``SourceConfig.key``: the config is their ``self``) are not, the
config does not travel there. Consecutive stops in one file are one pass through it.

    python scripts/config_path.py [--show]

Prints the stops, the files passed, the passes, the returns (a pass through a file already passed before) and
the climbs (a call from a file into a file that imports it: a callback or a function-level import of a module
above, :mod:`import_cycles`'s graph). Needs nothing but the installed package: the tiny models and corpus are made
in a temporary folder. ``FUSEFLOW_ROOT`` measures another checkout of the same installation.
"""

from __future__ import annotations

import dis
import inspect
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(os.environ.get("FUSEFLOW_ROOT") or Path(__file__).resolve().parent.parent)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _config_types():
    from pydantic import BaseModel

    import fuseflow.config
    import fuseflow.corpus

    found = set()
    for module in (fuseflow.config, fuseflow.corpus):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__.startswith(
                    ("fuseflow.config", "fuseflow.corpus")):
                found.add(value)
    return tuple(found)


def trace_fuse(config: Path) -> list[tuple[str, str, str]]:
    """``(file, function, caller's file)`` of each call that receives the config or a section of it, up to the
    first optimizer step."""
    from fuseflow.cli import main

    types = _config_types()
    ours = (str(ROOT / "fuseflow"), str(ROOT / "services"))
    stops: list[tuple[str, str]] = []
    done = [False]

    def profile(frame, event, arg):
        if done[0] or event != "call":
            return
        code = frame.f_code
        if code.co_name == "step" and code.co_filename.endswith(os.path.join("deepspeed", "runtime", "engine.py")):
            done[0] = True
            sys.setprofile(None)
            return
        if not code.co_filename.startswith(ours) or not _fresh(frame):
            return
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        if names[:1] == ("self",) and isinstance(frame.f_locals.get("self"), types):
            return  # the config's own method: the config does not travel there
        if any(isinstance(frame.f_locals.get(n), types) for n in names):
            caller = frame.f_back.f_code.co_filename if frame.f_back is not None else ""
            stops.append((_rel(code.co_filename), code.co_qualname, _rel(caller)))

    sys.setprofile(profile)
    import threading

    threading.setprofile(profile)
    try:
        code = main(["fuse", str(config), "--no-progress", "train.max_steps=1"])
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    if code != 0:
        raise SystemExit(f"fuseflow fuse exited {code}")
    return stops


_RESUME = dis.opmap.get("RESUME")
_GENERATOR = inspect.CO_GENERATOR | inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _fresh(frame) -> bool:
    """A new call, not a generator resumed (CPython 3.11+: a frame starts at ``RESUME 0``, resumes at ``RESUME n>0``):
    a streamed generator that holds the config is one stop however many items it yields. Nor a generator closed:
    ``close()`` (or the generator's collection) throws ``GeneratorExit`` in at its ``yield``, a profile "call" whose
    frame stands on the ``YIELD_VALUE`` (``RETURN_GENERATOR`` if it never started), not on a ``RESUME``."""
    code, i = frame.f_code.co_code, frame.f_lasti
    if _RESUME is None or i < 0 or not frame.f_code.co_flags & _GENERATOR:
        return True
    return code[i] == _RESUME and code[i + 1] == 0


def _rel(filename: str) -> str:
    try:
        return str(Path(filename).relative_to(ROOT))
    except ValueError:
        return filename


def module_of(rel: str) -> str | None:
    """The import name of a file of the tree (``services/trainer/loop.py`` → ``fuseflow.trainer.loop``)."""
    from import_cycles import PACKAGE_DIRS

    for package, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[1])):
        if rel.startswith(folder + "/"):
            parts = list(Path(rel[len(folder) + 1 :]).with_suffix("").parts)
            return ".".join([package, *(parts[:-1] if parts[-1] == "__init__" else parts)])
    return None


def climbs(stops: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """The stops called from a file that the called file imports: the call goes back up the import graph."""
    from import_cycles import import_graph

    graph = import_graph(ROOT)
    out = []
    for file, fn, caller in stops:
        callee, up = module_of(file), module_of(caller)
        if callee and up and callee != up and up in graph.get(callee, ()):
            out.append((file, fn, caller))
    return out


def passes(stops: list[tuple[str, str, str]]) -> list[str]:
    out: list[str] = []
    for file, _, _ in stops:
        if not out or out[-1] != file:
            out.append(file)
    return out


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from online_helpers import write_run_config

    from fuseflow.models import make_tiny_model, make_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bpe, spm = make_tiny_tokenizer("bpe", 512), make_tiny_tokenizer("spm", 640)
        llama = make_tiny_model(tmp / "llama", "llama", tokenizer=bpe, seed=0)
        gemma = make_tiny_model(tmp / "gemma", "gemma3", tokenizer=spm, seed=1)
        qwen = make_tiny_model(tmp / "qwen", "qwen2", tokenizer=bpe, seed=2)
        config = write_run_config(tmp, llama, gemma, qwen, n_docs=8)
        stops = trace_fuse(config)
    seq = passes(stops)
    returns = sum(1 for i, f in enumerate(seq) if f in seq[:i])
    up = climbs(stops)
    if "--show" in sys.argv:
        last = None
        for file, fn, caller in stops:
            print(("  " if file == last else f"{file}\n  ") + f"{fn}  (from {caller})")
            last = file
        for file, fn, caller in up:
            print(f"climb: {caller} -> {file}:{fn}")
    print(f"config path, fuseflow fuse -> first optimizer step: {len(stops)} calls, {len(set(seq))} files, "
          f"{len(seq)} passes, {returns} returns to a file already passed, {len(up)} climbs to an importing file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
