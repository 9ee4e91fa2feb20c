"""mergekit YAML read as it is: parameter resolution (filters, gradients), slices (frankenmerges), mergekit's
defaults, errors naming the field; mergekit's own example configs (tests/merge/fixtures, on tiny models:
gradient-slerp with slices, ties, the orcamini-platy frankenmerge, and della / model_stock files of the
same shape) merged end to end and checked tensor by tensor against the methods applied by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fuseflow.cli import main as cli
from fuseflow.merge.mergekit import ConditionalParameter, MergekitConfig, evaluate_setting
from fuseflow.merge.methods import MERGE_METHODS
from fuseflow.merge.run import load_config


def main(argv):
    """``fuseflow merge ARGV``, through the one CLI wrapper."""
    return cli(["merge", *argv])


FIXTURES = Path(__file__).parent / "fixtures"


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _fixture(tmp_path: Path, name: str, models: dict[str, Path]) -> Path:
    text = (FIXTURES / name).read_text()
    for key, path in models.items():
        text = text.replace(key, str(path))
    out = tmp_path / name
    out.write_text(text)
    return out


def _lerp(values: list[float], t: float) -> float:
    """The gradient at t, written out independently of fuseflow.merge.mergekit: piecewise linear over
    evenly spaced points."""
    x = t * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    return values[i] + (x - i) * (values[i + 1] - values[i])


# ----------------------------------------------------------------------------------------------------------
# Parameter resolution.
# ----------------------------------------------------------------------------------------------------------


def test_gradients_interpolate_across_layers_and_filters_pick_by_substring():
    assert evaluate_setting("x", 0.3, 0.7) == 0.3
    assert evaluate_setting("x", [0.0, 1.0], 0.25) == pytest.approx(0.25)
    assert evaluate_setting("x", [0, 0.5, 0.3, 0.7, 1], 0.5) == pytest.approx(0.3)
    assert evaluate_setting("x", [0, 0.5, 0.3, 0.7, 1], 0.625) == pytest.approx(0.5)
    assert evaluate_setting("x", [0, 0.5, 0.3, 0.7, 1], 1.0) == pytest.approx(1.0)
    conds = [ConditionalParameter(filter="mlp", value=[1, 0]), ConditionalParameter(value=0.5)]
    assert evaluate_setting("model.layers.3.mlp.up_proj.weight", conds, 0.5) == pytest.approx(0.5)
    assert evaluate_setting("model.layers.3.mlp.up_proj.weight", conds, 0.0) == pytest.approx(1.0)
    assert evaluate_setting("model.norm.weight", conds, 0.0) == 0.5
    assert evaluate_setting("model.norm.weight", [ConditionalParameter(filter="mlp", value=1)], 0.0) is None
    assert evaluate_setting("x", [True, False], 0.9) is True  # discrete values are indexed, not interpolated


def test_config_shape_decides_the_format(tmp_path):
    mk = tmp_path / "mk.yml"
    mk.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}}]}))
    assert isinstance(load_config(mk, ["output=o"]), MergekitConfig)


@pytest.mark.parametrize(
    "doc,message",
    [
        ({"merge_method": "karcher", "models": [{"model": "a"}]}, "merge_method: 'karcher' is not supported"),
        ({"merge_method": "lineer", "models": [{"model": "a"}]}, "merge_method: 'lineer' is not a mergekit method"),
        ({"merge_method": "linear"}, "models / slices: give exactly one"),
        ({"merge_method": "linear", "models": [{"model": "a"}], "modules": {"text": {}}}, "modules: "),
        ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_source": "union"}, "tokenizer_source: "),
        ({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer": {"source": "union"}}, "tokenizer: "),
        ({"merge_method": "linear", "models": [{"model": "a"}], "dtype": "int8"}, "dtype: 'int8'"),
        ({"merge_method": "linear", "models": [{"model": "a", "extra": 1}]}, "extra"),
    ],
)
def test_unsupported_fields_are_errors_naming_the_field(tmp_path, doc, message, capsys):
    cfg = tmp_path / "mk.yml"
    cfg.write_text(yaml.safe_dump(doc))
    assert main([str(cfg), "output=o", "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_mergekit_config_needs_an_output(tmp_path, capsys):
    cfg = tmp_path / "mk.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "a"}]}))
    assert main([str(cfg), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "output: " in err and "output=DIR" in err


# ----------------------------------------------------------------------------------------------------------
# End to end on tiny 5-layer Llamas.
# ----------------------------------------------------------------------------------------------------------


def _mk(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / f"mk-{len(list(tmp_path.glob('mk-*.yml')))}.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_mergekit_defaults_apply_weight_required_and_ties_density_one(llama5, llama5_finetuned, tmp_path, capsys):
    a, b = llama5_finetuned[:2]
    doc = {"merge_method": "ties", "base_model": str(llama5), "models": [{"model": str(a)}, {"model": str(b)}]}
    assert main([str(_mk(tmp_path, doc)), f"output={tmp_path / 'o'}", "--dry-run"]) == 2
    assert "models[0].parameters.weight: required by ties" in capsys.readouterr().err
    # A top-level weight is every model's default (mergekit's parameter precedence).
    doc["parameters"] = {"weight": 1.0}
    out = tmp_path / "ties"
    assert main([str(_mk(tmp_path, doc)), f"output={out}", "--no-progress"]) == 0
    merged, base, wa, wb = _weights(out), _weights(llama5), _weights(a), _weights(b)
    for name, tensor in merged.items():
        # mergekit's ties default density is 1.0: nothing is trimmed (fuseflow's own default is 0.2).
        want = MERGE_METHODS["ties"].fn([wa[name], wb[name]], base[name], density=1.0)
        assert torch.equal(tensor, want.to(tensor.dtype)), name


def test_unknown_parameter_is_named(llama5, llama5_finetuned, tmp_path, capsys):
    doc = {
        "merge_method": "slerp", "base_model": str(llama5),
        "models": [{"model": str(llama5)}, {"model": str(llama5_finetuned[0])}],
        "parameters": {"t": 0.5, "tt": 1},
    }
    assert main([str(_mk(tmp_path, doc)), f"output={tmp_path / 'o'}", "--dry-run"]) == 2
    assert "parameters.tt: slerp takes no parameter 'tt'" in capsys.readouterr().err


def test_gradient_slerp_example_merges_unchanged(llama5, llama5_finetuned, tmp_path):
    a, b = llama5, llama5_finetuned[0]
    cfg = _fixture(tmp_path, "gradient-slerp.yml", {"MODEL_A": a, "MODEL_B": b})
    out = tmp_path / "slerp"
    assert main([str(cfg), f"output={out}", "--no-progress"]) == 0
    merged, wa, wb = _weights(out), _weights(a), _weights(b)
    assert merged.keys() == wa.keys()
    n_layers = 5
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float16
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        pos = 0.0 if layer is None else layer / (n_layers - 1)
        if "self_attn" in name:
            t = _lerp([0, 0.5, 0.3, 0.7, 1], pos)
        elif "mlp" in name:
            t = _lerp([1, 0.5, 0.7, 0.3, 0], pos)
        else:
            t = 0.5
        want = MERGE_METHODS["slerp"].fn([wb[name]], wa[name], t=t).half()
        assert torch.equal(tensor, want), (name, t)
    # The extremes of the gradient are the inputs themselves.
    q0 = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[q0].float(), wa[q0].half().float(), rtol=0, atol=1e-3)
    q4 = "model.layers.4.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[q4].float(), wb[q4].half().float(), rtol=0, atol=1e-3)


def test_passthrough_frankenmerge_stacks_layer_ranges_and_loads(llama5, llama5_finetuned, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = llama5, llama5_finetuned[1]
    cfg = _fixture(tmp_path, "frankenmerge.yml", {"MODEL_A": a, "MODEL_B": b})
    out = tmp_path / "franken"
    assert main([str(cfg), f"output={out}", "--no-progress"]) == 0
    merged, wa, wb = _weights(out), _weights(a), _weights(b)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    sources = [(wa, 0), (wa, 1), (wa, 2), (wa, 3), (wb, 3), (wb, 4)]
    for i, (w, j) in enumerate(sources):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(merged[f"model.layers.{i}.{suffix}"], w[f"model.layers.{j}.{suffix}"].half())
    assert torch.equal(merged["model.embed_tokens.weight"], wa["model.embed_tokens.weight"].half())
    assert torch.equal(merged["model.norm.weight"], wb["model.norm.weight"].half())
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert len(model.model.layers) == 6
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_ties_example_with_per_model_gradients_and_filters(llama5, llama5_finetuned, tmp_path):
    a, b, c = llama5_finetuned
    cfg = _fixture(tmp_path, "ties.yml", {"MODEL_A": a, "MODEL_B": b, "MODEL_C": c, "BASE": llama5})
    out = tmp_path / "ties"
    assert main([str(cfg), f"output={out}", "--no-progress"]) == 0
    merged, base = _weights(out), _weights(llama5)
    ws = [_weights(m) for m in (a, b, c)]
    for name, tensor in merged.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        pos = 0.0 if layer is None else layer / 4
        density = [_lerp([1, 0.7, 0.1], pos), 0.5, 0.33]
        weights = [1.0, _lerp([0, 0.3, 0.7, 1], pos), 0.5 if "mlp" in name else 0.0]
        if len(set(density)) == 1:
            density = density[0]
        want = MERGE_METHODS["ties"].fn([w[name] for w in ws], base[name], density=density, weights=weights)
        assert torch.equal(tensor, want.half()), name


def _fuseflow_merge(cfg: Path, out: Path) -> None:
    """``fuseflow merge CFG output=OUT`` through the CLI wrapper, as a user runs it."""
    from fuseflow.cli import main as fuseflow

    assert fuseflow(["merge", str(cfg), f"output={out}", "--no-progress"]) == 0


def test_della_example_shape_with_gradients_filters_and_mergekit_defaults(llama5, llama5_finetuned, tmp_path):
    from fuseflow.merge.execute import tensor_seed

    a, b, c = llama5_finetuned
    cfg = _fixture(tmp_path, "della.yml", {"MODEL_A": a, "MODEL_B": b, "MODEL_C": c, "BASE": llama5})
    out = tmp_path / "della"
    _fuseflow_merge(cfg, out)
    merged, base = _weights(out), _weights(llama5)
    ws = [_weights(m) for m in (a, b, c)]
    assert merged.keys() == base.keys()
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float16
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        pos = 0.0 if layer is None else layer / 4
        want = MERGE_METHODS["della"].fn(
            [w[name] for w in ws], base[name],
            density=[_lerp([0.7, 0.5, 0.3], pos), 0.5, 0.6],
            epsilon=[0.1, 0.15, 0.15],  # MODEL_C: mergekit's default epsilon
            weights=[1.0, 0.5 if "mlp" in name else 0.8, 0.3],
            normalize=True, consensus=True, scaling=0.9,
            rescale="l1",  # mergekit's della default rescale: true
            seed=tensor_seed(0, name),  # fuseflow's seed (0 unless seed=... is given), per tensor
        )
        assert torch.equal(tensor, want.half()), name


def test_model_stock_example_shape_merges_unchanged(llama5, llama5_finetuned, tmp_path):
    a, b, c = llama5_finetuned
    cfg = _fixture(tmp_path, "model-stock.yml", {"MODEL_A": a, "MODEL_B": b, "MODEL_C": c, "BASE": llama5})
    out = tmp_path / "model-stock"
    _fuseflow_merge(cfg, out)
    merged, base = _weights(out), _weights(llama5)
    ws = [_weights(m) for m in (a, b, c)]
    assert merged.keys() == base.keys()
    for name, tensor in merged.items():
        want = MERGE_METHODS["model_stock"].fn([w[name] for w in ws], base[name], filter_wise=False)
        assert torch.equal(tensor, want.half()), name
        # Model Stock interpolates between the base and the models' average: strictly inside for these.
        avg = sum(w[name] for w in ws) / 3
        if name.endswith("proj.weight"):
            assert (tensor.float() - base[name]).norm() < (avg - base[name]).norm(), name


@pytest.mark.parametrize(
    "fixture", ["gradient-slerp.yml", "ties.yml", "della.yml", "model-stock.yml", "frankenmerge.yml"]
)
def test_example_configs_run_through_the_fuseflow_cli(fixture, llama5, llama5_finetuned, tmp_path):
    """Each method family's example, unchanged but for model paths, through ``fuseflow merge``: a
    loadable model with every tensor finite."""
    from transformers import AutoModelForCausalLM

    a, b, c = llama5_finetuned
    text = (FIXTURES / fixture).read_text()
    models = {"MODEL_A": a, "MODEL_B": b, "MODEL_C": c, "BASE": llama5} if "BASE" in text else {"MODEL_A": llama5, "MODEL_B": a}
    cfg = _fixture(tmp_path, fixture, models)
    out = tmp_path / "out"
    _fuseflow_merge(cfg, out)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert all(torch.isfinite(t.float()).all() for t in _weights(out).values())


def test_dry_run_refuses_an_input_model_as_output(llama5, llama5_finetuned, tmp_path, capsys):
    # The same check as the real run, in both formats (issue 17).
    native = tmp_path / "native.yaml"
    native.write_text(yaml.safe_dump({
        "method": "linear", "base": str(llama5), "models": [str(m) for m in llama5_finetuned], "output": str(llama5),
    }))
    assert main([str(native), "--dry-run"]) == 2
    assert "is one of the input models" in capsys.readouterr().err
    cfg = _fixture(tmp_path, "gradient-slerp.yml", {"MODEL_A": llama5, "MODEL_B": llama5_finetuned[0]})
    assert main([str(cfg), f"output={llama5_finetuned[0]}", "--dry-run"]) == 2
    assert "is one of the input models" in capsys.readouterr().err


def test_dry_run_prints_the_plan_of_a_mergekit_config(llama5, llama5_finetuned, tmp_path, capsys):
    cfg = _fixture(tmp_path, "frankenmerge.yml", {"MODEL_A": llama5, "MODEL_B": llama5_finetuned[0]})
    assert main([str(cfg), f"output={tmp_path / 'o'}", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "mergekit passthrough as fuseflow passthrough; 6 layers" in text
    assert not (tmp_path / "o").exists()
