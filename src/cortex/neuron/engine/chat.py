"""Render OpenAI-shaped chat messages to prompt token ids with the model's own chat template.

Tools: a template that renders tools gets them as the model was trained (native mode). A template that
does not gets them in the generic format (`tools.py`): a system-prompt block listing each tool with
its schema and the exact call syntax, earlier calls written back as `<tool_call>` text in the
assistant turns, and tool results as `<tool_response>` blocks in user turns, so any model can take part
in a tool loop whatever roles its template knows.

Never drops a message. Many templates reject a system message that is not first, but clients
(Claude Code among them) send system-role messages between turns and even last. The conversation is
rendered as sent when the template allows it; otherwise each later system message is folded into the
neighbouring user turn, order kept; as a last resort every system message is folded that way.
"""

from __future__ import annotations

import json
from typing import Any

from .tools import GENERIC, as_template_tool, generic_tools_prompt, render_call, render_custom_call, tool_call_mode
from .types import EngineError

Message = dict[str, Any]

IMAGE_PART_TYPES = frozenset({"image_url", "image", "input_image"})
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text"})
FOLD_SEPARATOR = "\n\n"


class ChatRenderer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    @property
    def has_template(self) -> bool:
        return bool(getattr(self._tokenizer, "chat_template", None))

    @property
    def tool_mode(self) -> str | None:
        template = getattr(self._tokenizer, "chat_template", None)
        return tool_call_mode(template if isinstance(template, str) else str(template or ""))

    def render_text(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        if not self.has_template:
            raise EngineError("model has no chat template")
        normalised = normalise_messages(messages)
        if tools and self.tool_mode == GENERIC:
            normalised, tools = generic_tool_messages(normalised, tools), None
        elif tools:  # native: custom tools become functions the template can list; their calls stay text
            normalised, tools = custom_calls_as_text(normalised), [as_template_tool(t) for t in tools]
        else:
            normalised = custom_calls_as_text(normalised)
        failure: Exception | None = None
        for attempt in _fallbacks(normalised):
            try:
                return self._apply(attempt, tools, add_generation_prompt, template_kwargs)
            except Exception as exc:  # jinja's TemplateError, or whatever a template's raise_exception raised
                failure = exc
        raise EngineError(f"chat template failed: {failure}")

    def render(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        text = self.render_text(messages, tools, add_generation_prompt, **template_kwargs)
        # The template already wrote BOS and every special token it wants.
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def _apply(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any],
    ) -> str:
        text = self._tokenizer.apply_chat_template(
            messages,
            tools=tools or None,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
            **template_kwargs,
        )
        if not isinstance(text, str):
            raise EngineError("chat template did not render text")
        return text


def generic_tool_messages(messages: list[Message], tools: list[dict[str, Any]]) -> list[Message]:
    """Normalised messages with the tools, earlier calls and their results written as text (generic mode)."""
    block = generic_tools_prompt(tools)
    out: list[Message] = []
    if messages and messages[0]["role"] == "system":
        out.append(_with_content(messages[0], _join(messages[0]["content"], block)))
        messages = messages[1:]
    else:
        out.append({"role": "system", "content": block})
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            calls = [_call_text(call) for call in message["tool_calls"]]
            text = "\n".join(t for t in [message["content"], *calls] if t)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            result = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out[-1]["role"] == "user":  # several results (or a result and a user turn) share one user turn
                out[-1] = _with_content(out[-1], out[-1]["content"] + "\n" + result)
            else:
                out.append({"role": "user", "content": result})
        else:
            out.append(message)
    return out


def custom_calls_as_text(messages: list[Message]) -> list[Message]:
    """Custom-tool calls (free-form input, no JSON arguments) written into the assistant's text, as generated."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") or []
        custom = [c for c in calls if isinstance(c, dict) and c.get("type") == "custom"]
        if not custom:
            out.append(message)
            continue
        text = "\n".join(t for t in [message["content"], *(_call_text(c) for c in custom)] if t)
        rest = [c for c in calls if c not in custom]
        changed = {k: v for k, v in message.items() if k != "tool_calls"}
        out.append({**changed, "content": text, **({"tool_calls": rest} if rest else {})})
    return out


def _call_text(call: Any) -> str:
    if isinstance(call, dict) and call.get("type") == "custom" and isinstance(call.get("custom"), dict):
        custom = call["custom"]
        if not isinstance(custom.get("name"), str) or not isinstance(custom.get("input", ""), str):
            raise EngineError("each custom tool call must be {'type': 'custom', 'custom': {'name': ..., 'input': ...}}")
        return render_custom_call(custom["name"], custom.get("input", ""))
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise EngineError("each tool call must be {'type': 'function', 'function': {'name': ..., 'arguments': ...}}")
    return render_call(function["name"], function.get("arguments", {}))


def _fallbacks(messages: list[Message]) -> list[list[Message]]:
    attempts = [messages]
    for fold in (fold_later_system_messages, fold_all_system_messages):
        folded = fold(messages)
        if folded not in attempts:
            attempts.append(folded)
    return attempts


def normalise_messages(messages: list[Message]) -> list[Message]:
    """Copies shaped the way templates expect: text content as one string, tool-call arguments as mappings."""
    if not isinstance(messages, list) or not messages:
        raise EngineError("messages must be a non-empty list")
    return [_normalise_message(m) for m in messages]


def _normalise_message(message: Message) -> Message:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise EngineError("each message must be an object with a string 'role'")
    normalised = dict(message)
    normalised["content"] = flatten_content(message.get("content"))
    if message.get("tool_calls"):
        normalised["tool_calls"] = [_normalise_tool_call(c) for c in message["tool_calls"]]
    return normalised


def flatten_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise EngineError("message content must be a string or a list of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in IMAGE_PART_TYPES:
            raise EngineError("model does not accept images")
        if kind not in TEXT_PART_TYPES or not isinstance(part.get("text"), str):
            raise EngineError(f"unsupported content part type {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def _normalise_tool_call(call: Any) -> Any:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    function = dict(call["function"])
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):  # templates iterate `arguments.items()` or pipe it through tojson
            function["arguments"] = parsed
    return {**call, "function": function}


def _with_content(message: Message, content: str) -> Message:
    return {**message, "content": content}


def _join(*texts: str) -> str:
    return FOLD_SEPARATOR.join(t for t in texts if t)


def fold_later_system_messages(messages: list[Message]) -> list[Message]:
    """Keep the leading system message(s) as one; fold every later one into the adjacent user turn."""
    folded: list[Message] = []
    pending: list[str] = []  # system texts waiting for the next user turn
    for message in messages:
        if message["role"] == "system":
            if all(m["role"] == "system" for m in folded) and not pending:
                _merge_leading_system(folded, message)
            else:
                pending.append(message["content"])
            continue
        folded.extend(_place_pending(folded, pending, message))
        pending = []
    _place_trailing(folded, pending)
    return folded


def fold_all_system_messages(messages: list[Message]) -> list[Message]:
    """For templates with no system role at all: every system text goes into the adjacent user turn."""
    folded: list[Message] = []
    pending: list[str] = []
    for message in messages:
        if message["role"] == "system":
            pending.append(message["content"])
            continue
        folded.extend(_place_pending(folded, pending, message))
        pending = []
    _place_trailing(folded, pending)
    return _merge_consecutive(folded, "user")


def _merge_leading_system(folded: list[Message], message: Message) -> None:
    if folded:
        folded[0] = _with_content(folded[0], _join(folded[0]["content"], message["content"]))
    else:
        folded.append(message)


def _place_pending(folded: list[Message], pending: list[str], message: Message) -> list[Message]:
    """Messages to append for `message` with `pending` system texts before it, in order."""
    if not pending:
        return [message]
    if message["role"] == "user":
        return [_with_content(message, _join(*pending, message["content"]))]
    if folded and folded[-1]["role"] == "user":
        folded[-1] = _with_content(folded[-1], _join(folded[-1]["content"], *pending))
        return [message]
    return [{"role": "user", "content": _join(*pending)}, message]


def _place_trailing(folded: list[Message], pending: list[str]) -> None:
    if not pending:
        return
    if folded and folded[-1]["role"] == "user":
        folded[-1] = _with_content(folded[-1], _join(folded[-1]["content"], *pending))
    else:
        folded.append({"role": "user", "content": _join(*pending)})


def _merge_consecutive(messages: list[Message], role: str) -> list[Message]:
    merged: list[Message] = []
    for message in messages:
        if merged and merged[-1]["role"] == role == message["role"]:
            merged[-1] = _with_content(merged[-1], _join(merged[-1]["content"], message["content"]))
        else:
            merged.append(message)
    return merged
