"""Token alignment: a teacher's predictions, made in its own tokenization and vocabulary, moved onto the
target's positions (:mod:`.sequence`) and vocabulary (:mod:`.vocab`), then projected (:mod:`.project`).
Token strings are normalised across tokenizer families in :mod:`.tokens`; batched edit distances live in
:mod:`.levenshtein`.
"""

from fuseflow.align.project import align_scored, project_to_target
from fuseflow.align.sequence import SEQUENCE_ALIGNERS, align_mined_dp, align_offsets
from fuseflow.align.tokens import token_strings
from fuseflow.align.vocab import VOCAB_MAPS, build_vocab_map

__all__ = [
    "SEQUENCE_ALIGNERS",
    "VOCAB_MAPS",
    "align_mined_dp",
    "align_offsets",
    "align_scored",
    "build_vocab_map",
    "project_to_target",
    "token_strings",
]
