"""Grammar-constrained decoding: one mechanism for JSON mode, JSON Schema, Lark, regex and tool calls.

Built on `llguidance` (the engine behind llama.cpp's and vLLM's guided decoding): a grammar is compiled
once per tokenizer into a matcher that computes, natively and in parallel, a bitmask of the tokens that
keep the output inside the grammar. Nothing here walks the vocabulary in Python.

The pieces, in the order a request meets them:

- `Grammar` (pure, no tokenizer): what to enforce, as llguidance grammar text. Built by `json_object`,
  `json_schema`, `lark`, `regex` and `tool_calls`.
- `GrammarCompiler` (one per tokenizer): `compile(grammar)` checks and compiles it against the model's
  vocabulary while the request is validated, raising `EngineError` (a 400) for a schema or grammar that
  does not compile, so a bad grammar never reaches the device. Compiled grammars are kept in an LRU:
  agents resend the same schema with every turn. The neuron validates a constrained request on a
  thread (`validate_off_loop`): a cold compile takes milliseconds to seconds (the tokenizer's compiler,
  ~2 s, may still be warming up), which the event loop must not wait for.
- `GrammarMatcher` (one per sequence): `CompiledGrammar.matcher()` copies the pristine compiled state.
  After each step the scheduler feeds it the sampled token (`advance`).
- `TokenMask` (one per scheduler): in the batched step, `apply(logits, rows)` fills one bitmask row per
  constrained sequence on the host (llguidance, GIL released, rows in parallel), copies it to the device
  with one transfer, and masks the logits with one `masked_fill`.

A matcher that cannot continue (its grammar is complete, or it failed) allows only end-of-sequence, so
a constrained sequence always ends cleanly: never an all-masked row, never a device fault.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from .types import EngineError, GenerationRequest

log = logging.getLogger(__name__)

# Whitespace between JSON tokens: any of it is valid JSON, but a model can loop on it; a run is capped
# (enough for pretty-printing a few levels deep).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,24}"
JSON_OPTIONS: dict[str, Any] = {"whitespace_pattern": JSON_WHITESPACE}
CACHE_SIZE = 128  # compiled grammars kept per tokenizer
PARALLEL_ROWS = 2  # fill masks on llguidance's thread pool from this many constrained rows up

CallSyntax = Literal["hermes", "llama3", "json"]
HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"


@dataclass(frozen=True)
class Grammar:
    """What to enforce, as llguidance grammar text; `label` names it in error messages."""

    source: str
    label: str


# --- building grammars (pure) ---------------------------------------------------------------------


def json_object() -> Grammar:
    """JSON mode: any one JSON object."""
    return json_schema({"type": "object"}, label="response_format json_object")


def json_schema(schema: Any, *, strict: bool = True, label: str = "JSON schema") -> Grammar:
    """One JSON value valid against `schema`.

    strict: every keyword must be one the compiler enforces, else the request is refused (OpenAI's
    `strict: true`: the output is guaranteed to validate). Not strict: keywords it cannot enforce are
    ignored and the output follows the rest of the schema.
    """
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise EngineError(f"{label}: a schema must be a JSON object")
    try:
        source = _llg().LLMatcher.grammar_from_json_schema(schema, overrides=_json_options(strict))
    except (ValueError, TypeError) as exc:
        raise EngineError(f"{label}: {exc}") from None
    return Grammar(source, label)


def lark(text: str, *, label: str = "Lark grammar") -> Grammar:
    """A grammar in llguidance's Lark dialect (Lark syntax, Earley parsing, `%json {...}` inline schemas)."""
    if not isinstance(text, str) or not text.strip():
        raise EngineError(f"{label}: the grammar is empty")
    return Grammar(_llg().LLMatcher.grammar_from_lark(text), label)


def regex(pattern: str, *, label: str = "regex") -> Grammar:
    """Output matching `pattern` as a whole (Rust `regex` syntax)."""
    if not isinstance(pattern, str):
        raise EngineError(f"{label}: the pattern must be a string")
    return Grammar(_llg().LLMatcher.grammar_from_regex(pattern), label)


