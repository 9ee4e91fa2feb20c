"""Read one tensor at a time from safetensors shards and write shards as a stream.

Reading: ``safe_open`` memory-maps the file and ``get_tensor`` returns a tensor backed by that map, which
stays mapped while the tensor lives. Opening the file per tensor (a header parse, ~1 ms) ties each
mapping's lifetime to its tensor, so the pages of a tensor leave the process when the tensor is dropped,
instead of a whole shard's pages accumulating in the resident set until the handle closes.

Writing: the plan knows every output tensor's name, dtype and shape before any is computed, so each shard's
header is written first and the tensors' bytes are appended as they are produced: memory holds one output
tensor, not one shard. The layout follows the safetensors format (huggingface/safetensors README): an
8-byte little-endian header length, a JSON header padded with spaces to a multiple of 8, then the data,
each tensor at ``data_offsets`` relative to the end of the header.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

# safetensors dtype names ⇄ torch dtypes (the ones HF checkpoints use).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorRef:
    """Where to read one tensor: a shard file and the tensor's name inside it."""

    file: Path
    name: str


def load_tensor(ref: TensorRef, rows: int | None = None) -> torch.Tensor:
    """The tensor ``ref`` (its first ``rows`` rows when given), backed by a read-only map of the file."""
    with safe_open(str(ref.file), framework="pt") as f:
        if rows is None:
            return f.get_tensor(ref.name)
        return f.get_slice(ref.name)[:rows]


def read_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, safetensors dtype)}`` of one shard, from its header only."""
    with safe_open(str(file), framework="pt") as f:
        out = {}
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = (tuple(sl.get_shape()), sl.get_dtype())
        return out


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class ShardEntry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class StreamingShardWriter:
    """Write one safetensors file whose tensors are known in advance, one tensor at a time.

    ``entries`` fixes the order and layout; :meth:`write` must be called with exactly those tensors in that
    order, and :meth:`close` checks that all were written.
    """

    def __init__(self, path: Path, entries: list[ShardEntry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = entries
        self._next = 0
        header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for e in entries:
            size = nbytes(e.shape, e.dtype)
            header[e.name] = {
                "dtype": ST_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + size]
            }
            offset += size
        self.data_size = offset
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data: writing from a big-endian host is not supported")
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise RuntimeError(f"{self.path}: tensor {name!r} is beyond the planned {len(self.entries)} tensors")
        e = self.entries[self._next]
        if (name, tuple(tensor.shape), tensor.dtype) != (e.name, e.shape, e.dtype):
            raise RuntimeError(
                f"{self.path}: expected tensor {e.name!r} {e.shape} {e.dtype}, got {name!r} "
                f"{tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.contiguous().reshape(-1).view(torch.uint8)  # [nbytes] the tensor's raw bytes
        self._file.write(memoryview(data.numpy()))
        self._next += 1

    def abort(self) -> None:
        """Close and delete a partly written file (after an error)."""
        self._file.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.entries):
            raise RuntimeError(f"{self.path}: {self._next} of {len(self.entries)} planned tensors were written")


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> Path:
    path = Path(out_dir) / INDEX_NAME
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2) + "\n")
    tmp.rename(path)
    return path
