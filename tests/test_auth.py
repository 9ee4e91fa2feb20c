"""The one bearer-credential parser of the teacher (gRPC metadata) and the gateway (HTTP header)."""

from __future__ import annotations

import pytest

from fuseflow.auth import bearer_credential, bearer_matches


@pytest.mark.parametrize("header", ["Bearer k3y", "bearer k3y", "BEARER k3y", "  bEaReR   k3y  ", b"Bearer k3y"])
def test_the_scheme_is_case_insensitive(header):
    assert bearer_credential(header) == "k3y" and bearer_matches(header, "k3y")


@pytest.mark.parametrize("header", [None, "", "k3y", "Basic k3y", "Bearer", "Bearer ", "Bearerk3y", "Bearer k3yy"])
def test_other_schemes_and_wrong_credentials_do_not_match(header):
    assert not bearer_matches(header, "k3y")
