"""fuseflow: fuse the knowledge of LLMs with different architectures and tokenizers.

Data flow, in the order a reader meets it in the tree:
``fuseflow.models`` (load) → ``fuseflow.teacher`` (score) → ``fuseflow.align`` (to target tokens and vocab)
→ ``fuseflow.fuse`` (fuse distributions, losses) → ``fuseflow.trainer`` (step).
"""

__version__ = "0.1.0"
