"""The committed stubs under fuseflow/wire/gen/ are what scripts/gen_proto.py makes from proto/."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "fuseflow" / "wire" / "gen"


def load_gen_script():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed_grpc_tools_version() -> str:
    text = (GEN / "fuseflow" / "v1" / "teacher_pb2_grpc.py").read_text()
    return re.search(r"GRPC_GENERATED_VERSION = '([^']+)'", text).group(1)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    pytest.importorskip("grpc_tools", reason="regenerating the stubs needs grpcio-tools (fuseflow[test])")
    out = tmp_path_factory.mktemp("gen")
    load_gen_script().generate(out)
    return out


def test_committed_descriptor_matches_proto(regenerated):
    """Version-independent: the schema compiled into the committed stubs is the schema in proto/."""
    from google.protobuf import descriptor_pb2

    from fuseflow.wire.gen.fuseflow.v1 import teacher_pb2

    committed = descriptor_pb2.FileDescriptorProto()
    teacher_pb2.DESCRIPTOR.CopyToProto(committed)
    text = (regenerated / "fuseflow" / "v1" / "teacher_pb2.py").read_text()
    fresh_bytes = ast.literal_eval(re.search(r"AddSerializedFile\((b'.*?')\)\n", text, flags=re.S).group(1))
    fresh = descriptor_pb2.FileDescriptorProto.FromString(fresh_bytes)
    assert committed == fresh, "proto/fuseflow/v1/teacher.proto changed: run python scripts/gen_proto.py"


def test_committed_stubs_are_byte_identical(regenerated):
    import grpc_tools

    installed = getattr(grpc_tools, "__version__", None)
    if installed is None:
        from importlib.metadata import version

        installed = version("grpcio-tools")
    if installed != committed_grpc_tools_version():
        committed = committed_grpc_tools_version()
        pytest.skip(f"stubs were generated with grpcio-tools {committed}, {installed} is installed")
    fresh = {p.relative_to(regenerated): p.read_bytes() for p in regenerated.rglob("*") if p.is_file()}
    committed = {
        p.relative_to(GEN): p.read_bytes()
        for p in GEN.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.relative_to(GEN) != Path("__init__.py")
    }
    assert sorted(fresh) == sorted(committed)
    drifted = [str(p) for p in fresh if fresh[p] != committed[p]]
    assert not drifted, f"{drifted} differ from a fresh generation: run python scripts/gen_proto.py"


def test_generated_imports_resolve_inside_fuseflow():
    from fuseflow.wire.gen.fuseflow.v1 import teacher_pb2, teacher_pb2_grpc

    assert teacher_pb2_grpc.fuseflow_dot_v1_dot_teacher__pb2 is teacher_pb2
    assert teacher_pb2.Array.__module__ == "fuseflow.wire.gen.fuseflow.v1.teacher_pb2"
    assert hasattr(teacher_pb2_grpc, "TeacherServiceServicer") and hasattr(teacher_pb2_grpc, "TeacherServiceStub")
