"""The wire: generated gRPC stubs (``gen/``), the array codec, and the transports that carry samples to
teachers and aligned distributions to the trainer (Redis streams across processes, queues in one process).
"""

from fuseflow.wire.inprocess import InProcessTransport
from fuseflow.wire.redis_streams import RedisTransport
from fuseflow.wire.transport import ReadySample, Transport, WorkItem

__all__ = ["InProcessTransport", "ReadySample", "RedisTransport", "Transport", "WorkItem"]
