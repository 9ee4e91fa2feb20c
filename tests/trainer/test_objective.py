"""FusionObjective options that change how, not what, it computes."""

from __future__ import annotations

import pytest
import torch

from fuseflow.config import FusionConfig
from fuseflow.models import load
from fuseflow.sparse import Sample
from fuseflow.trainer.batches import collate
from fuseflow.trainer.loop import FusionObjective

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hi.", "A much longer sentence about packing rows.", "Ok"]


@pytest.mark.slow
def test_compiled_trunk_trains_like_eager(tiny_llama):
    """train.compile: the torch.compile'd trunk (dynamic shapes, packed rows) gives the eager loss and
    gradients, backward included."""
    results = []
    for compile_trunk in (False, True):
        lm = load(tiny_llama)
        lm.model.train()
        objective = FusionObjective(lm.model, FusionConfig(top_k=3), chunk_tokens=16, zero_stage=0)
        if compile_trunk:
            objective._trunk.compile(dynamic=True)
        samples = [Sample(f"s{i}", t) for i, t in enumerate(TEXTS)]
        batch = collate(samples, lm.tokenizer, None, [], 3, pack=True)
        assert batch.position_ids is not None  # the packed layout, restarts and all
        parts, _ = objective(batch)
        parts.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in lm.model.parameters() if p.grad is not None])
        results.append((parts.loss.detach(), grads))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=1e-4)


def test_student_gold_is_the_dense_log_softmax_at_the_labels():
    """fuseflow.fuse.loss.student_gold against log_softmax of the full logits, by chunks smaller than the batch."""
    from fuseflow.fuse.loss import student_gold

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 7, 16), torch.randn(50, 16)
    labels = torch.randint(0, 50, (2, 7))
    mask = torch.rand(2, 7) > 0.3
    gold = student_gold(hidden, weight, labels, mask, chunk_tokens=3, logit_softcap=30.0)
    dense = torch.log_softmax(30.0 * torch.tanh(hidden @ weight.T / 30.0), -1)  # [B, T, V]
    torch.testing.assert_close(gold[mask], dense.gather(-1, labels.unsqueeze(-1)).squeeze(-1)[mask])
    assert (gold[~mask] == 0).all()


def _teacher_batch(lm, gold_logprob: float, k: int = 3, pack: bool = False):
    """The batch of TEXTS with one teacher whose rows are the gold token first, at ``gold_logprob`` (top_k = k:
    no row is cut, so its order does not matter)."""
    import numpy as np

    from fuseflow.sparse import AlignedDist

    samples = [Sample(f"s{i}", t) for i, t in enumerate(TEXTS)]
    dists = []
    for s in samples:
        target = lm.tokenizer(s.text)["input_ids"]
        t = len(target) - 1
        ids = np.zeros((t, k), np.int32)
        ids[:, 0] = target[1:]
        ids[:, 1:] = (np.array(target[1:])[:, None] + np.arange(1, k)) % len(lm.tokenizer)
        # the rest of the mass on other ids: a teacher wrong and sure of it (its KL is large) or sure of the gold
        lps = np.full((t, k), -30.0 if gold_logprob > -1 else np.log(0.9 / (k - 1)), np.float32)
        lps[:, 0] = gold_logprob
        meta = {"nll": float(-gold_logprob * t)}
        dists.append({"teacher": AlignedDist(ids, lps, np.full(t, gold_logprob, np.float32), np.ones(t, bool), meta)})
    return collate(samples, lm.tokenizer, dists, ["teacher"], k, pack=pack)


@pytest.mark.parametrize("kl", ["renormalised", "tail"])
@pytest.mark.parametrize("criterion", ["aligned", "text"])
@pytest.mark.parametrize("pack", [False, True])
def test_the_student_as_a_candidate_trains_on_the_text_where_no_teacher_beats_it(tiny_llama, criterion, pack, kl):
    """fusion.student_candidate (issue 22): a teacher worse than the student (its gold at logprob −60) is never
    picked: the student's candidate, the text itself, is, so the KL is the CE of the gold token and the loss is
    CLM alone; a teacher sure of the gold text (logprob 0) is picked as without the option (same loss)."""
    lm = load(tiny_llama)
    for gold_lp, worse in ((-60.0, True), (0.0, False)):
        batch = _teacher_batch(lm, gold_lp, pack=pack)
        parts = {}
        for own in (False, True):
            cfg = FusionConfig(top_k=3, lam=0.5, criterion=criterion, kl=kl, student_candidate=own)
            parts[own], _ = FusionObjective(lm.model, cfg, chunk_tokens=8, zero_stage=0)(batch)
        if worse:
            assert parts[False].kl > 1.0
            torch.testing.assert_close(parts[True].kl, parts[True].clm)
            torch.testing.assert_close(parts[True].loss.detach(), parts[True].clm)
        else:
            torch.testing.assert_close(parts[True].loss, parts[False].loss)
