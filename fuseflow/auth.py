"""Bearer credentials, one parser for the teacher's gRPC metadata and the gateway's HTTP header.

``Authorization: <scheme> <credential>``: the scheme is case-insensitive (RFC 7235, section 2.1), so
``bearer``, ``Bearer`` and ``BEARER`` are the same scheme (issue 26); the credential is compared in constant
time.
"""

from __future__ import annotations

import hmac


def bearer_credential(header: str | bytes | None) -> str | None:
    """The credential of an ``Authorization: Bearer <credential>`` header value; None for a missing header,
    another scheme, or an empty credential."""
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, credential = (header or "").strip().partition(" ")
    credential = credential.strip()
    return credential if scheme.lower() == "bearer" and credential else None


def bearer_matches(header: str | bytes | None, expected: str) -> bool:
    """``header`` carries ``Bearer <expected>`` (any case of the scheme), compared in constant time."""
    credential = bearer_credential(header)
    return credential is not None and hmac.compare_digest(credential.encode(), expected.encode())
