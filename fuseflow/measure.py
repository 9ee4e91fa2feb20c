"""What the benchmarks and the tests measure of a computation: the tensor memory it holds at its peak.

One definition for ``bench/loss.py`` (docs/performance.md's peak column) and the fused loss's memory test
(``tests/fuse/test_fused_linear_loss.py``), so the figure a benchmark reports is the one a test bounds.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorBytes(TorchDispatchMode):
    """The most bytes alive at once among the storages that ops create while the mode is active (views and
    in-place ops create none; storages freed since are dropped). Inputs and parameters made before the mode
    are not counted; gradients the backward makes inside it are.

        with PeakTensorBytes() as peak:
            loss(...).backward()
        peak.peak  # bytes
    """

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (func.is_view or func._schema.is_mutable):
            for x in tree_leaves(out):
                if isinstance(x, torch.Tensor):
                    storage = x.untyped_storage()
                    self.live.setdefault(storage._cdata, (StorageWeakRef(storage), storage.nbytes()))
        self.live = {key: entry for key, entry in self.live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self.live.values()))
        return out
