"""Anthropic Messages request -> OpenAI chat body (what the neuron speaks).

The translation keeps everything a chat model can use: system text verbatim and in order (also
system-role messages inside `messages`, where Claude Code puts them), every block, every tool call
id. Text-only content with several blocks stays a list of text parts (block boundaries are the
application's, not ours to join); rendering them is the neuron's chat template's job.

What cannot cross: `cache_control` (no prompt cache to steer), `is_error` on tool results (OpenAI
tool messages have no such flag; the content is passed verbatim, and Claude Code already wraps
failures in `<tool_use_error>`), `redacted_thinking` (Anthropic-encrypted), and the interleaving of
text and `tool_use` blocks within one assistant turn (OpenAI holds text, then tool calls).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from cortex.core.errors import ApiError, bad_request
from cortex.core.openai import function_tool
from cortex.gateway.dialects.anthropic.request import (
    CountTokensRequest,
    DocumentBlock,
    ImageBlock,
    InputMessage,
    MessagesRequest,
    RedactedThinkingBlock,
    SearchResultBlock,
    TextBlock,
    ThinkingBlock,
    ToolChoice,
    ToolDefinition,
    ToolResultBlock,
    ToolUseBlock,
)

# Where tool-call arguments that are not a JSON object end up, so a tool sees what the model wrote.
RAW_ARGUMENTS_KEY = "raw_arguments"

Part = dict[str, Any]
ChatMessage = dict[str, Any]


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def new_tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def to_chat_request(req: CountTokensRequest) -> dict[str, Any]:
    """The OpenAI chat body for a Messages (or count_tokens) request."""
    body: dict[str, Any] = {"model": req.model, "messages": to_chat_messages(req)}
    _add_tools(body, req.tools, req.tool_choice)
    if is_prefill(body["messages"]):
        body["continue_final_message"] = True
    if isinstance(req, MessagesRequest):
        _add_sampling(body, req)
    return body


def is_prefill(messages: list[ChatMessage]) -> bool:
    """An assistant message last, with text and no tool calls: Anthropic's prefill, which the model continues."""
    last = messages[-1] if messages else None
    return last is not None and last["role"] == "assistant" and bool(last.get("content")) and not last.get("tool_calls")


def _add_sampling(body: dict[str, Any], req: MessagesRequest) -> None:
    body["max_tokens"] = req.max_tokens
    if req.stream:
        body["stream"] = True
    for name in ("temperature", "top_p", "top_k"):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.top_p == 0:  # the smallest nucleus there is: the most likely token alone
        del body["top_p"]
        body["top_k"] = 1
    if req.stop_sequences:
        body["stop"] = list(req.stop_sequences)
    if req.metadata is not None and req.metadata.user_id:
        body["user"] = req.metadata.user_id
    fmt = req.output_config.format if req.output_config is not None else None
    fmt = fmt or req.output_format
    if fmt is not None:  # structured outputs: the neuron decodes the answer under the schema
        schema = {"name": "output", "schema": fmt.schema_, "strict": True}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}


def _add_tools(body: dict[str, Any], tools: list[ToolDefinition] | None, choice: ToolChoice | None) -> None:
    chat_tools = [to_chat_tool(t) for t in tools or []]  # parsing kept only tools the model can be given
    if not chat_tools:
        # OpenAI rejects tool_choice without tools; with no tools there is nothing to choose.
        return
    body["tools"] = chat_tools
    if choice is not None:
        body["tool_choice"] = to_chat_tool_choice(choice)
        if choice.disable_parallel_tool_use:
            body["parallel_tool_calls"] = False


def to_chat_tool(tool: ToolDefinition) -> dict[str, Any]:
    """A custom tool with its schema; an Anthropic-defined client tool (`bash_…`) with its documented one."""
    documented = tool.client_schema()
    if documented is not None:
        schema, description = documented
        return function_tool(tool.name, schema, tool.description or description)
    return function_tool(tool.name, tool.input_schema, tool.description, tool.strict)


def to_chat_tool_choice(choice: ToolChoice) -> str | dict[str, Any]:
    if choice.type == "tool":
        return {"type": "function", "function": {"name": choice.name}}
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]


def to_chat_messages(req: CountTokensRequest) -> list[ChatMessage]:
    messages = _system_messages(req.system)
    for position, message in enumerate(req.messages):
        messages.extend(_convert_message(message, position))
    return messages


