"""Token ids to streamable text: never half a UTF-8 character, never the start of a stop string.

`IncrementalDetokenizer` decodes a short window of recent ids (the prefix/read offset scheme) so the
cost per token stays constant, and it holds back text that still ends in U+FFFD: the bytes of one
character often span several byte-level BPE tokens. `StopMatcher` then holds back any tail that could
grow into a stop string and cuts the text at the first complete one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .holdback import partial_marker_length

REPLACEMENT = "\ufffd"
PROMPT_CONTEXT_TOKENS = 6  # prompt ids decoded ahead of the output so its first token keeps its leading space


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = len(self._ids)  # ids before this are already emitted as text
        self._prefix_text = self._decode(self._ids)

    def push(self, token_id: int) -> str:
        """Add one id; return the new text that is now certain ('' while a character is incomplete)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(self._prefix_text) or text.endswith(REPLACEMENT):
            return ""
        new_text = text[len(self._prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        return new_text

    def flush(self) -> str:
        """What remains at the end; a character the output never completed is dropped, not half-shown."""
        text = self._decode(self._ids[self._prefix_offset :])
        new_text = text[len(self._prefix_text) :] if len(text) > len(self._prefix_text) else ""
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        return new_text.rstrip(REPLACEMENT)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)


class StopMatcher:
    """Cuts generated text at the first stop string; holds back any tail that could still become one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, str | None]:
        """(text safe to emit, the stop string that matched or None)."""
        if not self._stops:
            return text, None
        buffer = self._held + text
        match = self._first_match(buffer)
        if match is not None:
            index, stop = match
            self._held = ""
            return buffer[:index], stop
        keep = partial_marker_length(buffer, self._stops)
        safe = len(buffer) - keep
        self._held = buffer[safe:]
        return buffer[:safe], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _first_match(self, buffer: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            index = buffer.find(stop)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best
