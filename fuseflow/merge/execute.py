"""Execute a merge plan: for each output tensor, load it from the base and every model, merge, write, drop.

At any moment the process holds the N + 1 input tensors of one output tensor (memory-mapped, see
safetensors_io), the method's per-tensor statistics and chunk temporaries (methods.py), its float32 result
and that result in the output dtype; nothing of the other tensors. Shards are written as streams, so the
output adds one tensor, not one shard.
"""

from __future__ import annotations

import ctypes
import zlib
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .methods import MergeMethod
from .plan import MergePlan, TensorTask
from .safetensors_io import ShardEntry, StreamingShardWriter, load_tensor, write_index


# glibc's mallopt parameter number for the mmap threshold (malloc.h).
M_MMAP_THRESHOLD = -3


def return_large_frees_to_the_os(threshold: int = 4 << 20) -> None:
    """Serve every allocation of ``threshold`` bytes or more by its own mapping, unmapped when freed.

    glibc raises its mmap threshold after each large free (up to 32 MiB), so the full-size results, masks
    and scores a merge allocates and frees once per tensor come from the heap after the first one, and the
    holes they leave stay resident: that added up to 1.7 tensors to the peak resident set of a ties or
    breadcrumbs merge of 32 MiB tensors (tests/merge/test_merge_memory.py). A fixed threshold keeps the
    resident set at what is alive. Chunk temporaries (1 MiB) stay on the heap. No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(M_MMAP_THRESHOLD, threshold)


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed from the configured seed and the tensor name: a tensor's random draws do not
    depend on which tensors were merged before it (or on the shard layout)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def merge_tensor(task: TensorTask, method: MergeMethod, params: dict[str, Any]) -> torch.Tensor:
    """The merged tensor of one plan entry, in its output dtype."""
    base = load_tensor(task.base)
    if not task.sources:
        return base.to(task.dtype)
    kwargs = dict(params if task.params is None else task.params)
    if method.seeded:
        kwargs["seed"] = tensor_seed(int(kwargs.get("seed", 0)), task.name)
    tensors = [load_tensor(ref, task.rows) for ref in task.sources]
    if task.rows is None:
        return method.fn(tensors, base if task.base_input else None, **kwargs).to(task.dtype)
    out = base.to(task.dtype, copy=True)  # [V_base, ...] rows past the common vocabulary stay the base's
    out[: task.rows] = method.fn(tensors, base[: task.rows], **kwargs)
    return out


def execute_plan(
    plan: MergePlan,
    method: MergeMethod,
    params: dict[str, Any],
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> list[Path]:
    """Merge every tensor of ``plan`` with ``method`` and write the weight shards (and the index when there
    is more than one) to ``out_dir``. Returns the files written."""
    return_large_frees_to_the_os()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_shard: list[list[TensorTask]] = [[] for _ in plan.shard_files]
    for task in plan.tasks:
        by_shard[task.shard].append(task)
    written: list[Path] = []
    bar = tqdm(total=len(plan.tasks), desc=f"merge ({method.name})", unit="tensor", disable=not progress)
    try:
        for file, tasks in zip(plan.shard_files, by_shard):
            writer = StreamingShardWriter(out_dir / file, [ShardEntry(t.name, t.shape, t.dtype) for t in tasks])
            try:
                for task in tasks:
                    bar.set_postfix_str(task.name, refresh=False)
                    writer.write(task.name, merge_tensor(task, method, params))
                    bar.update(1)
            except BaseException:
                writer.abort()
                raise
            writer.close()
            written.append(out_dir / file)
    finally:
        bar.close()
    if len(plan.shard_files) > 1:
        weight_map = {t.name: plan.shard_files[t.shard] for t in plan.tasks}
        written.append(write_index(out_dir, weight_map, plan.total_size))
    return written
