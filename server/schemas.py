"""OpenAI-compatible request and response models, plus the session API's, with sleepserve's extensions."""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # per stop string


def _utf8(text: str) -> str:
    """Text that encodes to UTF-8 (JSON may smuggle in lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from exc
    return text


Text = Annotated[str, AfterValidator(_utf8)]  # every string a request carries


def _json_int(value: object) -> object:
    """An integer as JSON Schema has it: 3 or 3.0, never true or "3" (the models are strict)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _int(**bounds: int) -> Any:
    """A JSON integer field type with bounds (set before the validator: in the other order pydantic
    writes `ge` into the schema of a union member where JSON Schema says `minimum`)."""
    return Annotated[int, Field(**bounds), BeforeValidator(_json_int)]


Int = _int()
_SESSION_ID = re.compile(r"[0-9a-fA-F]{32}")
SESSION_ID_MESSAGE = "session_id must be 32 hexadecimal characters (a random 128-bit id)"


def is_session_id(value: str) -> bool:
    return _SESSION_ID.fullmatch(value) is not None


def _session_id(value: str) -> str:
    if not is_session_id(value):
        raise ValueError(SESSION_ID_MESSAGE)
    return value.lower()


# `(?!\n)`: test generators read `$` as Python does (true also before a final newline), and would
# send ids that end with one as valid.
SessionId = Annotated[
    str,
    AfterValidator(_session_id),
    WithJsonSchema(
        {"type": "string", "pattern": r"^[0-9a-fA-F]{32}(?!\n)$", "description": SESSION_ID_MESSAGE}
    ),
]


def _stops(value: str | list[str] | None) -> str | list[str] | None:
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > MAX_STOP_STRINGS or not all(0 < len(_utf8(s)) <= MAX_STOP_CHARS for s in stops):
        raise ValueError(
            f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} characters"
        )
    return value


def _prompt(value: str | list) -> str | list:
    if not value:
        raise ValueError("prompt must not be empty")
    if isinstance(value, list) and not isinstance(value[0], int):  # a list of prompts
        if len(value) != 1:
            raise ValueError("only one prompt per request is supported")
        if not value[0]:
            raise ValueError("prompt must not be empty")
    for text in [value] if isinstance(value, str) else value:
        if isinstance(text, str) and not _utf8(text):
            raise ValueError("prompt must not be empty")
    return value


# Unions validated by one function each (a clear message, not one per union member), with the schema
# that says the same.
_STOP_STRING = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
Stop = Annotated[
    str | list[str] | None,
    AfterValidator(_stops),
    WithJsonSchema(
        {
            "anyOf": [
                _STOP_STRING,
                {"type": "array", "items": _STOP_STRING, "maxItems": MAX_STOP_STRINGS},
                {"type": "null"},
            ],
            "description": f"Up to {MAX_STOP_STRINGS} strings that end the text (excluded from it).",
        }
    ),
]
Prompt = Annotated[
    str | list[str] | list[Int] | list[list[Int]],
    AfterValidator(_prompt),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                {
                    "type": "array",
                    "items": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1},
                    "minItems": 1,
                    "maxItems": 1,
                },
            ],
            "description": "Text or token ids (non-empty), or a list of one of either.",
        }
    ),
]


