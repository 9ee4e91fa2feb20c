"""``fuseflow.gateway``: ``fuseflow serve-ensemble``, the Cool-Fusion OpenAI-compatible HTTP server — a thin
FastAPI shell over :mod:`fuseflow.ensemble` (request schemas in :mod:`.protocol`, Prometheus in :mod:`.metrics`)."""

from fuseflow.cli import Command

COMMANDS = (
    Command(("serve-ensemble",), "Cool-Fusion OpenAI-compatible gateway over gRPC teachers or in-process models",
            "fuseflow.gateway.server"),
)
