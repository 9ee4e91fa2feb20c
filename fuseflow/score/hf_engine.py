"""The ``hf`` engine: a transformers causal LM scored in packed rows with a chunked head.

Batches: requests are packed end to end into rows (:mod:`fuseflow.packing`: restarted position ids, no
padding FLOPs) and the rows grouped under a token budget (:mod:`fuseflow.score.batching`).

Memory: the decoder trunk gives ``[B, T, H]`` hidden states; only the positions that predict a real token
are kept (``[N, H]``) and the lm_head runs on ``head_chunk_tokens`` of them at a time
(:mod:`fuseflow.kernels.head`), so one ``[chunk, V]`` logits block in the model's dtype is alive, with the
fp32 logsumexp taken a vocabulary slice at a time. Gemma-3's 262k vocabulary at 8k tokens would otherwise
need 8 GiB of fp32 logits per sequence (the ``[prompt_tokens, vocab]`` OOMs reported against vLLM's prompt
logprobs). Top-k and the gold-token gather run on the device; only ``[N, k]`` crosses to the host.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fuseflow.kernels.head import HEAD_METHODS, LogitTransform, apply_logit_transform, topk_logprobs_with_head
from fuseflow.models import LoadedModel, load
from fuseflow.packing import is_varlen, pack_rows, row_capacity, row_layout
from fuseflow.score.batching import plan_batches
from fuseflow.score.engine import Engine, EngineOptions, Generated, NextTokenScores, ScoreError, register_engine
from fuseflow.score.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

# fp32 bytes of one [chunk, V] logits block when head_chunk_tokens is left to the engine.
_AUTO_HEAD_CHUNK_BYTES = 256 << 20


# ----------------------------------------------------------------------------------------------------------
# Pure tensor functions.
# ----------------------------------------------------------------------------------------------------------


def sample_next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """One token from ``logits`` [V] (fp32): argmax at temperature 0, else nucleus sampling
    (Holtzman et al. 2020: the smallest set of tokens whose probability reaches ``top_p``)."""
    if temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)  # [V]
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)  # [V]
        # Keep a token if the mass before it is still short of top_p: the first token is always kept.
        keep = (torch.cumsum(sorted_probs, dim=-1) - sorted_probs) < top_p  # [V]
        sorted_probs = sorted_probs * keep
        pick = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[pick])
    return int(torch.multinomial(probs, 1, generator=generator))


# ----------------------------------------------------------------------------------------------------------
# The engine.
# ----------------------------------------------------------------------------------------------------------


def _parse_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"engine option dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


class HFEngineOptions(EngineOptions):
    """``engine_options`` of an ``engine: hf`` source: :class:`HFEngine`'s keyword arguments."""

    device: str = "cpu"
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = "auto"
    max_length: int | None = Field(None, gt=1, description="longest sequence, special tokens included")
    max_top_k: int | None = Field(None, ge=1)
    max_batch_tokens: int = Field(8192, gt=0, description="padded tokens per forward")
    max_batch_size: int = Field(64, gt=0, description="sequences per forward")
    head_chunk_tokens: int | None = Field(None, gt=0, description="tokens per lm_head chunk (bounds [chunk, V])")
    name: str | None = None
    pack: bool = Field(True, description="pack sequences end to end into rows instead of padding them")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] | None = None
    head_method: Literal[HEAD_METHODS] = Field("auto", description="top-k kernel of the lm_head epilogue")
    compile: bool = Field(False, description="torch.compile the decoder trunk")
    prefix_cache: int = Field(4, ge=0, description="prefix KV caches kept for Cool-Fusion's growing contexts")


