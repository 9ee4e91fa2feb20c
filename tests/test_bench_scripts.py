"""Smoke tests of the GPU-performance benchmarks at the tiny shape on CPU: they run, write the JSON they
promise, and their helpers follow the conventions they state. Speed is never asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    """Import ``bench/<name>.py`` under a unique module name (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"fuseflow_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_bench():
    return _load("train")


@pytest.fixture(scope="module")
def score_bench():
    return _load("score")


@pytest.fixture(scope="module")
def common(train_bench):
    return sys.modules["common"]  # bench/common.py, imported by the scripts


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_train_script_writes_every_mode(train_bench, tmp_path):
    out = tmp_path / "train.json"
    args = ["--shape", "tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "32", "--warmup", "1",
            "--steps", "1", "--activation-checkpointing", "--out", str(out)]
    assert train_bench.main(args) == 0
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"clm", "fusion"}
    assert result["tokens_per_step"] == 2 * 32
    assert _positive(result["matmul_peak_flops"]) and _positive(result["params_n"])
    for mode, row in result["modes"].items():
        for key in ("step_s", "tokens_per_s", "mfu", "mfu_issue_convention", "mfu_with_recompute",
                    "peak_memory_bytes", "loss_last"):
            assert _positive(row[key]), (mode, key, row[key])
        assert row["tokens_per_s"] == pytest.approx(64 / row["step_s"], rel=1e-3, abs=0.05)  # written to 0.1
    assert math.isfinite(result["modes"]["fusion"]["overhead_vs_clm"])
    assert result["environment"]["torch"] == torch.__version__


def test_score_script_shape_mode(score_bench, tmp_path):
    out = tmp_path / "score.json"
    args = ["--shape", "tiny", "--device", "cpu", "--seq-len", "32", "--batch-tokens", "64", "--max-tokens", "128",
            "--repeats", "1", "--pack", "--out", str(out)]
    assert score_bench.main(args) == 0
    result = json.loads(out.read_text())
    # 4 sequences × 32 scored positions, no padding (equal lengths)
    assert result["tokens"] == result["predicted_tokens"] == result["forward_tokens"] == 128
    for contender in ("engine", "trunk", "dense"):
        for key in ("s", "tok_s", "mfu", "mfu_issue_convention", "peak_memory_bytes"):
            assert _positive(result[f"{contender}_{key}"]), (contender, key)
    assert _positive(result["engine_over_trunk"])
    assert "environment" in result


def test_score_script_model_mode_keeps_its_keys(score_bench, tmp_path):
    out = tmp_path / "score.json"
    args = ["--model", "tiny", "--seq-len", "48", "--max-tokens", "192", "--repeats", "1", "--no-dense",
            "--out", str(out)]
    assert score_bench.main(args) == 0
    result = json.loads(out.read_text())
    for key in ("engine_s", "engine_tok_s", "engine_cpu_s", "engine_tok_per_cpu_s", "trunk_tok_s", "load_s"):
        assert _positive(result[key]), key
    assert "dense_s" not in result


def test_random_teacher_rows_follow_the_aligned_dist_convention(train_bench):
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 1000, (3, 50), generator=gen)  # [B, T]
    rows = train_bench.random_teacher_rows(labels, n_teachers=2, k=10, vocab=1000, generator=gen)
    ids, lp, gold, aligned = (rows[k] for k in ("teacher_ids", "teacher_logprobs", "teacher_gold", "teacher_aligned"))
    assert ids.shape == lp.shape == (2, 3, 50, 10) and gold.shape == aligned.shape == (2, 3, 50)
    assert 0 < aligned.float().mean() < 1
    al = lp[aligned]  # [n, k]: finite, descending, top-k mass in (0, 1]
    assert torch.isfinite(al).all() and (al[:, :-1] >= al[:, 1:]).all()
    mass = al.exp().sum(-1)
    assert (mass > 0.5).all() and (mass <= 1 + 1e-5).all()
    # Unaligned: the one-hot gold fallback, gold logprob 0.
    gold_ids = labels.expand(2, 3, 50)
    assert (ids[~aligned][:, 0] == gold_ids[~aligned]).all() and (lp[~aligned][:, 0] == 0).all()
    assert torch.isinf(lp[~aligned][:, 1:]).all() and (gold[~aligned] == 0).all()
    # Aligned: the gold logprob is the top entry when the gold id is there, below the row otherwise.
    hit = aligned & (ids[..., 0] == gold_ids)
    assert torch.equal(gold[hit], lp[..., 0][hit])
    miss = aligned & (ids[..., 0] != gold_ids)
    assert (gold[miss] < lp[..., -1][miss]).all()