def tool_calls(
    tools: Sequence[dict[str, Any]], *, forced: bool, syntax: CallSyntax = "hermes", parallel: bool = True
) -> Grammar:
    """Tool calls to the given OpenAI-shaped tools: function tools with arguments valid against their
    schema, custom tools with free-form input (or input in their Lark / regex grammar).

    `forced` (tool_choice required / any / a named tool): the reply is one or more calls and nothing
    else. Otherwise (auto) the reply is free text, and once the model opens a call, the call must be
    well formed: a declared tool's name and valid arguments or input.

    Syntaxes: "hermes" (`<tool_call>{"name": .., "arguments": {..}}</tool_call>`, also the generic format
    for templates without tools), "json" (a bare `{"name": .., "arguments": {..}}`), "llama3" (the same
    with "parameters", optionally after `<|python_tag|>`). A custom tool's call (hermes only) is
    `<tool_call>{"name": ..}<input>\n...\n</input></tool_call>`.
    """
    if not tools:
        raise EngineError("tool_choice requires at least one tool")
    key = "parameters" if syntax == "llama3" else "arguments"
    rules = [f"WS: /{JSON_WHITESPACE}/", r"TEXT: /(.|\n)*/"]
    subgrammars: list[dict[str, str]] = []
    bodies = []
    for index, tool in enumerate(tools):
        name = _tool_name(tool)
        head = f'"{{" WS {_literal(json.dumps("name"))} WS ":" WS {_literal(json.dumps(name))} WS'
        if isinstance(tool, dict) and tool.get("type") == "custom":
            if syntax != "hermes":
                raise EngineError(f"custom tool {name!r}: this model's tool format ({syntax}) has no free-form calls")
            rules.append(_custom_input_rule(index, tool, subgrammars))
            bodies.append(f'{head} "}}" WS "{CUSTOM_OPEN}\\n" input_{index}')
            continue
        function = _function(tool)
        schema = function.get("parameters") or {"type": "object"}
        if not isinstance(schema, dict):
            raise EngineError(f"tool {name!r}: parameters must be a JSON Schema object")
        strict = bool(function.get("strict"))
        schema = {**schema, "x-guidance": {**schema.get("x-guidance", {}), **_json_options(strict)}}
        rules.append(f"args_{index}: %json {json.dumps(schema, ensure_ascii=False)}")
        bodies.append(f'{head} "," WS {_literal(json.dumps(key))} WS ":" WS args_{index} WS "}}"')
    rules.append("body: " + " | ".join(f"({b})" for b in bodies))
    repeat = "+" if parallel else ""
    if syntax == "hermes":
        rules.append(f'call: head WS body WS "{HERMES_CLOSE}" WS')
        if forced:
            rules.append(f'head: "{HERMES_OPEN}"')
            start = f"start: WS call{repeat}"
        else:
            # Free text until the model writes the opening tag (lazy: the first one ends the text).
            rules.append(f'head[lazy]: TEXT "{HERMES_OPEN}"')
            start = "start: call* TEXT"
    else:
        tag = '"<|python_tag|>"?' if syntax == "llama3" else ""
        rules.append(f"call: WS {tag} WS body WS")
        if forced:
            start = "start: call"
        else:
            rules.append(r"PROSE: /[^{<\s](.|\n)*/")  # a reply that is not a call does not start like one
            start = "start: call | WS PROSE | WS"
    main = "\n".join([start, *rules])
    if not subgrammars:
        return lark(main, label="tools")
    # Lark-format custom tools are sub-grammars referenced as @tool_N (each with its own lexer).
    return Grammar(json.dumps({"grammars": [{"lark_grammar": main}, *subgrammars]}), "tools")


CUSTOM_OPEN = "<input>"
CUSTOM_CLOSE = "</input>"


def _custom_input_rule(index: int, tool: dict[str, Any], subgrammars: list[dict[str, str]]) -> str:
    """`input_N`: the custom tool's input and the closing tag, as its format allows."""
    custom = tool.get("custom") or {}
    fmt = custom.get("format") or {"type": "text"}
    close = f'"\\n"? "{CUSTOM_CLOSE}"'
    if fmt.get("type") == "text":
        return f'input_{index}[lazy]: TEXT "{CUSTOM_CLOSE}"'
    grammar_spec = fmt.get("grammar") if isinstance(fmt.get("grammar"), dict) else fmt
    syntax, definition = grammar_spec.get("syntax"), grammar_spec.get("definition")
    if fmt.get("type") != "grammar" or not isinstance(definition, str) or not definition.strip():
        raise EngineError(f"custom tool {custom.get('name')!r}: format must be text or a grammar with a definition")
    if syntax == "regex":
        return f"input_{index}: /{_llg().regex_to_lark(definition)}/ {close}"
    if syntax == "lark":
        subgrammars.append({"name": f"tool_{index}", "lark_grammar": definition})
        return f"input_{index}: @tool_{index} {close}"
    raise EngineError(f"custom tool {custom.get('name')!r}: grammar syntax must be 'lark' or 'regex', not {syntax!r}")


def _tool_name(tool: Any) -> str:
    kind = tool.get("type", "function") if isinstance(tool, dict) else None
    body = tool.get(kind) if kind in ("function", "custom") else None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
        raise EngineError(
            "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}} "
            "or {'type': 'custom', 'custom': {'name': ..., 'format': ...}}"
        )
    return body["name"]


