"""Token strings that compare across tokenizers.

Every tokenizer spells its vocabulary its own way: byte-level BPE (GPT-2, Llama-3, SmolLM, Qwen) writes
each byte as a printable character (``Ġ`` = space, ``Ċ`` = newline, ``âĢĻ`` = ``’``); SentencePiece
(Llama-2, Gemma) writes ``▁`` for a space and ``<0xNN>`` for byte-fallback tokens. Here every token becomes
the text it stands for. A token that is only part of a UTF-8 character (a byte-level piece, a ``<0xE6>``
fallback byte) keeps its bytes as lone surrogates (``errors="surrogateescape"``), so both families spell
the same partial byte the same way and a whole character spelt by byte pieces equals the character.

Special tokens (BOS, EOS, chat markers, …) stand for no text: they keep their literal content, are flagged
in :class:`VocabInfo` and are never matched by string; vocab maps pair them by role (bos/eos/pad/unk).
"""

from __future__ import annotations

import hashlib
import json
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

_SPM_SPACE = "\u2581"  # ▁
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
ROLES = ("bos", "eos", "pad", "unk")


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` table (openai/gpt-2 ``encoder.py``): printable stand-in → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _from_bytes(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def normalize_token(token: str, scheme: str) -> str:
    """The text ``token`` (as ``convert_ids_to_tokens`` spells it) stands for, in tokenizer family ``scheme``."""
    if scheme == "byte-level":
        table = unicode_to_byte()
        if all(c in table for c in token):
            return _from_bytes(bytes(table[c] for c in token))
        return token  # an added token: stored as plain text, not byte-encoded
    if scheme == "sentencepiece":
        m = _BYTE_TOKEN.match(token)
        if m:
            return _from_bytes(bytes([int(m.group(1), 16)]))
        return token.replace(_SPM_SPACE, " ")
    return token


def detect_scheme(tokens: list[str]) -> str:
    """Guess the family from token strings alone (for callers without a tokenizer object)."""
    if any(_SPM_SPACE in t or _BYTE_TOKEN.match(t) for t in tokens):
        return "sentencepiece"
    if any(c in t for t in tokens for c in "ĠĊĉ"):
        return "byte-level"
    return "plain"


def normalize_tokens(tokens: list[str], scheme: str | None = None) -> list[str]:
    """:func:`normalize_token` over a sequence; ``scheme=None`` detects it with :func:`detect_scheme`."""
    scheme = scheme or detect_scheme(tokens)
    return [normalize_token(t, scheme) for t in tokens]


def tokenizer_scheme(tokenizer) -> str:
    """Family of a fast tokenizer, read from its decoder (the component that turns tokens back into text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return "plain"
    decoder = backend.decoder.__getstate__().decode("utf-8")  # the decoder's JSON
    if '"ByteLevel"' in decoder:
        return "byte-level"
    if '"Metaspace"' in decoder or '"ByteFallback"' in decoder or _SPM_SPACE in decoder or "\\u2581" in decoder:
        return "sentencepiece"
    return "plain"


@dataclass(frozen=True)
class VocabInfo:
    """One tokenizer's vocabulary in comparable form; built by :func:`vocab_info`."""

    strings: list[str]  # [V] normalised text per id (special tokens: their literal content)
    special: np.ndarray  # [V] bool: special tokens (never matched by string)
    roles: dict[str, int]  # "bos"/"eos"/"pad"/"unk" → id, for the roles the tokenizer defines
    scheme: str
    digest: str  # hash of everything above: the disk-cache key of vocab maps

    @property
    def size(self) -> int:
        return len(self.strings)


_CACHE: "weakref.WeakKeyDictionary[object, VocabInfo]" = weakref.WeakKeyDictionary()


def vocab_info(tokenizer) -> VocabInfo:
    """Normalised strings, special flags and roles of ``tokenizer``'s vocabulary.

    The one Python loop over the vocabulary in the alignment code lives here; it runs once per tokenizer
    object (cached, ~0.5 s for Gemma-3's 262k entries) and everything downstream is array code.
    """
    cached = _CACHE.get(tokenizer)
    if cached is not None:
        return cached
    size = len(tokenizer)
    raw = tokenizer.convert_ids_to_tokens(list(range(size)))
    scheme = tokenizer_scheme(tokenizer)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = np.zeros(size, dtype=bool)  # [V]
    for i in getattr(tokenizer, "all_special_ids", []):
        if 0 <= i < size:
            special[i] = True
    strings: list[str] = []
    for i, tok in enumerate(raw):
        if tok is None:  # a hole in the id space
            special[i] = True
            strings.append("")
            continue
        a = added.get(i)
        if a is not None and a.special:
            special[i] = True
        if special[i]:
            strings.append(tok)
        elif a is not None and scheme == "byte-level":
            strings.append(tok)  # added tokens are stored as text, not as byte stand-ins
        else:
            strings.append(normalize_token(tok, scheme))
    roles = {}
    for role in ROLES:
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None and 0 <= tid < size:
            roles[role] = int(tid)
    h = hashlib.sha1(scheme.encode())
    h.update("\x00".join(strings).encode("utf-8", errors="surrogatepass"))
    h.update(np.packbits(special).tobytes())
    h.update(json.dumps(roles, sort_keys=True).encode())
    info = VocabInfo(strings=strings, special=special, roles=roles, scheme=scheme, digest=h.hexdigest())
    _CACHE[tokenizer] = info
    return info


def token_strings(tokenizer) -> list[str]:
    """Normalised string per token id (see the module docstring); cached per tokenizer object."""
    return vocab_info(tokenizer).strings


def as_numpy_strings(strings) -> np.ndarray:
    """``strings`` as a numpy unicode array ``[N]``. numpy drops trailing NULs, so a NUL (the byte-0 token)
    is stored as U+FFFE, a noncharacter that no tokenizer emits."""
    strings = list(strings)
    if "\x00" in "".join(strings):
        strings = [s.replace("\x00", "\ufffe") for s in strings]
    return np.asarray(strings, dtype=str) if strings else np.zeros(0, dtype="<U1")


def code_points(strings) -> tuple[np.ndarray, np.ndarray]:
    """Padded code-point matrix ``[N, W] int32`` (0-padded) and lengths ``[N] int32`` of ``strings``
    (a list or a numpy unicode array from :func:`as_numpy_strings`)."""
    arr = strings if isinstance(strings, np.ndarray) else as_numpy_strings(strings)
    if arr.size == 0:
        return np.zeros((0, 1), dtype=np.int32), np.zeros(0, dtype=np.int32)
    width = max(arr.dtype.itemsize // 4, 1)
    codes = np.ascontiguousarray(arr).view(np.uint32).reshape(len(arr), width).astype(np.int32)  # [N, W]
    lengths = np.char.str_len(arr).astype(np.int32)  # [N]
    return codes, lengths
