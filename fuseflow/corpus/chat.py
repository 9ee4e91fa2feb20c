"""Chat documents rendered with the target's chat template, with the character spans of the assistant turns
(the tokens the fusion loss applies to, as FuseChat)."""

from __future__ import annotations

from collections.abc import Sequence

from .documents import CorpusError, DocumentError, Message


def render_chat(messages: Sequence[Message], tokenizer, where: str = "chat") -> tuple[str, tuple[tuple[int, int], ...]]:
    """Render ``messages`` with ``tokenizer``'s chat template; return (text, assistant character spans).

    A span runs from the first character of an assistant turn's content through the template's end-of-turn
    marker (the model must learn to stop), without trailing whitespace: FuseChat (FastChat ``preprocess``
    with ``mask_instruction``) applies the loss to exactly these tokens. Spans come from rendering the
    prefix of the chat before the turn (with the generation prompt) and through it; templates that do not
    render prefixes consistently fall back to locating the content verbatim.

    A leading BOS that the tokenizer also adds by itself is dropped from the text, so that the text
    tokenized with ``add_special_tokens=True`` (as every stage does) carries one BOS, not two.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise CorpusError(
            f"{where}: chat document, but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no "
            "chat_template; use a chat model as the target or give the corpus a text field"
        )
    msgs = [dict(m) for m in messages]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = _turn_span(msgs, i, text, tokenizer)
        if start < cursor:
            start = text.find(m["content"], cursor)
            if start < 0:
                raise DocumentError(where, f"assistant turn {i} not found in the rendered chat template output")
            end = start + len(m["content"])
        end = start + len(text[start:end].rstrip())
        if end > start:
            spans.append((start, end))
        cursor = max(cursor, end)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
        spans = [(s - len(bos), e - len(bos)) for s, e in spans]
    return text, tuple(spans)


def _turn_span(msgs: list[Message], i: int, text: str, tokenizer) -> tuple[int, int]:
    """Character span of assistant turn ``i`` in ``text`` by prefix rendering; (-1, -1) if inconsistent."""
    try:
        before = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
    except Exception:  # noqa: BLE001 - a template may reject a prefix (raise_exception, indexing); fall back
        return -1, -1
    if i and text.startswith(before) and text.startswith(through) and len(before) < len(through):
        return len(before), len(through)
    return -1, -1


def _adds_bos(tokenizer) -> bool:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos_id is not None and len(ids) > 0 and ids[0] == bos_id
