"""OpenAI chat-completion shapes: what clients send and what they get back.

Policy on fields: every field OpenAI defines that we can honour is accepted and honoured;
a field we cannot honour (tools, logprobs, ...) or do not know is refused with a 400
naming it. Nothing is silently dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _is_none(value: object) -> bool:
    return value is None


def omitted_if_none() -> Any:
    """A field OpenAI's published schema makes optional but not nullable: left out of the
    JSON while unset (a `null` there fails strict clients and the schema), as OpenAI does."""
    return Field(None, exclude_if=_is_none)


def _unicode(value: Any) -> None:
    """JSON may escape a lone UTF-16 surrogate ("\\ud800"), which no UTF-8 text holds: the
    tokenizer, Redis and every writer would fail on it later, as a 500."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(
                    f"text holds a lone surrogate ({value[exc.start]!r}), which is not valid Unicode"
                ) from None
    elif isinstance(value, (list, tuple)):
        for item in value:
            _unicode(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            _unicode(key)
            _unicode(item)


class StrictModel(BaseModel):
    """Unknown fields are errors, so a typo or an unsupported option never goes unnoticed."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, v: Any) -> Any:
        _unicode(v)  # models inside were checked by their own validator
        return v


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    # `developer` is OpenAI's newer name for `system`; both reach the model as system.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        """An image, audio or file part gets a plain answer, not a union-validation dump."""
        for j, part in enumerate(v if isinstance(v, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise ValueError(f"this model accepts text only: content part {j} is of type '{kind}'")
        if isinstance(v, list):  # here, not per union branch: one error, not "Input should be a valid string"
            _unicode(v)  # (a string is checked once, by StrictModel's validator)
        return v

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_engine(self) -> dict[str, str]:
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class StreamOptions(StrictModel):
    include_usage: bool = False


class InferqOptions(StrictModel):
    """Our extension, under its own key so it never collides with an OpenAI field."""

    #: generation time limit for this request (capped by the server's INFERQ_MAX_JOB_TIMEOUT_S)
    timeout_s: float | None = Field(default=None, gt=0)
    #: a job still queued after this many seconds ends `expired` without running
    expires_after_s: float | None = Field(default=None, gt=0)


class ResponseFormat(StrictModel):
    type: Literal["text"]


Metadata = Annotated[dict[str, str], Field(max_length=16)]


class ChatCompletionRequest(StrictModel):
    """Body of POST /v1/chat/completions and POST /v1/jobs."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    #: an extension (as vLLM's): sample among the k most likely tokens; 0 or -1: no limit
    top_k: int | None = Field(default=None, ge=-1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = Field(default=None, max_length=256)
    metadata: Metadata | None = None
    inferq: InferqOptions | None = None
    # Honoured only at their "off" value; anything else is refused by name below.
    logprobs: bool | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in items):
            raise ValueError("stop sequences must be non-empty strings")
        return v

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        for key, value in (v or {}).items():
            if len(key) > 64:
                raise ValueError(f"metadata key {key[:20]!r}... is longer than 64 characters")
            if len(value) > 512:
                raise ValueError(f"metadata value for {key!r} is longer than 512 characters")
        return v

    @model_validator(mode="after")
    def _check_unsupported(self) -> ChatCompletionRequest:
        if self.logprobs:
            raise ValueError("logprobs is not supported by this server")
        if self.parallel_tool_calls:
            raise ValueError("parallel_tool_calls is not supported: tools are not supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    #: required (nullable) in OpenAI's published schema; this server never refuses
    refusal: None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "cancelled"]
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """The `chat.completion` object: a job's result and the non-streaming response."""

    id: str = Field(default_factory=lambda: _id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: Usage
    system_fingerprint: str | None = omitted_if_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inferq"
    #: Our extension: true for the random-weight demo model, whose output is gibberish.
    demo: bool = False
    context_length: int | None = None
    #: Our extension (as vLLM's): a LoRA adapter's base model
    parent: str | None = omitted_if_none()


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The one error body every route answers with (OpenAI's shape)."""

    error: ErrorInfo


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code)).model_dump()


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = omitted_if_none()
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One `chat.completion.chunk` of a streamed /v1/chat/completions response."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = omitted_if_none()
