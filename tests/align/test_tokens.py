"""Token-string normalisation (fuseflow/align/tokens.py)."""

from __future__ import annotations

import numpy as np

from fuseflow.align.tokens import (
    code_points,
    detect_scheme,
    normalize_token,
    normalize_tokens,
    token_strings,
    unicode_to_byte,
    vocab_info,
)


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    # The table as openai/gpt-2 encoder.py writes it, kept here as an independent reference.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def test_byte_table_is_gpt2_inverse():
    ref = _gpt2_bytes_to_unicode()
    assert unicode_to_byte() == {c: b for b, c in ref.items()}
    assert len(unicode_to_byte()) == 256


def test_markers_and_byte_fallback():
    assert normalize_token("Ġworld", "byte-level") == " world"
    assert normalize_token("Ċ", "byte-level") == "\n"
    assert normalize_token("âĢĻ", "byte-level") == "’"
    assert normalize_token("▁world", "sentencepiece") == " world"
    assert normalize_token("<0x0A>", "sentencepiece") == "\n"
    # A partial UTF-8 character is spelt the same way by both families.
    assert normalize_token("<0xE6>", "sentencepiece") == normalize_token("æ", "byte-level") == "\udce6"
    # Three byte pieces of one character concatenate to the character.
    pieces = ["<0xE6>", "<0x9D>", "<0xB1>"]
    joined = "".join(normalize_token(p, "sentencepiece") for p in pieces)
    assert joined.encode("utf-8", "surrogateescape").decode("utf-8") == "東"
    assert normalize_token("æĿ±", "byte-level") == "東"


def test_detect_scheme():
    assert detect_scheme(["▁the", "cat"]) == "sentencepiece"
    assert detect_scheme(["Ġthe", "cat"]) == "byte-level"
    assert detect_scheme(["the", "cat"]) == "plain"
    assert normalize_tokens(["Ġthe", "Ċ"]) == [" the", "\n"]


def test_bpe_strings_equal_decoded_tokens(bpe_tokenizer):
    strings = token_strings(bpe_tokenizer)
    info = vocab_info(bpe_tokenizer)
    assert info.scheme == "byte-level"
    checked = 0
    for i, s in enumerate(strings):
        if info.special[i] or any(0xDC80 <= ord(c) <= 0xDCFF for c in s):
            continue  # partial characters decode to U+FFFD in the tokenizer's own decoder
        assert s == bpe_tokenizer.decode([i]), (i, s)
        checked += 1
    assert checked > 200


def test_spm_strings_match_pieces(spm_tokenizer):
    info = vocab_info(spm_tokenizer)
    assert info.scheme == "sentencepiece"
    raw = spm_tokenizer.convert_ids_to_tokens(list(range(len(spm_tokenizer))))
    for i, (r, s) in enumerate(zip(raw, info.strings)):
        if not info.special[i]:
            assert s == r.replace("▁", " ")


def test_specials_and_roles(bpe_tokenizer):
    info = vocab_info(bpe_tokenizer)
    specials = set(np.flatnonzero(info.special).tolist())
    assert specials == set(bpe_tokenizer.all_special_ids)
    assert info.roles == {"bos": bpe_tokenizer.bos_token_id, "eos": bpe_tokenizer.eos_token_id,
                          "pad": bpe_tokenizer.pad_token_id, "unk": bpe_tokenizer.unk_token_id}


def test_vocab_info_is_cached(bpe_tokenizer):
    assert vocab_info(bpe_tokenizer) is vocab_info(bpe_tokenizer)
    assert token_strings(bpe_tokenizer) is token_strings(bpe_tokenizer)


def test_code_points_keep_nul_and_lengths():
    codes, lengths = code_points(["ab", "", "\x00", "é東"])
    assert lengths.tolist() == [2, 0, 1, 2]
    assert codes[0, :2].tolist() == [ord("a"), ord("b")]
    assert codes[3, :2].tolist() == [ord("é"), ord("東")]
    assert codes[2, 0] != 0  # NUL is kept as a character, not as padding