def _check_unicode(value: object) -> None:
    """Refuse lone surrogates anywhere in a JSON value (the fields a request passes through unread)."""
    if isinstance(value, str):
        _utf8(value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_unicode(key)
            _check_unicode(item)
    elif isinstance(value, list):
        for item in value:
            _check_unicode(item)


# JSON Schema rules between fields: `stream_options` needs `stream: true`; `top_logprobs`, `logprobs: true`.
_STREAM_OPTIONS_RULE = {
    "if": {"properties": {"stream": {"const": True}}, "required": ["stream"]},
    "else": {"properties": {"stream_options": {"type": "null"}}},
}
_TOP_LOGPROBS_RULE = {
    "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
}


class _Request(BaseModel):
    # OpenAI fields we do not use (user, …) pass. Strict: JSON types as the schema has
    # them (no 0 for false, no false for a token id). `stream_options` needs `stream: true`.
    model_config = ConfigDict(
        extra="allow",
        strict=True,
        json_schema_extra=_STREAM_OPTIONS_RULE,
    )

    @model_validator(mode="after")
    def _extra_text(self) -> _Request:
        _check_unicode(self.model_extra)
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingRequest(_Request):
    """Fields common to completions and chat completions."""

    model: Text
    max_tokens: _int(ge=0) | None = Field(
        None,
        description="Tokens to generate at most (capped by the server). 0 only feeds the prompt: with a "
        "session, that adds it to the conversation without a reply (extension).",
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Int = Field(
        -1, ge=-1, description="Sample among the k likeliest tokens; -1 or 0: off (extension)."
    )
    seed: Int | None = Field(
        None, description="Any integer (used modulo 2**64): the same seed, the same sample."
    )
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Int = Field(1, ge=1, le=1, description="Only 1 is supported.")
    ignore_eos: bool = Field(False, description="Generate past end-of-text tokens (as vLLM; for benchmarks).")
    session_id: SessionId | None = Field(
        None, description="Continue this session (extension; or X-Session-ID)."
    )

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    logprobs: _int(ge=0, le=5) | None = Field(
        None,
        description="Log-probabilities of each token with this many likeliest alternatives (as OpenAI, at "
        "most 5).",
    )
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs).")


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str  # checked by `_content`


def _content(value: str | list[TextPart] | None) -> str | list[TextPart] | None:
    for part in [value] if isinstance(value, str) else value or ():
        _utf8(part if isinstance(part, str) else part.text)
    return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str | list[TextPart] | None, AfterValidator(_content)] = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"allOf": [_STREAM_OPTIONS_RULE, _TOP_LOGPROBS_RULE]})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: _int(ge=1) | None = None
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: _int(ge=0, le=20) | None = Field(
        None, description="With logprobs: this many likeliest alternatives per token (at most 20)."
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    consolidated_tokens: int = Field(
        0, description="Tokens slept into fast-weight memory during this request."
    )
    sleep_passes: int = Field(0, description="Sleep passes run during this request.")
    sleep_seconds: float = Field(0.0, description="Seconds spent sleeping during this request.")
    session_tokens_total: int = Field(
        0, description="Tokens the session has seen in all, this request included."
    )


def _now() -> int:
    return int(time.time())


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None] = Field(description="None for a first token that follows nothing.")
    top_logprobs: list[dict[str, float] | None] = Field(
        description="The likeliest alternatives and the token itself, by token text."
    )
    text_offset: list[int] = Field(description="Where each token starts in the choice's text.")


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    session_id: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] = Field(description="The token text's UTF-8 bytes.")


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    session_id: str | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sleepserve"
    max_model_len: int = Field(description="Most tokens one request may generate.")
    family: str = Field(description="The checkpoint family: sleepy (native) or qwen3_5.")
    window: int = Field(description="Tokens per sleep window L.")
    schedule: str
    sleep_passes: int = Field(description="Sleep passes N per window.")
    fingerprint: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CreateSessionRequest(BaseModel):
    model_config = ConfigDict(strict=True)
    session_id: SessionId | None = Field(None, description="A client-chosen id: 32 hex characters.")


class HeadStats(BaseModel):
    frobenius_norm: float
    effective_rank: float = Field(description="exp of the entropy of the normalised singular values.")
    top_singular_values: list[float]


class LayerStats(BaseModel):
    layer: int = Field(description="Index of the gdn layer among the model's gdn layers.")
    frobenius_norm: float
    effective_rank_mean: float
    heads: list[HeadStats]


class SessionInfo(BaseModel):
    id: str
    object: Literal["session"] = "session"
    version: int
    schedule: str
    tokens_seen: int
    chunks_consolidated: int
    consolidated_tokens: int
    sleep_passes: int
    last_passes: int
    sleep_seconds: float
    tail_tokens: int
    window_capacity: int
    window_fill: float = Field(description="Unconsolidated tokens / window capacity.")
    chat_messages: int = Field(description="Chat messages the session has consumed.")
    state_bytes: int
    fast_weights: list[LayerStats]


class DeletedSession(BaseModel):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