@register_engine("hf", HFEngineOptions)
class HFEngine(Engine):
    """transformers + torch on CPU or CUDA.

    Options: ``device`` ("cpu", "cuda", "cuda:1"), ``dtype`` ("auto": bf16 on CUDA, fp32 on CPU),
    ``max_length`` (default: the model's ``max_position_embeddings``, capped by the tokenizer's
    ``model_max_length``), ``max_top_k`` (default: no cap below the vocabulary), ``max_batch_tokens``
    (tokens per forward, row padding included), ``max_batch_size`` (rows per forward), ``head_chunk_tokens``
    (positions per lm_head call; default: as many as fit in 256 MiB of fp32), ``name``. ``model`` is a
    reference for :func:`fuseflow.models.load` or a :class:`~fuseflow.models.LoadedModel` already in memory
    (then ``device`` and ``dtype`` are the model's own).

    Speed options (``docs/performance.md``): ``pack`` (default on) lays several sequences end to end in one
    row with restarted ``position_ids`` instead of padding them (:mod:`fuseflow.packing`);
    ``attn_implementation`` picks transformers' attention kernel (``flash_attention_2`` / ``flex_attention``
    make packed rows truly variable-length; with the default SDPA rows are capped at the longest sequence);
    ``head_method`` is :mod:`fuseflow.kernels.head`'s top-k method (``auto``, ``torch``, ``block``,
    ``triton``); ``compile`` runs the trunk through ``torch.compile`` (dynamic shapes); ``prefix_cache``
    keeps the KV caches of that many recent generations for prompts that extend them
    (:mod:`fuseflow.score.prefix_cache`; 0 turns it off).
    """

    def __init__(
        self,
        model: str | os.PathLike | LoadedModel,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "auto",
        max_length: int | None = None,
        max_top_k: int | None = None,
        max_batch_tokens: int = 8192,
        max_batch_size: int = 64,
        head_chunk_tokens: int | None = None,
        name: str | None = None,
        pack: bool = True,
        attn_implementation: str | None = None,
        head_method: str = "auto",
        compile: bool = False,
        prefix_cache: int = 4,
    ):
        if isinstance(model, LoadedModel):
            # Already in memory (the in-process pipeline, tests): keep its device and dtype.
            loaded = model
            self.device = next(loaded.model.parameters()).device
        else:
            self.device = torch.device(device)
            loaded = load(
                model, dtype=_parse_dtype(dtype, self.device), device=self.device,
                attn_implementation=attn_implementation,
            )
        self.model = loaded.model.eval()
        self.pack = bool(pack)
        self.prefix_cache = PrefixCache(prefix_cache)
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None) or attn_implementation
        # One forward at a time: a forward already uses every core / the whole GPU, and callers (gRPC
        # threads, the Redis worker) may share one engine.
        self._lock = threading.Lock()
        self.tokenizer = loaded.tokenizer
        self.name = name or loaded.name
        self.dtype = next(self.model.parameters()).dtype

        self._head = self.model.get_output_embeddings()
        if self._head is None:
            raise ValueError(f"model {self.name!r} has no output embeddings (lm_head); it is not a causal LM")
        text_config = self.model.config.get_text_config()
        # soft-capping, logit_scale, logits_scaling: whatever the model's forward applies after its lm_head
        self._transform = LogitTransform.from_config(text_config)
        if head_method not in HEAD_METHODS:
            raise ValueError(f"engine option head_method must be one of {HEAD_METHODS}, got {head_method!r}")
        self.head_method = head_method
        self._vocab_size = int(self._head.weight.shape[0])

        model_limit = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        tok_limit = int(tok_limit) if tok_limit and tok_limit < 10**7 else None
        limits = [x for x in (model_limit, tok_limit) if x]
        default_max = min(limits) if limits else 2048
        if max_length is None:
            max_length = default_max
        elif not 1 <= max_length <= (model_limit or max_length):
            raise ValueError(
                f"engine option max_length {max_length} must be in [1, {model_limit}] "
                f"(max_position_embeddings of {self.name})"
            )
        self.max_length = int(max_length)
        if max_top_k is not None and max_top_k < 1:
            raise ValueError(f"engine option max_top_k must be >= 1, got {max_top_k}")
        self.max_top_k = max_top_k
        if max_batch_tokens < 1 or max_batch_size < 1:
            raise ValueError(
                f"engine options max_batch_tokens ({max_batch_tokens}) and max_batch_size ({max_batch_size}) "
                "must be >= 1"
            )
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = int(max_batch_size)
        if head_chunk_tokens is None:
            head_chunk_tokens = max(16, min(4096, _AUTO_HEAD_CHUNK_BYTES // (4 * self._vocab_size)))
        elif head_chunk_tokens < 1:
            raise ValueError(f"engine option head_chunk_tokens must be >= 1, got {head_chunk_tokens}")
        self.head_chunk_tokens = int(head_chunk_tokens)

        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None and 0 <= pad < self._vocab_size else 0
        self._keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._hidden = self._pick_hidden_states()
        if compile:
            # Fused kernels for the trunk (norms, rotary, MLP); dynamic shapes since packed rows vary in length.
            # The first batch of each new shape family pays the compile (tens of seconds on CPU).
            (self._trunk if self._hidden == self._trunk_hidden else self.model).compile(dynamic=True)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    # ------------------------------------------------------------------------------------------------------
    # Final hidden states without the head.
    # ------------------------------------------------------------------------------------------------------

    def _trunk_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return self._trunk(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state

    def _output_hidden(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        # Costs one [B, 1, V] logits row and every layer's hidden states: only used when the trunk is not
        # reachable on its own.
        kw = {"logits_to_keep": 1} if self._keeps_logits else {}
        out = self.model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, output_hidden_states=True, **kw
        )
        return out.hidden_states[-1]

    @torch.inference_mode()
    def _pick_hidden_states(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Choose how to get final hidden states, checked against the model's own logits on a probe.

        The decoder trunk (``get_decoder()``) is the cheap way; the probe catches architectures whose
        head does more than ``lm_head`` + soft-capping (a logit scale, say) before they give wrong scores.
        """
        n = min(8, self.max_length)
        probe = (torch.arange(n, device=self.device) * 7919 % self._vocab_size)[None]  # [1, n]
        reference = self.model(input_ids=probe, use_cache=False).logits.float()  # [1, n, V]
        tol = 1e-3 if self.dtype == torch.float32 else 3e-2
        scale = reference.abs().max().clamp_min(1e-6)

        candidates: list[tuple[str, Callable]] = []
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        if decoder is not None and decoder is not self.model:
            self._trunk = decoder
            candidates.append(("decoder trunk", self._trunk_hidden))
        candidates.append(("output_hidden_states", self._output_hidden))
        for label, fn in candidates:
            try:
                logits = self._head(fn(probe)).float()  # [1, n, V]
            except Exception as e:  # an architecture whose trunk wants other inputs: try the next way
                log.debug("%s: %s failed on the probe: %s", self.name, label, e)
                continue
            logits = apply_logit_transform(logits, self._transform)
            if float((logits - reference).abs().max() / scale) < tol:
                log.debug("%s: final hidden states from the %s", self.name, label)
                return fn
        # Both sides of the probe run the same attention kernel: a mismatch under a non-default kernel usually
        # means the kernel is wrong, not the head (torch 2.13's compiled CPU flex attention at head dims <= 16,
        # issue 12).
        kernel = (
            f", or attn_implementation={self.attn_implementation!r} gives inconsistent outputs on this device "
            "(try sdpa)" if self.attn_implementation not in (None, "sdpa", "eager") else ""
        )
        raise ValueError(
            f"model {self.name!r} ({type(self.model).__name__}): lm_head applied to its final hidden states does "
            f"not reproduce its logits (an unsupported logit transform{kernel}); use another engine kind"
        )

    # ------------------------------------------------------------------------------------------------------
    # Scoring.
    # ------------------------------------------------------------------------------------------------------

    def _score(self, ids: list[np.ndarray], top_k: int, temperature: float) -> list[NextTokenScores]:
        with self._lock, torch.inference_mode():
            return self._score_unlocked(ids, top_k, temperature)

    def _score_unlocked(self, ids: list[np.ndarray], top_k: int, temperature: float) -> list[NextTokenScores]:
        # The last token of a sequence predicts nothing: the forward runs on L-1 tokens per sequence.
        n_pred = np.array([len(a) - 1 for a in ids], dtype=np.int64)  # [R]
        out: list[NextTokenScores | None] = [None] * len(ids)
        for i in np.flatnonzero(n_pred <= 0).tolist():
            out[i] = _empty_scores(top_k)
        live = np.flatnonzero(n_pred > 0)  # [R'] requests with at least one predicting position
        if self.pack and live.size > 1:
            capacity = row_capacity(n_pred[live], self.attn_implementation, self.max_batch_tokens)
            rows = [live[r].tolist() for r in pack_rows(n_pred[live], capacity)]
        else:
            rows = [[i] for i in live.tolist()]
        row_tokens = np.array([int(n_pred[r].sum()) for r in rows], dtype=np.int64)  # [rows]
        # A varlen kernel gets one packed row per forward: rows already fill the token budget, and
        # transformers' flash-attention path reads packed position ids only from a batch of one row.
        per_forward = 1 if self.pack and is_varlen(self.attn_implementation) else self.max_batch_size
        for batch in plan_batches(row_tokens, self.max_batch_tokens, per_forward):
            batch_rows = [rows[j] for j in batch]
            topk_ids, topk_lp, gold_lp = self._score_rows(
                [[ids[i] for i in row] for row in batch_rows], top_k, temperature
            )
            order = [i for row in batch_rows for i in row]  # requests in the order their positions come back
            bounds = np.cumsum(n_pred[order])[:-1]
            for i, a, b, c in zip(
                order, np.split(topk_ids, bounds), np.split(topk_lp, bounds), np.split(gold_lp, bounds)
            ):
                out[i] = NextTokenScores(a, b, c)
        return out  # type: ignore[return-value]

    def _score_rows(
        self, rows: list[list[np.ndarray]], top_k: int, temperature: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Score one batch of rows, each row one or more sequences laid end to end (:mod:`fuseflow.packing`).

        Positions come back concatenated row by row, sequence by sequence: ``len(seq) - 1`` per sequence.
        """
        pieces = [seq for row in rows for seq in row]
        lens = np.array([len(seq) - 1 for seq in pieces], dtype=np.int64)  # [n] predicting positions each
        per_row = np.array([len(row) for row in rows])  # [B]
        real, positions = row_layout(lens, per_row)  # [B, T] right-padded rows, restarted positions
        inputs = np.full(real.shape, self._pad_id, dtype=np.int64)  # [B, T] each sequence minus its last token
        targets = np.zeros(real.shape, dtype=np.int64)  # [B, T] the token each position predicts
        inputs[real] = np.concatenate([seq[:-1] for seq in pieces])
        targets[real] = np.concatenate([seq[1:] for seq in pieces])
        # Position ids only where a row holds several sequences: otherwise the default ones are the same and
        # their absence keeps the kernels' causal fast path.
        position_ids = torch.from_numpy(positions).to(self.device) if per_row.max() > 1 else None
        inputs_t = torch.from_numpy(inputs).to(self.device)
        real_t = torch.from_numpy(real).to(self.device)
        # No attention mask: with right padding and causal attention a real position only ever attends to
        # real positions, and an absent mask lets SDPA / flash kernels take their causal fast path.
        hidden = self._hidden(inputs_t, position_ids)  # [B, T, H]
        hidden = hidden[real_t]  # [N, H]
        gold = torch.from_numpy(targets).to(self.device)[real_t]  # [N]
        topk_ids, topk_lp, gold_lp = topk_logprobs_with_head(
            hidden, self._head, gold, top_k, transform=self._transform.with_temperature(temperature),
            chunk_tokens=self.head_chunk_tokens, method=self.head_method,
        )
        return (
            topk_ids.to(torch.int32).cpu().numpy(),
            topk_lp.cpu().numpy(),
            gold_lp.cpu().numpy(),
        )

    def score_tails(self, seqs: Sequence[np.ndarray], starts: Sequence[int]) -> list[np.ndarray]:
        """Log-probability of each token ``seqs[i][starts[i]:]`` given everything before it: ``[L_i - start_i]``
        fp32 per sequence, temperature 1, the model's own logits (soft-capping included).

        For callers that score continuations of a context they already ran, as Cool-Fusion's reranking does:
        sequences are run one at a time on the :attr:`prefix_cache`, so a candidate costs its new tokens, not
        its context. The values are those of :meth:`score_ids`' gold logprobs at the same positions.
        """
        seqs = [np.asarray(s, dtype=np.int64) for s in seqs]
        if len(starts) != len(seqs):
            raise ScoreError(f"score_tails: {len(seqs)} sequences but {len(starts)} starts")
        for i, (seq, start) in enumerate(zip(seqs, starts)):
            if not 1 <= start <= len(seq) or len(seq) > self.max_length:
                raise ScoreError(
                    f"score_tails: sequence {i} has {len(seq)} tokens (max_length {self.max_length}) and start "
                    f"{start}; start must be in [1, {len(seq)}]", i,
                )
            if seq.min() < 0 or seq.max() >= self._vocab_size:
                raise ScoreError(f"score_tails: sequence {i} has ids outside [0, {self._vocab_size})", i)
        with self._lock, torch.inference_mode():
            return [self._score_tail(seq, int(start)) for seq, start in zip(seqs, starts)]

    def score_continuations(self, context: np.ndarray, continuations: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Log-probability of each token of each ``continuations[i]`` after ``context``: ``[len_i]`` fp32 per
        continuation, temperature 1, the model's own logits (soft-capping included).

        Cool-Fusion's reranking (issue 16): a source scores every candidate segment after the same context in
        ONE forward — the context's KV cache from :attr:`prefix_cache` (copied, so the generation's own entry
        stays whole for the next step), repeated once per candidate, and the candidates right-padded in a
        batch. Right padding needs no attention mask: a real position only attends to the context and to the
        real positions before it. The values are those of :meth:`score_ids`' gold logprobs at the same
        positions.
        """
        context = np.asarray(context, dtype=np.int64)
        conts = [np.asarray(c, dtype=np.int64) for c in continuations]
        if context.ndim != 1 or context.size == 0:
            raise ScoreError(f"score_continuations: context must be a non-empty 1-D array, got shape {context.shape}")
        for i, c in enumerate(conts):
            if c.ndim != 1 or context.size + c.size > self.max_length:
                raise ScoreError(
                    f"score_continuations: continuation {i} has {c.size} tokens after a context of {context.size} "
                    f"(max_length {self.max_length})", i,
                )
        for i, a in enumerate([context, *conts]):
            if a.size and (a.min() < 0 or a.max() >= self._vocab_size):
                raise ScoreError(f"score_continuations: ids outside [0, {self._vocab_size})", max(i - 1, 0))
        out = [np.zeros(0, dtype=np.float32) for _ in conts]
        live = [i for i, c in enumerate(conts) if c.size]
        if not live:
            return out
        with self._lock, torch.inference_mode():
            cache, fed = self.prefix_cache.take(context, copy=True)  # a KV cache of context[:fed], fed < len
            tail = context[fed:]  # [P - fed] >= 1: the last context token predicts each continuation's first
            longest = max(conts[i].size for i in live)
            inputs = np.full((len(live), tail.size + longest - 1), self._pad_id, dtype=np.int64)  # [C, T]
            inputs[:, : tail.size] = tail
            for r, i in enumerate(live):
                inputs[r, tail.size : tail.size + conts[i].size - 1] = conts[i][:-1]
            if cache is not None and len(live) > 1:
                cache.batch_repeat_interleave(len(live))
            kw = {"logits_to_keep": longest} if self._keeps_logits else {}
            logits = self.model(
                input_ids=torch.from_numpy(inputs).to(self.device), past_key_values=cache, use_cache=cache is not None,
                **kw,
            ).logits[:, -longest:].float()  # [C, longest, V] positions P-1 … P+longest-2
            for r, i in enumerate(live):
                n = conts[i].size
                gold = torch.from_numpy(conts[i]).to(self.device)  # [n]
                rows = logits[r, :n]  # [n, V]
                lp = rows.gather(1, gold[:, None])[:, 0] - torch.logsumexp(rows, dim=-1)  # [n]
                out[i] = lp.cpu().numpy().astype(np.float32)
        return out

    def _score_tail(self, seq: np.ndarray, start: int) -> np.ndarray:
        if start == len(seq):
            return np.zeros(0, dtype=np.float32)
        inputs = seq[:-1]  # position t predicts token t + 1
        cache, fed = self.prefix_cache.take(inputs[:start])  # a KV cache of inputs[:fed], fed < start
        kw = {"logits_to_keep": len(inputs) - (start - 1)} if self._keeps_logits else {}
        out = self.model(
            input_ids=torch.from_numpy(inputs[fed:])[None].to(self.device), past_key_values=cache, use_cache=True, **kw
        )
        logits = out.logits[0, -(len(inputs) - (start - 1)) :].float()  # [L - start, V] positions start-1 … L-2
        gold = torch.from_numpy(seq[start:]).to(self.device)  # [L - start]
        logprobs = logits.gather(1, gold[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)  # [L - start]
        self.prefix_cache.put(inputs, out.past_key_values)
        return logprobs.cpu().numpy().astype(np.float32)

    # ------------------------------------------------------------------------------------------------------
    # Generation.
    # ------------------------------------------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
        stop_when: Callable[[np.ndarray], bool] | None = None,
    ) -> Generated:
        """Sample with the model's own forward and a KV cache, one token per step (batch of one).

        ``stop_when``, if given, is called after each sampled token with the ids generated so far ([n] int32)
        and ends generation when it returns true (finish reason "stop"; the token is kept). It is how a caller
        stops on a condition of the text (Cool-Fusion's shared word boundary, a stop string) inside the
        generation, with the KV cache kept in :attr:`prefix_cache`, instead of cutting a fixed window after it
        (issue 16). It runs under the engine's lock: keep it to text work.
        """
        prompt = self._check_generate_args(prompt_ids, max_new_tokens, temperature, top_p)
        with self._lock, torch.inference_mode():
            return self._generate_unlocked(prompt, max_new_tokens, temperature, top_p, stop_token_ids, seed, stop_when)

    def _generate_unlocked(
        self, prompt, max_new_tokens, temperature, top_p, stop_token_ids, seed, stop_when=None
    ) -> Generated:
        stops = {int(s) for s in stop_token_ids}
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(int(seed))
        kw = {"logits_to_keep": 1} if self._keeps_logits else {}

        cache, fed = self.prefix_cache.take(prompt)  # a KV cache of prompt[:fed], or none
        step_input = torch.from_numpy(prompt[fed:])[None].to(self.device)  # [1, P - fed], then [1, 1]
        tokens: list[int] = []
        logprobs: list[float] = []
        finish = "length"
        for _ in range(max_new_tokens):
            out = self.model(input_ids=step_input, past_key_values=cache, use_cache=True, **kw)
            cache, fed = out.past_key_values, fed + step_input.shape[1]
            logits = out.logits[0, -1].float()  # [V], the model's own head (soft-capping included)
            token = sample_next_token(logits, temperature, top_p, generator)
            tokens.append(token)
            logprobs.append(float(logits[token] - torch.logsumexp(logits, dim=-1)))
            if token in stops or (stop_when is not None and stop_when(np.asarray(tokens, dtype=np.int32))):
                finish = "stop"
                break
            step_input = torch.tensor([[token]], dtype=torch.int64, device=self.device)  # [1, 1]
        # The cache holds every token fed so far: the prompt and the generated tokens but the last.
        self.prefix_cache.put(np.concatenate([prompt, np.asarray(tokens, dtype=prompt.dtype)])[:fed], cache)
        return Generated(
            token_ids=np.asarray(tokens, dtype=np.int32),
            logprobs=np.asarray(logprobs, dtype=np.float32),
            finish_reason=finish,
        )


def _empty_scores(top_k: int) -> NextTokenScores:
    return NextTokenScores(
        np.zeros((0, top_k), dtype=np.int32), np.zeros((0, top_k), dtype=np.float32), np.zeros((0,), dtype=np.float32)
    )
