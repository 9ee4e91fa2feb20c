from __future__ import annotations

from pathlib import Path

import pytest

from fuseflow.config import ConfigError
from fuseflow.ensemble.config import EnsembleConfig, build_source, load_ensemble_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "ensemble.yaml"


def test_example_config_validates_with_every_default_written():
    cfg = load_ensemble_config(EXAMPLE)
    assert [s.name for s in cfg.sources] == ["smollm", "gemma"]
    # The example spells out every field: dumping the defaults adds nothing it does not have.
    defaults = EnsembleConfig(sources=[{"name": "x", "model": "m"}]).model_dump()
    written = cfg.model_dump()
    for section in ("decoding", "server", "eval"):
        assert written[section] == defaults[section]


def test_overrides_apply():
    cfg = load_ensemble_config(EXAMPLE, ["decoding.rerank=mean_logprob", "sources.1.engine_options.dtype=bfloat16"])
    assert cfg.decoding.rerank == "mean_logprob"
    assert cfg.sources[1].engine_options == {"head_chunk_tokens": 512, "dtype": "bfloat16"}


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["sources.0.address=localhost:1"], "sources[0]"),  # address and model both set
        (["sources.1.name=smollm"], "sources"),  # duplicate name
        (["name=gemma"], "name"),
        (["decoding.rerank=best"], "decoding.rerank"),
        (["decoding.boundary=sentence"], "decoding.boundary"),
        (["decoding.segment_max_tokens=0"], "decoding.segment_max_tokens"),
        (["server.typo=1"], "server.typo"),
    ],
)
def test_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_ensemble_config(EXAMPLE, overrides)
    assert field in str(e.value)


def test_unreachable_teacher_names_the_address_field():
    cfg = EnsembleConfig(sources=[{"name": "t", "address": "127.0.0.1:1", "connect_timeout_s": 0.3}])
    with pytest.raises(ConfigError, match=r"sources\[0\] \('t'\)\.address"):
        build_source(cfg.sources[0], 0)


def test_chat_template_override_inline_and_from_file(tiny_gemma, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    cfg = EnsembleConfig(sources=[{"name": "g", "model": str(tiny_gemma), "chat_template": template}])
    source = build_source(cfg.sources[0], 0)
    assert source.render_chat([{"role": "user", "content": "hi"}]) == "[user] hi\n"
    (tmp_path / "t.jinja").write_text("<<{{ messages[0]['content'] }}>>")
    cfg = EnsembleConfig(sources=[{"name": "g", "model": str(tiny_gemma), "chat_template": str(tmp_path / "t.jinja")}])
    assert build_source(cfg.sources[0], 0).render_chat([{"role": "user", "content": "hi"}]) == "<<hi>>"
    cfg = EnsembleConfig(sources=[{"name": "g", "model": str(tiny_gemma), "chat_template": str(tmp_path / "none")}])
    with pytest.raises(ConfigError, match=r"sources\[0\] \('g'\)\.chat_template"):
        build_source(cfg.sources[0], 0)


def test_unknown_task_and_rerank_rule_are_named_at_load():
    from pathlib import Path

    from fuseflow.config import ConfigError
    from fuseflow.ensemble.config import load_ensemble_config

    example = Path(__file__).resolve().parents[2] / "examples" / "ensemble.yaml"
    with pytest.raises(ConfigError, match=r"eval\.task: unknown task 'sums'; choose one of .*arithmetic"):
        load_ensemble_config(example, ["eval.task=sums"])
    with pytest.raises(ConfigError, match=r"decoding\.rerank: unknown rerank method 'vote'; choose one of .*mean_logprob"):
        load_ensemble_config(example, ["decoding.rerank=vote"])


def test_experts_example_evaluates_where_no_expert_trained():
    """examples/ensemble-experts.yaml: the experts bench/experts.py links, in their own domains, on the
    documents the run config they were built from holds out (which no expert reads)."""
    import sys

    from fuseflow.config import FuseConfig, load_config

    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "bench"))
    try:
        import experts
    finally:
        sys.path.remove(str(root / "bench"))
    cfg = load_ensemble_config(root / "examples" / "ensemble-experts.yaml")
    built = {e.name: e for e in experts.parse_experts(experts.DEFAULT_EXPERTS)}
    assert [s.name for s in cfg.sources] == list(built)
    assert [s.model for s in cfg.sources] == [f"runs/experts/{name}" for name in built]  # link_expert's path
    assert sorted(cfg.eval.languages) == sorted(e.domain for e in built.values())
    run = load_config(FuseConfig, root / "examples" / "quickstart.yaml", [])  # bench/experts.py's default config
    assert cfg.eval.task == "next-word" and cfg.eval.held_out_documents == run.corpus.held_out_documents
    assert cfg.eval.seed == run.corpus.seed  # the eval's seed is its corpus split's seed too
    assert cfg.eval.num_problems >= 60 and cfg.eval.split == "test"
