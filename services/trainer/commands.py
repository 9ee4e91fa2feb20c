"""``fuseflow fuse``, ``fuseflow finetune``, ``fuseflow train`` and ``fuseflow evaluate``: the knowledge-fusion recipe
(:mod:`fuseflow.trainer.recipe`) in one process and over Redis, and the held-out evaluation of models, as commands of
the one CLI (:mod:`fuseflow.cli`, which wraps them all alike; registered in ``pyproject.toml``). Light at import: the
recipe is imported when the command runs."""

from __future__ import annotations

import argparse
import json
import os


class Fuse:
    @staticmethod
    def build_parser() -> argparse.ArgumentParser:
        from fuseflow.config import config_parser

        p = config_parser("Knowledge fusion (FuseLLM) in one process: score, align, fuse, train, evaluate.",
                          "example: fuseflow fuse examples/quickstart.yaml train.max_steps=20 baseline=none",
                          "run config YAML (see examples/quickstart.yaml)",
                          "key=value overrides, e.g. train.lr=3e-5 fusion.function=avg_ce")
        p.add_argument("--baseline", choices=["clm", "none"], default=None, help="also train a CLM-only copy (default: config)")
        p.add_argument("--pairwise", action="store_true", help="FuseChat: one fused copy of the target per source")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        return p

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fuseflow.config import FuseConfig, load_config
        from fuseflow.trainer.recipe import fuse

        overrides = list(args.overrides)
        if args.baseline:
            overrides.append(f"baseline={args.baseline}")
        if args.pairwise:
            overrides.append("pairwise=true")
        fuse(load_config(FuseConfig, args.config, overrides), progress=not args.no_progress)
        return 0


class Finetune:
    @staticmethod
    def build_parser() -> argparse.ArgumentParser:
        from fuseflow.config import config_parser

        p = config_parser("CLM-fine-tune a model on a corpus and write an HF directory (run_dir/finetuned/model): the "
                          "recipe of `fuseflow fuse` with no teachers, e.g. to make a domain expert to fuse. Takes a "
                          "fuse run config; its sources, align and fusion sections are not used.",
                          "example: fuseflow finetune examples/finetune-expert.yaml train.max_steps=150",
                          "run config YAML (see examples/finetune-expert.yaml)",
                          "key=value overrides, e.g. target.model=gemma3-270m corpus.source=manpages:de")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
        return p

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fuseflow.config import FinetuneConfig, load_config
        from fuseflow.trainer.recipe import finetune

        finetune(load_config(FinetuneConfig, args.config, list(args.overrides)), progress=not args.no_progress)
        return 0


class Train:
    @staticmethod
    def build_parser() -> argparse.ArgumentParser:
        from fuseflow.config import OnlineConfig, add_field_flags, config_parser

        p = config_parser(
            "Online knowledge fusion: train the target on aligned top-k distributions that teacher services "
            "(`fuseflow teacher serve --redis`) stream through Redis. Rank 0 dispatches the corpus; run N ranks with "
            "the deepspeed or torchrun launcher (env RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The flags below set "
            "the run config's `online` fields in brackets, as key=value overrides do.",
            "example: fuseflow train examples/quickstart.yaml --redis redis://:PASSWORD@localhost:6379/0 "
            "train.max_steps=20",
            "run config YAML (see examples/quickstart.yaml)", "key=value overrides, e.g. train.lr=3e-5 online.window=512")
        add_field_flags(p, OnlineConfig, "online", ["redis", "run", "window", "metrics_host", "metrics_port"])
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        # The deepspeed launcher passes --local_rank to each rank (torchrun sets env LOCAL_RANK instead).
        p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
        return p

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fuseflow.config import FuseConfig, flag_values, load_config
        from fuseflow.trainer.recipe import train_over_redis

        if args.local_rank is not None:
            os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
        train_over_redis(load_config(FuseConfig, args.config, args.overrides, flag_values(args)),
                         progress=not args.no_progress)
        return 0


class Evaluate:
    @staticmethod
    def build_parser() -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(
            description="Held-out bits/byte and perplexity of models on a run config's held-out documents.",
            epilog="example: fuseflow evaluate examples/quickstart.yaml pivot=smollm2-135m merged=runs/fusechat/merged-sce",
        )
        p.add_argument("config", help="run config YAML: its corpus (held-out split) and eval sections are used")
        p.add_argument("models", nargs="+", help="NAME=MODEL or MODEL (short name, HF dir or .gguf)")
        p.add_argument("--out", help="write the rows as JSON here")
        p.add_argument("--no-progress", action="store_true")
        return p

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from fuseflow.config import FuseConfig, load_config
        from fuseflow.trainer.report import evaluate_models

        cfg = load_config(FuseConfig, args.config)
        refs = dict(m.split("=", 1) if "=" in m else (m, m) for m in args.models)
        rows = evaluate_models(cfg, refs, progress=not args.no_progress)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=2)
        return 0
