"""OpenAI Chat Completions and Completions request types (the neuron's native dialect).

Unknown fields are accepted and ignored: clients send many vendor extensions.
Responses are built as plain dicts on the hot path (see the `*_chunk`/`*_response` helpers).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ToolFunction(_Lenient):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # arguments decoded under the schema either way; strict refuses what it cannot enforce


class CustomToolSpec(_Lenient):
    """A tool that takes free-form input: `format` {"type": "text"} or {"type": "grammar", "grammar":
    {"syntax": "lark" | "regex", "definition": ...}}; its calls come back as {"type": "custom", "custom":
    {"name", "input"}}."""

    name: str
    description: str | None = None
    format: dict[str, Any] | None = None


class Tool(_Lenient):
    type: Literal["function", "custom"] = "function"
    function: ToolFunction | None = None
    custom: CustomToolSpec | None = None

    @model_validator(mode="after")
    def _body_matches_type(self) -> Tool:
        if getattr(self, self.type) is None:
            raise ValueError(f"a {self.type} tool needs its '{self.type}' object")
        return self


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # str, or a list of content parts ({"type": "text", "text": ...}, image parts, ...)
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def _part_types(cls, v: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        if isinstance(v, list):
            for index, part in enumerate(v):
                if not isinstance(part.get("type"), str):
                    raise ValueError(f"content part {index} needs a string 'type'")
        return v

    def text(self) -> str:
        """The message's text content, text parts joined; non-text parts are not text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.get("text", "") for p in self.content if p.get("type") in ("text", "input_text"))


class SamplingFields(_Lenient):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)  # beyond any vocabulary; int64 on the device
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what a torch generator accepts
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1)
    logprobs: bool | int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        items = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in items if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    top_logprobs: int | None = None
    # Ask a thinking model to keep its reasoning out of `content` (default) or inline.
    include_reasoning: bool | None = None
    # vLLM's extension: the last message is an assistant turn to continue, not a finished one (Anthropic's
    # "prefill"); the reply is the continuation only.
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _continues_an_assistant_turn(self) -> ChatCompletionRequest:
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs an assistant message last")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    echo: bool = False
    suffix: str | None = None


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI `usage`; `cached_tokens`: prompt tokens served from the prefix cache (included in `prompt_tokens`)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def cached_tokens(usage: dict[str, Any]) -> int:
    """The prompt tokens a usage says were served from the prefix cache (0 when it does not say)."""
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return cached if isinstance(cached, int) and not isinstance(cached, bool) and cached > 0 else 0


def function_tool(
    name: str | None, parameters: dict[str, Any] | None, description: str | None = None, strict: bool | None = None
) -> dict[str, Any]:
    """A chat request's function tool, as every dialect's tool becomes (no schema: any object)."""
    function: dict[str, Any] = {"name": name, "parameters": parameters or {"type": "object"}}
    if description is not None:
        function["description"] = description
    if strict is not None:
        function["strict"] = strict
    return {"type": "function", "function": function}
