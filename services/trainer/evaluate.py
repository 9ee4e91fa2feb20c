"""Held-out language-modelling evaluation: negative log-likelihood, perplexity and bits per byte.

Perplexity is per token of the model's own tokenizer, so it cannot be compared across tokenizers;
bits per byte (``nll / ln 2 / UTF-8 bytes``) can, and is the number the fusion table compares.

How every text is scored, identically for every model so that bits per byte stay comparable:

- The text is tokenized by the model's tokenizer with its special tokens. If the tokenizer does not put
  a BOS in front by itself, its BOS (else its EOS) is prepended as context, as lm-evaluation-harness's
  ``loglikelihood_rolling`` does: every token of the text is then predicted, the first one included.
- Long texts are scored in windows of ``max_length`` tokens that overlap by exactly one token: window
  ``w`` covers tokens ``[w·(m−1), w·(m−1)+m)`` and predicts all but its first, which the previous window
  already predicted. Each token is predicted exactly once; context restarts at every window (no
  sliding-window context), so a smaller ``max_length`` gives a slightly higher nll.
- ``bytes`` is the UTF-8 length of each text: since every token is predicted, every byte is scored once,
  and the count is the same whatever the tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from fuseflow.kernels.head import LogitTransform, apply_logit_transform, token_nll_with_head

DEFAULT_MAX_LENGTH = 2048
# fp32 logits per chunk of positions: 2²⁶ floats = 256 MiB, e.g. 256 positions of a 262k vocabulary.
LOGITS_CHUNK_ELEMENTS = 1 << 26
# Windows buffered before sorting by length and batching; bounds memory on any number of texts.
BUFFER_BATCHES = 32


def rolling_windows(num_tokens: int, max_length: int) -> np.ndarray:
    """Token ranges ``[W, 2]`` (start, end) covering ``num_tokens`` tokens, consecutive ones sharing one
    token, so positions ``start+1 … end-1`` of all windows predict tokens ``1 … num_tokens-1`` exactly once."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    if num_tokens < 2:
        return np.zeros((0, 2), dtype=np.int64)
    starts = np.arange(0, num_tokens - 1, max_length - 1, dtype=np.int64)  # [W]
    return np.stack([starts, np.minimum(starts + max_length, num_tokens)], axis=1)  # [W, 2]


def bits_per_byte(nll: float, num_bytes: int) -> float:
    """``nll`` (nats, summed) per UTF-8 byte, in bits."""
    return nll / math.log(2) / num_bytes if num_bytes else float("nan")


def logits_function(model):
    """hidden ``[..., H]`` → logits ``[..., V]`` exactly as ``model.forward`` computes them from the final
    hidden state, including the output post-processing that some architectures apply (Gemma-2 soft-capping,
    Cohere ``logit_scale``, Granite ``logits_scaling``); :func:`evaluate_lm` checks it against the model."""
    head = model.get_output_embeddings()
    transform = LogitTransform.from_config(model.config)  # the one definition: fuseflow.kernels.head

    def logits_fn(hidden: torch.Tensor) -> torch.Tensor:
        return apply_logit_transform(head(hidden), transform)  # in the head's dtype, as model.forward does

    return logits_fn


def _decoder(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise ValueError(f"{type(model).__name__}: cannot find the decoder under the LM head (get_decoder)")
    return decoder


def prefix_token(tokenizer) -> int | None:
    """The id to prepend so that the first text token is predicted, or ``None`` when the tokenizer puts its
    BOS in front by itself."""
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    if bos is not None and ids and ids[0] == bos:
        return None
    prefix = bos if bos is not None else getattr(tokenizer, "eos_token_id", None)
    if prefix is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a BOS nor an EOS token to "
            "prefix texts with; set tokenizer.bos_token"
        )
    return int(prefix)


def _windows(texts: Iterable[str], tokenizer, max_length: int, counts: dict) -> Iterator[np.ndarray]:
    """Token windows ``[≤ max_length]`` of every text; adds the text's bytes and count to ``counts``."""
    prefix = prefix_token(tokenizer)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        ids = np.asarray(([prefix] if prefix is not None else []) + list(ids), dtype=np.int64)  # [n]
        counts["texts"] += 1
        counts["bytes"] += len(text.encode("utf-8"))
        for start, end in rolling_windows(len(ids), max_length):
            yield ids[start:end]


