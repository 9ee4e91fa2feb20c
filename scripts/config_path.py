"""The path of a run's config through the code (issue 25): ``fuseflow fuse`` on tiny random models, traced
from the command to the first optimizer step. Every call of a fuseflow function (fuseflow/ or services/) that
receives the config or one of its sections (a pydantic model of ``fuseflow.config`` / ``fuseflow.corpus``) is a
stop; consecutive stops in one file are one pass through it.

    python scripts/config_path.py [--show]

Prints the files passed, the passes, and the returns (a pass through a file already passed before). Needs
nothing but the installed package: the tiny models and corpus are made in a temporary folder.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _config_types():
    from pydantic import BaseModel

    import fuseflow.config
    import fuseflow.corpus

    found = set()
    for module in (fuseflow.config, fuseflow.corpus):
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == module.__name__:
                found.add(value)
    return tuple(found)


def trace_fuse(config: Path) -> list[tuple[str, str]]:
    """``(file, function)`` of each call that receives the config or a section of it, up to the first
    optimizer step."""
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
        if not code.co_filename.startswith(ours):
            return
        args = [frame.f_locals.get(n) for n in code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]]
        if any(isinstance(a, types) for a in args):
            stops.append((str(Path(code.co_filename).relative_to(ROOT)), code.co_qualname))

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


def passes(stops: list[tuple[str, str]]) -> list[str]:
    out: list[str] = []
    for file, _ in stops:
        if not out or out[-1] != file:
            out.append(file)
    return out


def main() -> int:
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
    if "--show" in sys.argv:
        last = None
        for file, fn in stops:
            print(("  " if file == last else f"{file}\n  ") + fn)
            last = file
    print(f"config path, fuseflow fuse -> first optimizer step: {len(stops)} calls, {len(set(seq))} files, "
          f"{len(seq)} passes, {returns} returns to a file already passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
