"""OpenAI-compatible request and response models, plus the session API's, with sleepserve's extensions."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


def _utf8(text: str) -> str:
    """Text that encodes to UTF-8 (JSON may smuggle in lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from exc
    return text


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI fields we do not use (user, …) pass


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(_Request):
    """Fields common to completions and chat completions."""

    model: str
    max_tokens: int | None = Field(
        None,
        ge=0,
        description="Tokens to generate at most (capped by the server). 0 only feeds the prompt: with a "
        "session, that adds it to the conversation without a reply (extension).",
    )
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(
        -1, ge=-1, description="Sample among the k likeliest tokens; -1 or 0: off (extension)."
    )
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, description="Only 1 is supported.")
    ignore_eos: bool = Field(False, description="Generate past end-of-text tokens (as vLLM; for benchmarks).")
    session_id: str | None = Field(None, description="Continue this session (extension; or X-Session-ID).")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 16 or any(not s for s in stops)):
            raise ValueError("stop takes at most 16 non-empty strings")
        return stops and [_utf8(s) for s in stops]


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, token ids, or a list of one of either."
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=5,
        description="Log-probabilities of each token with this many likeliest alternatives (as OpenAI, "
        "at most 5).",
    )
    echo: bool = Field(False, description="Return the prompt before the completion (with its logprobs).")

    @field_validator("prompt")
    @classmethod
    def _text(cls, value: str | list) -> str | list:
        for item in [value] if isinstance(value, str) else value:
            if isinstance(item, str):
                _utf8(item)
        return value


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text(cls, value: str | list[TextPart] | None) -> str | list[TextPart] | None:
        for item in [value] if isinstance(value, str) else value or ():
            _utf8(item if isinstance(item, str) else item.text)
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="Return the log-probability of each generated token.")
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=20,
        description="With logprobs: this many likeliest alternatives per token (at most 20).",
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
    session_id: str | None = Field(None, description="A client-chosen id: 32 hex characters.")


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
