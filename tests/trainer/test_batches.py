import numpy as np
import pytest
import torch

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


def _samples_and_dists(tokenizer, texts, k=3):
    samples = [Sample(f"s{i}", t) for i, t in enumerate(texts)]
    encs = [encode(tokenizer, s.text) for s in samples]
    dists = [{"t1": _dist(len(e.ids) - 1, k, i), "t2": _dist(len(e.ids) - 1, k, 50 + i)} for i, e in enumerate(encs)]
    return samples, encs, dists


TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi.", "A much longer sentence about packing rows.", "Ok"]


def test_packed_collate_lays_samples_end_to_end(bpe_tokenizer):
    samples, encs, dists = _samples_and_dists(bpe_tokenizer, TEXTS)
    padded = collate(samples, bpe_tokenizer, dists, ["t1", "t2"], top_k=3)
    packed = collate(samples, bpe_tokenizer, dists, ["t1", "t2"], top_k=3, pack=True)
    lengths = [len(e.ids) for e in encs]
    # rows no longer than the longest sample (SDPA default): fewer rows than samples, nothing lost
    assert packed.input_ids.shape[0] < len(samples) and packed.input_ids.shape[1] == max(lengths)
    assert packed.attention_mask is None and packed.position_ids.shape == packed.input_ids.shape
    assert packed.num_tokens == padded.num_tokens
    # Slow reference: walk every row's positions and find each sample by its restarting position ids.
    found = {}
    for r in range(packed.input_ids.shape[0]):
        pos = packed.position_ids[r].tolist()
        starts = [p for p in range(len(pos)) if pos[p] == 0]
        for a, b in zip(starts, starts[1:] + [len(pos)]):
            ids = packed.input_ids[r, a:b].tolist()
            match = [i for i, e in enumerate(encs) if e.ids.tolist() == ids and i not in found]
            if not match:
                continue  # the padding tail, a segment of its own
            i = match[0]
            found[i] = (r, a)
            n = lengths[i]
            assert packed.labels[r, a : a + n - 1].tolist() == encs[i].ids[1:].tolist()
            assert packed.loss_mask[r, a : a + n - 1].all()
            if a + n - 1 < packed.labels.shape[1]:  # the last token predicts nothing across the boundary
                assert not packed.loss_mask[r, a + n - 1] and packed.labels[r, a + n - 1] == IGNORE
            np.testing.assert_array_equal(packed.teacher_logprobs[1, r, a : a + n - 1].numpy(), dists[i]["t2"].logprobs)
            np.testing.assert_array_equal(packed.teacher_ids[0, r, a : a + n - 1].numpy(), dists[i]["t1"].ids)
    assert sorted(found) == list(range(len(samples)))


def test_packed_batch_gives_the_padded_loss(tiny_llama, tiny_gemma):
    """The trainer's objective on a packed micro-batch equals the padded one (attention never crosses samples)."""
    import torch

    from fuseflow.config import FusionConfig
    from fuseflow.models import load
    from fuseflow.trainer.loop import FusionObjective

    for path in (tiny_llama, tiny_gemma):
        lm = load(path)
        samples, encs, dists = _samples_and_dists(lm.tokenizer, TEXTS)
        ids_max = lm.model.config.vocab_size
        for d in dists:
            for t in d.values():
                t.ids[:] %= ids_max
        objective = FusionObjective(lm.model, FusionConfig(top_k=3), chunk_tokens=16, zero_stage=0)
        losses = []
        for pack in (False, True):
            batch = collate(samples, lm.tokenizer, dists, ["t1", "t2"], top_k=3, pack=pack)
            with torch.no_grad():
                parts, _ = objective(batch)
            losses.append((float(parts.loss), float(parts.clm), float(parts.kl), int(parts.n_tokens)))
        assert losses[0][3] == losses[1][3]
        np.testing.assert_allclose(losses[0][:3], losses[1][:3], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pack", [False, True])
def test_collate_spreads_each_teachers_text_nll_over_its_sample(bpe_tokenizer, pack):
    """``teacher_text_ce`` (fusion.criterion 'text'): a teacher's whole-text nll over the sample's target positions,
    on every position of that sample, padded or packed; None as soon as one distribution carries no nll."""
    samples, encs, dists = _samples_and_dists(bpe_tokenizer, TEXTS)
    for i, per_teacher in enumerate(dists):
        for j, d in enumerate(per_teacher.values()):
            d.meta["nll"] = 10.0 * (i + 1) + j
    batch = collate(samples, bpe_tokenizer, dists, ["t1", "t2"], top_k=3, pack=pack)
    seg = batch.segment_ids if batch.segment_ids is not None else torch.arange(len(samples)).unsqueeze(-1)
    for i, e in enumerate(encs):
        n = len(e.ids) - 1
        at = (seg == i) & batch.loss_mask if batch.segment_ids is not None else None
        for j in range(2):
            values = batch.teacher_text_ce[j][at] if at is not None else batch.teacher_text_ce[j, i, :n]
            assert values.numel() == n
            torch.testing.assert_close(values, torch.full((n,), (10.0 * (i + 1) + j) / n))
    del dists[2]["t2"].meta["nll"]
    assert collate(samples, bpe_tokenizer, dists, ["t1", "t2"], top_k=3, pack=pack).teacher_text_ce is None
