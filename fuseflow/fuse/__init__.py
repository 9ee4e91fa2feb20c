"""Fuse the teachers' aligned sparse distributions (``fusion``) and train on them (``loss``)."""

from fuseflow.fuse.fusion import FUSIONS, fusion, get_fusion, merge_duplicate_ids
from fuseflow.fuse.loss import LossParts, clm_loss, fusion_loss, per_teacher_ce, sparse_kl

__all__ = [
    "FUSIONS",
    "LossParts",
    "clm_loss",
    "fusion",
    "fusion_loss",
    "get_fusion",
    "merge_duplicate_ids",
    "per_teacher_ce",
    "sparse_kl",
]
