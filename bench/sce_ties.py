"""Where fuseflow's sce and mergekit's differ on bf16 updates: the variance selection's tie-break, traced.

Runs in an interpreter that imports both (the mergekit venv; fuseflow is imported from this checkout).
It builds one bf16 tensor shaped like a SmolLM2 matrix, base ``0.02·N(0, 1)`` and N copies
``+ σ·N(0, 1)`` rounded to bf16 (bench/merge.py's "fine-tuned" copies), and computes, in float32 as
``dtype: float32`` does:

- the two Select masks (fuseflow's ``sce_select_mask``; mergekit's ``sce_mask``), how many entries each
  keeps, how many share the threshold variance and where the masks disagree;
- fuseflow's ``sce`` (mergekit-YAML path ``uniform_below: 1e-6`` and the paper's weights) against
  mergekit's sce code (its ``sce_mask``, ``get_mask`` and ``sce_weight``, put together as its
  ``sce_merge`` does), the bf16 results' max |Δ| where the masks agree and where they do not;
- mergekit's code given fuseflow's mask instead of its own: what is left once the selection is the same.

    /work/venvs/mergekit/bin/python bench/sce_ties.py --rows 2048 --cols 576 --models 2 --out sce-ties.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import markdown_table, write_json  # noqa: E402

from fuseflow.merge.methods import sce, sce_select_mask  # noqa: E402


def mergekit_sce(task_vectors: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's ``sce_merge`` after its Select step, with the Select mask given."""
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask
    from mergekit.merge_methods.sce import sce_weight

    tvs = task_vectors * mask.to(task_vectors.dtype).unsqueeze(0)
    erase = get_mask(tvs, method="sum", mask_dtype=tvs.dtype)
    w = sce_weight(tvs)
    while w.dim() < tvs.dim():
        w = w.unsqueeze(-1)
    ew = w * erase
    return base + (tvs * ew).sum(dim=0) / ew.sum(dim=0).clamp(min=1e-6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--cols", type=int, default=576)
    p.add_argument("--models", type=int, default=2, help="fine-tuned copies (besides the base)")
    p.add_argument("--sigma", type=float, default=2e-4, help="update size of the copies")
    p.add_argument("--select-topk", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    try:
        from mergekit.merge_methods.sce import sce_mask
    except ImportError:
        p.error("mergekit is not importable: run this with the mergekit venv's python (docs/merge.md)")

    g = torch.Generator().manual_seed(args.seed)
    base = (0.02 * torch.randn(args.rows, args.cols, generator=g)).to(torch.bfloat16)  # [R, C]
    copies = [(base.float() + args.sigma * torch.randn(args.rows, args.cols, generator=g)).to(torch.bfloat16)
              for _ in range(args.models)]
    b32 = base.float()
    tvs = torch.stack([c.float() - b32 for c in copies])  # [N, R, C]
    largest = float(tvs.abs().max())

    mk_mask = sce_mask(tvs, args.select_topk, torch.float32).bool()
    ff_mask = sce_select_mask(copies, base, args.select_topk)
    var = torch.var(tvs, dim=0, unbiased=False)
    threshold = float(var[mk_mask].min())
    disagree = mk_mask != ff_mask
    selection = {
        "kept_mergekit": int(mk_mask.sum()), "kept_fuseflow": int(ff_mask.sum()),
        "threshold_variance": threshold, "entries_at_threshold": int((var == threshold).sum()),
        "masks_disagree": int(disagree.sum()), "disagree_off_threshold": int((disagree & (var != threshold)).sum()),
    }
    mk_out = mergekit_sce(tvs, b32, mk_mask)
    mk_with_ff_mask = mergekit_sce(tvs, b32, ff_mask)
    rows = []
    for path, uniform_below in (("mergekit YAML (uniform_below 1e-6)", 1e-6), ("paper weights", 0.0)):
        ours = sce(copies, base, select_topk=args.select_topk, uniform_below=uniform_below)  # float32
        d = (ours.to(torch.bfloat16).float() - mk_out.to(torch.bfloat16).float()).abs()
        rows.append({
            "path": path,
            "max_abs_bf16": float(d.max()),
            "max_abs_bf16_pct_of_largest_update": 100 * float(d.max()) / largest,
            "max_abs_bf16_where_masks_agree": float(d[~disagree].max()),
            "max_abs_bf16_where_masks_disagree": float(d[disagree].max()) if disagree.any() else 0.0,
            "max_abs_f32_same_mask": float((ours - mk_with_ff_mask).abs().max()),
        })
    print(markdown_table(["selection", "value"], list(selection.items())))
    print()
    print(markdown_table(
        ["fuseflow sce", "max |Δ| bf16", "% of largest update", "masks agree", "masks disagree", "same mask, f32"],
        [[r["path"], f"{r['max_abs_bf16']:.2e}", f"{r['max_abs_bf16_pct_of_largest_update']:.1f}",
          f"{r['max_abs_bf16_where_masks_agree']:.2e}", f"{r['max_abs_bf16_where_masks_disagree']:.2e}",
          f"{r['max_abs_f32_same_mask']:.2e}"] for r in rows],
    ))
    if args.out:
        write_json(args.out, {"args": vars(args), "largest_update": largest, "selection": selection, "merges": rows},
                   torch.device("cpu"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
