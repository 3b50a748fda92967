"""OpenAI chat-completion shapes: what clients send and what they get back.

Policy on fields: every field OpenAI defines that we can honour is accepted and honoured;
a field that has no effect here is accepted at its no-op value only (`service_tier`
"auto", `store` false, `modalities` ["text"]); anything else is refused with a 400 naming
it. Nothing is silently dropped. vLLM's sampling extensions are accepted under vLLM's names
(`top_k`, `min_p`, `min_tokens`, `ignore_eos`, `repetition_penalty`).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from schemas.structured import (
    ChoiceLogprobs,
    ChunkToolCall,
    ResponseFormat,
    Tool,
    ToolCall,
    ToolChoice,
    omitted_if_none,
)


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


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
    role: Literal["system", "developer", "user", "assistant", "tool"]
    #: null only for an assistant message that carries `tool_calls`
    content: str | list[TextPart] | None = None
    name: str | None = None
    #: an assistant turn's calls, sent back by clients in a tool round trip
    tool_calls: list[ToolCall] | None = None
    #: a `tool` message answers this call
    tool_call_id: str | None = None
    #: clients echo an assistant answer back as they got it (the `openai` SDK's model_dump()
    #: adds these as null; parse() adds `parsed`): accepted, ignored
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: None = None
    function_call: None = None
    parsed: Any = Field(default=None, exclude=True)

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

    @model_validator(mode="after")
    def _check_role_fields(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs content")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the tool_call_id it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def for_engine(self) -> dict[str, Any]:
        """The message as ms-swift's template takes it (its agent template renders tool
        calls and tool answers in the model's own format)."""
        role = "system" if self.role == "developer" else self.role
        out: dict[str, Any] = {"role": role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(StrictModel):
    include_usage: bool = False
    #: vLLM's: `usage` (tokens so far) on every chunk
    continuous_usage_stats: bool = False


class InferqOptions(StrictModel):
    """Our extension, under its own key so it never collides with an OpenAI field."""

    #: generation time limit for this request (capped by the server's INFERQ_MAX_JOB_TIMEOUT_S)
    timeout_s: float | None = Field(default=None, gt=0)
    #: a job still queued after this many seconds ends `expired` without running
    expires_after_s: float | None = Field(default=None, gt=0)


def _system_lead(messages: list[ChatMessage]) -> int:
    """How many system and developer messages open the conversation."""
    return next((i for i, m in enumerate(messages) if m.role not in ("system", "developer")), len(messages))


Metadata = Annotated[dict[str, str], Field(max_length=16)]


class ChatCompletionRequest(StrictModel):
    """Body of POST /v1/chat/completions and POST /v1/jobs."""

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    #: an extension (as vLLM's): sample among the k most likely tokens; 0 or -1: no limit
    top_k: int | None = Field(default=None, ge=-1)
    #: vLLM's: drop tokens less likely than min_p times the most likely one
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    #: vLLM's: no end of sequence (nor a template stop token) before this many tokens
    min_tokens: int = Field(default=0, ge=0)
    #: vLLM's: never end on an end-of-sequence token; run to max_tokens or a stop sequence
    ignore_eos: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    #: vLLM's (and HF's): >1 discourages tokens already in the prompt or the output
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    #: token id (as a string, as OpenAI's) -> bias added to its logit, -100..100
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, min_length=1, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = Field(default=None, max_length=256)
    #: OpenAI's newer per-user identifier and cache hint: accepted, nothing to do here
    safety_identifier: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    metadata: Metadata | None = None
    inferq: InferqOptions | None = None
    # Accepted at their no-op value only; anything else is refused by name below.
    store: bool | None = None
    service_tier: str | None = None
    modalities: list[str] | None = None

    @field_validator("messages")
    @classmethod
    def _check_system_first(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        lead = _system_lead(v)
        for i, m in enumerate(v[lead:], lead):
            if m.role in ("system", "developer"):
                raise ValueError(
                    f"message {i} is a '{m.role}' message after the conversation started; ms-swift's "
                    "templates take system (and developer) messages only at its start"
                )
        return v

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

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None and len(v) > 300:
            raise ValueError("at most 300 tokens may be biased")
        for token, bias in (v or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids; {token[:20]!r} is not one")
            if not -100 <= bias <= 100:
                raise ValueError(f"the bias of token {token} is {bias}; it must be within -100..100")
        return v

    @field_validator("service_tier")
    @classmethod
    def _check_tier(cls, v: str | None) -> str | None:
        if v not in (None, "auto", "default"):
            raise ValueError(
                f"'{v}' is not supported by this server: every request runs on its own GPUs ('auto')"
            )
        return v

    @field_validator("modalities")
    @classmethod
    def _check_modalities(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and v != ["text"]:
            raise ValueError("only ['text'] is supported by this server")
        return v

    @field_validator("store")
    @classmethod
    def _check_store(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError(
                "stored completions are not supported by this server (every request is kept as a "
                "job until its TTL: GET /v1/jobs)"
            )
        return v

    # Rules between fields are checked on the later field, so the error names it (a model
    # validator's error names only "body").
    @field_validator("max_completion_tokens")
    @classmethod
    def _check_limits_agree(cls, v: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if v is not None and other is not None and v != other:
            raise ValueError("max_tokens and max_completion_tokens disagree; send one of them")
        return v

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs to be true")
        return v

    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, v: ToolChoice | None, info: ValidationInfo) -> ToolChoice | None:
        tools: list[Tool] = info.data.get("tools") or []
        if v is None or v == "none":
            return v
        if not tools:
            raise ValueError("tool_choice needs tools")
        if not isinstance(v, str) and v.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"the function '{v.function.name}' is not one of the tools")
        return v

    @field_validator("tools")
    @classmethod
    def _check_tool_names(cls, v: list[Tool] | None) -> list[Tool] | None:
        names = [t.function.name for t in v or []]
        if len(set(names)) != len(names):
            raise ValueError("two tools have the same function name")
        return v

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def calls_tools(self) -> bool:
        """Tools are offered to the model (rendered into its prompt, calls parsed back)."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def top_logprobs_n(self) -> int | None:
        """None: no logprobs; else how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def engine_messages(self) -> list[dict[str, Any]]:
        """The messages as the engine's template takes them: the system and developer
        messages at the start become one system message (OpenAI takes several; ms-swift's
        templates one)."""
        lead = _system_lead(self.messages)
        if lead <= 1:
            return [m.for_engine() for m in self.messages]
        system = {"role": "system", "content": "\n\n".join(m.text() for m in self.messages[:lead])}
        return [system, *(m.for_engine() for m in self.messages[lead:])]

    def tools_for_engine(self) -> list[dict[str, Any]] | None:
        return [t.model_dump(exclude_none=True) for t in self.tools or []] if self.calls_tools else None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    #: null when the answer is only tool calls
    content: str | None
    #: required (nullable) in OpenAI's published schema; this server never refuses
    refusal: None = None
    tool_calls: list[ToolCall] | None = omitted_if_none()


FinishReason = Literal["stop", "length", "tool_calls", "cancelled"]


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


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
    #: Our extension: how many live workers serve it (0: none now; requests get 503)
    workers: int | None = omitted_if_none()


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
    tool_calls: list[ChunkToolCall] | None = omitted_if_none()


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One `chat.completion.chunk` of a streamed /v1/chat/completions response."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = omitted_if_none()
