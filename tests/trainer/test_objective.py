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
