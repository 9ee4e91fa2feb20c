"""FuseChat parameter-space merging (VaRM, SCE, linear, task arithmetic, TIES, DARE), streamed by tensor.

``methods`` holds the pure tensor functions behind the ``MERGE_METHODS`` registry; ``plan`` checks the
models and plans every output tensor from safetensors headers; ``execute`` streams the tensors through a
method into output shards; ``run`` is the ``fuseflow merge CONFIG`` command.
"""

from .methods import MERGE_METHODS, MergeMethod, get_method, merge_method
from .plan import MergeCheckError, MergePlan, build_plan, inspect_model
from .run import load_config, run_merge

__all__ = [
    "MERGE_METHODS",
    "MergeCheckError",
    "MergeMethod",
    "MergePlan",
    "build_plan",
    "get_method",
    "inspect_model",
    "load_config",
    "merge_method",
    "run_merge",
]
