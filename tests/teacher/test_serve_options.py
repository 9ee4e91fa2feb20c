"""``fuseflow teacher serve``'s gRPC server options come from the run config's ``serve`` section by field name
(issue 25: no hand-copied list that a new field can miss)."""

from __future__ import annotations

import dataclasses

import pytest

from fuseflow.config import ServeConfig
from fuseflow.teacher.serve import PROCESS_FIELDS, UsageError, server_options
from fuseflow.teacher.server import ServerOptions


def test_every_serve_field_is_a_server_option_or_the_process_s():
    options = {f.name for f in dataclasses.fields(ServerOptions)}
    assert PROCESS_FIELDS <= set(ServeConfig.model_fields)
    assert not set(ServeConfig.model_fields) - PROCESS_FIELDS - options, "a serve field neither reaches the server nor is the process's"


def test_server_options_carry_the_section(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSEFLOW_TEACHER_TOKEN", raising=False)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    serve = ServeConfig(host="127.0.0.1", port=0, max_texts=3, max_tokens=100, max_text_bytes=900, max_concurrent_rpcs=5,
                        max_tokenizing=4, max_top_k=11, max_wait_ms=2.5, token_file=token)
    options = server_options(serve)
    shared = set(ServeConfig.model_fields) - PROCESS_FIELDS
    assert {name: getattr(options, name) for name in shared} == {name: getattr(serve, name) for name in shared}
    assert options.token == "s3cret" and options.tls_cert is None
    # the defaults of the two agree, so a standalone server and a configured one start alike
    assert {n: getattr(server_options(ServeConfig()), n) for n in shared} == {n: getattr(ServerOptions(), n) for n in shared}


def test_a_limit_the_server_refuses_is_named_as_the_serve_field():
    with pytest.raises(UsageError, match="the request limits need a .*-byte message"):
        server_options(ServeConfig(max_tokens=1 << 29))
