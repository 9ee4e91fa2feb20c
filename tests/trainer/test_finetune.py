"""`fuseflow finetune` (issue 22): the recipe with no teachers makes an expert, an HF directory, on tiny models."""

import json

import numpy as np
import pytest

# The CLM baseline of test_knowledge_fusion.py's `fuseflow fuse` run: the same target, corpus, train section and
# seed. finetune is that recipe with no teachers, so its losses are these (one recipe, no second trainer).
BASELINE_LOSSES = [6.217257022857666, 6.204608917236328, 6.188961029052734, 6.224956035614014]


def _write(tmp_path, tiny_llama, sources: str = "") -> str:
    p = tmp_path / "finetune.yaml"
    p.write_text(f"""
run_dir: {tmp_path / 'run'}
target: {{model: {tiny_llama}}}
{sources}
corpus: {{source: builtin, max_documents: 6, held_out_documents: 2}}
train: {{max_length: 48, micro_batch_size: 2, lr: 1.0e-3, max_steps: 4, checkpoint_every: 2, warmup_ratio: 0.0}}
eval: {{max_length: 48}}
""")
    return str(p)


@pytest.mark.slow
def test_finetune_writes_an_hf_model_trained_as_the_clm_baseline(tmp_path, tiny_llama, capsys):
    from transformers import AutoModelForCausalLM

    from fuseflow.cli import main

    assert main(["finetune", _write(tmp_path, tiny_llama), "--no-progress"]) == 0
    run = tmp_path / "run"
    model_dir = run / "finetuned" / "model"
    assert (model_dir / "config.json").exists() and (model_dir / "tokenizer.json").exists()
    rows = [json.loads(line) for line in (run / "finetuned" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["kl"] == 0 for r in rows)
    np.testing.assert_allclose([r["loss"] for r in rows], BASELINE_LOSSES, rtol=1e-4)
    report = json.loads((run / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["target before", "target finetuned"]
    assert report["config"]["sources"] == []
    assert "| target finetuned |" in capsys.readouterr().out
    before = AutoModelForCausalLM.from_pretrained(tiny_llama)
    after = AutoModelForCausalLM.from_pretrained(model_dir)
    assert max((a - b).abs().max().item() for a, b in zip(before.parameters(), after.parameters())) > 0


def test_finetune_takes_a_fuse_config_and_leaves_its_sources_out(tmp_path, tiny_llama, tiny_gemma, monkeypatch):
    """A fuse run config works as is (its sources are not scored); a config without sources validates."""
    from fuseflow.config import FinetuneConfig, FuseConfig, load_config
    from fuseflow.trainer import recipe

    seen = {}
    monkeypatch.setattr(recipe, "train_in_process", lambda cfg, out, *a, **k: seen.setdefault("cfg", cfg) and 1 / 0)
    path = _write(tmp_path, tiny_llama, f"sources: [{{name: gemma, model: {tiny_gemma}}}]")
    cfg = load_config(FinetuneConfig, path, ["eval.before=false"])
    with pytest.raises(ZeroDivisionError):
        recipe.finetune(cfg, progress=False)
    assert seen["cfg"].sources == [] and seen["cfg"].baseline == "none"
    assert load_config(FinetuneConfig, _write(tmp_path, tiny_llama)).sources == []
    with pytest.raises(Exception, match="sources"):  # fuse still needs its teachers
        load_config(FuseConfig, _write(tmp_path, tiny_llama))
