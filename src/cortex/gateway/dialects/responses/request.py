"""OpenAI Responses request types (https://platform.openai.com/docs/api-reference/responses), stateless.

Lenient: unknown fields are ignored. What needs server-side state (`previous_response_id`,
`conversation`, `item_reference` items, `background`) is refused with a 400 that says so, rather
than answered as if the earlier turns did not exist. Response objects are built as plain dicts in
`reply.py` and `stream.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from cortex.core.errors import bad_request
from cortex.core.validation import parse_request
from cortex.gateway.dialects.optional_tools import OPTIONAL_TOOLS_HEADER, is_optional
from cortex.gateway.dialects.responses.builtin_tools import BUILT_IN_ITEMS
from cortex.gateway.dialects.responses.tools import (
    BuiltInTool,
    ClientTool,
    HostedTool,
    RequestTool,
    ToolSearchTool,
    flat_tool_name,
    flatten_tools,
    tagged_union,
)
from cortex.gateway.dialects.responses.tools import Lenient as _Lenient


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


class _CallItem(_Lenient):
    """An earlier call to a client's tool (function or custom): the fields both kinds share."""

    call_id: str
    name: str
    namespace: str | None = None  # the call was to a tool of a `namespace` tool
    id: str | None = None


class _CallOutputItem(_Lenient):
    """A tool call's output, as the client ran it (function or custom)."""

    call_id: str
    output: str | list[ContentPart]


class FunctionCallItem(_CallItem):
    type: Literal["function_call"]
    arguments: str = ""


class FunctionCallOutputItem(_CallOutputItem):
    type: Literal["function_call_output"]


class CustomToolCallItem(_CallItem):
    """An earlier call to a `custom` tool: its free-form `input` goes back to the model as it wrote it."""

    type: Literal["custom_tool_call"]
    input: str = ""


class CustomToolCallOutputItem(_CallOutputItem):
    type: Literal["custom_tool_call_output"]


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
    known = isinstance(kind, str) and kind in _ITEMS  # a `type` that is not a string names no item
    return kind if known else "UnsupportedItem"  # CamelCase: left out of error paths


class UnsupportedItem(_Lenient):
    type: str

    @model_validator(mode="after")
    def _refuse(self) -> UnsupportedItem:
        if self.type == "item_reference":
            raise ValueError("'item_reference' items need stored responses; this server is stateless")
        raise ValueError(f"input items of type {self.type!r} are not supported")


class ToolSearchCallItem(_Lenient):
    """An earlier tool search call (the client ran it); goes back as a call to the `tool_search` function."""

    type: Literal["tool_search_call"]
    call_id: str | None = None
    arguments: Any = None
    execution: str | None = None
    id: str | None = None


class ToolSearchOutputItem(_Lenient):
    """The tools a tool search loaded: they become callable in this request, and the search's answer to the
    model is a short list of them (`tool_search.py`). Only function, custom and namespace tools can be loaded."""

    type: Literal["tool_search_output"]
    call_id: str | None = None
    tools: list[RequestTool] = Field(default_factory=list)
    execution: str | None = None
    id: str | None = None


