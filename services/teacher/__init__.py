"""``fuseflow.teacher``: a source model as a service — the gRPC server over an engine (:mod:`fuseflow.score`),
the request batcher, the Redis worker of a run, metrics — and its command."""

from fuseflow.cli import Command

COMMANDS = (
    Command(("teacher", "serve"), "serve a source model over gRPC (and as a run's Redis worker)", "fuseflow.teacher.serve"),
)
