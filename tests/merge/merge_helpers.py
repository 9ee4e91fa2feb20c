"""Helpers for the merge tests: small model directories written straight from tensors, and fine-tuned
variants of an HF model directory made by perturbing its weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": True}


def write_model(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None, shards: int = 1) -> Path:
    """An HF-style directory: config.json plus ``tensors`` in ``shards`` safetensors files (with an index
    when more than one)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or LLAMA_CONFIG))
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n] for n in names}, path / "model.safetensors", metadata={"format": "pt"})
        return path
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n] for n in part}, path / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def toy_tensors(seed: int = 0, vocab: int = 16, hidden: int = 4, head: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(hidden, hidden, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(hidden, generator=g),
        "model.norm.weight": torch.randn(hidden, generator=g),
    }
    if head:
        t["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    return t


def perturbed_copy(src: Path, dst: Path, seed: int, scale: float) -> Path:
    """Copy an HF directory, adding seeded Gaussian noise of std ``scale`` to every weight (a stand-in for
    a fine-tuned model: same architecture, tokenizer and tensor names)."""
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    weights = {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in weights.items()}
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


# ----------------------------------------------------------------------------------------------------------
# mergekit, run as a separate program (it is never a fuseflow dependency).
# ----------------------------------------------------------------------------------------------------------

MERGEKIT_PYTHON_ENV = "FUSEFLOW_MERGEKIT_PYTHON"


def mergekit_python() -> str | None:
    """An interpreter that can import mergekit: ``$FUSEFLOW_MERGEKIT_PYTHON`` (e.g. a venv made only for
    mergekit, whose transformers may differ from fuseflow's), else this interpreter if it has mergekit,
    else None (the comparison tests skip)."""
    import importlib.util
    import os
    import subprocess
    import sys

    python = os.environ.get(MERGEKIT_PYTHON_ENV)
    if python:
        probe = subprocess.run([python, "-c", "import mergekit.merge"], capture_output=True, text=True)
        if probe.returncode != 0:
            raise RuntimeError(f"{MERGEKIT_PYTHON_ENV}={python} cannot import mergekit:\n{probe.stderr[-2000:]}")
        return python
    return sys.executable if importlib.util.find_spec("mergekit") else None


def run_mergekit(python: str, doc: dict, out: Path) -> None:
    """``mergekit-yaml`` on ``doc`` into ``out`` with ``python``: one thread, no tokenizer or model card,
    ``--random-seed 0``."""
    import os
    import subprocess

    import yaml

    cfg = out.with_name(out.name + "-mergekit.yml")
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    cmd = [python, "-m", "mergekit.scripts.run_yaml", str(cfg), str(out), "--no-copy-tokenizer",
           "--no-write-model-card", "--quiet", "--num-threads", "1", "--random-seed", "0"]
    # PYTHONPATH empty: the mergekit interpreter must not pick up this checkout's packages.
    env = dict(os.environ, PYTHONPATH="", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        raise AssertionError(f"mergekit failed ({done.returncode}) on {cfg}:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
