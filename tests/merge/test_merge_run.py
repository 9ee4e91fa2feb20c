"""``fuseflow merge``: config loading and errors, and end-to-end merges of tiny models that must load and
generate with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from merge_helpers import perturbed_copy, toy_tensors, write_model
from safetensors.torch import load_file

from fuseflow.cli import main as cli
from fuseflow.config import ConfigError
from fuseflow.merge.config import MergeConfig, method_parameters, parse_size
from fuseflow.merge.execute import tensor_seed
from fuseflow.merge.methods import MERGE_METHODS
from fuseflow.merge.run import load_config


def main(argv):
    """``fuseflow merge ARGV``, through the one CLI wrapper."""
    return cli(["merge", *argv])


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "merge.yaml"


def _config(tmp_path: Path, **fields) -> Path:
    path = tmp_path / f"merge-{len(list(tmp_path.glob('merge-*.yaml')))}.yaml"
    def plain(v):
        return str(v) if isinstance(v, Path) else [plain(x) for x in v] if isinstance(v, list) else v

    path.write_text(yaml.safe_dump({k: plain(v) for k, v in fields.items()}))
    return path


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# ----------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------


def test_example_config_documents_every_field_and_default():
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert set(raw) == set(MergeConfig.model_fields)
    cfg = load_config(EXAMPLE)
    for name, field in MergeConfig.model_fields.items():
        if not field.is_required() and name != "parameters":
            assert getattr(cfg, name) == field.default, name
    text = EXAMPLE.read_text()
    for name, method in MERGE_METHODS.items():
        assert f"{name}:" in text, name
        for param, (_, default) in method_parameters(method).items():
            shown = "(required)" if default is ... else "null" if default is None else str(default).lower()
            assert f"{param}: {shown}" in text, (name, param)


def test_overrides_set_nested_fields_and_list_items_with_yaml_values(tmp_path):
    path = _config(tmp_path, method="sce", base="b", models=["m1", "m2"], output="o", dtype="float32")
    overrides = ["parameters.select_topk=0.1", "dtype=bfloat16", "models.1=m3", "overwrite=true", "shard_size=40KB"]
    cfg = load_config(path, overrides)
    assert cfg.parameters == {"select_topk": 0.1, "uniform_below": 0.0}
    assert (cfg.dtype, cfg.models, cfg.overwrite, cfg.shard_size) == ("bfloat16", ["m1", "m3"], True, 40_000)
    with pytest.raises(ConfigError, match="'select_topk' is not of the form key=value"):
        load_config(path, ["select_topk"])
    with pytest.raises(ConfigError, match="'dtype.x=1': dtype is not a section"):
        load_config(path, ["dtype.x=1"])
    with pytest.raises(ConfigError, match="'models.2=m4': models has 2 items; '2' is not an index"):
        load_config(path, ["models.2=m4"])
    with pytest.raises(ConfigError, match=r"modles: unknown field \(typo\?\)"):
        load_config(path, ["modles=[a]"])


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"models": []}, "models: List should have at least 1 item"),
        ({"modles": ["a"]}, "modles: unknown field (typo?)"),
        ({"method": "karcher"}, "method: unknown merge method 'karcher'; choose one of breadcrumbs, dare, della, linear"),
        ({"dtype": "fp8"}, "dtype: Input should be 'float32'"),
        ({"shard_size": "lots"}, "shard_size: expected a size such as 5GB"),
        ({"shard_size": 0}, "shard_size: Input should be greater than 0"),
        ({"parameters": {"select_topk": 0}}, "parameters.select_topk: Input should be greater than 0"),
        (
            {"parameters": {"density": 0.5}},
            "parameters.density: unknown field (typo?) (method 'sce' takes: select_topk, uniform_below)",
        ),
        ({"method": "ties", "parameters": {"weights": [1, 2, 3]}}, "parameters.weights: 3 values for 2 models"),
        ({"method": "dare", "parameters": {"consensus": "maybe"}}, "parameters.consensus: Input should be a valid bool"),
    ],
)
def test_config_errors_name_the_field(tmp_path, fields, message):
    base = {"method": "sce", "base": "b", "models": ["m1", "m2"], "output": "o"}
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, **{**base, **fields}))
    assert message in str(e.value)


def test_parse_size_units():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("1.5MB") == 1_500_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234
    with pytest.raises(ValueError):
        parse_size("5 parsecs")


def test_parameters_get_their_defaults():
    cfg = MergeConfig(method="dare", base="b", models=["m"], output="o")
    assert cfg.parameters == {
        "density": 0.5, "weights": None, "normalize": False, "consensus": False, "rescale": "probability",
        "scaling": 1.0, "seed": 0,
    }


# ----------------------------------------------------------------------------------------------------------
# End to end on tiny models.
# ----------------------------------------------------------------------------------------------------------


def _generate(model_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok("def merge(models):", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
        out = model.generate(**ids, max_new_tokens=6, do_sample=False)
    return logits, out


METHOD_PARAMS = {
    "linear": {},
    "task_arithmetic": {"weights": [0.3, 0.3, 0.4]},
    "ties": {"density": 0.5},
    "dare": {"density": 0.7, "seed": 3},
    "varm": {},
    "sce": {"select_topk": 0.1},
}


@pytest.mark.parametrize("method", sorted(METHOD_PARAMS))
def test_merged_model_equals_the_method_applied_per_tensor_and_generates(method, tiny_llama, finetuned_llamas, tmp_path):
    out = tmp_path / "merged"
    cfg = _config(
        tmp_path, method=method, base=tiny_llama, models=finetuned_llamas, output=out, parameters=METHOD_PARAMS[method]
    )
    assert main([str(cfg), "--no-progress"]) == 0

    merged, base = _weights(out), _weights(tiny_llama)
    inputs = [_weights(m) for m in finetuned_llamas]
    params = MergeConfig.model_validate(yaml.safe_load(cfg.read_text())).parameters
    assert merged.keys() == base.keys()
    for name, tensor in merged.items():
        kwargs = dict(params)
        if MERGE_METHODS[method].seeded:
            kwargs["seed"] = tensor_seed(params["seed"], name)
        want = MERGE_METHODS[method].fn([w[name] for w in inputs], base[name], **kwargs)
        assert torch.equal(tensor, want), name
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])

    logits, generated = _generate(out)
    assert torch.isfinite(logits).all() and generated.shape[1] > 0
    assert (out / "tokenizer.json").exists() and (out / "fuseflow_merge.yaml").exists()
    assert yaml.safe_load((out / "fuseflow_merge.yaml").read_text())["method"] == method


def test_merging_copies_of_the_base_reproduces_its_logits(tiny_llama, tmp_path):
    out = tmp_path / "same"
    cfg = _config(tmp_path, method="linear", base=tiny_llama, models=[tiny_llama, tiny_llama], output=out)
    assert main([str(cfg), "--no-progress"]) == 0
    torch.testing.assert_close(_generate(out)[0], _generate(tiny_llama)[0])


def test_sharded_bf16_output_has_an_index_and_loads(tiny_llama, finetuned_llamas, tmp_path):
    out = tmp_path / "sharded"
    cfg = _config(
        tmp_path, method="varm", base=tiny_llama, models=finetuned_llamas[:2], output=out, dtype="bfloat16",
        shard_size="40KB",
    )
    assert main([str(cfg), "--no-progress"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    weights = _weights(out)
    assert set(index["weight_map"]) == set(weights)
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in weights.values())
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    assert all(s.stat().st_size <= 40_000 + 4096 or len(load_file(s)) == 1 for s in shards)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    logits, _ = _generate(out)
    assert torch.isfinite(logits).all()


def test_untied_model_merges_its_head(tiny_qwen, tmp_path):
    models = [perturbed_copy(tiny_qwen, tmp_path / f"q{j}", seed=j, scale=0.02) for j in range(2)]
    out = tmp_path / "qwen"
    assert main([str(_config(tmp_path, method="sce", base=tiny_qwen, models=models, output=out)), "--no-progress"]) == 0
    merged, base = _weights(out), _weights(tiny_qwen)
    assert "lm_head.weight" in merged and not torch.equal(merged["lm_head.weight"], base["lm_head.weight"])
    assert torch.isfinite(_generate(out)[0]).all()


def test_merge_common_rows_keeps_the_base_vocabulary(tmp_path):
    base = write_model(tmp_path / "base", toy_tensors(0, vocab=16))
    small = write_model(tmp_path / "small", toy_tensors(1, vocab=12))
    same = write_model(tmp_path / "same", toy_tensors(2, vocab=16))
    out = tmp_path / "out"
    cfg = _config(tmp_path, method="linear", base=base, models=[small, same], output=out, vocab_mismatch="merge_common")
    assert main([str(cfg), "--no-progress"]) == 0
    emb = _weights(out)["model.embed_tokens.weight"]
    e_base, e_small, e_same = (_weights(d)["model.embed_tokens.weight"] for d in (base, small, same))
    assert emb.shape == (16, 4)
    torch.testing.assert_close(emb[:12], (e_small + e_same[:12]) / 2)
    assert torch.equal(emb[12:], e_base[12:])


def test_dare_merges_are_reproducible_and_masks_differ_per_tensor(tiny_llama, finetuned_llamas, tmp_path):
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"dare{i}")
        cfg = _config(
            tmp_path, method="dare", base=tiny_llama, models=finetuned_llamas[:1], output=outs[-1],
            parameters={"density": 0.5},
        )
        assert main([str(cfg), "--no-progress"]) == 0
    a, b = _weights(outs[0]), _weights(outs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = _weights(tiny_llama)
    kept_q = a["model.layers.0.self_attn.q_proj.weight"] != base["model.layers.0.self_attn.q_proj.weight"]
    kept_o = a["model.layers.0.self_attn.o_proj.weight"] != base["model.layers.0.self_attn.o_proj.weight"]
    assert not torch.equal(kept_q, kept_o)  # same shape, different per-tensor seeds


def test_shape_mismatch_is_reported_with_the_tensor_name(tiny_llama, tmp_path, capsys):
    bad = perturbed_copy(tiny_llama, tmp_path / "bad", seed=0, scale=0.01)
    w = load_file(bad / "model.safetensors")
    w["model.layers.1.mlp.down_proj.weight"] = w["model.layers.1.mlp.down_proj.weight"][:, :-1].contiguous()
    from safetensors.torch import save_file

    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    cfg = _config(tmp_path, method="sce", base=tiny_llama, models=[bad], output=tmp_path / "o")
    assert main([str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: tensor model.layers.1.mlp.down_proj.weight has shape [32, 63]" in err
    assert not (tmp_path / "o").exists()


def test_architecture_mismatch_is_reported_with_the_model_dir(tiny_llama, tiny_gemma, tmp_path, capsys):
    cfg = _config(tmp_path, method="varm", base=tiny_llama, models=[tiny_gemma], output=tmp_path / "o")
    assert main([str(cfg), "--no-progress", "--dry-run"]) == 2
    assert f"{tiny_gemma}: config.json architectures ['Gemma3ForCausalLM'] differs" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tiny_llama, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    cfg = _config(tmp_path, method="linear", base=tiny_llama, models=[tiny_llama], output=out)
    assert main([str(cfg), "--no-progress"]) == 2
    assert "output: " in capsys.readouterr().err
    assert main([str(cfg), "--no-progress", "overwrite=true"]) == 2  # not a model directory: never replaced
    assert (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()
    assert main([str(cfg), "--no-progress"]) == 0  # empty directory: fine
    assert main([str(cfg), "--no-progress", "overwrite=true"]) == 0
    assert (out / "config.json").exists() and not list(tmp_path.glob(".o.*"))


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_llama, finetuned_llamas, tmp_path, capsys):
    cfg = _config(tmp_path, method="sce", base=tiny_llama, models=finetuned_llamas, output=tmp_path / "o")
    assert main([str(cfg), "--dry-run"]) == 0
    assert "3 models: 20 tensors" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()


def test_help_lists_methods(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert all(name in text for name in MERGE_METHODS) and "select_topk=1.0" in text
