"""Array kernels shared by scoring, evaluation and training: the lm_head epilogue (:mod:`.head`) and its
optional Triton implementation (:mod:`.triton_head`, imported only when used)."""

from fuseflow.kernels.head import (
    HEAD_METHODS,
    LogitTransform,
    apply_logit_transform,
    block_topk,
    logsumexp_transformed,
    token_nll,
    token_nll_with_head,
    topk_logprobs,
    topk_logprobs_with_head,
)

__all__ = [
    "HEAD_METHODS",
    "LogitTransform",
    "apply_logit_transform",
    "block_topk",
    "logsumexp_transformed",
    "token_nll",
    "token_nll_with_head",
    "topk_logprobs",
    "topk_logprobs_with_head",
]
