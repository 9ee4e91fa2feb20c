"""``fuseflow`` — one CLI for every stage: a registry of commands and one wrapper around them.

A command is a :class:`Command`: its words (``fuse``, ``teacher serve``), a line of help, and the module
that implements it, which has ``build_parser()`` (the command's arguments and ``--help``) and
``run(args) -> int | None``. The module is imported only when its command runs, so ``fuseflow --help`` is
instant. The library's commands are listed here; the services (``fuseflow.teacher``, ``fuseflow.trainer``,
``fuseflow.gateway``) register theirs through the ``fuseflow.commands`` entry-point group
(``pyproject.toml``), so the library never imports a service (issue 13).

The wrapper does for every command what each used to do by hand: ``--log-format``/``--log-level`` before
or after the command, logging set up once, ``key=value`` overrides handed to the config loader, and one
table from errors to exit codes (:func:`exit_code_for`): a user error prints one line naming what to change
and exits 2; an interrupt exits 130; anything else is a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
ENTRY_POINT_GROUP = "fuseflow.commands"


@dataclass(frozen=True)
class Command:
    """One ``fuseflow`` command. ``impl`` is ``module`` or ``module:attr``; the object it names has
    ``build_parser() -> argparse.ArgumentParser`` and ``run(args) -> int | None`` (None means 0)."""

    words: tuple[str, ...]
    help: str
    impl: str

    @property
    def name(self) -> str:
        return " ".join(self.words)

    def load(self):
        module, _, attr = self.impl.partition(":")
        obj = importlib.import_module(module)
        return getattr(obj, attr) if attr else obj


LIBRARY_COMMANDS = (
    Command(("config",), "print a run config with every default filled in, after validation", "fuseflow.cli:ConfigCommand"),
    Command(("models",), "list or prepare (convert once) the pretrained models that PyPI packages carry", "fuseflow.cli:ModelsCommand"),
    Command(("merge",), "merge fine-tuned copies of one model in parameter space (linear, ties, dare, varm, sce, …)", "fuseflow.merge.run"),
    Command(("query",), "ad-hoc gRPC client for a teacher: info, tokenize, score, generate", "fuseflow.query"),
    Command(("stack",), "the local stack as processes: Redis, one teacher per source, the trainer", "fuseflow.stack"),
    Command(("eval-ensemble",), "accuracy and latency of each source alone vs Cool-Fusion", "fuseflow.ensemble.evaluate"),
)


def commands() -> dict[tuple[str, ...], Command]:
    """Every command: the library's and those the installed services register (entry points)."""
    from importlib.metadata import entry_points

    found: dict[tuple[str, ...], Command] = {c.words: c for c in LIBRARY_COMMANDS}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        for c in ep.load():
            if c.words in found:
                raise RuntimeError(f"two commands named 'fuseflow {c.name}' ({found[c.words].impl}, {c.impl})")
            found[c.words] = c
    return dict(sorted(found.items()))


def _global_parser(add_help: bool) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=add_help)
    p.add_argument("--log-format", choices=["text", "json"], default=None,
                   help="log lines as text or JSON (default: env FUSEFLOW_LOG_FORMAT, else text)")
    p.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING, … (default: env FUSEFLOW_LOG_LEVEL, else INFO)")
    return p


def _top_parser(table: Iterable[Command]) -> argparse.ArgumentParser:
    p = _global_parser(add_help=True)
    p.prog = "fuseflow"
    p.description = "Fuse the knowledge of LLMs with different tokenizers (FuseLLM, FuseChat, Cool-Fusion)."
    p.epilog = "commands:\n" + "\n".join(f"  {c.name:16s} {c.help}" for c in table) + "\n\n`fuseflow COMMAND --help` for each."
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.usage = "fuseflow [--log-format {text,json}] [--log-level LEVEL] COMMAND ..."
    return p


def build_parser(command: Command) -> argparse.ArgumentParser:
    """The command's own parser, named ``fuseflow <words>``, with the global logging flags added."""
    parser = command.load().build_parser()
    parser.prog = f"fuseflow {command.name}"
    have = {s for a in parser._actions for s in a.option_strings}
    for action in _global_parser(add_help=False)._actions:
        if not set(action.option_strings) & have:
            parser._add_action(action)
    return parser


