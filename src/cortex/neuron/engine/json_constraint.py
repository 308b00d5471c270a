"""`response_format: json_object`: generation constrained to one JSON object, token by token.

`JsonPrefix` is a character-level pushdown automaton that accepts exactly the prefixes of a valid
JSON object. `JsonConstraint` applies it to tokens: a candidate token is allowed when its text keeps
the output a valid prefix. `ConstrainedSampler` draws from the model's own distribution and rejects
disallowed tokens (rejection sampling draws from the masked, renormalised distribution), falling back
to a scan in logit order when the model keeps proposing invalid tokens. Once the object is complete,
the sequence ends with EOS; until then EOS is not allowed.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .sampling import Sampler

_WHITESPACE = frozenset(" \t\n\r")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_HEX = frozenset("0123456789abcdefABCDEF")
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_ESCAPES = frozenset('"\\/bfnrtu')
# Unbounded whitespace is valid JSON but a model can loop on it: cap a run outside strings.
MAX_WHITESPACE_RUN = 16
REJECTION_TRIES = 8


class JsonPrefix:
    """Accepts the prefixes of one JSON object (surrounding whitespace allowed)."""

    __slots__ = ("done", "literal", "mode", "number", "stack", "unicode_left", "whitespace_run")

    def __init__(self) -> None:
        self.stack: list[str] = []  # "{" or "[" per open container
        self.mode = "start"  # start | value | key_or_end | key | colon | after | value_or_end | string | key_string
        self.number = ""  # the number being read, "" when none
        self.literal = ""  # the rest of true/false/null still expected
        self.unicode_left = -1  # hex digits still expected after \u; -1 when not in an escape
        self.whitespace_run = 0
        self.done = False

    def copy(self) -> JsonPrefix:
        other = JsonPrefix.__new__(JsonPrefix)
        other.stack = self.stack.copy()
        for name in ("mode", "number", "literal", "unicode_left", "whitespace_run", "done"):
            setattr(other, name, getattr(self, name))
        return other

    @property
    def in_string(self) -> bool:
        return self.mode in ("string", "key_string", "escape", "key_escape")

    def feed_text(self, text: str) -> bool:
        return all(self.feed(ch) for ch in text)

    def feed(self, ch: str) -> bool:
        if self.in_string:
            return self._string_char(ch)
        if self.literal:
            return self._literal_char(ch)
        if self.number:
            if ch in _NUMBER_CHARS and _number_prefix_ok(self.number + ch):
                self.number += ch
                return True
            if not _number_complete(self.number):
                return False
            self.number = ""
            self._value_done()
        return self._structural(ch)

    def _structural(self, ch: str) -> bool:
        if ch in _WHITESPACE:
            self.whitespace_run += 1
            return self.whitespace_run <= MAX_WHITESPACE_RUN
        self.whitespace_run = 0
        if self.done:
            return False
        handler = getattr(self, f"_in_{self.mode}")
        return handler(ch)

    def _in_start(self, ch: str) -> bool:
        if ch != "{":
            return False
        self.stack.append("{")
        self.mode = "key_or_end"
        return True

    def _in_value(self, ch: str) -> bool:
        if ch == "{":
            self.stack.append("{")
            self.mode = "key_or_end"
        elif ch == "[":
            self.stack.append("[")
            self.mode = "value_or_end"
        elif ch == '"':
            self.mode = "string"
        elif ch in _LITERALS:
            self.literal = _LITERALS[ch][1:]
        elif ch == "-" or ch.isdigit():
            self.number = ch
        else:
            return False
        return True

    def _in_value_or_end(self, ch: str) -> bool:
        if ch == "]":
            return self._close("[")
        return self._in_value(ch)

    def _in_key_or_end(self, ch: str) -> bool:
        if ch == "}":
            return self._close("{")
        return self._in_key(ch)

    def _in_key(self, ch: str) -> bool:
        if ch != '"':
            return False
        self.mode = "key_string"
        return True

    def _in_colon(self, ch: str) -> bool:
        if ch != ":":
            return False
        self.mode = "value"
        return True

    def _in_after(self, ch: str) -> bool:
        top = self.stack[-1]
        if ch == ",":
            self.mode = "key" if top == "{" else "value"
            return True
        return self._close(top) if ch == ("}" if top == "{" else "]") else False

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        self._value_done()
        return True

    def _value_done(self) -> None:
        if self.stack:
            self.mode = "after"
        else:
            self.done = True

    def _literal_char(self, ch: str) -> bool:
        if ch != self.literal[0]:
            return False
        self.literal = self.literal[1:]
        if not self.literal:
            self._value_done()
        return True

    def _string_char(self, ch: str) -> bool:
        key = self.mode.startswith("key")
        if self.mode.endswith("escape"):
            return self._escape_char(ch, key)
        if ch == '"':
            if key:
                self.mode = "colon"
            else:
                self._value_done()
            return True
        if ch == "\\":
            self.mode = "key_escape" if key else "escape"
            return True
        return ch >= " "  # control characters must be escaped inside strings

    def _escape_char(self, ch: str, key: bool) -> bool:
        if self.unicode_left > 0:
            if ch not in _HEX:
                return False
            self.unicode_left -= 1
        elif ch not in _ESCAPES:
            return False
        elif ch == "u":
            self.unicode_left = 4
        if self.unicode_left <= 0:
            self.unicode_left = -1
            self.mode = "key_string" if key else "string"
        return True


def _number_prefix_ok(text: str) -> bool:
    """Whether `text` can still grow into a JSON number: -?(0|[1-9]d*)(.d+)?([eE][+-]?d+)?"""
    i, n = 0, len(text)
    if i < n and text[i] == "-":
        i += 1
    if i == n:
        return True
    if text[i] == "0":
        i += 1
    elif text[i].isdigit():
        while i < n and text[i].isdigit():
            i += 1
    else:
        return False
    if i < n and text[i] == ".":
        i += 1
        while i < n and text[i].isdigit():
            i += 1
        if i < n and text[i - 1] == "." and text[i] in "eE":
            return False
    if i < n and text[i] in "eE":
        i += 1
        if i < n and text[i] in "+-":
            i += 1
        while i < n and text[i].isdigit():
            i += 1
    return i == n


def _number_complete(text: str) -> bool:
    return bool(text) and text[-1].isdigit()


_VOCAB_TEXTS: weakref.WeakKeyDictionary[Any, list[str | None]] = weakref.WeakKeyDictionary()


def vocab_texts(tokenizer: Any) -> list[str | None]:
    """Each token id's text (None for special tokens and pieces of a multi-byte character), cached."""
    cached = _VOCAB_TEXTS.get(tokenizer)
    if cached is None:
        special = set(tokenizer.all_special_ids)
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = [None if i in special or not t or "\ufffd" in t else t for i, t in enumerate(texts)]
        _VOCAB_TEXTS[tokenizer] = cached
    return cached