def test_param_counts_of_the_real_shapes(common):
    """Llama-3.2-1B has 1,235,814,400 parameters (tied head), Llama-2-7B 6,738,415,616 (untied)."""
    one_b = common.param_counts(common.make_shape_model("llama-3.2-1b", torch.bfloat16, "meta"))
    assert one_b.tied and one_b.total == 1_235_814_400 and one_b.n == one_b.total
    assert one_b.trunk == one_b.total - 128256 * 2048
    seven_b = common.param_counts(common.make_shape_model("llama-2-7b", torch.bfloat16, "meta"))
    assert not seven_b.tied and seven_b.total == 6_738_415_616
    assert seven_b.n == seven_b.total - 32000 * 4096 and seven_b.n_issue == seven_b.total


def test_attention_flops_is_causal_half_of_full(common):
    model = common.make_shape_model("tiny", torch.float32, "meta")
    cfg = model.config
    full = 4 * cfg.num_hidden_layers * cfg.hidden_size * 100**2  # QKᵀ + AV over every (query, key) pair
    assert common.attention_flops(cfg, [100]) == full / 2


def test_bench_objective_matches_the_trainers(train_bench, common):
    """The bench rebuilds FusionObjective.forward (the trainer module imports pydantic/DeepSpeed): same loss."""
    from fuseflow.config import FusionConfig
    from fuseflow.trainer.batches import FusionBatch
    from fuseflow.trainer.loop import FusionObjective

    model = common.make_shape_model("tiny", torch.float32, "cpu")
    gen = torch.Generator().manual_seed(1)
    batch = train_bench.random_batch(2, 24, model.config.vocab_size, gen, "cpu")
    rows = train_bench.random_teacher_rows(batch["labels"], 2, 10, model.config.vocab_size, gen)
    ours = train_bench.BenchObjective(model, "avg_ce", 10, 16, None, False)
    theirs = FusionObjective(model, FusionConfig(function="avg_ce", top_k=10, lam=0.9), 16, zero_stage=0)
    fb = FusionBatch(sample_ids=["a", "b"], teachers=["t0", "t1"], **batch, **rows)
    for teachers in (True, False):
        b = {**batch, **rows} if teachers else batch
        if not teachers:
            fb.teacher_ids = fb.teacher_logprobs = fb.teacher_gold = fb.teacher_aligned = None
        with torch.no_grad():
            got, got_ce = ours(b, 0.9)
            want, want_ce = theirs(fb)
        for key in ("loss", "clm", "kl"):
            torch.testing.assert_close(getattr(got, key), getattr(want, key), rtol=0, atol=0)
        assert (got_ce is None) == (want_ce is None)


