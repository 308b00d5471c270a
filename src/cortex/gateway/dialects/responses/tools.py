"""OpenAI Responses tool types: function, custom (free text or a grammar), namespace, client-run tool
search, the built-in tools the client runs (shell, local_shell, apply_patch), and the hosted tools that
are refused; and the flat names namespaced tools go by.

Lenient like the request: unknown fields are ignored.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


class Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class FunctionTool(Lenient):
    """Responses' flat function tool. `defer_loading`: listed by name and description only until a
    `tool_search_output` item loads it (`tool_search.py`)."""

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    defer_loading: bool | None = None


class CustomToolFormat(Lenient):
    """A custom tool's input: free text, or text in a Lark or regex grammar (enforced while decoding)."""

    type: Literal["text", "grammar"] = "text"
    syntax: Literal["lark", "regex"] | None = None
    definition: str | None = None

    @model_validator(mode="after")
    def _grammar_needs_definition(self) -> CustomToolFormat:
        if self.type == "grammar" and (self.syntax is None or not (self.definition or "").strip()):
            raise ValueError("a grammar format needs 'syntax' ('lark' or 'regex') and a non-empty 'definition'")
        return self


class CustomTool(Lenient):
    """A tool that takes free-form text (Codex's `apply_patch`); its calls are `custom_tool_call` items."""

    type: Literal["custom"]
    name: str = Field(min_length=1)
    description: str | None = None
    format: CustomToolFormat | None = None
    defer_loading: bool | None = None


NamespacedTool = Annotated[FunctionTool | CustomTool, Field(discriminator="type")]


class NamespaceTool(Lenient):
    """Function and custom tools grouped under a name (Codex's `multi_agent_v1`). The model sees each
    under a flat name (`flat_tool_name`); its calls come back with `name` and `namespace` apart."""

    type: Literal["namespace"]
    name: str = Field(min_length=1)
    description: str = ""
    tools: list[NamespacedTool]


class ToolSearchTool(Lenient):
    """Tool search the client runs (`execution: "client"`; Codex's BM25 search over its deferred tools).
    The model sees it as a function `tool_search` with the client's description and parameters; its
    calls are `tool_search_call` items, and the `tool_search_output` the client sends back loads tools."""

    type: Literal["tool_search"]
    execution: Literal["client"]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    name: ClassVar[str] = "tool_search"  # the function name the model calls it by


class BuiltInTool(Lenient):
    """One of OpenAI's built-in tools that the client runs (`shell`, `local_shell`, `apply_patch`). The model
    sees it as a function of the same name with the parameters of the call's action (`builtin_tools.py`);
    its calls are items of their own (`shell_call`, `local_shell_call`, `apply_patch_call`)."""

    type: Literal["shell", "local_shell", "apply_patch"]
    description: ClassVar[str | None] = None

    @property
    def name(self) -> str:
        """The function name the model calls it by: the tool's type."""
        return self.type


class HostedTool(Lenient):
    """A tool OpenAI runs on its own servers (`web_search`, `file_search`, `code_interpreter`, `mcp`, tool
    search without `execution: "client"`, ...). Refused (400 naming it) unless the client marked it
    optional (`optional_tools.py`)."""

    type: str


_TOOL_TAGS = {
    "function": "FunctionTool",
    "custom": "CustomTool",
    "namespace": "NamespaceTool",
    "shell": "BuiltInTool",
    "local_shell": "BuiltInTool",
    "apply_patch": "BuiltInTool",
}


def _tool_kind(tool: Any) -> str:
    """The tool's class (CamelCase tags are left out of error paths: `tools.0.name: Field required`)."""
    kind = tool.get("type") if isinstance(tool, dict) else getattr(tool, "type", None)
    if kind == "tool_search":
        execution = tool.get("execution") if isinstance(tool, dict) else getattr(tool, "execution", None)
        return "ToolSearchTool" if execution == "client" else "HostedTool"
    return _TOOL_TAGS.get(kind, "HostedTool") if isinstance(kind, str) else "HostedTool"


def tagged_union(members: dict[str, type[BaseModel]], kind: Callable[[Any], str]) -> Any:
    """`Annotated[A, Tag(a)] | Annotated[B, Tag(b)] | ...` under `Discriminator(kind)`, from one tag -> model table:
    pydantic validates an element against exactly the model its tag names, and its errors name that tag."""
    union = functools.reduce(operator.or_, (Annotated[model, Tag(tag)] for tag, model in members.items()))
    return Annotated[union, Discriminator(kind)]


RequestTool = tagged_union(
    {
        "FunctionTool": FunctionTool,
        "CustomTool": CustomTool,
        "NamespaceTool": NamespaceTool,
        "ToolSearchTool": ToolSearchTool,
        "BuiltInTool": BuiltInTool,
        "HostedTool": HostedTool,
    },
    _tool_kind,
)

ClientTool = FunctionTool | CustomTool | ToolSearchTool | BuiltInTool


NAMESPACE_SEPARATOR = "__"


def flat_tool_name(namespace: str | None, name: str) -> str:
    """The name the model sees for a tool: `<namespace>__<name>` inside a namespace (a valid function
    name: OpenAI allows only letters, digits, `_` and `-`), else the tool's own name."""
    return f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name


def flatten_tools(tools: list[RequestTool] | None) -> list[tuple[str | None, ClientTool]]:
    """(namespace or None, tool) for every tool the client runs, namespaces flattened, in order."""
    found: list[tuple[str | None, ClientTool]] = []
    for tool in tools or []:
        if isinstance(tool, NamespaceTool):
            found.extend((tool.name, inner) for inner in tool.tools)
        elif isinstance(tool, FunctionTool | CustomTool | ToolSearchTool | BuiltInTool):
            found.append((None, tool))
    return found
