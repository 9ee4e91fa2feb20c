"""The first DeepSpeed start on a CPU compiles a C++ op for minutes (issue 15): the trainer says so first,
with where it is cached and how to avoid it, and stays quiet once the op is built."""

from __future__ import annotations

import logging

import pytest

from fuseflow.trainer.loop import announce_op_builds, pending_op_builds


@pytest.fixture
def cpu_accelerator():
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    if get_accelerator()._name != "cpu" or installed_ops.get("deepspeed_shm_comm"):
        pytest.skip("needs DeepSpeed's CPU accelerator without the prebuilt shared-memory op")


def test_an_op_to_compile_is_announced_before_deepspeed_starts(cpu_accelerator, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # an empty JIT cache: a first start
    ((name, build_var, build_dir),) = pending_op_builds()
    assert (name, build_var, build_dir) == ("deepspeed_shm_comm", "DS_BUILD_SHM_COMM", tmp_path / "deepspeed_shm_comm")
    with caplog.at_level(logging.WARNING, logger="fuseflow.trainer.loop"):
        announce_op_builds()
    (record,) = caplog.records
    assert "compiles its C++ op deepspeed_shm_comm" in record.message
    assert "DS_BUILD_SHM_COMM=1" in record.message and str(build_dir) in record.message
    assert "TORCH_EXTENSIONS_DIR" in record.message
    (build_dir / "deepspeed_shm_comm.so").write_bytes(b"")  # built by an earlier start
    caplog.clear()
    assert pending_op_builds() == []
    with caplog.at_level(logging.WARNING, logger="fuseflow.trainer.loop"):
        announce_op_builds()
    assert not caplog.records
