import numpy as np
import pytest

from fuseflow.models import encode
from fuseflow.sparse import AlignedDist, Sample
from fuseflow.trainer.batches import IGNORE, BatchError, collate, loss_positions


def _dist(n, k, seed):
    rng = np.random.default_rng(seed)
    lp = np.sort(np.log(rng.dirichlet(np.ones(k), size=n)).astype(np.float32), axis=1)[:, ::-1].copy()
    return AlignedDist(
        ids=rng.integers(0, 100, (n, k)).astype(np.int32), logprobs=lp,
        gold_logprobs=lp[:, 0].copy(), aligned=np.ones(n, bool),
    )


def test_collate_pads_and_stacks(bpe_tokenizer):
    samples = [Sample("a", "The quick brown fox."), Sample("b", "Hi.")]
    encs = [encode(bpe_tokenizer, s.text) for s in samples]
    dists = [{"t1": _dist(len(e.ids) - 1, 3, i), "t2": _dist(len(e.ids) - 1, 5, 10 + i)} for i, e in enumerate(encs)]
    b = collate(samples, bpe_tokenizer, dists, ["t1", "t2"], top_k=4)
    L = max(len(e.ids) for e in encs)
    assert b.input_ids.shape == (2, L) and b.labels.shape == (2, L - 1)
    assert b.teacher_ids.shape == (2, 2, L - 1, 4)
    n1 = len(encs[1].ids) - 1
    assert (b.labels[1, n1:] == IGNORE).all() and not b.loss_mask[1, n1:].any()
    assert b.labels[0].tolist() == encs[0].ids[1:].tolist()
    # a teacher with fewer than top_k entries is padded with -inf; one with more is cut
    assert np.isneginf(b.teacher_logprobs[0, 0, :, 3].numpy()).all()
    assert np.allclose(b.teacher_logprobs[1, 0, : len(encs[0].ids) - 1].numpy(), dists[0]["t2"].logprobs[:, :4])
    assert b.num_tokens == sum(len(e.ids) - 1 for e in encs)


def test_collate_rejects_mismatched_positions(bpe_tokenizer):
    s = Sample("x", "Some text here.")
    n = len(encode(bpe_tokenizer, s.text).ids) - 1
    with pytest.raises(BatchError, match="sample x: teacher 't' sent"):
        collate([s], bpe_tokenizer, [{"t": _dist(n + 1, 2, 0)}], ["t"], 2)
    with pytest.raises(BatchError, match="no distribution from teacher 'u'"):
        collate([s], bpe_tokenizer, [{"t": _dist(n, 2, 0)}], ["t", "u"], 2)


def test_loss_positions_follow_predicted_token(bpe_tokenizer):
    text = "user: hello\nassistant: the answer"
    enc = encode(bpe_tokenizer, text)
    start = text.index("the answer")
    keep = loss_positions(enc, [(start, len(text))])
    starts = enc.offsets[1:, 0]
    # slow reference: position t counts iff token t+1 starts inside the span
    assert keep.tolist() == [bool(start <= s < len(text)) for s in starts]
    assert keep.any() and not keep.all()
