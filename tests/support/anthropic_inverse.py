"""The inverse of `translate_anthropic.to_chat_request`, and the canonical form both sides share.

The property test goes Anthropic -> OpenAI -> Anthropic and compares canonical forms. The
canonical form encodes exactly the documented liberties of the forward translation, no more:
a leading system-role message and top-level `system` are the same thing; tool results come before
the user's own content (OpenAI needs `tool` messages right after the calls) and images in tool
results join that content; consecutive tool results are one group; text blocks of an assistant
turn come before its `tool_use` blocks; thinking blocks join into one; `is_error` and
`cache_control` do not cross.
"""

from __future__ import annotations

import json
from typing import Any

from cortex.gateway.dialects.anthropic.request import (
    DocumentBlock,
    ImageBlock,
    MessagesRequest,
    TextBlock,
    ThinkingBlock,
    ToolResultBlock,
    ToolUseBlock,
)

# ------------------------------------------------------------------------------ inverse


def _blocks_from_parts(content: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [_block_from_part(p) for p in content]


def _block_from_part(part: dict[str, Any]) -> dict[str, Any]:
    if part["type"] == "text":
        return {"type": "text", "text": part["text"]}
    url = part["image_url"]["url"]
    if url.startswith("data:"):
        media_type, data = url[5:].split(";base64,", 1)
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _content_back(content: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]]:
    return content if isinstance(content, str) else _blocks_from_parts(content)


def _assistant_back(message: dict[str, Any]) -> dict[str, Any]:
    blocks: list[dict[str, Any]] = []
    if message.get("reasoning_content"):
        blocks.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
    blocks += _blocks_from_parts(message.get("content"))
    for call in message.get("tool_calls") or []:
        function = call["function"]
        blocks.append(
            {"type": "tool_use", "id": call["id"], "name": function["name"], "input": json.loads(function["arguments"])}
        )
    if not message.get("reasoning_content") and not message.get("tool_calls") and isinstance(message["content"], str):
        return {"role": "assistant", "content": message["content"]}
    return {"role": "assistant", "content": blocks}


def chat_to_anthropic(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request equivalent to an OpenAI chat body made by `to_chat_request`."""
    chat = list(body["messages"])
    request: dict[str, Any] = {"model": body["model"], "max_tokens": body["max_tokens"]}
    if chat and chat[0]["role"] == "system":
        request["system"] = _content_back(chat.pop(0)["content"])
    messages: list[dict[str, Any]] = []
    for message in chat:
        if message["role"] == "tool":
            result = {"type": "tool_result", "tool_use_id": message["tool_call_id"]}
            result["content"] = _content_back(message["content"])
            if messages and messages[-1].get("_tool_results"):
                messages[-1]["content"].append(result)
            else:
                messages.append({"role": "user", "content": [result], "_tool_results": True})
        elif message["role"] == "assistant":
            messages.append(_assistant_back(message))
        else:
            messages.append({"role": message["role"], "content": _content_back(message["content"])})
    for message in messages:
        message.pop("_tool_results", None)
    request["messages"] = messages
    _sampling_back(body, request)
    _tools_back(body, request)
    return request


def _sampling_back(body: dict[str, Any], request: dict[str, Any]) -> None:
    for name in ("temperature", "top_p", "top_k"):
        if name in body:
            request[name] = body[name]
    if "stop" in body:
        request["stop_sequences"] = body["stop"]
    if "user" in body:
        request["metadata"] = {"user_id": body["user"]}


def _tools_back(body: dict[str, Any], request: dict[str, Any]) -> None:
    if "tools" not in body:
        return
    request["tools"] = [
        {
            k: v
            for k, v in {
                "name": f["name"],
                "description": f.get("description"),
                "input_schema": f["parameters"],
            }.items()
            if v is not None
        }
        for f in (t["function"] for t in body["tools"])
    ]
    choice = body.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, dict):
        anthropic_choice: dict[str, Any] = {"type": "tool", "name": choice["function"]["name"]}
    else:
        anthropic_choice = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    if body.get("parallel_tool_calls") is False:
        anthropic_choice["disable_parallel_tool_use"] = True
    request["tool_choice"] = anthropic_choice


# ------------------------------------------------------------------------------ canonical form


def _image_key(block: ImageBlock) -> tuple[str, str]:
    return ("image", block.data_url())


def _text_of(block: Any) -> tuple[str, str]:
    return ("text", block.text() if isinstance(block, DocumentBlock) else block.text)


def _as_blocks(content: str | list[Any]) -> list[Any]:
    return [TextBlock(type="text", text=content)] if isinstance(content, str) else list(content)


def _result_texts(block: ToolResultBlock) -> list[str]:
    if block.content is None:
        return []
    if isinstance(block.content, str):
        return [block.content] if block.content else []
    return [_text_of(b)[1] for b in block.content if not isinstance(b, ImageBlock)]


def _result_images(block: ToolResultBlock) -> list[tuple[str, str]]:
    if isinstance(block.content, list):
        return [_image_key(b) for b in block.content if isinstance(b, ImageBlock)]
    return []


def _canonical_user(blocks: list[Any]) -> list[tuple[Any, ...]]:
    results = [b for b in blocks if isinstance(b, ToolResultBlock)]
    own = [b for b in blocks if not isinstance(b, ToolResultBlock)]
    entries: list[tuple[Any, ...]] = []
    if results:
        entries.append(("tool_results", [(r.tool_use_id, _result_texts(r)) for r in results]))
    rest = [img for r in results for img in _result_images(r)]
    rest += [_image_key(b) if isinstance(b, ImageBlock) else _text_of(b) for b in own]
    if rest or not results:
        entries.append(("user", rest))
    return entries


def _canonical_assistant(blocks: list[Any]) -> tuple[Any, ...]:
    reasoning = "".join(b.thinking for b in blocks if isinstance(b, ThinkingBlock))
    texts = [b.text for b in blocks if isinstance(b, TextBlock)]
    calls = [(b.id, b.name, b.input) for b in blocks if isinstance(b, ToolUseBlock)]
    return ("assistant", reasoning, texts, calls)


def _merge_tool_results(entries: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    merged: list[tuple[Any, ...]] = []
    for entry in entries:
        if entry[0] == "tool_results" and merged and merged[-1][0] == "tool_results":
            merged[-1] = ("tool_results", merged[-1][1] + entry[1])
        else:
            merged.append(entry)
    return merged


def canonical(req: MessagesRequest) -> dict[str, Any]:
    entries: list[tuple[Any, ...]] = []
    if req.system:
        entries.append(("system", [b.text for b in _as_blocks(req.system)]))
    for message in req.messages:
        blocks = _as_blocks(message.content)
        if message.role == "user":
            entries += _canonical_user(blocks)
        elif message.role == "assistant":
            entries.append(_canonical_assistant(blocks))
        else:
            entries.append(("system", [_text_of(b)[1] for b in blocks]))
    custom = [t for t in req.tools or [] if t.is_custom()]
    choice = req.tool_choice if custom else None
    return {
        "model": req.model,
        "max_tokens": req.max_tokens,
        "sampling": (req.temperature, req.top_p, req.top_k, req.stop_sequences or []),
        "user_id": (req.metadata.user_id if req.metadata else None) or None,
        "messages": _merge_tool_results(entries),
        "tools": [(t.name, t.description, t.input_schema) for t in custom],
        "tool_choice": (choice.type, choice.name, bool(choice.disable_parallel_tool_use)) if choice else None,
    }
