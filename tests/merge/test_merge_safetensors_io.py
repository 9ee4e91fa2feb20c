"""The streaming shard writer produces files that safetensors itself reads back bit for bit."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fuseflow.merge.safetensors_io import (
    ShardEntry,
    StreamingShardWriter,
    TensorRef,
    load_tensor,
    read_header,
    write_index,
)


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.weight": torch.randn(3, generator=g).to(torch.float16),
        "c.weight": torch.randn(2, 3, 4, generator=g),
        "d.buffer": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.scalar": torch.tensor(3.5, dtype=torch.float64),
        "f.empty": torch.zeros(0, 4),
        "g.mask": torch.tensor([True, False, True]),
    }


def test_streamed_shard_reads_back_exactly(tmp_path):
    tensors = _tensors()
    path = tmp_path / "s.safetensors"
    writer = StreamingShardWriter(path, [ShardEntry(k, tuple(v.shape), v.dtype) for k, v in tensors.items()])
    for k, v in tensors.items():
        writer.write(k, v)
    writer.close()
    back = load_file(path)
    assert back.keys() == tensors.keys()
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_len % 8 == 0


def test_non_contiguous_tensors_are_written_in_logical_order(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # [4, 3] non-contiguous view
    path = tmp_path / "t.safetensors"
    writer = StreamingShardWriter(path, [ShardEntry("t", (4, 3), torch.float32)])
    writer.write("t", t)
    writer.close()
    assert torch.equal(load_file(path)["t"], t)


def test_writer_rejects_unplanned_or_missing_tensors(tmp_path):
    entries = [ShardEntry("x", (2,), torch.float32), ShardEntry("y", (2,), torch.float32)]
    w = StreamingShardWriter(tmp_path / "a.safetensors", entries)
    with pytest.raises(RuntimeError, match="expected tensor 'x'"):
        w.write("y", torch.zeros(2))
    w.write("x", torch.zeros(2))
    with pytest.raises(RuntimeError, match="expected tensor 'y'.*float16"):
        w.write("y", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="1 of 2 planned tensors"):
        w.close()
    w2 = StreamingShardWriter(tmp_path / "b.safetensors", entries)
    w2.abort()
    assert not (tmp_path / "b.safetensors").exists()


def test_load_tensor_reads_whole_tensors_and_leading_rows(tmp_path):
    t = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    save_file({"emb": t, "other": torch.ones(3)}, tmp_path / "m.safetensors")
    ref = TensorRef(tmp_path / "m.safetensors", "emb")
    assert torch.equal(load_tensor(ref), t)
    assert torch.equal(load_tensor(ref, rows=6), t[:6])
    assert read_header(tmp_path / "m.safetensors") == {"emb": ((10, 4), "F32"), "other": ((3,), "F32")}


def test_index_lists_every_tensor(tmp_path):
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    path = write_index(tmp_path, weight_map, 123)
    assert json.loads(path.read_text()) == {"metadata": {"total_size": 123}, "weight_map": weight_map}
