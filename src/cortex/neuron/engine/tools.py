"""Tool calling on every model: how tools reach the prompt, how calls are constrained and parsed back.

Call syntaxes, as chat templates teach them:

- "hermes" (Hermes, Qwen 2/2.5/3 and most fine-tunes): `<tool_call>{"name": .., "arguments": {..}}</tool_call>`.
- "json" / "llama3": a bare JSON object (or list of them) `{"name": .., "arguments"|"parameters": {..}}`
  as the whole reply, optionally after Llama 3's `<|python_tag|>`.

A model's tool mode (`ModelInfo.tool_call_format`) is "native:<syntax>" when its template renders
tools, else "generic": the neuron then writes the tools into the system prompt itself in the generic
format below (the Hermes syntax, the one most open models have seen) and renders earlier calls and
results as text (`chat.py`). Either way, `tool_grammar` constrains decoding (`grammar.py`) so a call,
once the model opens one, names a declared tool with arguments valid against its schema, and
`tool_choice` required / a named tool forces one.

A parser is fed text as it streams and returns plain text that is safe to show now, holding back
only what may still become a tool call. Malformed tool-call JSON never raises: it comes back as text.
"""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from typing import Any

from . import grammar
from .grammar import CUSTOM_CLOSE, CUSTOM_OPEN, HERMES_CLOSE, HERMES_OPEN, Grammar, tool_kind
from .holdback import partial_marker_length
from .types import EngineError, ParsedEvent, PlainText, ToolCall

_CUSTOM_CALL = re.compile(r"\A\s*(\{.*?\})\s*<input>(.*)</input>\s*\Z", re.DOTALL)
PYTHON_TAG = "<|python_tag|>"
GENERIC = "generic"
NATIVE = "native:"

GENERIC_TOOLS_PROMPT = """# Tools

You can call tools. Each tool is listed below as a JSON object with its name, what it does, and a JSON \
Schema of its arguments:
<tools>
{tools}
</tools>

To call a tool, write a JSON object with the tool's name and its arguments inside <tool_call></tool_call> tags:
<tool_call>
{{"name": "<tool name>", "arguments": {{<the arguments, valid against the tool's schema>}}}}
</tool_call>
Write one such block per call. Each result comes back inside <tool_response></tool_response> tags. \
When no tool is needed, answer directly."""

CUSTOM_TOOLS_PROMPT = """Tools listed with an "input" instead of "parameters" take free-form input, not JSON arguments \
(their input must follow the grammar given, if any). Call them like this:
<tool_call>
{{"name": "<tool name>"}}
<input>
<the input, exactly as the tool expects it>
</input>
</tool_call>"""


def detect_tool_format(chat_template: str | None) -> str | None:
    """The tool-call format a chat template teaches its model, or None if it does not render tools."""
    if not chat_template:
        return None
    if HERMES_OPEN in chat_template:
        return "hermes"
    if PYTHON_TAG in chat_template:
        return "llama3"
    if "tools" in chat_template:
        return "json"
    return None


def tool_call_mode(chat_template: str | None) -> str | None:
    """ "native:<syntax>" when the template renders tools, "generic" when it does not, None without a template."""
    if not chat_template:
        return None
    syntax = detect_tool_format(chat_template)
    return f"{NATIVE}{syntax}" if syntax else GENERIC


def call_syntax(tool_format: str | None) -> str | None:
    """The call syntax of a tool mode ("native:hermes" → "hermes", "generic" → "hermes"); raw syntaxes pass."""
    if tool_format == GENERIC:
        return "hermes"
    if tool_format and tool_format.startswith(NATIVE):
        return tool_format[len(NATIVE) :]
    return tool_format


def generic_tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The system-prompt block that teaches a template without tool support the declared tools."""
    lines = []
    custom = False
    for tool in tools:
        kind, body = tool_kind(tool)
        entry: dict[str, Any] = {"name": body["name"]}
        if body.get("description"):
            entry["description"] = body["description"]
        if kind == "custom":
            custom = True
            entry["input"] = _custom_input_description(body.get("format"))
        else:
            entry["parameters"] = body.get("parameters") or {"type": "object", "properties": {}}
        lines.append(json.dumps(entry, ensure_ascii=False))
    prompt = GENERIC_TOOLS_PROMPT.format(tools="\n".join(lines))
    return prompt + "\n\n" + CUSTOM_TOOLS_PROMPT if custom else prompt


def _custom_input_description(fmt: Any) -> Any:
    if not isinstance(fmt, dict) or fmt.get("type", "text") == "text":
        return "free-form text"
    spec = fmt.get("grammar") if isinstance(fmt.get("grammar"), dict) else fmt
    return {"grammar": spec.get("syntax"), "definition": spec.get("definition")}


def as_template_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A custom tool as a function tool a native template can render (its description says how to call it)."""
    kind, body = tool_kind(tool)
    if kind == "function":
        return tool
    how = (
        f'Takes free-form input, not JSON arguments: call it as {HERMES_OPEN}{{"name": "{body["name"]}"}}'
        f"{CUSTOM_OPEN}\n...\n{CUSTOM_CLOSE}{HERMES_CLOSE}."
    )
    grammar_text = _custom_input_description(body.get("format"))
    if isinstance(grammar_text, dict):
        how += f" The input follows this {grammar_text['grammar']} grammar:\n{grammar_text['definition']}"
    description = f"{body['description']}\n\n{how}" if body.get("description") else how
    return {"type": "function", "function": {"name": body["name"], "description": description, "parameters": {}}}


