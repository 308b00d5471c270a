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
- `CompiledGrammar.matcher()` hands each sequence its own `GrammarMatcher`; the step masks the batch's
  constrained rows with `TokenMask` (both in `token_mask.py`: the per-step half, on the device worker).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from .token_mask import GrammarMatcher
from .types import EngineError, GenerationRequest

log = logging.getLogger(__name__)

# Whitespace between JSON tokens: any of it is valid JSON, but a model can loop on it; a run is capped
# (enough for pretty-printing a few levels deep).
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,24}"
JSON_OPTIONS: dict[str, Any] = {"whitespace_pattern": JSON_WHITESPACE}
CACHE_SIZE = 128  # compiled grammars kept per tokenizer

CallSyntax = Literal["hermes", "llama3", "json"]
HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
CUSTOM_OPEN = "<input>"  # a custom (free-form) tool's input, inside its call
CUSTOM_CLOSE = "</input>"


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
        kind, body = tool_kind(tool)
        name = body["name"]
        head = f'"{{" WS {_literal(json.dumps("name"))} WS ":" WS {_literal(json.dumps(name))} WS'
        if kind == "custom":
            if syntax != "hermes":
                raise EngineError(f"custom tool {name!r}: this model's tool format ({syntax}) has no free-form calls")
            rules.append(_custom_input_rule(index, tool, subgrammars))
            bodies.append(f'{head} "}}" WS "{CUSTOM_OPEN}\\n" input_{index}')
            continue
        schema = body.get("parameters") or {"type": "object"}
        if not isinstance(schema, dict):
            raise EngineError(f"tool {name!r}: parameters must be a JSON Schema object")
        strict = bool(body.get("strict"))
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


def tool_kind(tool: Any) -> tuple[str, dict[str, Any]]:
    """("function" | "custom", the tool's body with its name); EngineError for anything else.

    One check for both users: the call grammar here and tools.py's prompts and parsing, which build on
    this module (so it lives in the lower of the two, as do the call syntax's tags).
    """
    kind = tool.get("type", "function") if isinstance(tool, dict) else None
    body = tool.get(kind) if kind in ("function", "custom") else None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not body["name"]:
        raise EngineError(
            "each tool must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}} "
            "or {'type': 'custom', 'custom': {'name': ..., 'format': ...}}"
        )
    return kind, body


def _literal(text: str) -> str:
    """A Lark string literal matching `text` exactly."""
    return json.dumps(text, ensure_ascii=False)


def _json_options(strict: bool) -> dict[str, Any]:
    return {**JSON_OPTIONS, "lenient": not strict}


def _llg() -> Any:
    import llguidance

    return llguidance


# --- compiling against a tokenizer ----------------------------------------------------------------


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