def _function(tool: Any) -> dict[str, Any]:
    _tool_name(tool)
    return tool["function"]


def _literal(text: str) -> str:
    """A Lark string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)


def _json_options(strict: bool) -> dict[str, Any]:
    return {**JSON_OPTIONS, "lenient": not strict}


def _llg() -> Any:
    import llguidance

    return llguidance


# --- compiling against a tokenizer ----------------------------------------------------------------


class GrammarMatcher:
    """One sequence's position in its grammar. Worker thread only."""

    __slots__ = ("_matcher", "words")

    def __init__(self, matcher: Any, words: int) -> None:
        self._matcher = matcher
        self.words = words  # int32 words of its bitmask row: the vocabulary (tokenizer or logits, wider) / 32

    @property
    def accepting(self) -> bool:
        """The output so far is a complete sentence of the grammar (end-of-sequence is allowed)."""
        return bool(self._matcher.is_accepting())

    @property
    def finished(self) -> bool:
        """Nothing but end-of-sequence can follow (the grammar is complete, or the matcher failed)."""
        return bool(self._matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None if self._matcher.is_error() else None

    def advance(self, token_id: int) -> bool:
        """Record the sampled token; False if the grammar did not allow it (then only end-of-sequence is)."""
        return bool(self._matcher.consume_token(token_id))

    def allowed_mask(self) -> torch.Tensor:
        """Which token ids are allowed now, as a bool tensor on the host. For tests and diagnostics, not the step."""
        words = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.int32)
        return _unpack(words.unsqueeze(0), words.numel() * 32)[0]

    def allowed(self) -> torch.Tensor:
        """The allowed token ids now (host). For tests and diagnostics, not the step."""
        return self.allowed_mask().nonzero().flatten()

    def _fill(self, address: int, size: int) -> None:
        self._matcher.unsafe_compute_mask_ptr(address, size)

    @property
    def _ll(self) -> Any:
        return self._matcher


class CompiledGrammar:
    """A grammar compiled for one tokenizer; `matcher()` hands each sequence its own copy."""

    def __init__(self, pristine: Any, words: int, label: str) -> None:
        self._pristine = pristine
        self._words = words
        self.label = label

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._pristine.deep_copy(), self._words)