def render_custom_call(name: str, text: str) -> str:
    """An earlier custom-tool call as the model writes it."""
    header = json.dumps({"name": name}, ensure_ascii=False)
    return f"{HERMES_OPEN}\n{header}\n{CUSTOM_OPEN}\n{text}\n{CUSTOM_CLOSE}\n{HERMES_CLOSE}"


def render_call(name: str, arguments: Any, syntax: str | None = "hermes") -> str:
    """An earlier call as the model would have written it (generic mode renders history as text)."""
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):  # unparsable arguments are shown as the string they are
            arguments = json.loads(arguments) if arguments.strip() else {}
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{HERMES_OPEN}\n{body}\n{HERMES_CLOSE}" if syntax == "hermes" else body


def tool_grammar(
    tools: list[dict[str, Any]] | None, tool_choice: Any, tool_format: str | None, *, parallel: bool = True
) -> Grammar | None:
    """The grammar that keeps a reply's tool calls well formed, or None when decoding stays free.

    tool_choice "none" (or no tools): free. "auto": free text, but a call the model opens must be a
    valid call (Hermes syntax; bare-JSON syntaxes are left free: their calls cannot be told from prose
    until the reply ends). "required" / "any" / a named tool: the reply is a call, to that tool if named.
    """
    if not tools or tool_choice in (None, "none"):
        return None
    syntax = call_syntax(tool_format) or "hermes"
    if syntax not in ("hermes", "json", "llama3"):
        return None
    choice = _choice_name(tool_choice)
    if choice is None:  # auto
        if syntax != "hermes":
            return None
        return grammar.tool_calls(tools, forced=False, syntax="hermes", parallel=parallel)
    if choice:
        tools = [t for t in tools if tool_kind(t)[1]["name"] == choice]
        if not tools:
            raise EngineError(f"tool_choice names {choice!r}, which is not one of the tools")
    return grammar.tool_calls(tools, forced=True, syntax=syntax, parallel=parallel and not choice)  # type: ignore[arg-type]


