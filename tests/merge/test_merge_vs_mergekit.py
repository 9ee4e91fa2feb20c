"""The same mergekit YAML merged by mergekit and by ``fuseflow merge``, tensor by tensor.

mergekit is not a fuseflow dependency and runs as its own program (``python -m mergekit.scripts.run_yaml``)
with the interpreter named by ``FUSEFLOW_MERGEKIT_PYTHON`` (a venv made for mergekit), or this one if it
imports mergekit; without either the module is skipped::

    python -m venv /work/venvs/mergekit && /work/venvs/mergekit/bin/pip install torch==2.13.0 mergekit==0.1.5
    FUSEFLOW_MERGEKIT_PYTHON=/work/venvs/mergekit/bin/python python -m pytest tests/merge/test_merge_vs_mergekit.py

Both compute in float32 here (``dtype: float32``). Each case states the largest difference allowed and
why it is not 0 where it is not:
- 0: linear, task_arithmetic, ties, breadcrumbs(_ties), passthrough, dare / della at density 1
  (nothing dropped) — the same float32 operations in the same order, and random inputs have no ties in
  |Δ| at the trimming thresholds;
- float32 rounding (≤ 1e-6 of the tensor's scale): slerp, nuslerp, multislerp, model_stock, sce's weights
  and the ``rescale: true`` L1 factors take their per-tensor statistics (dots, norms, sums of squares) in
  float64 here, in float32 in mergekit, and multislerp is evaluated as a linear combination from the Gram
  matrix;
- not compared entry by entry: dare / della at density < 1, whose random masks come from fuseflow's
  seeded generator and mergekit's global one (tests/merge/test_merge_methods.py tests them on their own).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from merge_helpers import MERGEKIT_PYTHON_ENV, mergekit_python
from merge_helpers import run_mergekit as _run_mergekit

from fuseflow.cli import main as fuseflow

MERGEKIT = mergekit_python()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MERGEKIT is None, reason=f"mergekit not importable; set {MERGEKIT_PYTHON_ENV}"),
]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_mergekit(doc: dict, out: Path) -> None:
    _run_mergekit(MERGEKIT, doc, out)


def _models(base, ft, with_base, **per_model):
    """``models:`` entries for the fine-tuned copies (and the base when ``with_base``)."""
    entries = [{"model": str(base)}] if with_base else []
    for j, m in enumerate(ft):
        params = {k: (v[j] if isinstance(v, list) else v) for k, v in per_model.items()}
        entries.append({"model": str(m), **({"parameters": params} if params else {})})
    return entries


# (name, merge_method, base_model?, models builder kwargs, top-level parameters, n fine-tuned, atol)
CASES = [
    ("linear", "linear", False, {"weight": [1.0, 0.5, 2.0]}, {}, 3, 0.0),
    ("task_arithmetic", "task_arithmetic", True, {"weight": [1.0, 0.5, 0.3]}, {"lambda": 0.8}, 3, 0.0),
    ("ties", "ties", True, {"weight": [1.0, 0.5, 0.7], "density": [0.5, 0.3, 0.8]}, {}, 3, 0.0),
    ("breadcrumbs", "breadcrumbs", True, {"weight": 1.0, "density": 0.8, "gamma": 0.05}, {}, 3, 0.0),
    ("breadcrumbs_ties", "breadcrumbs_ties", True, {"weight": [1.0, 0.4, 0.6], "density": 0.6}, {"normalize": True}, 3, 0.0),
    ("ties_rescale", "ties", True, {"weight": 1.0, "density": 0.4}, {"rescale": True}, 2, 1e-6),
    ("sce", "sce", True, {}, {"select_topk": 0.5}, 3, 1e-6),
    ("dare_linear_dense", "dare_linear", True, {"weight": [0.6, 0.4]}, {}, 2, 0.0),
    ("dare_ties_dense", "dare_ties", True, {"weight": [0.6, 0.4]}, {}, 2, 0.0),
    ("della_dense", "della", True, {"weight": [0.6, 0.4, 1.0]}, {}, 3, 0.0),
    ("della_linear_dense", "della_linear", True, {"weight": [0.6, 0.4, 1.0]}, {}, 3, 0.0),
    ("slerp", "slerp", "in_models", {}, {"t": [0.2, 0.7, 0.4]}, 1, 1e-6),
    ("nuslerp", "nuslerp", True, {"weight": [1.0, 2.0]}, {}, 2, 1e-6),
    ("nuslerp_rows", "nuslerp", False, {"weight": [1.0, 2.0]}, {"nuslerp_flatten": False}, 2, 1e-6),
    ("nuslerp_cols", "nuslerp", True, {"weight": [3.0, 1.0]}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, 2, 1e-6),
    ("multislerp", "multislerp", True, {"weight": [1.0, 2.0, 3.0]}, {}, 3, 1e-6),
    ("multislerp_nobase", "multislerp", False, {"weight": [1.0, 2.0, 3.0]}, {}, 3, 1e-6),
    ("model_stock", "model_stock", True, {}, {}, 3, 1e-6),
    ("model_stock_filter", "model_stock", True, {}, {"filter_wise": True}, 3, 1e-6),
]


@pytest.mark.parametrize("name,method,base,per_model,params,n,atol", CASES, ids=[c[0] for c in CASES])
def test_same_yaml_same_merge(name, method, base, per_model, params, n, atol, llama5, llama5_finetuned, tmp_path):
    ft = llama5_finetuned[:n]
    doc = {
        "merge_method": method,
        "models": _models(llama5, ft, with_base=base == "in_models", **per_model),
        "dtype": "float32",
    }
    if base:
        doc["base_model"] = str(llama5)
    if params:
        doc["parameters"] = params
    cfg = tmp_path / "mergekit.yml"
    cfg.write_text(yaml.safe_dump(doc))
    run_mergekit(doc, tmp_path / "mk")
    assert fuseflow(["merge", str(cfg), f"output={tmp_path / 'ff'}", "--no-progress"]) == 0
    ours, theirs = _weights(tmp_path / "ff"), _weights(tmp_path / "mk")
    assert ours.keys() == theirs.keys()
    for k in ours:
        scale = max(theirs[k].abs().max().item(), 1.0)
        diff = (ours[k].float() - theirs[k].float()).abs().max().item()
        assert diff <= atol * scale, (k, diff)


def test_gradient_slerp_and_frankenmerge_examples_match(llama5, llama5_finetuned, tmp_path):
    """mergekit's own example configs (tests/merge/fixtures), run by both tools. They say ``dtype:
    float16``: mergekit then computes in float16, fuseflow in float32 (rounding once, at the end), so
    mergekit runs them with ``dtype: float32, out_dtype: float16`` and the two must agree but for slerp's
    and model_stock's float64 statistics (one float16 step at most). della.yml is not compared: its
    random masks come from different generators (see the module docstring)."""
    fixtures = Path(__file__).parent / "fixtures"
    a, b, c = llama5_finetuned
    two = {"MODEL_A": llama5, "MODEL_B": b}
    for name, models, atol in (
        ("gradient-slerp.yml", two, 1e-3), ("frankenmerge.yml", two, 0.0),
        ("ties.yml", {"MODEL_A": a, "MODEL_B": b, "MODEL_C": c, "BASE": llama5}, 0.0),
        ("model-stock.yml", {"MODEL_A": a, "MODEL_B": b, "MODEL_C": c, "BASE": llama5}, 1e-3),
    ):
        text = (fixtures / name).read_text()
        for key, path in models.items():
            text = text.replace(key, str(path))
        cfg = tmp_path / name
        cfg.write_text(text)
        run_mergekit({**yaml.safe_load(text), "dtype": "float32", "out_dtype": "float16"}, tmp_path / f"mk-{name}")
        assert fuseflow(["merge", str(cfg), f"output={tmp_path / f'ff-{name}'}", "--no-progress"]) == 0
        ours, theirs = _weights(tmp_path / f"ff-{name}"), _weights(tmp_path / f"mk-{name}")
        assert ours.keys() == theirs.keys(), name
        for k in ours:
            # One float16 step at the tensor's largest magnitude (2^-10 relative) for slerp, model_stock.
            diff = (ours[k].float() - theirs[k].float()).abs().max().item()
            assert diff <= atol * max(theirs[k].abs().max().item(), 1.0), (name, k, diff)


def test_sce_with_realistic_update_sizes_uses_mergekits_equal_weight_fallback(llama5, tmp_path):
    """Updates of σ 2e-4 (a real fine-tune's size) put Σ_j mean(Δ_j²) below 1e-6 on every tensor: mergekit
    then weighs the models equally. Read from a mergekit YAML, fuseflow does the same (``uniform_below``);
    fuseflow's own ``sce`` follows the paper and differs (issue 17)."""
    from merge_helpers import perturbed_copy

    from fuseflow.merge.methods import MERGE_METHODS

    ft = [perturbed_copy(llama5, tmp_path / f"small{j}", seed=300 + j, scale=2e-4 * (j + 1)) for j in range(2)]
    doc = {"merge_method": "sce", "base_model": str(llama5), "models": [{"model": str(m)} for m in ft],
           "dtype": "float32"}
    cfg = tmp_path / "sce.yml"
    cfg.write_text(yaml.safe_dump(doc))
    run_mergekit(doc, tmp_path / "mk")
    assert fuseflow(["merge", str(cfg), f"output={tmp_path / 'ff'}", "--no-progress"]) == 0
    ours, theirs, base = _weights(tmp_path / "ff"), _weights(tmp_path / "mk"), _weights(llama5)
    inputs = [_weights(m) for m in ft]
    worst_paper = 0.0
    for k in ours:
        assert (ours[k] - theirs[k]).abs().max().item() <= 1e-6 * max(theirs[k].abs().max().item(), 1.0), k
        paper = MERGE_METHODS["sce"].fn([w[k] for w in inputs], base[k])
        largest_delta = max((w[k] - base[k]).abs().max().item() for w in inputs)
        worst_paper = max(worst_paper, (paper - theirs[k]).abs().max().item() / largest_delta)
    assert worst_paper > 0.1  # the paper's weights are not equal weights at this size


def _boundary_values(sorted_desc: torch.Tensor, keep: slice) -> list[torch.Tensor]:
    """The values at the two ends of the kept range of a descending-sorted score: entries equal to one of
    them are the ones a tool's tie-break decides."""
    n = sorted_desc.numel()
    ends = [keep.start - 1, keep.start] if keep.start > 0 else []
    if keep.stop < n:
        ends += [keep.stop - 1, keep.stop]
    return [sorted_desc[i] for i in ends]


def _at_trim_thresholds(method: str, params: dict, deltas: list[torch.Tensor]) -> torch.Tensor:
    """Where an entry's score ties with the score at the edge of what ``method`` keeps (float32, as both tools
    compute with ``dtype: float32``): ties and breadcrumbs rank each model's |Δ_j| (keep the top ``density``;
    breadcrumbs first drops the top ``gamma``), sce ranks the variance of Δ across models (keep the top
    ``select_topk`` of the non-zero ones)."""
    at = torch.zeros(deltas[0].shape, dtype=torch.bool)
    if method == "sce":
        var = torch.var(torch.stack(deltas), dim=0, unbiased=False)
        k = int(params["select_topk"] * int(torch.count_nonzero(var)))
        scores, keeps = [var], [slice(0, k)]
    else:
        scores = [d.abs() for d in deltas]
        n = deltas[0].numel()
        if method == "ties":
            keeps = [slice(0, max(1, int(params["density"] * n)))] * len(deltas)
        else:  # breadcrumbs: the top gamma dropped, then the smallest until density remain
            top = int(params["gamma"] * n)
            keeps = [slice(top, top + int(params["density"] * n))] * len(deltas)
    for score, keep in zip(scores, keeps):
        for v in _boundary_values(score.reshape(-1).sort(descending=True).values, keep):
            at |= score == v
    return at


BF16_TIE_CASES = [
    # (method, parameters per model, top-level parameters, update σ)
    ("ties", {"weight": 1.0, "density": 0.3}, {}, 2e-3),
    ("breadcrumbs", {"weight": 1.0, "density": 0.8, "gamma": 0.05}, {}, 2e-3),
    # σ 2e-4, bench/merge.py's size: the YAML's sce then takes mergekit's equal weights, which do not
    # depend on the selection, so a different tie-break changes nothing but the tied entries.
    ("sce", {}, {"select_topk": 0.1}, 2e-4),
]


@pytest.mark.parametrize("method,per_model,params,sigma", BF16_TIE_CASES, ids=[c[0] for c in BF16_TIE_CASES])
def test_bf16_merges_differ_only_where_scores_tie_at_the_trim_threshold(method, per_model, params, sigma, llama5, tmp_path):
    """bf16 fine-tunes' updates are multiples of one bf16 step, so many entries share a score (|Δ_j|, or
    sce's variance) at a trimming threshold; which of those are kept is each tool's tie-break (fuseflow:
    earlier positions; mergekit: ``torch.argsort`` / ``torch.sort`` / ``torch.topk`` order). Everywhere else
    the two merges are bit-identical. These are the ties, breadcrumbs(_ties) and sce differences
    bench/merge.py measures on bf16 SmolLM2 copies (docs/merge.md)."""
    import shutil

    from safetensors.torch import save_file

    base_dir = tmp_path / "base"
    shutil.copytree(llama5, base_dir)
    base = {k: v.to(torch.bfloat16) for k, v in _weights(llama5).items()}
    save_file(base, base_dir / "model.safetensors", metadata={"format": "pt"})
    ft = []
    for j in range(2):
        d = tmp_path / f"ft{j}"
        shutil.copytree(base_dir, d)
        g = torch.Generator().manual_seed(400 + j)
        save_file({k: (v.float() + sigma * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()},
                  d / "model.safetensors", metadata={"format": "pt"})
        ft.append(d)
    doc = {"merge_method": method, "base_model": str(base_dir), "dtype": "float32", "out_dtype": "bfloat16",
           "models": [{"model": str(m), **({"parameters": per_model} if per_model else {})} for m in ft]}
    if params:
        doc["parameters"] = params
    cfg = tmp_path / f"{method}.yml"
    cfg.write_text(yaml.safe_dump(doc))
    run_mergekit(doc, tmp_path / "mk")
    assert fuseflow(["merge", str(cfg), f"output={tmp_path / 'ff'}", "--no-progress"]) == 0
    ours, theirs = _weights(tmp_path / "ff"), _weights(tmp_path / "mk")
    inputs = [_weights(m) for m in ft]
    differing = 0
    for k in ours:
        at_threshold = _at_trim_thresholds(method, {**per_model, **params}, [w[k].float() - base[k].float() for w in inputs])
        diff = ours[k] != theirs[k]
        assert not (diff & ~at_threshold).any(), k  # differences only where a score ties at a threshold
        differing += int(diff.sum())
    assert differing > 0  # the tie-breaks do differ on bf16 inputs