def _batches(windows: list[np.ndarray], batch_tokens: int) -> Iterator[list[np.ndarray]]:
    """Longest first; a batch holds as many windows as fit ``rows × longest ≤ batch_tokens`` (at least one)."""
    windows = sorted(windows, key=len, reverse=True)
    i = 0
    while i < len(windows):
        rows = max(1, batch_tokens // len(windows[i]))
        yield windows[i : i + rows]
        i += rows


def evaluate_lm(
    model,
    tokenizer,
    texts: Iterable[str],
    max_length: int | None = None,
    batch_tokens: int = 16384,
    device: str | torch.device | None = None,
    chunk_tokens: int | None = None,
    progress: bool | None = None,
) -> dict:
    """Score ``texts`` under ``model``; see the module docstring for exactly what is counted.

    ``max_length``: window length in tokens (default: the model's context, at most 2048).
    ``batch_tokens``: padded tokens per forward pass (rows × longest window; a longer window runs alone).
    ``device``: where inputs go (default: the model's first parameter's device); the model is not moved.
    ``chunk_tokens``: positions per fp32 logits chunk (default: 2²⁶ / vocabulary size).
    ``progress``: tqdm bar in tokens; ``None`` shows it when stderr is a terminal.

    Returns ``nll`` (nats, summed), ``tokens`` (predicted), ``bytes`` (UTF-8), ``texts``, ``windows``,
    ``nll_per_token``, ``perplexity`` and ``bpb`` (bits per byte); nan ratios when nothing was scored.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if max_length is None:
        max_length = min(getattr(config, "max_position_embeddings", None) or DEFAULT_MAX_LENGTH, DEFAULT_MAX_LENGTH)
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    decoder, logits_fn = _decoder(model), logits_function(model)
    vocab_size = getattr(config, "vocab_size", None) or model.get_output_embeddings().weight.shape[0]
    chunk = chunk_tokens or max(1, LOGITS_CHUNK_ELEMENTS // vocab_size)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    counts = {"texts": 0, "bytes": 0}
    nll, tokens, num_windows = 0.0, 0, 0
    checked = False
    was_training = model.training
    model.eval()
    bar = tqdm(desc="eval", unit="tok", unit_scale=True, disable=None if progress is None else not progress)
    try:
        with torch.inference_mode():
            windows = _windows(texts, tokenizer, max_length, counts)
            for group in _buffered(windows, BUFFER_BATCHES * batch_tokens):
                for batch in _batches(group, batch_tokens):
                    input_ids, attention_mask = _pad(batch, pad_id, device)  # [B, T], [B, T]
                    if not checked:
                        _check_logits(model, decoder, logits_fn, input_ids[:1, : min(16, len(batch[0]))])
                        checked = True
                    hidden = decoder(
                        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                    ).last_hidden_state  # [B, T, H]
                    predicts = attention_mask[:, 1:].bool()  # [B, T-1]: position t predicts token t+1
                    # logits_fn applies the model's logit transform; chunk positions of logits at a time
                    token_nll = token_nll_with_head(
                        hidden[:, :-1][predicts], logits_fn, input_ids[:, 1:][predicts], chunk_tokens=chunk
                    )  # [N] fp32
                    nll += float(token_nll.double().sum())
                    tokens += token_nll.shape[0]
                    num_windows += len(batch)
                    bar.update(token_nll.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    return {
        "nll": nll,
        "tokens": tokens,
        "bytes": counts["bytes"],
        "texts": counts["texts"],
        "windows": num_windows,
        "max_length": max_length,
        "nll_per_token": nll / tokens if tokens else float("nan"),
        "perplexity": math.exp(nll / tokens) if tokens else float("nan"),
        "bpb": bits_per_byte(nll, counts["bytes"]) if tokens else float("nan"),
    }


def _buffered(windows: Iterable[np.ndarray], limit_tokens: int) -> Iterator[list[np.ndarray]]:
    buffer, size = [], 0
    for window in windows:
        buffer.append(window)
        size += len(window)
        if size >= limit_tokens:
            yield buffer
            buffer, size = [], 0
    if buffer:
        yield buffer


def _pad(batch: list[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    longest = len(batch[0])
    input_ids = np.full((len(batch), longest), pad_id, dtype=np.int64)  # [B, T]
    attention_mask = np.zeros((len(batch), longest), dtype=np.int64)  # [B, T]
    for row, window in enumerate(batch):
        input_ids[row, : len(window)] = window
        attention_mask[row, : len(window)] = 1
    return torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device)


def _check_logits(model, decoder, logits_fn, input_ids: torch.Tensor) -> None:
    """Fail loudly if :func:`logits_function` does not reproduce ``model``'s own logits (an architecture
    that post-processes logits in a way not handled there), on one short sequence."""
    expected = model(input_ids=input_ids, use_cache=False).logits[0].float()  # [T, V]
    got = logits_fn(decoder(input_ids=input_ids, use_cache=False).last_hidden_state[0]).float()  # [T, V]
    tol = 1e-4 if got.dtype == torch.float32 and model.dtype == torch.float32 else 3e-2
    if not torch.allclose(got, expected, rtol=tol, atol=tol * max(1.0, float(expected.abs().max()))):
        raise ValueError(
            f"{type(model).__name__}: logits from the decoder's hidden states and the output head differ "
            f"from the model's own (max diff {float((got - expected).abs().max()):.3g}); evaluate_lm does "
            "not support this architecture's logit post-processing"
        )
