"""fuseflow.models: the trunk / head split the training loss relies on."""

from __future__ import annotations

import pytest
import torch
import transformers

from fuseflow.models import ModelLoadError, load, split_head


def test_split_head_reproduces_the_models_logits(tiny_llama, tiny_gemma):
    """lm_head(trunk(ids)), soft-capped as HeadSpec says, equals the model's own logits (Llama: no cap;
    Gemma-3 with a final_logit_softcapping small enough to bend the tiny model's logits)."""
    for path, cap in ((tiny_llama, None), (tiny_gemma, 0.05)):
        model = load(path).model
        if cap is not None:
            model.config.final_logit_softcapping = cap
        spec = split_head(model)
        assert spec.logit_softcap == cap
        ids = torch.arange(1, 12)[None]
        with torch.no_grad():
            want = model(input_ids=ids).logits
            z = torch.nn.functional.linear(spec.trunk(input_ids=ids).last_hidden_state, spec.weight, spec.bias)
            if spec.logit_softcap is not None:
                z = spec.logit_softcap * torch.tanh(z / spec.logit_softcap)
        torch.testing.assert_close(z, want, atol=1e-5, rtol=1e-5)


def test_split_head_rejects_a_logit_scale_the_loss_would_ignore():
    config = transformers.CohereConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, logit_scale=0.5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    with pytest.raises(ModelLoadError, match=r"scales its logits \({'logit_scale': 0.5}\).*cannot be a training target"):
        split_head(transformers.CohereForCausalLM(config))
