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
from collections.abc import Iterable, Iterator, Sequence

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


def _windows(texts: Iterable[str], tokenizer, max_length: int, counts: dict) -> Iterator[tuple[int, np.ndarray]]:
    """(text number, token window ``[≤ max_length]``) of every text; adds each text's bytes to ``counts``."""
    prefix = prefix_token(tokenizer)
    for number, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        ids = np.asarray(([prefix] if prefix is not None else []) + list(ids), dtype=np.int64)  # [n]
        counts["texts"] += 1
        counts["bytes"] += len(text.encode("utf-8"))
        counts["text_bytes"].append(len(text.encode("utf-8")))
        for start, end in rolling_windows(len(ids), max_length):
            yield number, ids[start:end]


def _batches(windows: list[tuple[int, np.ndarray]], batch_tokens: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    """Longest first; a batch holds as many windows as fit ``rows × longest ≤ batch_tokens`` (at least one)."""
    windows = sorted(windows, key=lambda w: len(w[1]), reverse=True)
    i = 0
    while i < len(windows):
        rows = max(1, batch_tokens // len(windows[i][1]))
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
    ``nll_per_token``, ``perplexity`` and ``bpb`` (bits per byte); nan ratios when nothing was scored; and per
    text, in input order, ``text_nll`` and ``text_bytes`` (per-corpus figures and bootstraps over documents).
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

    counts: dict = {"texts": 0, "bytes": 0, "text_bytes": []}
    text_nll: dict[int, float] = {}
    nll, tokens, num_windows = 0.0, 0, 0
    checked = False
    was_training = model.training
    model.eval()
    bar = tqdm(desc="eval", unit="tok", unit_scale=True, disable=None if progress is None else not progress)
    try:
        with torch.inference_mode():
            windows = _windows(texts, tokenizer, max_length, counts)
            for group in _buffered(windows, BUFFER_BATCHES * batch_tokens):
                for numbered in _batches(group, batch_tokens):
                    numbers, batch = [n for n, _ in numbered], [w for _, w in numbered]
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
                    row_nll = torch.zeros(len(batch), dtype=torch.float64, device=token_nll.device)  # [B]
                    row_nll.index_add_(0, predicts.nonzero()[:, 0], token_nll.double())
                    for number, value in zip(numbers, row_nll.tolist()):
                        text_nll[number] = text_nll.get(number, 0.0) + value
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
        "text_nll": [text_nll.get(i, 0.0) for i in range(counts["texts"])],
        "text_bytes": counts["text_bytes"],
    }


def group_bpb(text_nll: Sequence[float], text_bytes: Sequence[int], groups: Sequence[str]) -> dict[str, float]:
    """Bits per byte of each group of texts (e.g. per corpus): summed nll over summed bytes within a group."""
    nll, nbytes, names = np.asarray(text_nll, float), np.asarray(text_bytes, float), np.asarray(groups)  # [N] each
    return {str(g): bits_per_byte(float(nll[names == g].sum()), int(nbytes[names == g].sum())) for g in dict.fromkeys(groups)}


def bootstrap_bpb(
    text_nll: Sequence[float],
    text_bytes: Sequence[int],
    baseline_nll: Sequence[float] | None = None,
    num_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Bits per byte of a set of documents and its percentile-bootstrap interval, resampling documents with
    replacement (the unit that was sampled; tokens within a document are not independent).

    With ``baseline_nll`` (the same documents under another model) it is the *paired* bootstrap of the
    difference ``bpb − baseline bpb``: both models are resampled on the same documents, so document
    difficulty, which both share, cancels out. Returns ``value``, ``low``, ``high``, ``std``.
    """
    nll = np.asarray(text_nll, dtype=np.float64)  # [N]
    if baseline_nll is not None:
        nll = nll - np.asarray(baseline_nll, dtype=np.float64)
    nbytes = np.asarray(text_bytes, dtype=np.float64)  # [N]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(nll), size=(num_resamples, len(nll)))  # [R, N]
    samples = nll[picks].sum(1) / math.log(2) / nbytes[picks].sum(1)  # [R]
    alpha = (1 - level) / 2
    return {
        "value": float(nll.sum() / math.log(2) / nbytes.sum()),
        "low": float(np.quantile(samples, alpha)),
        "high": float(np.quantile(samples, 1 - alpha)),
        "std": float(samples.std(ddof=1)),
    }


def _buffered(windows: Iterable[tuple[int, np.ndarray]], limit_tokens: int) -> Iterator[list[tuple[int, np.ndarray]]]:
    buffer, size = [], 0
    for window in windows:
        buffer.append(window)
        size += len(window[1])
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