def test_quality_script_trains_every_arm_on_the_same_samples(tmp_path, tiny_llama, tiny_gemma, monkeypatch):
    quality = _load("quality")
    for name, words in (("en", "The quick brown fox jumps over the lazy dog."), ("de", "Der schnelle braune Fuchs springt.")):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(12):
            (folder / f"{i:02d}.txt").write_text(f"{words} Nummer {i}.\n\n" + f"{words} " * (8 + i))
    run = tmp_path / "run.yaml"
    run.write_text(f"""
target: {{model: {tiny_llama}}}
sources:
  - {{name: gemma, model: {tiny_gemma}}}
  - {{name: self, model: {tiny_llama}}}
corpus:
  sources: [{{name: en, source: {tmp_path / 'en'}}}, {{name: de, source: {tmp_path / 'de'}, weight: 2}}]
  held_out_documents: 2
fusion: {{top_k: 4, lam: 0.5}}
train: {{max_length: 32, micro_batch_size: 2, lr: 1.0e-3, warmup_ratio: 0.0}}
eval: {{max_length: 32}}
""")
    out, png = tmp_path / "quality.json", tmp_path / "quality.png"
    base = ["--config", str(run), "--size", "tiny", "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert quality.main(base + ["--arms", "clm,distil:gemma,fuse:min_ce,fuse:avg_ce", "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    assert set(result["corpora"]) == {"en", "de"} and sum(result["train_mix"].values()) == 4 * 2
    assert result["train_mix"]["de"] > result["train_mix"]["en"]  # weight 2 : 1
    assert set(result["sources"]) == {"source gemma", "target (start)"}
    assert list(result["arms"]) == ["clm", "distil:gemma", "fuse:min_ce", "fuse:avg_ce"]
    for name, arm in result["arms"].items():
        assert [p["step"] for p in arm["curve"]] == [1, 2, 4]
        assert [p["tokens"] for p in arm["curve"]] == [p["tokens"] for p in result["arms"]["clm"]["curve"]]
        for p in arm["curve"]:
            assert set(p["per_corpus"]) == {"en", "de"} and math.isfinite(p["bpb"])
            d = p["vs_clm"]["overall"]
            assert d["low"] <= d["value"] <= d["high"]
            if name == "clm":
                assert d["value"] == 0.0
        assert (arm["kind"] == "clm") == all(r["kl"] == 0 for r in arm["loss"])
    assert png.stat().st_size > 1000
    # the teachers' scores are cached: a second run on the same samples scores nothing
    assert len(list((tmp_path / "cache").glob("*.pkl"))) == 2

    def no_scoring(*args, **kwargs):
        raise AssertionError("a cached sample was scored again")

    monkeypatch.setattr("fuseflow.score.engine.engine_from_source", no_scoring)
    # ... and an arm with other alignment settings aligns the cached scores afresh (issue 21).
    arms = "clm,fuse:min_ce@fusion.lam=0.2,distil:gemma@align.vocab_map=mined@align.chain_rule=false"
    ref = "distil:gemma@align.vocab_map=mined@align.chain_rule=false"
    assert quality.main(base + ["--arms", arms, "--no-sources", "--plot", "", "--vs", ref]) == 0
    result = json.loads(out.read_text())
    for name, a in result["arms"].items():  # compared with the other arm too, paired, at every budget
        for p in a["curve"]:
            d = p["vs"][ref]["overall"]
            assert d["low"] <= d["value"] <= d["high"] and (d["value"] == 0.0) == (name == ref)
    assert quality.main(["--report", str(out), "--vs", "fuse:min_ce@fusion.lam=0.2"]) == 0  # no training
    arm = result["arms"]["fuse:min_ce@fusion.lam=0.2"]
    assert arm["lam"] == 0.2 and arm["function"] == "min_ce" and arm["teachers"] == ["gemma", "self"]
    assert arm["align"]["chain_rule"] is True and set(arm["teacher_stats"]) == {"gemma", "self"}
    mined = result["arms"]["distil:gemma@align.vocab_map=mined@align.chain_rule=false"]
    assert mined["align"] == {**arm["align"], "vocab_map": "mined", "chain_rule": False}
    # the same target positions, aligned another way: the rows differ (the chain rule can only add rows)
    old, new = mined["teacher_stats"]["gemma"], arm["teacher_stats"]["gemma"]
    assert old["positions"] == new["positions"] and old["coverage"] <= new["coverage"]
    assert (old["miss_rate"], old["p_gold"]) != (new["miss_rate"], new["p_gold"])


def test_align_script_reports_fidelity_and_cost_on_tiny_models(tmp_path):
    """bench/align.py --tiny: every map with and without the chain rule, the target's own rows, the cost rows."""
    out = tmp_path / "align.json"
    assert _load("align").main(["--tiny", "--documents", "4", "--stats-docs", "8", "--doc-chars", "600",
                                "--dtw-tokens", "40", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["rows"]: r for r in result["fidelity"]}
    assert rows["the target's own"]["all"]["coverage"] == 1.0
    for method in ("exact", "mined", "first-token", "stats"):
        plain, chained = rows[f"teacher via {method}"], rows[f"teacher via {method} + chain rule"]
        assert 0 < plain["all"]["coverage"] <= chained["all"]["coverage"] <= 1
        assert plain["linked"] == chained["linked"]  # the chain rule leaves the linked positions as they were
    assert all(_positive(r["tokens_per_s"]) for r in result["cost"])
    assert result["dtw"]["tokens"] == [40, 40]


@pytest.mark.slow
def test_experts_script_builds_experts_once_and_compares_every_method(tmp_path, tiny_llama, tiny_gemma, capsys):
    """bench/experts.py (issue 22) on tiny models: each expert is made by `fuseflow finetune` from its own corpus
    (never from an evaluation split) and cached; the arms, FuseChat's pairs and their merges are evaluated alike."""
    experts = _load("experts")
    for name, words in (("en", "The quick brown fox jumps over the lazy dog."), ("de", "Der schnelle braune Fuchs springt.")):
        folder = tmp_path / name
        folder.mkdir()
        for i in range(110):  # the experts never train on the dev documents of any size (100 at most)
            (folder / f"{i:03d}.txt").write_text(f"{words} Nummer {i}.\n\n" + f"{words} " * (8 + i % 10))
    run = tmp_path / "run.yaml"
    run.write_text(f"""
target: {{model: {tiny_llama}}}
sources: [{{name: unused, model: {tiny_llama}}}]
corpus:
  sources: [{{name: en, source: {tmp_path / 'en'}}}, {{name: de, source: {tmp_path / 'de'}}}]
  held_out_documents: 2
fusion: {{top_k: 4, lam: 0.9}}
train: {{max_length: 32, micro_batch_size: 2, lr: 1.0e-3, warmup_ratio: 0.0}}
eval: {{max_length: 32}}
""")
    out = tmp_path / "experts.json"
    spec = f"g-de={tiny_gemma}:de:2:1e-3,l-en={tiny_llama}:en:3:1e-3"
    base = ["--config", str(run), "--size", "tiny", "--experts", spec, "--experts-cache", str(tmp_path / "experts"),
            "--cache", str(tmp_path / "cache"), "--out", str(out), "--split", "dev"]
    assert experts.main(base + ["--merges", "linear,varm", "--plot", str(tmp_path / "experts.png")]) == 0
    result = json.loads(out.read_text())
    built = result["experts"]
    assert {e["name"]: e["cached"] for e in built.values()} == {"g-de": False, "l-en": False}
    evaluated = _eval_texts(experts, run)
    for e in built.values():
        home = Path(e["model_dir"]).parents[2]
        trained = {json.loads(line)["text"] for line in (home / "corpus.jsonl").read_text().splitlines()}
        assert len(trained) == 110 - 2 - 100 and not trained & evaluated
        assert e["steps"] in (2, 3) and e["train_bytes"] > 0 and e["seconds"] > 0
    t = experts.TUNED
    want = ["clm", "distil:target", "fuse:min_ce", f"distil:g-de{t}", f"distil:g-de{t}@align.vocab_map=mined",
            f"distil:l-en{t}", f"fuse:min_ce{t}", f"fuse:avg_ce{t}", f"pair:g-de{t}", f"pair:l-en{t}", "merge:linear",
            "merge:varm"]
    assert list(result["arms"]) == want
    assert result["arms"][f"pair:g-de{t}"]["teachers"] == ["g-de", "target"]
    assert result["arms"]["fuse:min_ce"]["teachers"] == ["g-de", "l-en", "target"]
    assert result["arms"][f"fuse:min_ce{t}"]["lam"] == 0.5 and result["arms"]["fuse:min_ce"]["lam"] == 0.9  # config's
    for name in ("merge:linear", "merge:varm"):  # the merged pairwise targets: one point, at the final budget
        (point,) = result["arms"][name]["curve"]
        assert point["step"] == 4 and "distil:target" in point["vs"] and math.isfinite(point["vs_clm"]["overall"]["value"])
    assert set(result["sources"]) == {"source g-de", "source l-en", "target (start)"}
    printed = capsys.readouterr().out
    assert "| g-de (" in printed and "Δ vs distil:target overall" in printed and "tokens to reach CLM's final" in printed
    # the experts are cached: a second run builds none
    assert experts.main(base + ["--experts-only"]) == 0
    assert all(e["cached"] for e in json.loads(out.read_text())["experts"].values())
    # --build-only links each expert by name; --write-unread gives each domain's documents no expert read
    unread_dir = tmp_path / "unread"
    assert experts.main(base + ["--build-only", "--write-unread", str(unread_dir)]) == 0
    from fuseflow.config import FuseConfig, load_config
    from fuseflow.corpus import iter_documents

    held_out = {d.text for d in iter_documents(load_config(FuseConfig, run).corpus, "held_out")}
    for e in built.values():
        link = tmp_path / "experts" / e["name"]
        assert link.is_symlink() and link.resolve() == Path(e["model_dir"]).resolve()
        trained = {json.loads(line)["text"] for line in (Path(e["model_dir"]).parents[2] / "corpus.jsonl").read_text().splitlines()}
        unread = [json.loads(line)["text"] for line in (unread_dir / f"{e['domain']}.jsonl").read_text().splitlines()]
        assert len(unread) == 100 and not set(unread) & trained and not set(unread) & held_out


def _eval_texts(experts, run) -> set[str]:
    """Every text of an evaluation split the bench can use (held-out documents; dev documents of every size)."""
    from fuseflow.config import FuseConfig, load_config
    from fuseflow.corpus import iter_documents

    cfg = load_config(FuseConfig, run)
    texts = {d.text for d in iter_documents(cfg.corpus, "held_out")}
    for name, _, sub in cfg.corpus.corpora():
        docs = list(iter_documents(sub, "train"))
        n = max(s["dev_documents"] for s in experts.q.SIZES.values())
        dev = experts.q.dev_indices(np.array([d.index for d in docs]), cfg.corpus.seed, n)
        texts |= {d.text for d in docs if d.index in dev}
    return texts


def test_ensemble_script_runs_an_ensemble_config_on_its_dev_documents(tmp_path, tiny_llama, tiny_gemma):
    """``bench/ensemble.py --config``: the config's sources and decoding, prompts from its next-word languages'
    dev documents (never the test split's), forward calls counted per source."""
    from fuseflow.ensemble.tasks import split_documents

    bench = _load("ensemble")
    cfg = tmp_path / "ensemble.yaml"
    cfg.write_text(
        f"sources:\n  - {{name: llama, model: {tiny_llama}}}\n  - {{name: gemma, model: {tiny_gemma}}}\n"
        "decoding: {rerank: mixture_likelihood, segment_max_tokens: 4}\n"
        "eval: {task: next-word, languages: [en], held_out_documents: 4}\n"
    )
    out = tmp_path / "bench.json"
    assert bench.main(["--config", str(cfg), "--prompts", "2", "--prompt-chars", "120", "--max-tokens", "6",
                       "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["sources"] == ["llama", "gemma"] and result["rerank"] == "mixture_likelihood"
    assert result["segment_max_tokens"] == 4
    dev = [" ".join(d.text.split()) for d in split_documents("en", 0, "dev", 4)]
    test = [" ".join(d.text.split()) for d in split_documents("en", 0, "test", 4)]
    for prompt in result["prompts"]:
        assert any(t.startswith(prompt) for t in dev) and not any(t.startswith(prompt) for t in test)
    fused = result["systems"][-1]
    assert fused["system"] == "cool-fusion" and all(v > 0 for v in fused["forward_calls"].values())
    assert _positive(result["ratio_ms_per_token_vs_slower_source"])
