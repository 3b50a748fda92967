"""OpenAI's structured features, as clients send and read them: `response_format`, `tools`
and `tool_choice`, tool calls in messages and answers, and `logprobs`.

Kept apart from `schemas.openai` (the chat request and answer) because these shapes are
shared by requests, answers, stream chunks and the grammar built from them
(`schemas.grammar`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: OpenAI's own rule for function and schema names
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextFormat(_Strict):
    type: Literal["text"]


class JsonObjectFormat(_Strict):
    """Any JSON object (OpenAI's "JSON mode")."""

    type: Literal["json_object"]


class JsonSchemaSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    #: `schema` shadows a BaseModel attribute, hence the alias
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    #: decoding is always constrained here; `strict` is accepted either way
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)


class JsonSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class FunctionDef(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    """A call's function: `arguments` is a JSON text, as OpenAI sends it."""

    model_config = ConfigDict(extra="forbid")

    name: str
    arguments: str
    #: the `openai` SDK's parse() adds this to a call it returns, and clients send the
    #: message back as it is: ignored (`arguments` says the same)
    parsed_arguments: Any = Field(default=None, exclude=True)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall

    @field_validator("id")
    @classmethod
    def _short_id(cls, v: str) -> str:
        if len(v) > 256:
            raise ValueError("a tool call id is at most 256 characters")
        return v


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """`choices[].logprobs`: one entry per generated token."""

    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


def _is_none(value: object) -> bool:
    return value is None


def omitted_if_none() -> Any:
    """A field OpenAI's published schema makes optional but not nullable: left out of the
    JSON while unset (a `null` there fails strict clients and the schema), as OpenAI does."""
    return Field(None, exclude_if=_is_none)


class ChunkFunction(BaseModel):
    name: str | None = omitted_if_none()
    arguments: str | None = omitted_if_none()


class ChunkToolCall(BaseModel):
    """A stream's tool-call delta: `index`, then `id`, `type` and the name once, then
    argument fragments (as OpenAI and vLLM stream them)."""

    index: int
    id: str | None = omitted_if_none()
    type: Literal["function"] | None = omitted_if_none()
    function: ChunkFunction