def _split(argv: list[str], table: dict[tuple[str, ...], Command]) -> tuple[list[str], Command | None, list[str]]:
    """``[global flags] COMMAND WORDS [command args]`` → (global flags, the command, its args)."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 1 if "=" in argv[i] or argv[i] in ("-h", "--help") else 2  # --log-format json
    words = argv[i:]
    for n in sorted({len(w) for w in table}, reverse=True):
        if tuple(words[:n]) in table:
            return argv[:i], table[tuple(words[:n])], words[n:]
    return argv[:i], None, words


def exit_code_for(error: BaseException) -> int | None:
    """The one table from errors to exit codes; None: not a user error (a bug: let it raise)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return EXIT_USAGE
    if isinstance(error, ValueError) and (type(error).__module__.startswith("fuseflow") or _raised_by_fuseflow(error)):
        return EXIT_USAGE  # ConfigError, CorpusError, UsageError, …, or a check of ours on an input
    if isinstance(error, OSError):
        return EXIT_FAILED  # a port in use, an unreachable Redis (TransportUnavailable), a full disk
    from fuseflow.config import RunFailed

    if isinstance(error, RunFailed):
        return EXIT_FAILED
    return None


def _raised_by_fuseflow(error: BaseException) -> bool:
    """Raised by fuseflow's own code (a check on an input), not deep inside a dependency (a bug of ours)."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("fuseflow")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    table = commands()
    head, command, rest = _split(argv, table)
    if command is None:
        top = _top_parser(table.values())
        top.parse_args(head)  # --help, or an error for a bad global flag
        top.error(f"unknown command {' '.join(rest[:2])!r}" if rest else "a COMMAND is required")
    return run_command(command, rest, _global_parser(add_help=True).parse_args(head))


def run_command(command: Command | str, argv: Sequence[str], global_args: argparse.Namespace | None = None) -> int:
    """Parse ``argv`` for ``command`` and run it inside the wrapper (logging, exit codes)."""
    if isinstance(command, str):
        command = commands()[tuple(command.split())]
    parser = build_parser(command)
    # Overrides may follow flags (`fuseflow fuse x.yaml --no-progress train.lr=1e-4`); argparse cannot
    # intermix positionals with sub-commands (query's actions), which parse as usual.
    has_sub = any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)
    args = parser.parse_args(list(argv)) if has_sub else parser.parse_intermixed_args(list(argv))
    from fuseflow.logs import setup_logging

    setup_logging(args.log_format or getattr(global_args, "log_format", None),
                  args.log_level or getattr(global_args, "log_level", None))
    try:
        code = command.load().run(args)
    except BaseException as e:
        code = exit_code_for(e)
        if code is None:
            raise
        message = "interrupted" if code == EXIT_INTERRUPTED else f"fuseflow {command.name}: error: {e}"
        print(message, file=sys.stderr)
    return EXIT_OK if code is None else int(code)


# ----------------------------------------------------------------------------------------------------------
# The library's small commands.
# ----------------------------------------------------------------------------------------------------------


class ConfigCommand:
    @staticmethod
    def build_parser() -> argparse.ArgumentParser:
        from fuseflow.config import config_parser

        p = config_parser("Print a run config with every default filled in, after validation.",
                          "example: fuseflow config examples/quickstart.yaml fusion.function=avg_ce",
                          "run config YAML", "key=value overrides, e.g. train.lr=3e-5")
        p.add_argument("--finetune", action="store_true", help="validate as `fuseflow finetune` does (sources optional)")
        return p

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fuseflow.config import FinetuneConfig, FuseConfig, dump_config, load_config

        kind = FinetuneConfig if args.finetune else FuseConfig
        print(dump_config(load_config(kind, args.config, args.overrides)), end="")
        return EXIT_OK


class ModelsCommand:
    @staticmethod
    def build_parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            description="List or prepare (convert once into the cache) the pretrained models that PyPI packages carry.",
            epilog="example: fuseflow models prepare smollm2-135m gemma3-270m",
        )
        p.add_argument("action", choices=["list", "prepare"])
        p.add_argument("names", nargs="*", help="short names (default: all)")
        return p

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fuseflow.models import PRETRAINED, resolve

        for name in args.names or sorted(PRETRAINED):
            print(name if args.action == "list" else f"{name}: {resolve(name)}")
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
