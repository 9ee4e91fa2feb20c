"""The run config's ``seed`` drives the run's random choices (issue 25: the loop seeded torch with 0 whatever
the config said). A tiny Llama target with attention dropout, the held-out split pinned by ``corpus.seed``, so
the samples are the same and only the seed differs: two runs with one seed train the same weights bit for bit,
another seed trains others — for ``fuseflow fuse``'s recipe (in-process teachers) and for ``fuseflow train`` over
Redis (the command, teachers as worker threads)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from online_helpers import WorkerThreads, build_aligners, write_run_config

from fuseflow.config import FuseConfig, load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OVERRIDES = ["corpus.seed=0", "train.max_steps=2", "train.checkpoint_every=2", "eval.before=false"]


@pytest.fixture(scope="module")
def dropout_llama(tmp_path_factory, tiny_llama):
    """The tiny Llama with attention dropout 0.3: training draws from torch's generator."""
    out = tmp_path_factory.mktemp("dropout-llama") / "model"
    shutil.copytree(tiny_llama, out)
    config = json.loads((out / "config.json").read_text())
    config["attention_dropout"] = 0.3
    (out / "config.json").write_text(json.dumps(config))
    return out


def _weights(model_dir):
    from safetensors.numpy import load_file

    return load_file(str(model_dir / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[n], b[n]) for n in a)


def test_the_seed_drives_the_fuse_recipe(tmp_path, dropout_llama, tiny_gemma, tiny_qwen):
    from fuseflow.models import load_tokenizer
    from fuseflow.trainer.data import prepare_corpus
    from fuseflow.trainer.recipe import train_in_process

    config = write_run_config(tmp_path, dropout_llama, tiny_gemma, tiny_qwen, n_docs=8)
    weights, trained = {}, {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = load_config(FuseConfig, config, [*OVERRIDES, f"seed={seed}"])
        corpus = prepare_corpus(cfg, load_tokenizer(cfg.target.model))
        res = train_in_process(cfg, tmp_path / name, corpus, progress=False, worker_batch_size=1)
        weights[name] = _weights(res.model_dir)
        trained[name] = (tmp_path / name / "trained_samples.log").read_text()
    assert trained["a"] == trained["b"] == trained["c"]  # the same samples: only the seed differs
    assert _same(weights["a"], weights["b"]), "one seed, different weights"
    assert not _same(weights["a"], weights["c"]), "another seed, the same weights: the seed is not used"


def test_the_seed_drives_fuseflow_train_over_redis(tmp_path, dropout_llama, tiny_gemma, tiny_qwen, redis_server):
    from fuseflow.cli import main
    from fuseflow.wire.redis_streams import RedisTransport

    config = write_run_config(tmp_path, dropout_llama, tiny_gemma, tiny_qwen, n_docs=8)
    cfg = load_config(FuseConfig, config)
    teachers = [s.key for s in cfg.sources]
    aligners = build_aligners(cfg)
    weights, trained = {}, {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run = f"seed-{name}"
        factory = lambda run=run: RedisTransport(redis_server.url, run, teachers)  # noqa: E731
        with WorkerThreads(aligners, factory, batch_size=1):
            code = main(["train", str(config), "--redis", redis_server.url, "--run", run, "--metrics-port", "0",
                         "--no-progress", *OVERRIDES, f"seed={seed}", f"run_dir={tmp_path / name}"])
        assert code == 0
        weights[name] = _weights(tmp_path / name / "fused" / "model")
        trained[name] = (tmp_path / name / "fused" / "trained_samples.log").read_text()
    assert trained["a"] == trained["b"] == trained["c"]
    assert _same(weights["a"], weights["b"]), "one seed, different weights"
    assert not _same(weights["a"], weights["c"]), "another seed, the same weights: the seed is not used"
