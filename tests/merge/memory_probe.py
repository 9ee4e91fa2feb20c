"""Peak memory of each merge method on one tensor, measured in a fresh process (run by test_merge_memory.py).

``python memory_probe.py ROWS COLS CASES_JSON`` builds the base and N bf16 input tensors of shape
``[ROWS, COLS]`` (as the executor gets them: already resident; in a real merge they are memory maps of
the input files), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``, 5), runs what the executor
runs for one tensor — ``method.fn(tensors, base, **params).to(bf16)`` — and reads the mark back
(``VmHWM``). It prints one JSON object per case: the peak resident memory above what the inputs and the
interpreter already held, in bytes."""

from __future__ import annotations

import ctypes
import gc
import json
import re
import sys
from pathlib import Path

import torch


def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def peak_above_resident(run) -> int:
    """Peak resident bytes reached while ``run()`` executes, above the resident set just before it."""
    gc.collect()
    # Hand freed heap memory back first: memory an earlier call freed but the allocator kept would be
    # counted in "before" and reused by this call without raising the mark.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    out = run()
    peak = _status_kib("VmHWM")
    del out
    gc.collect()
    return (peak - before) * 1024


def main(argv: list[str]) -> int:
    from fuseflow.merge.execute import return_large_frees_to_the_os
    from fuseflow.merge.methods import MERGE_METHODS

    return_large_frees_to_the_os()  # as execute_plan does before merging
    torch.set_num_threads(1)
    rows, cols, cases = int(argv[0]), int(argv[1]), json.loads(argv[2])
    g = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(rows, cols, generator=g)).to(torch.bfloat16)  # [R, C]
    # Updates of about one bf16 step (1.2e-4 at 0.02), as in bf16 fine-tunes: most |Δ| are 0 or one step,
    # so trimming thresholds tie by the million (top_k_mask once held int64 indices of all ties: +2 tensors).
    inputs = [(base.float() + 1e-4 * torch.randn(rows, cols, generator=g)).to(torch.bfloat16) for _ in range(3)]
    # Warm up every method on a small tensor first, so lazily initialised kernels and the allocator's own
    # bookkeeping are not counted against the first large call.
    small = [t[:64] for t in inputs]
    for name, params, n in cases:
        MERGE_METHODS[name].fn(small[:n], base[:64], **params)
    for name, params, n in cases:
        fn = MERGE_METHODS[name].fn
        extra = peak_above_resident(lambda: fn(inputs[:n], base, **params).to(torch.bfloat16))
        print(json.dumps({"name": name, "params": params, "n": n, "peak_extra_bytes": extra}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
