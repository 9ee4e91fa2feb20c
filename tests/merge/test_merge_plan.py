"""Planning and the compatibility checks: architectures, names, shapes, tied heads, vocabulary sizes."""

from __future__ import annotations

import pytest
import torch

from fuseflow.merge.plan import MergeCheckError, build_plan, inspect_model
from fuseflow.merge.safetensors_io import nbytes

from merge_helpers import toy_tensors, write_model

QWEN_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "tie_word_embeddings": False}


def test_plan_covers_every_tensor_once_from_the_right_files(tmp_path):
    base = write_model(tmp_path / "base", toy_tensors(0), shards=2)
    models = [write_model(tmp_path / f"m{j}", toy_tensors(j + 1), shards=j + 1) for j in range(2)]
    plan = build_plan(base, models)
    names = [t.name for t in plan.tasks]
    assert sorted(names) == sorted(toy_tensors(0)) and len(set(names)) == len(names)
    m1 = inspect_model(models[1])
    for task in plan.tasks:
        assert task.base.file == inspect_model(base).tensors[task.name].file
        assert task.sources[1].file == m1.tensors[task.name].file and task.sources[1].name == task.name
        assert task.rows is None and task.dtype == torch.float32
    assert plan.shard_files == ("model.safetensors",)


def test_layers_are_planned_in_numeric_order(tmp_path):
    tensors = {f"model.layers.{i}.w": torch.zeros(2) for i in (0, 1, 2, 10, 11)}
    base = write_model(tmp_path / "base", tensors)
    plan = build_plan(base, [base])
    assert [t.name for t in plan.tasks] == [f"model.layers.{i}.w" for i in (0, 1, 2, 10, 11)]


def test_shards_respect_the_size_limit(tmp_path):
    base = write_model(tmp_path / "base", toy_tensors(0, vocab=64, hidden=8))
    plan = build_plan(base, [base], shard_size=600, dtype=torch.bfloat16)
    sizes = [0] * len(plan.shard_files)
    for t in plan.tasks:
        sizes[t.shard] += nbytes(t.shape, t.dtype)
        assert t.dtype == torch.bfloat16
    # The 64x8 bf16 embedding (1024 bytes) exceeds the limit and gets a shard of its own; the rest
    # (16 + 128 + 16 bytes) fits in one.
    assert sizes == [1024, 160]
    assert plan.shard_files == ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    assert [t.shard for t in plan.tasks] == sorted(t.shard for t in plan.tasks)


def test_non_float_tensors_are_copied_from_the_base(tmp_path):
    tensors = {**toy_tensors(0), "model.rotary.inv_freq_ids": torch.arange(4)}
    base = write_model(tmp_path / "base", tensors)
    plan = build_plan(base, [write_model(tmp_path / "m", tensors)], dtype=torch.float16)
    task = next(t for t in plan.tasks if t.name == "model.rotary.inv_freq_ids")
    assert task.sources == () and task.dtype == torch.int64


def test_architecture_mismatch_names_the_model_and_field(tmp_path):
    base = write_model(tmp_path / "base", toy_tensors(0))
    other = write_model(tmp_path / "other", toy_tensors(1), config={**QWEN_CONFIG, "tie_word_embeddings": True})
    with pytest.raises(MergeCheckError, match=rf"{other}: config.json architectures \['Qwen2ForCausalLM'\] differs"):
        build_plan(base, [other])


def test_shape_mismatch_names_the_tensor(tmp_path):
    base = write_model(tmp_path / "base", toy_tensors(0))
    bad = toy_tensors(1)
    bad["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 5)
    model = write_model(tmp_path / "bad", bad)
    expected = rf"{model}: tensor model.layers.0.self_attn.q_proj.weight has shape \[4, 5\]"
    with pytest.raises(MergeCheckError, match=expected):
        build_plan(base, [model])


def test_missing_and_extra_tensors_are_listed(tmp_path):
    base = write_model(tmp_path / "base", toy_tensors(0))
    t = toy_tensors(1)
    del t["model.norm.weight"]
    t["model.extra.weight"] = torch.zeros(2)
    model = write_model(tmp_path / "m", t)
    with pytest.raises(MergeCheckError, match=r"missing: model.norm.weight; not in the base: model.extra.weight"):
        build_plan(base, [model])


def test_vocab_mismatch_is_an_error_by_default_and_merges_common_rows_on_request(tmp_path):
    base = write_model(tmp_path / "base", toy_tensors(0, vocab=16))
    small = write_model(tmp_path / "small", toy_tensors(1, vocab=12))
    big = write_model(tmp_path / "big", toy_tensors(2, vocab=20))
    expected = r"model.embed_tokens.weight has shape \[12, 4\].*vocab_mismatch: merge_common"
    with pytest.raises(MergeCheckError, match=expected):
        build_plan(base, [small, big])
    plan = build_plan(base, [small, big], vocab_mismatch="merge_common")
    emb = next(t for t in plan.tasks if t.name == "model.embed_tokens.weight")
    assert emb.rows == 12 and emb.shape == (16, 4)
    assert any("first 12 of 16 rows" in n for n in plan.notes)
    # Other tensors must still match exactly.
    bad = toy_tensors(3, vocab=12)
    bad["model.norm.weight"] = torch.zeros(5)
    with pytest.raises(MergeCheckError, match="model.norm.weight has shape"):
        build_plan(base, [write_model(tmp_path / "bad", bad)], vocab_mismatch="merge_common")


def test_tied_base_writes_no_head_even_if_a_model_stored_a_duplicate(tmp_path):
    base = write_model(tmp_path / "base", toy_tensors(0))
    with_dup = write_model(tmp_path / "dup", toy_tensors(1, head=True))  # config says tied
    plan = build_plan(base, [with_dup])
    assert plan.tie_word_embeddings and "lm_head.weight" not in {t.name for t in plan.tasks}


def test_untied_base_merges_the_head_using_a_tied_models_embedding(tmp_path):
    base = write_model(tmp_path / "base", toy_tensors(0, head=True), config=QWEN_CONFIG)
    untied = write_model(tmp_path / "untied", toy_tensors(1, head=True), config=QWEN_CONFIG)
    tied = write_model(tmp_path / "tied", toy_tensors(2), config={**QWEN_CONFIG, "tie_word_embeddings": True})
    plan = build_plan(base, [untied, tied])
    head = next(t for t in plan.tasks if t.name == "lm_head.weight")
    assert head.base.name == "lm_head.weight"
    assert [s.name for s in head.sources] == ["lm_head.weight", "model.embed_tokens.weight"]
    assert head.sources[1].file.parent == tied


def test_untied_model_cannot_merge_into_a_tied_base(tmp_path):
    base = write_model(tmp_path / "base", toy_tensors(0), config={**QWEN_CONFIG, "tie_word_embeddings": True})
    untied = write_model(tmp_path / "untied", toy_tensors(1, head=True), config=QWEN_CONFIG)
    with pytest.raises(MergeCheckError, match=rf"{untied}: has its own lm_head.weight.*use an untied base"):
        build_plan(base, [untied])


def test_directory_without_safetensors_is_explained(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(MergeCheckError, match="no .safetensors weights.*pytorch_model.bin.*safe_serialization=True"):
        inspect_model(d)
    with pytest.raises(MergeCheckError, match="no config.json"):
        inspect_model(tmp_path)
