import pytest

from fuseflow.config import ConfigError, FuseConfig, apply_overrides, load_config

BASE = """
target: {model: some/dir}
sources:
  - {model: a}
  - {model: b, name: bee}
"""


def _write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_follow_the_paper(tmp_path):
    cfg = load_config(FuseConfig, _write(tmp_path, BASE))
    assert cfg.fusion.lam == 0.9 and cfg.fusion.function == "min_ce"
    assert cfg.train.betas == (0.9, 0.95) and cfg.train.weight_decay == 0.1 and cfg.train.grad_clip == 1.0
    assert cfg.train.warmup_ratio == 0.008 and cfg.train.epochs == 1
    assert [s.key for s in cfg.sources] == ["a", "bee"]


def test_typo_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown field"):
        load_config(FuseConfig, _write(tmp_path, BASE + "train: {lrr: 1}\n"))


def test_bad_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"fusion\.lam"):
        load_config(FuseConfig, _write(tmp_path, BASE), ["fusion.lam=1.5"])


def test_unknown_fusion_function(tmp_path):
    with pytest.raises(ConfigError, match="unknown fusion function 'max_ce'") as e:
        load_config(FuseConfig, _write(tmp_path, BASE), ["fusion.function=max_ce"])
    assert "fusion.function: unknown fusion function" in str(e.value)  # no pydantic "Value error, " prefix


def test_duplicate_source_names(tmp_path):
    with pytest.raises(ConfigError, match="repeated"):
        load_config(FuseConfig, _write(tmp_path, "target: {model: x}\nsources: [{model: a}, {model: a}]\n"))


def test_overrides_parse_yaml_values_and_index_lists():
    data = apply_overrides({"sources": [{"model": "a"}]}, ["train.lr=3e-5", "sources.0.model=z", "baseline=none"])
    assert data == {"sources": [{"model": "z"}], "train": {"lr": 3e-5}, "baseline": "none"}
    assert apply_overrides({"models": ["a", "b"]}, ["models.-1=c"]) == {"models": ["a", "c"]}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["=3"])


@pytest.mark.parametrize(
    "override,message",
    [
        ("sources.1.model=z", "sources has 1 items; '1' is not an index"),
        ("sources.x.model=z", "sources has 1 items; 'x' is not an index"),
        ("sources.-2=z", "sources has 1 items; '-2' is not an index"),
        ("sources.0.model.x=1", "sources.0.model is not a section"),
    ],
)
def test_overrides_that_miss_the_structure_are_config_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        apply_overrides({"sources": [{"model": "a"}]}, [override])
    assert str(e.value) == f"override {override!r}: {message}"


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(FuseConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(FuseConfig, _write(tmp_path, "a: [1,"))


def test_engine_options_are_typed_at_load(tmp_path):
    """A typo or a wrong type in a source's engine_options fails at config load, naming the field (issue 13)."""
    bad = BASE + "  - {model: c, engine_options: {pakc: false, head_method: fast}}\n"
    with pytest.raises(ConfigError) as e:
        load_config(FuseConfig, _write(tmp_path, bad))
    assert "sources[2].engine_options.pakc: unknown field (typo?)" in str(e.value)
    assert "sources[2].engine_options.head_method: Input should be 'auto'" in str(e.value)
    with pytest.raises(ConfigError, match=r"sources\[0\]\.engine_options\.tensor_parallel_size"):
        load_config(FuseConfig, _write(tmp_path, BASE), ["sources.0.engine=vllm",
                                                         "sources.0.engine_options={tensor_parallel_size: 0}"])
    cfg = load_config(FuseConfig, _write(tmp_path, BASE), ["sources.1.engine_options={pack: 'false', compile: 1}"])
    assert cfg.sources[1].engine_options == {"pack": False, "compile": True}  # coerced, only what was set
    kw = cfg.sources[1].engine_kwargs("cpu")
    assert kw["pack"] is False and kw["name"] == "bee" and kw["device"] == "cpu"
