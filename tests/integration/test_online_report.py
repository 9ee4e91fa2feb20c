"""``fuseflow train`` (the online trainer) reports its run as ``fuseflow fuse`` does (issue 15): report.json,
loss.png and the evaluation table, through the same function (:func:`fuseflow.trainer.report.report_runs`). The recipe itself is replaced by a
stand-in that leaves what a run leaves (the corpus it cut, its metrics and a model directory), so the test is
about the report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from online_helpers import write_run_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_online_trainer_writes_the_fuse_report(tmp_path, tiny_llama, tiny_gemma, tiny_qwen, redis_server,
                                                   monkeypatch, capsys):
    from fuseflow.cli import main
    from fuseflow.trainer import recipe
    from fuseflow.trainer.loop import TrainResult
    from fuseflow.trainer.report import ONLINE_BASELINE_NOTE

    config = write_run_config(tmp_path, tiny_llama, tiny_gemma, tiny_qwen)
    run_dir = tmp_path / "run"
    calls = []

    def trained(cfg, transport, *, out=None, corpus=None, **kwargs):
        corpus()  # the recipe cuts the corpus (rank 0's, kept for the report)
        out = Path(out) if out is not None else Path(cfg.run_dir) / "fused"
        out.mkdir(parents=True, exist_ok=True)
        rows = [{"step": s, "loss": 5.0 - s / 10, "clm": 5.2 - s / 10, "kl": 4.8 - s / 10} for s in (1, 2, 3)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        # The "trained" model is the initial one: its row after training must equal "target before".
        shutil.copytree(tiny_llama, out / "model")
        return TrainResult(steps=3, samples=6, tokens=120, seconds=1.5, final_loss=4.7, model_dir=out / "model")

    real_report = recipe.report_runs

    def spy(*args, **kwargs):
        calls.append(args)
        return real_report(*args, **kwargs)

    monkeypatch.setattr(recipe, "run", trained)
    monkeypatch.setattr(recipe, "report_runs", spy)
    code = main(["train", str(config), "--redis", redis_server.url, "--run", "online-report", "--metrics-port", "0",
                 "--no-progress", "eval.before=true", "baseline=clm"])
    assert code == 0 and len(calls) == 1
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report) == {"config", "train_samples", "held_out_documents", "rejected_documents", "empty_documents",
                           "rows", "runs", "notes"}
    # The online trainer trains no CLM baseline: the config's `baseline: clm` row is said to be missing, not
    # dropped silently (issue 26).
    assert report["notes"] == [ONLINE_BASELINE_NOTE] and "fuseflow fuse" in report["notes"][0]
    names = [r["model"] for r in report["rows"]]
    assert names == ["source gemma", "source qwen", "target before", "target fused"]
    bpb = {r["model"]: r["bpb"] for r in report["rows"]}
    assert bpb["target fused"] == pytest.approx(bpb["target before"], rel=1e-9)
    fused = report["rows"][-1]
    assert fused["train_tokens"] == 120 and fused["train_seconds"] == 1.5
    model_dir = str(run_dir / "fused" / "model")
    assert report["runs"] == {"fused": {"model_dir": model_dir, "steps": 3, "tokens": 120, "final_loss": 4.7,
                                        "teachers": {}}}  # a stand-in training: no teacher statistics
    assert report["held_out_documents"] == 2 and report["train_samples"] > 0
    assert (run_dir / "loss.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert "| target fused |" in out and "baseline clm" not in out.split("note:")[0]
    assert out.rstrip().endswith("note: " + ONLINE_BASELINE_NOTE)
