"""OpenAI's Responses API (`/v1/responses`): what clients send, and the pure translations
between a response and the chat job that runs it.

Why a response is a job: the job record, its event stream, cancel, recovery and metrics
already are the durable parts the Responses API needs; a second state machine would drift
from the first. Why the ids map one to one (`resp_<hex>` is `job_<hex>`, its output items
`msg_<hex>` and `fc_<hex>_<k>`): a response needs no record of its own, and a stream read
again after a restart names every item as the first reading did.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Discriminator, Field, Tag, ValidationInfo, field_validator

from schemas.openai import ChatCompletion, ChatCompletionRequest, InferqOptions, Metadata, StrictModel
from schemas.structured import NAME_PATTERN

RESPONSE_PREFIX = "resp_"
JOB_PREFIX = "job_"


def response_id(job_id: str) -> str:
    """The response id of a response's job."""
    return RESPONSE_PREFIX + job_id.removeprefix(JOB_PREFIX)


def job_id_of(response_id: str) -> str:
    """The job id of a response id (any other string stays as it is, and is not found)."""
    if not response_id.startswith(RESPONSE_PREFIX):
        return response_id
    return JOB_PREFIX + response_id.removeprefix(RESPONSE_PREFIX)


def message_item_id(job_id: str) -> str:
    return "msg_" + job_id.removeprefix(JOB_PREFIX)


def call_item_id(job_id: str, k: int) -> str:
    return f"fc_{job_id.removeprefix(JOB_PREFIX)}_{k}"


# --- what clients send ------------------------------------------------------------------


class InputText(StrictModel):
    type: Literal["input_text"]
    text: str


class OutputText(StrictModel):
    """An earlier answer's text, sent back as part of the conversation."""

    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


Part = Annotated[InputText | OutputText, Field(discriminator="type")]


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[Part]
    #: an earlier output item sent back carries these: accepted, ignored
    id: str | None = None
    status: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> Any:
        for j, part in enumerate(v if isinstance(v, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text"):
                raise ValueError(f"this model accepts text only: content part {j} is of type '{kind}'")
        return v

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[InputText]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


def _item_kind(v: Any) -> str:
    kind = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", "message")
    return str(kind)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(
        _item_kind,
        custom_error_type="invalid_item",
        custom_error_message="an input item is a message, a function_call or a function_call_output",
    ),
]


class TextFormatText(StrictModel):
    type: Literal["text"]


class TextFormatJsonObject(StrictModel):
    type: Literal["json_object"]


class TextFormatJsonSchema(StrictModel):
    type: Literal["json_schema"]
    name: str = Field(pattern=NAME_PATTERN)
    json_schema: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[
    TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")
]


class TextConfig(StrictModel):
    format: TextFormat | None = None
    #: accepted at OpenAI's default only: the model's length is its own
    verbosity: Literal["medium"] | None = None


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(StrictModel):
    type: Literal["function"]
    name: str


ResponseToolChoice = Literal["none", "auto", "required"] | NamedFunction


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem


class ResponseCreate(StrictModel):
    """Body of POST /v1/responses. Same policy as chat: every field we can honour is
    honoured, a no-op field is accepted at its no-op value, anything else is a 400 naming it."""

    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: ResponseToolChoice | None = None
    parallel_tool_calls: bool | None = None
    metadata: Metadata | None = None
    previous_response_id: str | None = None
    #: false: forgotten once answered (retrieve answers 404); background needs it true
    store: bool = True
    background: bool = False
    stream: bool = False
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    service_tier: Literal["auto", "default"] | None = None
    truncation: Literal["disabled"] | None = None
    include: list[str] | None = None
    inferq: InferqOptions | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _some_text_input(cls, v: Any) -> Any:
        """Said here, before pydantic tries `input` as a string and as a list, so that the
        answer names the problem instead of "Input should be a valid string"."""
        if isinstance(v, list) and not v:
            raise ValueError("input needs at least one item")
        for k, item in enumerate(v if isinstance(v, list) else []):
            content = item.get("content") if isinstance(item, dict) else None
            for j, part in enumerate(content if isinstance(content, list) else []):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in ("input_text", "output_text"):
                    raise ValueError(
                        f"this model accepts text only: item {k}, content part {j} is of type '{kind}'"
                    )
        return v

    @field_validator("include")
    @classmethod
    def _no_includes(cls, v: list[str] | None) -> list[str] | None:
        if v:
            raise ValueError(f"'{v[0]}' cannot be included by this server (nothing can)")
        return v

    @field_validator("background")
    @classmethod
    def _background_stored(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("store") is False:
            raise ValueError("a background response must be stored (store: true)")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice_names_a_tool(
        cls, v: ResponseToolChoice | None, info: ValidationInfo
    ) -> ResponseToolChoice | None:
        tools: list[FunctionTool] = info.data.get("tools") or []
        if isinstance(v, NamedFunction) and v.name not in {t.name for t in tools}:
            raise ValueError(f"the function '{v.name}' is not one of the tools")
        return v

    def input_items(self) -> list[Item]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)]
        return list(self.input)


