"""One construction of a source's engine, one precedence (issue 25): ``fuseflow fuse``'s in-process teachers,
``fuseflow teacher serve`` (``--config`` and ``--model``) and in-process Cool-Fusion sources all build through
:func:`fuseflow.score.engine.engine_from_source`, where the caller's defaults (``serve.max_top_k``) give way to the
source's fields, and those to its ``engine_options``. Real hf engines on the tiny Llama: the rule is read back
from the engines built."""

from __future__ import annotations

import yaml

from fuseflow.config import FuseConfig, load_config


def _run_config(tmp_path, tiny_llama, engine_options: dict, serve_top_k: int = 50) -> FuseConfig:
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "target": {"model": str(tiny_llama)},
        "sources": [{"name": "llama", "model": str(tiny_llama), "max_length": 30, "engine_options": engine_options}],
        "serve": {"max_top_k": serve_top_k},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(FuseConfig, path)


def _fuse_engine(cfg):
    from fuseflow.models import load_tokenizer
    from fuseflow.trainer.teachers import build_teachers

    (aligner,) = build_teachers(cfg, cfg.sources, load_tokenizer(cfg.target.model))
    return aligner.engine


def _served_engine(path, *flags):
    from fuseflow.teacher import serve

    return serve.resolve_spec(serve.build_parser().parse_intermixed_args([*flags, "--device", "cpu"])).build_engine()


def _ensemble_engine(tmp_path, tiny_llama, engine_options: dict):
    from fuseflow.ensemble.config import build_source, load_ensemble_config

    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"name": "llama", "model": str(tiny_llama),
                                                 "engine_options": engine_options}]}))
    return build_source(load_ensemble_config(path).sources[0], 0).teacher


def test_engine_options_win_over_the_fields_and_the_serve_defaults_for_every_caller(tmp_path, tiny_llama):
    options = {"max_top_k": 7, "max_length": 20}
    cfg = _run_config(tmp_path, tiny_llama, options)
    config = str(tmp_path / "run.yaml")
    fuse = _fuse_engine(cfg)
    served = _served_engine(config, "--config", config, "--source", "llama")
    ensemble = _ensemble_engine(tmp_path, tiny_llama, options)
    for caller, engine in (("fuse", fuse), ("teacher serve", served), ("ensemble", ensemble)):
        assert (caller, engine.max_top_k, engine.max_length) == (caller, 7, 20)
    # A flag sets the serve section's default, which the source's engine_options still override.
    assert _served_engine(config, "--config", config, "--source", "llama", "--max-top-k", "9").max_top_k == 7


def test_without_engine_options_the_fields_then_the_serve_defaults_apply(tmp_path, tiny_llama):
    cfg = _run_config(tmp_path, tiny_llama, {}, serve_top_k=50)
    config = str(tmp_path / "run.yaml")
    fuse = _fuse_engine(cfg)
    served = _served_engine(config, "--config", config, "--source", "llama")
    # `fuseflow fuse` builds its in-process teachers as the served ones: serve.max_top_k, the source's max_length
    assert (fuse.max_top_k, fuse.max_length) == (served.max_top_k, served.max_length) == (50, 30)
    alone = _served_engine(None, "--model", str(tiny_llama), "--max-top-k", "12", "--dtype", "float32")
    assert (alone.name, alone.max_top_k) == (str(tiny_llama), 12)
    # The ensemble serves nothing: no defaults, the engine's own (hf: no cap below the vocabulary).
    assert _ensemble_engine(tmp_path, tiny_llama, {}).max_top_k is None
