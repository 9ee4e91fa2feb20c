"""``fuseflow merge CONFIG [key=value ...]``: load the YAML config, plan, merge, write an HF model directory.

CONFIG is fuseflow's format (``method:``, examples/merge.yaml) or mergekit's (``merge_method:``, read as
mergekit reads it: fuseflow/merge/mergekit.py); the format is told by that field.

The output directory holds the merged safetensors shards (with ``model.safetensors.index.json`` when there
are several), the base's config and tokenizer files, and ``fuseflow_merge.yaml``: the resolved config
that produced it. It is written to a temporary sibling directory and renamed into place when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from fuseflow.config import ConfigError, config_parser
from fuseflow.config import load_config as load_run_config
from fuseflow.models import ModelLoadError, resolve

from .config import MergeConfig, method_parameters
from .execute import execute_plan
from .mergekit import METHODS as MERGEKIT_METHODS
from .mergekit import MergekitConfig, build_mergekit_plan
from .methods import MERGE_METHODS, get_method
from .plan import MergeCheckError, MergePlan, build_plan

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
# Provenance files of the base itself (a converted GGUF, an earlier merge): they do not describe the output.
NOT_COPIED = ("fuseflow_source.json", "fuseflow_merge.yaml")
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Config loading.
# ----------------------------------------------------------------------------------------------------------


def is_mergekit(path: str | os.PathLike) -> bool:
    """A config is mergekit's when its top level has ``merge_method`` (fuseflow's has ``method``)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # the shared loader reports it
    return isinstance(data, dict) and "merge_method" in data


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> MergeConfig | MergekitConfig:
    """Read and validate a merge config with the shared loader (:func:`fuseflow.config.load_config`: YAML,
    ``key=value`` overrides such as ``parameters.select_topk=0.1`` or ``models.0=dir``); :class:`ConfigError`
    names each field at fault. A mergekit config (``merge_method:``) is read as :class:`MergekitConfig`."""
    if is_mergekit(path):
        cfg = load_run_config(MergekitConfig, path, overrides)
        if cfg.output is None:
            raise ConfigError(f"output: {path} is a mergekit config, which has no output directory; add output=DIR")
        return cfg
    return load_run_config(MergeConfig, path, overrides)


# ----------------------------------------------------------------------------------------------------------
# Running.
# ----------------------------------------------------------------------------------------------------------


def _resolve(ref: str, field: str) -> Path:
    try:
        return resolve(ref)
    except ModelLoadError as e:
        raise ConfigError(f"{field}: {e}") from None


def _check_output(out: Path, inputs: list[Path], overwrite: bool) -> None:
    if any(out.resolve() == p.resolve() for p in inputs):
        raise ConfigError(f"output: {out} is one of the input models; choose another directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output: {out} exists and is not empty; choose another directory or set overwrite: true")
        if not (out / "config.json").exists():
            raise ConfigError(f"output: {out} is not a model directory (no config.json); refusing to replace it")


def copy_base_files(base: Path, out: Path, dtype: str | None, updates: dict | None = None) -> None:
    """Copy the base's config, generation config and tokenizer files (everything but weights); set the
    config's dtype and ``updates`` (a frankenmerge's ``num_hidden_layers``)."""
    for f in sorted(base.iterdir()):
        weights = f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json")
        if f.is_file() and not weights and f.name not in NOT_COPIED:
            shutil.copy2(f, out / f.name)
    if dtype is not None or updates:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if dtype is not None:
            cfg["dtype"] = dtype
            if cfg.get("torch_dtype") is not None:
                cfg["torch_dtype"] = dtype
        cfg.update(updates or {})
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def plan_merge(config: MergeConfig | MergekitConfig) -> MergePlan:
    if isinstance(config, MergekitConfig):
        return build_mergekit_plan(config, _resolve)[0]
    base = _resolve(config.base, "base")
    models = [_resolve(m, f"models[{i}]") for i, m in enumerate(config.models)]
    return build_plan(
        base,
        models,
        dtype=TORCH_DTYPES[config.dtype] if config.dtype else None,
        shard_size=config.shard_size,
        vocab_mismatch=config.vocab_mismatch,
    )


def method_of(config: MergeConfig | MergekitConfig) -> str:
    """The fuseflow method that runs ``config``."""
    return MERGEKIT_METHODS[config.merge_method].fuseflow if isinstance(config, MergekitConfig) else config.method


def check_output(config: MergeConfig | MergekitConfig, plan: MergePlan) -> Path:
    """The output directory, refused when it is an input model or a non-empty directory (without
    ``overwrite``); the same check for a dry run and a real one."""
    out = Path(config.output)
    _check_output(out, [plan.base.path, *(m.path for m in plan.models)], config.overwrite)
    return out


def run_merge(config: MergeConfig | MergekitConfig, *, progress: bool = True) -> Path:
    """Plan and execute ``config``; returns the output directory (an HF model directory)."""
    config_updates: dict = {}
    if isinstance(config, MergekitConfig):
        plan, config_updates = build_mergekit_plan(config, _resolve)
        dtype = config.out_dtype or config.dtype
        params: dict = {}  # every task carries its own
    else:
        plan, dtype, params = plan_merge(config), config.dtype, config.parameters
    out = check_output(config, plan)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        execute_plan(plan, get_method(method_of(config)), params, tmp, progress=progress)
        copy_base_files(plan.base.path, tmp, dtype, config_updates)
        (tmp / "fuseflow_merge.yaml").write_text(
            yaml.safe_dump(config.model_dump(mode="json", exclude_none=isinstance(config, MergekitConfig)), sort_keys=False)
        )
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads)
    if out.exists():
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------------


def _methods_help() -> str:
    lines = ["methods and their parameters (defaults):"]
    for name, method in sorted(MERGE_METHODS.items()):
        params = ", ".join(f"{p}={d!r}" for p, (_, d) in method_parameters(method).items()) or "none"
        lines.append(f"  {name:16s} {params}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser(
        "Merge fine-tuned copies of one base model in parameter space, one tensor at a time (FuseChat: the fused "
        "target models, onto the pivot). Config reference: examples/merge.yaml; a mergekit YAML (merge_method:) is "
        "read as mergekit reads it, with output=DIR added (docs/merge.md).",
        _methods_help(), "YAML merge config", "override config fields, e.g. parameters.select_topk=0.1 output=out/",
        overrides_metavar="KEY=VALUE", prog="fuseflow merge", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help="check the models and print the plan; write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, args.overrides)
        if args.dry_run:
            plan = plan_merge(config)
            check_output(config, plan)
            print(plan.summary())
            return 0
        out = run_merge(config, progress=not args.no_progress)
    except (ConfigError, MergeCheckError) as e:
        print(f"fuseflow merge: error: {e}", file=sys.stderr)
        return 2
    if isinstance(config, MergekitConfig):
        print(f"merged with mergekit's {config.merge_method} (fuseflow {method_of(config)}) into {out}")
    else:
        print(f"merged {len(config.models)} models with {config.method} into {out}")
    return 0
