"""Anthropic Messages request types (https://docs.anthropic.com/en/api/messages).

Lenient where Anthropic's API is strict: unknown fields (`cache_control`, `thinking` options,
`context_management`, `output_config`, beta features...) are accepted and ignored, because
clients send features a gateway in front of local models has no use for.
Content blocks are validated by their `type`; a block type we cannot represent for a local model
fails with a 400 that names it. Replies are built as plain dicts in `reply.py` and `stream.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cortex.core.errors import bad_request
from cortex.core.validation import parse_request, validation_message
from cortex.gateway.dialects.anthropic.client_tools import client_tool_schema, refuse_or_drop
from cortex.gateway.dialects.optional_tools import OPTIONAL_TOOLS_HEADER, is_optional


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextBlock(_Lenient):
    type: Literal["text"]
    text: str


class Base64Source(_Lenient):
    type: Literal["base64"]
    media_type: str
    data: str


class UrlSource(_Lenient):
    type: Literal["url"]
    url: str


ImageSource = Annotated[Base64Source | UrlSource, Field(discriminator="type")]


class ImageBlock(_Lenient):
    type: Literal["image"]
    source: ImageSource

    def data_url(self) -> str:
        """The image as an OpenAI `image_url.url`: the URL itself, or a data URL for base64."""
        if isinstance(self.source, UrlSource):
            return self.source.url
        return f"data:{self.source.media_type};base64,{self.source.data}"


class PlainTextSource(_Lenient):
    type: Literal["text"]
    media_type: str = "text/plain"
    data: str


class DocumentBlock(_Lenient):
    """Only plain-text documents: a local text model cannot read a PDF, so those are refused."""

    type: Literal["document"]
    source: PlainTextSource | dict[str, Any]
    title: str | None = None

    @field_validator("source")
    @classmethod
    def _text_only(cls, source: PlainTextSource | dict[str, Any]) -> PlainTextSource | dict[str, Any]:
        if isinstance(source, dict):
            kind = source.get("type")
            raise ValueError(f"only plain-text documents (source type 'text') can be read here, not {kind!r}")
        return source

    def text(self) -> str:
        assert isinstance(self.source, PlainTextSource)  # the validator refused every other source
        return self.source.data


class SearchResultBlock(_Lenient):
    """A search result the application found (its own RAG), given to the model as text with its source."""

    type: Literal["search_result"]
    source: str
    title: str = ""
    content: list[TextBlock] = Field(default_factory=list)

    def text(self) -> str:
        head = f"Search result: {self.title} ({self.source})" if self.title else f"Search result: {self.source}"
        return "\n".join([head, *(block.text for block in self.content)])


class ToolUseBlock(_Lenient):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


ToolResultContentBlock = Annotated[
    TextBlock | ImageBlock | DocumentBlock | SearchResultBlock, Field(discriminator="type")
]


class ToolResultBlock(_Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[ToolResultContentBlock] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Lenient):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(_Lenient):
    """Encrypted reasoning from Anthropic's own models: opaque to us, so it is skipped."""

    type: Literal["redacted_thinking"]
    data: str = ""


ContentBlock = Annotated[
    TextBlock
    | ImageBlock
    | DocumentBlock
    | SearchResultBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class InputMessage(_Lenient):
    # "system" is not in Anthropic's spec, but Claude Code sends system-role messages mid-conversation.
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class ToolDefinition(_Lenient):
    """A custom tool has `input_schema`; Anthropic's versioned tools have a `type` instead: those the
    client runs (`bash_…`, `text_editor_…`, `memory_…`) get their documented schema, the others are
    refused unless marked optional (`client_tools.py`)."""

    name: str | None = None  # required of every tool that reaches the model (`mcp_toolset` has none)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None
    strict: bool | None = None  # strict tool use: the input is decoded under input_schema either way

    def is_custom(self) -> bool:
        return self.input_schema is not None and self.type in (None, "custom")

    def client_schema(self) -> tuple[dict[str, Any], str] | None:
        """(input schema, default description) of an Anthropic-defined tool the client runs."""
        return client_tool_schema(self.type) if self.type not in (None, "custom") else None


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _tool_needs_name(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs a 'name'")
        return self


class ThinkingConfig(_Lenient):
    type: str  # "enabled" | "adaptive" | "disabled"; future values are accepted
    budget_tokens: int | None = None

    def wants_thinking(self) -> bool:
        return self.type in ("enabled", "adaptive")


class Metadata(_Lenient):
    user_id: str | None = None


class CountTokensRequest(_Lenient):
    """The body of `/v1/messages/count_tokens`: a Messages request without sampling fields."""

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolDefinition] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    mcp_servers: list[Any] | None = None  # Anthropic's MCP connector: tools its servers call

    def wants_thinking(self) -> bool:
        return self.thinking is not None and self.thinking.wants_thinking()


class OutputFormat(_Lenient):
    """Structured outputs: the answer's text is one JSON value valid against `schema`."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(_Lenient):
    format: OutputFormat | None = None


class MessagesRequest(CountTokensRequest):
    # Required, as Anthropic requires it; large values pass (the neuron clips to the context left).
    max_tokens: int = Field(ge=1)
    output_config: OutputConfig | None = None  # structured outputs (`output_config.format`)
    output_format: OutputFormat | None = None  # the same, as the structured-outputs beta spelled it
    stream: bool = False
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    # 0 is an empty nucleus, which the neuron's sampler refuses: it becomes top_k 1 (the top token only).
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: Metadata | None = None


def _check_tools(req: CountTokensRequest, optional: frozenset[str]) -> None:
    """Every tool reaches the model or is refused by name; optional vendor-run tools are dropped."""
    if req.mcp_servers and not is_optional("mcp_servers", optional):
        raise bad_request(
            "mcp_servers: Anthropic's MCP connector runs on Anthropic's servers and is not available here; connect "
            f"the MCP servers in the client, or list mcp_servers in the {OPTIONAL_TOOLS_HEADER} header to drop them",
            param="mcp_servers",
        )
    kept: list[ToolDefinition] = []
    for index, tool in enumerate(req.tools or []):
        if tool.type in (None, "custom"):
            if tool.input_schema is None:
                raise bad_request(f"tools.{index}.input_schema: Field required", param=f"tools.{index}.input_schema")
        elif tool.client_schema() is None:
            refuse_or_drop(index, tool.type, optional)
            continue
        if not tool.name:
            raise bad_request(f"tools.{index}.name: Field required", param=f"tools.{index}.name")
        kept.append(tool)
    if req.tools is not None:
        req.tools = kept


def parse_messages_request(body: Any, optional: frozenset[str] = frozenset()) -> MessagesRequest:
    req = parse_request(MessagesRequest, body)
    _check_tools(req, optional)
    return req


def parse_count_tokens_request(body: Any, optional: frozenset[str] = frozenset()) -> CountTokensRequest:
    req = parse_request(CountTokensRequest, body)
    _check_tools(req, optional)
    return req


__all__ = [
    "ContentBlock",
    "CountTokensRequest",
    "DocumentBlock",
    "ImageBlock",
    "InputMessage",
    "MessagesRequest",
    "RedactedThinkingBlock",
    "SearchResultBlock",
    "TextBlock",
    "ThinkingBlock",
    "ThinkingConfig",
    "ToolChoice",
    "ToolDefinition",
    "ToolResultBlock",
    "ToolUseBlock",
    "parse_count_tokens_request",
    "parse_messages_request",
    "parse_request",
    "validation_message",
]
