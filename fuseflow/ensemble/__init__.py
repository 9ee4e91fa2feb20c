"""Cool-Fusion (arXiv 2407.19807): training-free fusion of LLMs with different tokenizers at inference.

- :mod:`~fuseflow.ensemble.boundaries` — where a segment may end: token boundaries common to every source;
- :mod:`~fuseflow.ensemble.rerank` — how every source's scores of every candidate are combined (registry);
- :mod:`~fuseflow.ensemble.sources` — a teacher (engine or gRPC client) + its local tokenizer;
- :mod:`~fuseflow.ensemble.decoder` — the decoding loop, and the single-model mode for comparison;
- :mod:`~fuseflow.ensemble.evaluate`, :mod:`~fuseflow.ensemble.tasks` — ``fuseflow eval-ensemble``.

The OpenAI-compatible HTTP server over this package, ``fuseflow serve-ensemble``, is the service
``fuseflow.gateway`` (services/gateway).
"""

from fuseflow.ensemble.decoder import Completion, CoolFusionDecoder, DecodeParams, Segment, generate_single
from fuseflow.ensemble.sources import EnsembleSource, Prompt, chat_prompt, completion_prompt

__all__ = [
    "Completion",
    "CoolFusionDecoder",
    "DecodeParams",
    "EnsembleSource",
    "Prompt",
    "Segment",
    "chat_prompt",
    "completion_prompt",
    "generate_single",
]