class GrammarCompiler:
    """Compiles grammars for one tokenizer; thread-safe; keeps the most recent ones compiled."""

    def __init__(self, tokenizer: Any, eos_ids: Iterable[int] = (), vocab_size: int | None = None) -> None:
        llguidance = _llg()
        from llguidance.hf import from_tokenizer

        eos = sorted(set(eos_ids))
        if getattr(tokenizer, "eos_token_id", None) in eos:  # the tokenizer's own EOS first: it is the one forced
            eos.remove(tokenizer.eos_token_id)
            eos.insert(0, tokenizer.eos_token_id)
        # The mask covers every logit: a model's embedding matrix is often padded past the tokenizer's ids.
        n_vocab = max(len(tokenizer), vocab_size or 0)
        try:
            self._tokenizer = from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos or None)
        except Exception as exc:  # a slow (Python) tokenizer, or one llguidance cannot read
            raise EngineError(f"this model's tokenizer does not support constrained decoding: {exc}") from None
        self.vocab_size: int = self._tokenizer.vocab_size
        self.eos: int = self._tokenizer.eos_token
        self._llguidance = llguidance
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (not served from the cache): for tests and metrics

    def compile(self, grammar: Grammar) -> CompiledGrammar:
        """Compile (or reuse) `grammar`; raises EngineError naming `grammar.label` when it does not compile."""
        with self._lock:
            cached = self._cache.get(grammar.source)
            if cached is not None:
                self._cache.move_to_end(grammar.source)
                return cached
        matcher = self._llguidance.LLMatcher(self._tokenizer, grammar.source, log_level=0)
        if matcher.is_error():
            raise EngineError(f"{grammar.label} does not compile: {_first_line(matcher.get_error())}")
        compiled = CompiledGrammar(matcher, (self.vocab_size + 31) // 32, grammar.label)
        with self._lock:
            self.compiled += 1
            self._cache[grammar.source] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


_COMPILERS: weakref.WeakKeyDictionary[Any, GrammarCompiler] = weakref.WeakKeyDictionary()
_BUILD_LOCK = threading.Lock()  # one build at a time: a request arriving mid warm-up waits for it


def compiler_for(tokenizer: Any, eos_ids: Iterable[int] = (), vocab_size: int | None = None) -> GrammarCompiler:
    """The compiler of a tokenizer, built on first use (about a second for a 50k vocabulary) and kept."""
    compiler = _COMPILERS.get(tokenizer)
    if compiler is None:
        with _BUILD_LOCK:
            compiler = _COMPILERS.get(tokenizer)
            if compiler is None:
                compiler = GrammarCompiler(tokenizer, eos_ids, vocab_size)
                _COMPILERS[tokenizer] = compiler
    return compiler


R = TypeVar("R")


async def validate_off_loop(validate: Callable[[GenerationRequest], R], request: GenerationRequest) -> R:
    """`validate(request)`, on a thread when it has a grammar to compile, else inline.

    Compiling is CPU work outside the GIL-free parts (the tokenizer's compiler, built once, and a cold
    grammar, cached after); on the loop it would stall every other request's stream. An unconstrained
    request does not pay for the thread hop. Errors (`EngineError` for a grammar that does not
    compile) come back unchanged, so the caller answers them as before.
    """
    if request.constraint is None and not request.sampling.json_object:
        return validate(request)
    return await asyncio.to_thread(validate, request)


def warm_up(tokenizer: Any, eos_ids: Iterable[int] = (), vocab_size: int | None = None) -> None:
    """Build the tokenizer's compiler on a background thread, so no request pays for it on the event loop."""
    eos = tuple(eos_ids)

    def build() -> None:
        try:
            compiler_for(tokenizer, eos, vocab_size)
        except Exception as exc:  # a tokenizer llguidance cannot read: constrained requests get the EngineError
            log.info("constrained decoding unavailable for this tokenizer: %s", exc)

    threading.Thread(target=build, name="grammar-warm-up", daemon=True).start()


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "unknown error"


# --- the batched step -----------------------------------------------------------------------------


class TokenMask:
    """Masks a batch's logits to what each constrained row's grammar allows. Worker thread only.

    The host bitmask (int32, one bit per token, pinned on CUDA) is reused from step to step; per step
    it costs one host fill (native, parallel), one host-to-device copy and one `masked_fill`.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self._host: torch.Tensor | None = None
        self._shifts = torch.arange(32, dtype=torch.int32, device=self.device)
        self._executor: Any = None

    def apply(self, logits: torch.Tensor, rows: Sequence[tuple[int, GrammarMatcher]]) -> torch.Tensor:
        """Mask `logits` ([batch, vocab], in place) where `rows` ((row index, matcher) pairs) say; returns it."""
        if not rows:
            return logits
        width = logits.shape[-1]
        words = rows[0][1].words  # one model, one tokenizer: every row has the same width
        host = self._buffer(len(rows), words)
        self._fill(host, rows, words)
        bits = host[: len(rows)].to(self.device, non_blocking=host.is_pinned())
        allowed = _unpack(bits, width, self._shifts)
        if len(rows) == logits.shape[0] and all(row == i for i, (row, _) in enumerate(rows)):
            return logits.masked_fill_(~allowed, float("-inf"))
        index = torch.tensor([row for row, _ in rows], dtype=torch.long, device=self.device)
        masked = logits.index_select(0, index).masked_fill_(~allowed, float("-inf"))
        return logits.index_copy_(0, index, masked)

    def _buffer(self, rows: int, words: int) -> torch.Tensor:
        host = self._host
        if host is None or host.shape[0] < rows or host.shape[1] != words:
            capacity = max(rows, host.shape[0] if host is not None else 0, 8)
            pin = self.device.type == "cuda"
            host = torch.zeros((capacity, words), dtype=torch.int32, pin_memory=pin)
            self._host = host
        return host

    def _fill(self, host: torch.Tensor, rows: Sequence[tuple[int, GrammarMatcher]], words: int) -> None:
        row_bytes = words * 4
        base = host.data_ptr()
        if len(rows) >= PARALLEL_ROWS:
            pairs = [(matcher._ll, i) for i, (_, matcher) in enumerate(rows)]
            self._pool().unsafe_compute_mask_ptr(pairs, base, row_bytes, host.shape[0])
        else:
            for i, (_, matcher) in enumerate(rows):
                matcher._fill(base + i * row_bytes, row_bytes)

    def _pool(self) -> Any:
        if self._executor is None:
            self._executor = _llg().LLExecutor(num_threads=max(1, min(4, (os.cpu_count() or 2) - 1)))
        return self._executor


def _unpack(words: torch.Tensor, width: int, shifts: torch.Tensor | None = None) -> torch.Tensor:
    """[rows, words] int32 bitmasks → [rows, width] bool (bit j of word i is token 32·i + j)."""
    if shifts is None:
        shifts = torch.arange(32, dtype=torch.int32, device=words.device)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)
    if bits.shape[1] >= width:
        return bits[:, :width]
    pad = torch.zeros((bits.shape[0], width - bits.shape[1]), dtype=torch.bool, device=bits.device)
    return torch.cat([bits, pad], dim=1)
