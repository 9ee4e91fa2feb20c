"""Scoring: the engine contract (:mod:`.engine`), its engines (:mod:`.hf_engine`, :mod:`.vllm_engine`),
length-bucketed batching, the prefix KV cache, and teacher-side alignment to the target (:mod:`.aligner`).

Library code with no process of its own: ``fuseflow teacher serve`` (services/teacher) puts an engine behind
gRPC and the Redis worker; ``fuseflow fuse`` and Cool-Fusion use the same engines in process.
"""