def _choice_name(tool_choice: Any) -> str | None:
    """None for auto; "" for any tool (required / any); the name for a named tool."""
    if tool_choice in ("auto",):
        return None
    if tool_choice in ("required", "any"):
        return ""
    if isinstance(tool_choice, dict):
        nested = tool_choice.get("function", tool_choice.get("custom"))
        function = nested if isinstance(nested, dict) else tool_choice
        name = function.get("name")
        if isinstance(name, str) and name:
            return name
        if tool_choice.get("type") in ("any", "required"):
            return ""
        if tool_choice.get("type") == "auto":
            return None
    raise EngineError(f"unsupported tool_choice {tool_choice!r}")


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def tool_calls_from_json(text: str) -> list[dict[str, Any]] | None:
    """OpenAI tool calls from one JSON object or a list of them; None if `text` is not exactly that."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = [_openai_call(item) for item in items]
    if not calls or any(call is None for call in calls):
        return None
    return [call for call in calls if call is not None]


def custom_call(body: str) -> dict[str, Any] | None:
    """A custom-tool call, `{"name": ..}<input>\n...\n</input>`, as an OpenAI custom tool call; None if not one."""
    match = _CUSTOM_CALL.match(body)
    if match is None:
        return None
    try:
        header = json.loads(match.group(1))
    except ValueError:
        return None
    if not isinstance(header, dict) or not isinstance(header.get("name"), str) or not header["name"]:
        return None
    text = match.group(2)
    text = text[1:] if text.startswith("\n") else text
    text = text[:-1] if text.endswith("\n") else text
    return {"id": new_call_id(), "type": "custom", "custom": {"name": header["name"], "input": text}}


def _openai_call(item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # some models emit the arguments pre-encoded
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {
        "id": new_call_id(),
        "type": "function",
        "function": {"name": item["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


class ToolCallParser:
    """Incremental parser: `feed` chunks as they stream, then `finish` once at the end."""

    def __init__(self, tool_format: str | None) -> None:
        self.tool_format = call_syntax(tool_format)  # a tool mode ("native:hermes", "generic") or a syntax
        self._buffer = ""
        self._in_call = False  # hermes: inside <tool_call> ... </tool_call>
        self._json_state = "start"  # json: "start" (only whitespace so far) | "json" | "text"

    def feed(self, text: str) -> list[ParsedEvent]:
        if self.tool_format == "hermes":
            return _merge_text(self._feed_hermes(text))
        if self.tool_format in ("json", "llama3"):
            return _merge_text(self._feed_json(text))
        return [PlainText(text)] if text else []

    def finish(self) -> list[ParsedEvent]:
        if self.tool_format == "hermes":
            return _merge_text(self._finish_hermes())
        if self.tool_format in ("json", "llama3"):
            return _merge_text(self._finish_json())
        return []

    # hermes: <tool_call>{...}</tool_call>, possibly several, anywhere in the reply

    def _feed_hermes(self, text: str) -> list[ParsedEvent]:
        self._buffer += text
        events: list[ParsedEvent] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(HERMES_OPEN)
                if start < 0:
                    safe = len(self._buffer) - partial_marker_length(self._buffer, (HERMES_OPEN,))
                    events.append(PlainText(self._buffer[:safe]))
                    self._buffer = self._buffer[safe:]
                    return events
                events.append(PlainText(self._buffer[:start]))
                self._buffer = self._buffer[start + len(HERMES_OPEN) :]
                self._in_call = True
            end = self._buffer.find(HERMES_CLOSE)
            if end < 0:
                return events
            body, self._buffer = self._buffer[:end], self._buffer[end + len(HERMES_CLOSE) :]
            self._in_call = False
            events.extend(self._hermes_call(body, closed=True))

    def _finish_hermes(self) -> list[ParsedEvent]:
        rest, self._buffer = self._buffer, ""
        if not self._in_call:
            return [PlainText(rest)]
        self._in_call = False
        return self._hermes_call(rest, closed=False)  # a model may stop before writing </tool_call>

    @staticmethod
    def _hermes_call(body: str, *, closed: bool) -> list[ParsedEvent]:
        calls = tool_calls_from_json(body.strip())
        if calls is None:
            custom = custom_call(body)
            if custom is not None:
                return [ToolCall(custom)]
            return [PlainText(HERMES_OPEN + body + (HERMES_CLOSE if closed else ""))]
        return [ToolCall(call) for call in calls]

    # json / llama3: the whole reply is one JSON tool call (or a list), maybe after <|python_tag|>

    def _feed_json(self, text: str) -> list[ParsedEvent]:
        self._buffer += text
        if self._json_state == "text":
            return self._flush_text()
        if self._json_state == "start":
            head = self._buffer.lstrip()
            if not head or PYTHON_TAG.startswith(head):
                return []  # nothing decisive yet
            if head.startswith(PYTHON_TAG):
                head = head[len(PYTHON_TAG) :].lstrip()
                if not head:
                    return []
            self._json_state = "json" if head[0] in "{[" else "text"
            if self._json_state == "text":
                return self._flush_text()
        return []  # a JSON reply is judged whole, at finish

    def _finish_json(self) -> list[ParsedEvent]:
        rest, self._buffer = self._buffer, ""
        if self._json_state == "json":
            body = rest.lstrip()
            body = body[len(PYTHON_TAG) :] if body.startswith(PYTHON_TAG) else body
            calls = tool_calls_from_json(body.strip())
            if calls is not None:
                return [ToolCall(call) for call in calls]
        return [PlainText(rest)]

    def _flush_text(self) -> list[ParsedEvent]:
        text, self._buffer = self._buffer, ""
        return [PlainText(text)]


def _merge_text(events: list[ParsedEvent]) -> list[ParsedEvent]:
    """Drop empty text and join neighbouring text events, so callers see one event per kind change."""
    merged: list[ParsedEvent] = []
    for event in events:
        if isinstance(event, PlainText):
            if not event.text:
                continue
            if merged and isinstance(merged[-1], PlainText):
                merged[-1] = PlainText(merged[-1].text + event.text)
                continue
        merged.append(event)
    return merged


def parse_tool_calls(text: str, tool_format: str | None = "hermes") -> tuple[str | None, list[dict[str, Any]]]:
    """One-shot parse of a whole reply: (content or None when only whitespace remains, tool calls)."""
    parser = ToolCallParser(tool_format)
    events = parser.feed(text) + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, PlainText))
    calls = [e.call for e in events if isinstance(e, ToolCall)]
    if calls:
        content = content.strip()
    return (content or None), calls
