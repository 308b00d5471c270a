"""OpenAI chat completion -> Anthropic Message: content blocks, stop reason, usage."""

from __future__ import annotations

import json
from typing import Any

from cortex.core.openai import cached_tokens
from cortex.gateway.dialects.anthropic.to_chat import RAW_ARGUMENTS_KEY, new_message_id, new_tool_use_id


def parse_tool_arguments(raw: str | None) -> dict[str, Any]:
    """A tool call's `arguments` string as an Anthropic `input` object, best effort.

    Valid JSON objects pass unchanged. Otherwise the first JSON object found in the text is used
    (models wrap arguments in code fences or trail garbage). Anything else keeps the raw text
    under `raw_arguments`, so the tool reports a useful validation error rather than running with
    an empty input. Empty or `null` arguments mean "no arguments": `{}`.
    """
    text = (raw or "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        value = _first_json_object(text)
    if value is None:
        return {} if text == "null" else {RAW_ARGUMENTS_KEY: raw}
    if isinstance(value, dict):
        return value
    return {RAW_ARGUMENTS_KEY: raw}


def _first_json_object(text: str) -> dict[str, Any] | None:
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except ValueError:
            start = text.find("{", start + 1)
            continue
        return value if isinstance(value, dict) else None
    return None


def stop_reason(finish_reason: str | None, stop_sequence: str | None, used_tools: bool) -> tuple[str, str | None]:
    """Anthropic's (stop_reason, stop_sequence) for an OpenAI finish.

    The neuron names the matched stop string in the choice's non-standard `stop_sequence`.
    """
    if finish_reason == "length":
        return "max_tokens", None
    if used_tools or finish_reason in ("tool_calls", "function_call"):
        return "tool_use", None
    if finish_reason == "content_filter":
        return "refusal", None
    if isinstance(stop_sequence, str):
        return "stop_sequence", stop_sequence
    return "end_turn", None


def usage_block(prompt_tokens: int | None, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """Anthropic usage: `input_tokens` excludes what the prefix cache served (`cache_read_input_tokens`).

    Anthropic's input counts add up to the prompt; OpenAI's `prompt_tokens` includes its cached part.
    Nothing is written to a cache on request, so `cache_creation_input_tokens` is 0.
    """
    prompt = prompt_tokens or 0
    cached = min(cached_tokens, prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def to_anthropic_message(
    response: dict[str, Any], *, model: str, thinking: bool = False, message_id: str | None = None
) -> dict[str, Any]:
    """A non-streaming OpenAI chat completion as an Anthropic `message`."""
    choice = (response.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    content = _reply_blocks(message, thinking)
    used_tools = any(block["type"] == "tool_use" for block in content)
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_sequence"), used_tools)
    usage = response.get("usage") or {}
    return {
        "id": message_id or new_message_id(),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_block(usage.get("prompt_tokens"), usage.get("completion_tokens") or 0, cached_tokens(usage)),
    }


def _reply_blocks(message: dict[str, Any], thinking: bool) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if thinking and reasoning:
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, list):
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if text:
        blocks.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        blocks.append(
            {
                "type": "tool_use",
                "id": call.get("id") or new_tool_use_id(),
                "name": function.get("name") or "",
                "input": parse_tool_arguments(function.get("arguments")),
            }
        )
    return blocks


# ---------------------------------------------------------------------------------------------
# Streaming: OpenAI chunks -> Anthropic events
# ---------------------------------------------------------------------------------------------