class JsonConstraint:
    def __init__(self, texts: list[str | None], eos_id: int) -> None:
        self.texts = texts
        self.eos_id = eos_id
        self.state = JsonPrefix()

    @property
    def complete(self) -> bool:
        return self.state.done

    def allows(self, token_id: int) -> bool:
        if token_id == self.eos_id:
            return self.state.done
        text = self.texts[token_id] if 0 <= token_id < len(self.texts) else None
        return text is not None and self.state.copy().feed_text(text)

    def advance(self, token_id: int) -> None:
        text = self.texts[token_id] if token_id != self.eos_id else None
        if text is not None:
            self.state.feed_text(text)


class ConstrainedSampler:
    """Wraps a `Sampler`: the same penalties and distribution, restricted to tokens the constraint allows."""

    def __init__(self, base: Sampler, constraint: JsonConstraint) -> None:
        self.base = base
        self.constraint = constraint

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.constraint.complete:
            token = torch.tensor([self.constraint.eos_id], device=logits.device)
        else:
            token = self._pick(self.base.penalised(logits.float()))
            self.constraint.advance(int(token.item()))
        self.base.record(token)
        return token

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        candidates = logits
        for _ in range(REJECTION_TRIES):
            try:
                token = self.base.draw(candidates)
            except RuntimeError:  # every token top-k/top-p kept was rejected: no mass left
                break
            if self.constraint.allows(int(token.item())):
                return token
            candidates = candidates.clone()
            candidates[token] = float("-inf")
        # The model keeps proposing invalid tokens: take the likeliest valid one, however far down it is.
        for token_id in torch.argsort(logits, descending=True).tolist():
            if self.constraint.allows(token_id):
                return torch.tensor([token_id], device=logits.device)
        # No token of the vocabulary fits (one without braces or quotes): end rather than emit invalid JSON.
        return torch.tensor([self.constraint.eos_id], device=logits.device)


def json_sampler(base: Sampler, tokenizer: Any, eos_ids: frozenset[int]) -> ConstrainedSampler:
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id in eos_ids else min(eos_ids)
    return ConstrainedSampler(base, JsonConstraint(vocab_texts(tokenizer), eos))
