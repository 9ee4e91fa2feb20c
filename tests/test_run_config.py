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


def test_the_text_criterion_needs_a_per_sample_fusion(tmp_path):
    cfg = load_config(FuseConfig, _write(tmp_path, BASE), ["fusion.criterion=text", "fusion.kl=tail"])
    assert cfg.fusion.criterion == "text" and cfg.fusion.kl == "tail"
    with pytest.raises(ConfigError, match=r"fusion: .*criterion 'text'.*min_ce_token"):
        load_config(FuseConfig, _write(tmp_path, BASE), ["fusion.criterion=text", "fusion.function=min_ce_token"])
    with pytest.raises(ConfigError, match=r"fusion\.kl"):
        load_config(FuseConfig, _write(tmp_path, BASE), ["fusion.kl=full"])


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


# ----------------------------------------------------------------------------------------------------------
# Serving and online flags are config sections (issue 13): YAML, flags and key=value overrides set the same
# fields, through the same loader.
# ----------------------------------------------------------------------------------------------------------


def _command_config(words: str, argv: list[str]):
    """``fuseflow <words> <argv>`` parsed by the real CLI, its run config loaded as the command loads it."""
    from fuseflow.cli import build_parser, commands
    from fuseflow.config import flag_values

    args = build_parser(commands()[tuple(words.split())]).parse_intermixed_args(argv)
    return load_config(FuseConfig, args.config, args.overrides, flag_values(args))


def test_train_flags_are_aliases_of_the_online_section(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSEFLOW_RUN", raising=False)
    path = str(_write(tmp_path, BASE + "online: {window: 300, metrics_port: 9500}\n"))
    from_yaml = _command_config("train", [path])
    assert (from_yaml.online.window, from_yaml.online.metrics_port, from_yaml.online.redis) == (300, 9500, None)
    url = "redis://:pw@localhost:6379/0"
    by_flags = _command_config("train", [path, "--redis", url, "--run", "007", "--window", "512", "--metrics-port", "0"])
    by_overrides = _command_config("train", [path, f"online.redis={url}", "online.run='007'", "online.window=512",
                                             "online.metrics_port=0"])
    assert by_flags == by_overrides
    assert by_flags.online.window == 512 and by_flags.online.metrics_port == 0 and by_flags.online.run == "007"
    assert by_flags.run_name() == "007"  # a flag's value is taken as given: "007" stays a string
    assert _command_config("train", [path, "--window", "64", "online.window=128"]).online.window == 128


def test_serve_flags_are_aliases_of_the_serve_section(tmp_path):
    path = str(_write(tmp_path, BASE + "serve: {max_texts: 8, port: 7000}\n"))
    from_yaml = _command_config("teacher serve", ["--config", path, "--source", "a"])
    assert (from_yaml.serve.max_texts, from_yaml.serve.port, from_yaml.serve.max_tokens) == (8, 7000, 16384)
    by_flags = _command_config("teacher serve", ["--config", path, "--max-texts", "16", "--port", "0",
                                                 "--max-wait-ms", "2.5", "--max-deliveries", "3", "--tls-cert", "c.pem",
                                                 "--tls-key", "k.pem"])
    by_overrides = _command_config("teacher serve", ["--config", path, "serve.max_texts=16", "serve.port=0",
                                                     "serve.max_wait_ms=2.5", "online.max_deliveries=3",
                                                     "serve.tls_cert=c.pem", "serve.tls_key=k.pem"])
    assert by_flags == by_overrides
    assert by_flags.serve.max_texts == 16 and by_flags.serve.max_wait_ms == 2.5 and by_flags.online.max_deliveries == 3


@pytest.mark.parametrize(
    "words, argv, message",
    [
        ("teacher serve", ["--port", "http"], r"serve\.port \(--port\): Input should be a valid integer"),
        ("teacher serve", ["serve.max_tokens=0"], r"serve\.max_tokens: Input should be greater than 0"),
        ("teacher serve", ["--max-deliveries", "0"], r"online\.max_deliveries \(--max-deliveries\): .*greater than or equal to 1"),
        ("teacher serve", ["--tls-cert", "c.pem"], r"TLS needs both serve\.tls_cert and serve\.tls_key"),
        ("teacher serve", ["serve.max_text=9"], r"serve\.max_text: unknown field"),
        ("train", ["--window", "0"], r"online\.window \(--window\): Input should be greater than 0"),
        ("train", ["online.metrics_port=70000"], r"online\.metrics_port: Input should be less than or equal to 65535"),
    ],
)
def test_serving_and_online_errors_name_the_field(tmp_path, words, argv, message):
    from fuseflow.cli import build_parser, commands
    from fuseflow.config import flag_values

    path = str(_write(tmp_path, BASE))
    args = build_parser(commands()[tuple(words.split())]).parse_intermixed_args(
        [path, *argv] if words == "train" else ["--config", path, *argv])
    with pytest.raises(ConfigError, match=message):
        load_config(FuseConfig, args.config, args.overrides, flag_values(args))


def test_gateway_flags_are_aliases_of_the_server_section():
    from pathlib import Path

    from fuseflow.cli import build_parser, commands
    from fuseflow.config import flag_values
    from fuseflow.ensemble.config import EnsembleConfig

    example = str(Path(__file__).resolve().parents[1] / "examples" / "ensemble.yaml")
    parser = build_parser(commands()[("serve-ensemble",)])

    def load(*argv):
        args = parser.parse_intermixed_args([example, *argv])
        return load_config(EnsembleConfig, args.config, args.overrides, flag_values(args))

    assert load("--port", "8001", "--max-n", "2") == load("server.port=8001", "server.max_n=2")
    assert load("--port", "8001").server.port == 8001
    with pytest.raises(ConfigError, match=r"server\.max_concurrent \(--max-concurrent\): Input should be greater"):
        load("--max-concurrent", "0")


def test_alignment_defaults_and_the_scored_candidates_bound(tmp_path):
    """Issue 21's defaults (bench/align.py), and align.score_top_k below fusion.top_k named as an error."""
    cfg = load_config(FuseConfig, _write(tmp_path, BASE))
    assert (cfg.align.vocab_map, cfg.align.chain_rule, cfg.align.score_top_k) == ("first-token", True, 64)
    with pytest.raises(ConfigError, match=r"align\.score_top_k \(8\) must be at least fusion\.top_k \(10\)"):
        load_config(FuseConfig, _write(tmp_path, BASE), ["align.score_top_k=8"])


def test_the_held_out_split_follows_the_seed_unless_pinned(tmp_path):
    """Issue 25: the run's seed drives every random choice, the held-out split too; corpus.seed pins the split."""
    from fuseflow.config import dump_config

    path = _write(tmp_path, BASE)
    assert load_config(FuseConfig, path).corpus.seed == 0
    assert load_config(FuseConfig, path, ["seed=7"]).corpus.seed == 7
    assert load_config(FuseConfig, path, ["seed=7", "corpus.seed=3"]).corpus.seed == 3
    # run_dir/config.yaml re-validates to the same split
    dumped = _write(tmp_path, dump_config(load_config(FuseConfig, path, ["seed=7"])))
    assert load_config(FuseConfig, dumped).corpus.seed == 7