# --- translations -------------------------------------------------------------------------


def conversation_messages(items: list[Item]) -> list[dict[str, Any]]:
    """Input items as chat messages: function calls join the assistant turn before them
    (or make one), their outputs become `tool` messages."""
    out: list[dict[str, Any]] = []
    for item in items:
        if isinstance(item, MessageItem):
            out.append({"role": item.role, "content": item.text()})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if not last.get("content"):
                    last["content"] = None
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
    return out


def answer_messages(result: ChatCompletion) -> list[dict[str, Any]]:
    """A finished response's answer as the assistant turn a next response continues from."""
    message = result.choices[0].message
    turn: dict[str, Any] = {"role": "assistant", "content": message.content or None}
    if message.tool_calls:
        turn["tool_calls"] = [c.model_dump() for c in message.tool_calls]
    elif turn["content"] is None:
        turn["content"] = ""
    return [turn]


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text is not None else None
    if fmt is None or isinstance(fmt, TextFormatText):
        return None
    if isinstance(fmt, TextFormatJsonObject):
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": fmt.name, "schema": fmt.json_schema}
    if fmt.description is not None:
        spec["description"] = fmt.description
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}


def _chat_tools(body: ResponseCreate) -> dict[str, Any]:
    if not body.tools:
        return {}
    out: dict[str, Any] = {
        "tools": [
            {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
            for t in body.tools
        ]
    }
    choice = body.tool_choice
    if isinstance(choice, NamedFunction):
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    elif choice is not None:
        out["tool_choice"] = choice
    if body.parallel_tool_calls is not None:
        out["parallel_tool_calls"] = body.parallel_tool_calls
    return out


def chat_request(body: ResponseCreate, conversation: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat job that runs a response. Raises pydantic's ValidationError for a
    conversation the chat request refuses (the caller names `input` in its 400)."""
    messages = list(conversation)
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    fields: dict[str, Any] = {
        "model": body.model,
        "messages": messages,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_tokens": body.max_output_tokens,
        "response_format": _response_format(body.text),
        "metadata": body.metadata,
        "user": body.user,
        "safety_identifier": body.safety_identifier,
        "prompt_cache_key": body.prompt_cache_key,
        "inferq": body.inferq.model_dump(exclude_none=True) if body.inferq else None,
        **_chat_tools(body),
    }
    return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})


def output_items(job_id: str, result: ChatCompletion, done: bool = True) -> list[dict[str, Any]]:
    """The answer as output items: a message with its text (when there is text, or nothing
    else), then one `function_call` per tool call."""
    choice = result.choices[0]
    message = choice.message
    status = "completed" if done and choice.finish_reason != "length" else "incomplete"
    items: list[dict[str, Any]] = []
    if message.content or not message.tool_calls:
        items.append(message_item(job_id, message.content or "", status))
    for k, call in enumerate(message.tool_calls or []):
        items.append(call_item(job_id, k, call.id, call.function.name, call.function.arguments, "completed"))
    return items


def message_item(job_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [output_text_part(text)]
    return {
        "id": message_item_id(job_id),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def output_text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(job_id: str, k: int, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": call_item_id(job_id, k),
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def usage(result: ChatCompletion | None) -> dict[str, Any] | None:
    if result is None:
        return None
    u = result.usage
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    }


def echo_fields(body: ResponseCreate) -> dict[str, Any]:
    """What a response object repeats of its request (kept with the job at creation)."""
    fmt = (
        body.text.format
        if body.text is not None and body.text.format is not None
        else TextFormatText(type="text")
    )
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": body.previous_response_id,
        "store": body.store,
        "background": body.background,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True)},
        "tool_choice": (
            body.tool_choice.model_dump()
            if isinstance(body.tool_choice, NamedFunction)
            else body.tool_choice or "auto"
        ),
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "truncation": "disabled",
        "user": body.user,
    }


class ResponseError(BaseModel):
    code: str
    message: str


class ResponseObject(BaseModel):
    """The `response` object (what create, retrieve and cancel answer). Output items are
    plain objects: their shapes are OpenAI's, built by `output_items`."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: dict[str, str] | None = None
    model: str
    output: list[dict[str, Any]] = []
    usage: dict[str, Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] = {}
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    store: bool = True
    background: bool = False
    temperature: float | None = None
    top_p: float | None = None
    text: dict[str, Any] = {}
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = []
    truncation: str = "disabled"
    user: str | None = None


class ResponseDeleted(BaseModel):
    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False