_ITEMS: dict[str, Any] = {  # the input item types this translation takes, by their `type`
    "message": MessageItem,
    "function_call": FunctionCallItem,
    "function_call_output": FunctionCallOutputItem,
    "custom_tool_call": CustomToolCallItem,
    "custom_tool_call_output": CustomToolCallOutputItem,
    "reasoning": ReasoningItem,
    "tool_search_call": ToolSearchCallItem,
    "tool_search_output": ToolSearchOutputItem,
    **BUILT_IN_ITEMS,
}
InputItem = tagged_union({**_ITEMS, "UnsupportedItem": UnsupportedItem}, _item_kind)


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
    tools: list[RequestTool] | None = None
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

    def loaded_tools(self) -> list[tuple[str | None, ClientTool]]:
        """(namespace, tool) for each tool the `tool_search_output` items in `input` loaded, in order."""
        if isinstance(self.input, str):
            return []
        outputs = [item for item in self.input if isinstance(item, ToolSearchOutputItem)]
        return [pair for item in outputs for pair in flatten_tools(item.tools)]

    def client_tools(self) -> list[tuple[str | None, ClientTool]]:
        """(namespace or None, tool) for every tool the model may call, namespaces flattened, in order: the
        request's tools, then the ones a tool search loaded (a loaded definition replaces the request's
        tool of the same flat name, which was deferred)."""
        tools = {flat_tool_name(ns, tool.name): (ns, tool) for ns, tool in flatten_tools(self.tools)}
        for namespace, tool in self.loaded_tools():
            tools[flat_tool_name(namespace, tool.name)] = (namespace, tool)
        return list(tools.values())

    def deferred_names(self) -> set[str]:
        """Flat names of the request's `defer_loading` tools that no tool search in `input` has loaded."""
        loaded = {flat_tool_name(ns, tool.name) for ns, tool in self.loaded_tools()}
        deferred = {
            flat_tool_name(ns, t.name) for ns, t in flatten_tools(self.tools) if getattr(t, "defer_loading", None)
        }
        return deferred - loaded

    def tool_names(self) -> dict[str, tuple[str | None, str]]:
        """The model's flat tool name -> (namespace, the client's name), for mapping calls back."""
        return {flat_tool_name(ns, tool.name): (ns, tool.name) for ns, tool in self.client_tools()}

    def tool_search_name(self) -> str | None:
        """The function name a client-run tool search is listed under, when the request has one."""
        return ToolSearchTool.name if any(isinstance(t, ToolSearchTool) for t in self.tools or []) else None


def _refuse_state(req: ResponsesRequest) -> None:
    stateless = "this server is stateless: send the whole conversation in `input`"
    if req.previous_response_id:
        raise bad_request(f"previous_response_id is not supported; {stateless}", param="previous_response_id")
    if req.conversation:
        raise bad_request(f"conversation is not supported; {stateless}", param="conversation")
    if req.background:
        raise bad_request("background responses are not supported; stream instead", param="background")


# OpenAI-defined tools the client runs that need screenshots in their outputs (shell, local_shell and
# apply_patch are served: `builtin_tools.py`).
_SCREEN_TOOLS = ("computer", "computer_use", "computer_use_preview")


def _unavailable(tool_type: str) -> str:
    if tool_type in _SCREEN_TOOLS:
        why = (
            f"the built-in tool {tool_type!r} drives a screen from screenshots (computer_call items with "
            "screenshot outputs), which this server does not produce; declare function tools for it instead"
        )
    elif tool_type == "tool_search":
        why = (
            "hosted tool search runs on OpenAI's servers and is not available here; run it in the client "
            '(`"execution": "client"`) or leave it out'
        )
    else:
        why = f"the hosted tool {tool_type!r} runs on OpenAI's servers and is not available here; leave it out"
    return f"{why}, or list it in the {OPTIONAL_TOOLS_HEADER} header to have it dropped"


def _check_tools(req: ResponsesRequest, optional: frozenset[str]) -> None:
    """Hosted tools are refused by name unless optional (then dropped); a tool search loads function, custom
    and namespace tools only; flat names must be unique."""
    kept: list[Any] = []
    for index, tool in enumerate(req.tools or []):
        if isinstance(tool, HostedTool):
            if is_optional(tool.type, optional):
                continue
            raise bad_request(f"tools[{index}]: {_unavailable(tool.type)}", param=f"tools[{index}].type")
        kept.append(tool)
    req.tools = kept if req.tools is not None else None
    for index, item in enumerate(req.input if isinstance(req.input, list) else []):
        for position, loaded in enumerate(item.tools if isinstance(item, ToolSearchOutputItem) else []):
            if isinstance(loaded, HostedTool | ToolSearchTool | BuiltInTool):
                raise bad_request(
                    f"input[{index}].tools[{position}]: a tool search can load function, custom and namespace "
                    f"tools, not {loaded.type!r}",
                    param=f"input[{index}].tools[{position}].type",
                )
    seen: set[str] = set()
    for namespace, tool in flatten_tools(req.tools):
        flat = flat_tool_name(namespace, tool.name)
        if flat in seen:
            raise bad_request(
                f"two tools are called {flat!r} (namespaced tools are named <namespace>__<name>)", "tools"
            )
        seen.add(flat)


def parse_responses_request(body: Any, optional: frozenset[str] = frozenset()) -> ResponsesRequest:
    req = parse_request(ResponsesRequest, body)
    _refuse_state(req)
    _check_tools(req, optional)
    return req
