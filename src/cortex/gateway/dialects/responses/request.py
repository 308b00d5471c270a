"""OpenAI Responses request types (https://platform.openai.com/docs/api-reference/responses), stateless.

Lenient: unknown fields are ignored. What needs server-side state (`previous_response_id`,
`conversation`, `item_reference` items, `background`) is refused with a 400 that says so, rather
than answered as if the earlier turns did not exist. Response objects are built as plain dicts in
`reply.py` and `stream.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from cortex.core.errors import bad_request
from cortex.core.validation import parse_request


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InputText(_Lenient):
    type: Literal["input_text"]
    text: str


class OutputText(_Lenient):
    type: Literal["output_text"]
    text: str


class Refusal(_Lenient):
    type: Literal["refusal"]
    refusal: str


class InputImage(_Lenient):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None

    @model_validator(mode="after")
    def _needs_url(self) -> InputImage:
        if not self.image_url:
            raise ValueError("only images given by 'image_url' (a URL or data URL) are supported, not 'file_id'")
        return self


ContentPart = Annotated[InputText | OutputText | Refusal | InputImage, Field(discriminator="type")]


class MessageItem(_Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]


class FunctionCallItem(_Lenient):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str = ""
    id: str | None = None


class FunctionCallOutputItem(_Lenient):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[ContentPart]


class ReasoningContent(_Lenient):
    type: str
    text: str = ""


class ReasoningItem(_Lenient):
    """A thinking model's earlier reasoning; its text goes back as the next assistant turn's reasoning."""

    type: Literal["reasoning"]
    summary: list[ReasoningContent] = Field(default_factory=list)
    content: list[ReasoningContent] | None = None

    def text(self) -> str:
        return "".join(part.text for part in self.content or [] if part.type == "reasoning_text")


def _item_kind(item: Any) -> str:
    """Messages may omit `type` (the SDK's EasyInputMessage)."""
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", "message")
    return kind if kind in _ITEM_KINDS else "UnsupportedItem"  # CamelCase: left out of error paths


class UnsupportedItem(_Lenient):
    type: str

    @model_validator(mode="after")
    def _refuse(self) -> UnsupportedItem:
        if self.type == "item_reference":
            raise ValueError("'item_reference' items need stored responses; this server is stateless")
        raise ValueError(f"input items of type {self.type!r} are not supported")


_ITEM_KINDS = ("message", "function_call", "function_call_output", "reasoning")

InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")]
    | Annotated[UnsupportedItem, Tag("UnsupportedItem")],
    Discriminator(_item_kind),
]


class FunctionTool(_Lenient):
    """Responses' flat function tool. Hosted tools (`web_search`, `file_search`, ...) run on
    OpenAI's servers; we have none, so they are skipped (`type` other than `function`)."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _function_needs_name(self) -> FunctionTool:
        if self.type == "function" and not self.name:
            raise ValueError("a function tool needs a 'name'")
        return self

    def is_function(self) -> bool:
        return self.type == "function"


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class TextConfig(_Lenient):
    format: TextFormat | None = None


class ResponsesRequest(_Lenient):
    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    text: TextConfig | None = None
    include: list[str] | None = None  # "message.output_text.logprobs": per-token logprobs on output_text
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    metadata: dict[str, str] | None = None
    user: str | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool | None = None

    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or [])

    def function_tools(self) -> list[FunctionTool]:
        return [t for t in self.tools or [] if t.is_function()]


def _refuse_state(req: ResponsesRequest) -> None:
    stateless = "this server is stateless: send the whole conversation in `input`"
    if req.previous_response_id:
        raise bad_request(f"previous_response_id is not supported; {stateless}", param="previous_response_id")
    if req.conversation:
        raise bad_request(f"conversation is not supported; {stateless}", param="conversation")
    if req.background:
        raise bad_request("background responses are not supported; stream instead", param="background")


def parse_responses_request(body: Any) -> ResponsesRequest:
    req = parse_request(ResponsesRequest, body)
    _refuse_state(req)
    return req
