"""Split a thinking model's reply into reasoning and content: `<think> ... </think>` (Qwen3, DeepSeek-R1).

A reply may open the block itself (Qwen3) or start inside it because the template already put
`<think>` in the prompt (DeepSeek-R1): the latter is `start_in_reasoning=True`. Only a block at the
very start of the reply counts as reasoning; a `<think>` later in the content is content.
"""

from __future__ import annotations

from .holdback import partial_marker_length
from .types import PlainText, ReasoningEvent, ReasoningText

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def template_thinks(chat_template: str | None) -> bool:
    return bool(chat_template) and THINK_OPEN in str(chat_template)


def prompt_opens_thinking(prompt_tail: str) -> bool:
    """True when the rendered prompt ends inside an open thinking block (the reply continues it)."""
    tail = prompt_tail.rstrip()
    return tail.endswith(THINK_OPEN)


class ReasoningParser:
    def __init__(self, start_in_reasoning: bool = False) -> None:
        self._state = "reasoning" if start_in_reasoning else "start"  # start | reasoning | content
        self._buffer = ""
        self._strip_content_start = False  # drop the blank lines a model writes after </think>

    def feed(self, text: str) -> list[ReasoningEvent]:
        self._buffer += text
        events: list[ReasoningEvent] = []
        if self._state == "start":
            events += self._after_start()
        if self._state == "reasoning":
            events += self._in_reasoning()
        if self._state == "content":
            events += self._content()
        return [e for e in events if e.text]

    def finish(self) -> list[ReasoningEvent]:
        rest, self._buffer = self._buffer, ""
        if self._state == "reasoning":
            return [ReasoningText(rest)] if rest else []
        if self._strip_content_start:
            rest = rest.lstrip()
        return [PlainText(rest)] if rest else []

    def _after_start(self) -> list[ReasoningEvent]:
        head = self._buffer.lstrip()
        if not head or THINK_OPEN.startswith(head):
            return []  # only whitespace or a partial "<think>" so far
        if head.startswith(THINK_OPEN):
            self._buffer = head[len(THINK_OPEN) :]
            self._state = "reasoning"
        else:
            self._state = "content"
        return []

    def _in_reasoning(self) -> list[ReasoningEvent]:
        end = self._buffer.find(THINK_CLOSE)
        if end >= 0:
            thought, self._buffer = self._buffer[:end], self._buffer[end + len(THINK_CLOSE) :]
            self._state = "content"
            self._strip_content_start = True
            return [ReasoningText(thought)]
        safe = len(self._buffer) - partial_marker_length(self._buffer, (THINK_CLOSE,))
        thought, self._buffer = self._buffer[:safe], self._buffer[safe:]
        return [ReasoningText(thought)]

    def _content(self) -> list[ReasoningEvent]:
        text, self._buffer = self._buffer, ""
        if self._strip_content_start:
            text = text.lstrip()
            if not text:
                return []  # keep stripping until real content arrives
            self._strip_content_start = False
        return [PlainText(text)]