def _system_messages(system: str | list[TextBlock] | None) -> list[ChatMessage]:
    if not system:
        return []
    if isinstance(system, str):
        return [{"role": "system", "content": system}]
    return [{"role": "system", "content": _text_content([_text_part(b.text) for b in system])}]


def _convert_message(message: InputMessage, position: int) -> list[ChatMessage]:
    if isinstance(message.content, str):
        return [{"role": message.role, "content": message.content}]
    if message.role == "assistant":
        return [_assistant_message(message.content, position)]
    if message.role == "system":
        return [{"role": "system", "content": _text_content(_user_parts(message.content, position, "system"))}]
    return _user_messages(message.content, position)


def _text_part(text: str) -> Part:
    return {"type": "text", "text": text}


def _image_part(block: ImageBlock) -> Part:
    return {"type": "image_url", "image_url": {"url": block.data_url()}}


def _text_content(parts: list[Part]) -> str | list[Part]:
    """One text part is a plain string (what every chat template renders); several stay parts."""
    if len(parts) == 1 and parts[0]["type"] == "text":
        return parts[0]["text"]
    return parts


def _misplaced(block_type: str, role: str, position: int) -> ApiError:
    return bad_request(
        f"messages.{position}: a '{block_type}' block cannot appear in a '{role}' message",
        param=f"messages.{position}.content",
    )


def _user_parts(blocks: list[Any], position: int, role: str) -> list[Part]:
    """Text, image and text-document blocks as OpenAI content parts."""
    parts: list[Part] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            parts.append(_text_part(block.text))
        elif isinstance(block, DocumentBlock | SearchResultBlock):
            parts.append(_text_part(block.text()))
        elif isinstance(block, ImageBlock):
            if role == "system":
                raise _misplaced("image", role, position)
            parts.append(_image_part(block))
        else:
            raise _misplaced(block.type, role, position)
    return parts


def _user_messages(blocks: list[Any], position: int) -> list[ChatMessage]:
    """Tool results first (OpenAI wants `tool` messages right after the assistant's calls), then
    the user's own content. Images inside tool results move into that user message: OpenAI tool
    messages carry text only."""
    tool_messages: list[ChatMessage] = []
    result_images: list[Part] = []
    own: list[Any] = []
    for block in blocks:
        if isinstance(block, ToolResultBlock):
            text_parts, images = _tool_result_parts(block, position)
            tool_messages.append(_tool_message(block.tool_use_id, text_parts))
            result_images.extend(images)
        else:
            own.append(block)
    parts = result_images + _user_parts(own, position, "user")
    if parts or not tool_messages:
        tool_messages.append({"role": "user", "content": _text_content(parts) if parts else ""})
    return tool_messages


def _tool_result_parts(block: ToolResultBlock, position: int) -> tuple[list[Part], list[Part]]:
    if block.content is None:
        return [], []
    if isinstance(block.content, str):
        return [_text_part(block.content)], []
    texts = [p for p in _user_parts(block.content, position, "user") if p["type"] == "text"]
    images = [_image_part(b) for b in block.content if isinstance(b, ImageBlock)]
    return texts, images


def _tool_message(tool_call_id: str, text_parts: list[Part]) -> ChatMessage:
    content: str | list[Part] = _text_content(text_parts) if text_parts else ""
    return {"role": "tool", "tool_call_id": tool_call_id, "content": content}


def _assistant_message(blocks: list[Any], position: int) -> ChatMessage:
    texts: list[Part] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            texts.append(_text_part(block.text))
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            calls.append(to_chat_tool_call(block))
        elif not isinstance(block, RedactedThinkingBlock):
            raise _misplaced(block.type, "assistant", position)
    message: ChatMessage = {"role": "assistant", "content": _text_content(texts) if texts else None}
    if message["content"] is None and not calls:
        message["content"] = ""
    if calls:
        message["tool_calls"] = calls
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    return message


def to_chat_tool_call(block: ToolUseBlock) -> dict[str, Any]:
    arguments = json.dumps(block.input, ensure_ascii=False)
    return {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}}


# ---------------------------------------------------------------------------------------------
# Reply: OpenAI -> Anthropic
# ---------------------------------------------------------------------------------------------
