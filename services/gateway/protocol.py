"""The OpenAI-compatible request and response shapes of the gateway, declared once (as vLLM's
``entrypoints/openai/protocol.py``).

Requests are pydantic models: unknown fields are ignored (clients send new ones all the time), fields we
cannot honour are rejected with a 400 that names them (``logprobs``, ``echo``, ``suffix``, penalties, tools).
Responses are plain dicts in the shapes of the OpenAI API reference: ``text_completion`` /
``chat.completion`` objects with ``usage``, and ``text_completion`` / ``chat.completion.chunk`` chunks for
server-sent events. Extension (send with the OpenAI client's ``extra_body``): ``fuseflow_trace: true``
adds each choice's per-segment trace as ``fuseflow_trace``.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_STRINGS = 4  # as OpenAI


class RequestError(ValueError):
    """A request the gateway refuses: HTTP ``status`` and the OpenAI error fields."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.type, self.code = param, status, type, code


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    fuseflow_trace: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(stops)}")
        return stops

    def unsupported(self) -> None:
        """Raise :class:`RequestError` for fields this gateway cannot honour."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise RequestError(f"{name} is not supported by the Cool-Fusion gateway; leave it at 0", name)
        if self.logit_bias:
            raise RequestError("logit_bias is not supported: the sources have different vocabularies", "logit_bias")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def prompts(self) -> list[str]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, str) for x in p):
            return list(p)
        if not p:
            raise RequestError("prompt is empty", "prompt")
        raise RequestError(
            "token-id prompts are not supported: the sources have different tokenizers; send text", "prompt"
        )

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs is not None:
            raise RequestError("logprobs is not supported: a fused segment has no single vocabulary", "logprobs")
        if self.echo:
            raise RequestError("echo is not supported", "echo")
        if self.best_of not in (None, 1):
            raise RequestError("best_of is not supported", "best_of")
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for j, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(
                    f"messages[{index}].content[{j}]: only text parts are supported, got type {part.get('type')!r}",
                    f"messages[{index}].content",
                )
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def rendered_messages(self) -> list[dict]:
        # "developer" is the newer name of "system"; templates know "system".
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
            for i, m in enumerate(self.messages)
        ]

    def unsupported(self) -> None:
        super().unsupported()
        if self.logprobs or self.top_logprobs:
            raise RequestError("logprobs is not supported: a fused segment has no single vocabulary", "logprobs")
        if self.tools:
            raise RequestError("tools are not supported by the Cool-Fusion gateway", "tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise RequestError("response_format other than text is not supported", "response_format")

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ----------------------------------------------------------------------------------------------------------
# Responses.
# ----------------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_choice(index: int, text: str, finish_reason: str | None, trace: list | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
    if trace is not None:
        choice["fuseflow_trace"] = trace
    return choice


def chat_choice(index: int, text: str, finish_reason: str | None, trace: list | None = None) -> dict:
    choice = {
        "index": index,
        "message": {"role": "assistant", "content": text},
        "logprobs": None,
        "finish_reason": finish_reason,
    }
    if trace is not None:
        choice["fuseflow_trace"] = trace
    return choice


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def response(object: str, id: str, created: int, model: str, choices: list, usage_: dict | None = None,
             with_usage: bool = True) -> dict:
    """A response (``with_usage``) or a streamed chunk (``usage`` only when the client asked for it)."""
    body = {"id": id, "object": object, "created": created, "model": model, "choices": choices}
    if with_usage:
        body["usage"] = usage_
    return body


def model_card(id: str, created: int, description: str) -> dict:
    return {"id": id, "object": "model", "created": created, "owned_by": "fuseflow", "description": description}
