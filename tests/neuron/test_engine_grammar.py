"""Grammar-constrained decoding (`engine/grammar.py`, `token_mask.py`): JSON Schema, JSON mode, Lark, regex, tool calls.

The matchers are driven the way the engine drives them (mask, pick an allowed token, advance) over the
real SmolLM2 vocabulary, picking tokens at random: a random walk explores far stranger outputs than a
model would write, so "every output validates" is a strong property.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cortex.neuron.engine import grammar
from cortex.neuron.engine.grammar import GrammarCompiler
from cortex.neuron.engine.token_mask import GrammarMatcher, TokenMask
from cortex.neuron.engine.tools import parse_tool_calls
from cortex.neuron.engine.types import EngineError

WALK_STEPS = 100  # random tokens before the walk starts heading for the end
MAX_STEPS = 400
FINISHERS = ['"', "}", "]", "0", "1", "true", "null", "a", ",", ":", "</", "tool", "_", "call", ">", "\n"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)  # SmolLM2's tokenizer, as read from its GGUF


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, {tokenizer.eos_token_id})


@pytest.fixture(scope="module")
def finishers(tokenizer: Any) -> list[int]:
    """Token ids that tend to close things (quotes, brackets, short literals): where a walk goes to end."""
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in FINISHERS]
    return [token[0] for token in ids if len(token) == 1]


def walk(matcher: GrammarMatcher, eos: int, rng: random.Random, finishers: list[int]) -> tuple[list[int], bool]:
    """Random allowed tokens until end-of-sequence; (tokens, ended). Every token must be accepted."""
    tokens: list[int] = []
    for step in range(MAX_STEPS):
        allowed = matcher.allowed_mask()
        assert allowed.any(), "a matcher always allows something (end-of-sequence at least)"
        if allowed[eos] and (matcher.finished or step >= WALK_STEPS or rng.random() < 0.2):
            assert matcher.advance(eos)
            return tokens, True
        allowed[eos] = False
        preferred = [t for t in finishers if allowed[t]] if step >= WALK_STEPS else []
        if preferred and rng.random() < 0.9:
            token = preferred[0]
        else:
            ids = allowed.nonzero().flatten()
            token = int(ids[rng.randrange(len(ids))])
        assert matcher.advance(token), matcher.error
        tokens.append(token)
    return tokens, False


# --- JSON Schema ----------------------------------------------------------------------------------

names = st.text(alphabet="abcdefgh_", min_size=1, max_size=6)
# Assigned characters only: llguidance cannot force a character no token spells but byte fallback (U+40000).
texts = st.text(alphabet=st.characters(exclude_categories=("Cn", "Cs", "Co")), max_size=5)


@st.composite
def string_schemas(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["plain", "enum", "pattern", "length"]))
    if kind == "enum":
        return {"type": "string", "enum": draw(st.lists(texts, min_size=1, max_size=3, unique=True))}
    if kind == "pattern":
        return {"type": "string", "pattern": draw(st.sampled_from(["^[a-z]{1,4}$", "^[0-9]{2}-[0-9]{2}$", "^x*y$"]))}
    if kind == "length":
        low = draw(st.integers(0, 3))
        return {"type": "string", "minLength": low, "maxLength": low + draw(st.integers(0, 5))}
    return {"type": "string"}


@st.composite
def integer_schemas(draw: st.DrawFn) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    if draw(st.booleans()):
        schema["minimum"] = draw(st.integers(-50, 50))
        schema["maximum"] = schema["minimum"] + draw(st.integers(0, 1000))
    return schema


leaves = st.one_of(
    string_schemas(),
    integer_schemas(),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda v: {"const": v}, st.one_of(st.integers(-5, 5), texts, st.booleans())),
)


def containers(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    arrays = st.builds(
        lambda items, low, extra: {"type": "array", "items": items, "minItems": low, "maxItems": low + extra},
        children,
        st.integers(0, 2),
        st.integers(0, 2),
    )
    objects = st.dictionaries(names, children, min_size=1, max_size=4).flatmap(
        lambda props: st.builds(
            lambda required, closed: {
                "type": "object",
                "properties": props,
                "required": sorted(required),
                **({"additionalProperties": False} if closed else {}),
            },
            st.sets(st.sampled_from(sorted(props))),
            st.booleans(),
        )
    )
    choices = st.lists(children, min_size=2, max_size=3).map(lambda options: {"anyOf": options})
    return st.one_of(arrays, objects, choices)


schemas = st.recursive(leaves, containers, max_leaves=8)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=schemas, seed=st.integers(0, 2**32 - 1))
def test_every_walk_under_a_random_schema_validates(
    compiler: GrammarCompiler, finishers: list[int], tokenizer: Any, schema: dict[str, Any], seed: int
) -> None:
    matcher = compiler.compile(grammar.json_schema(schema)).matcher()
    tokens, ended = walk(matcher, compiler.eos, random.Random(seed), finishers)
    text = tokenizer.decode(tokens)
    if not ended:  # the walk ran out of steps (a string it never closed): nothing to validate, rare
        return
    jsonschema.validate(json.loads(text), schema)


def test_walks_mostly_end(compiler: GrammarCompiler, finishers: list[int], tokenizer: Any) -> None:
    """The property above is not vacuous: walks under a nested schema do reach the end."""
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "integer"}}},
        "required": ["name", "tags"],
        "additionalProperties": False,
    }
    ended = 0
    for seed in range(10):
        tokens, done = walk(
            compiler.compile(grammar.json_schema(schema)).matcher(), compiler.eos, random.Random(seed), finishers
        )
        if done:
            jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
            ended += 1
    assert ended >= 8


def test_json_mode_is_any_object(compiler: GrammarCompiler, finishers: list[int], tokenizer: Any) -> None:
    for seed in range(5):
        tokens, ended = walk(
            compiler.compile(grammar.json_object()).matcher(), compiler.eos, random.Random(seed), finishers
        )
        if ended:
            assert isinstance(json.loads(tokenizer.decode(tokens)), dict)


def test_the_model_s_own_formatting_is_allowed(compiler: GrammarCompiler, tokenizer: Any) -> None:
    """Compact and pretty-printed JSON both pass: the grammar does not fight the model's style."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    for text in ['{"a": 1}', '{"a":1}', '{\n  "a": 1\n}']:
        matcher = compiler.compile(grammar.json_schema(schema)).matcher()
        assert all(matcher.advance(t) for t in tokenizer.encode(text, add_special_tokens=False)), text
        assert matcher.accepting
    matcher = compiler.compile(grammar.json_schema(schema)).matcher()
    assert not matcher.advance(tokenizer.encode('{"b"', add_special_tokens=False)[-1]) or not matcher.accepting


def test_strict_refuses_what_it_cannot_enforce(compiler: GrammarCompiler) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(EngineError, match=r"uniqueItems"):
        compiler.compile(grammar.json_schema(schema, strict=True, label="response_format json_schema"))
    compiler.compile(grammar.json_schema(schema, strict=False))  # not strict: the rest is enforced


@pytest.mark.parametrize(
    ("schema", "message"),
    [({"type": "foo"}, "foo"), ({"type": "string", "format": "weird"}, "weird"), ([1, 2], "JSON object")],
)
def test_bad_schemas_are_engine_errors(compiler: GrammarCompiler, schema: Any, message: str) -> None:
    with pytest.raises(EngineError, match=message) as caught:
        compiler.compile(grammar.json_schema(schema, label="response_format json_schema"))
    assert "json_schema" in str(caught.value) or "JSON object" in str(caught.value)


def test_compiled_grammars_are_cached(tokenizer: Any) -> None:
    compiler = GrammarCompiler(tokenizer, {tokenizer.eos_token_id})
    schema = {"type": "object", "properties": {"x": {"type": "string"}}}
    first = compiler.compile(grammar.json_schema(schema))
    again = compiler.compile(grammar.json_schema(json.loads(json.dumps(schema))))
    assert first is again and compiler.compiled == 1
    one, two = first.matcher(), first.matcher()
    assert one.advance(tokenizer.encode("{", add_special_tokens=False)[0])
    assert two.allowed().tolist() != one.allowed().tolist(), "each sequence has its own state"


# --- Lark and regex -------------------------------------------------------------------------------

ARITHMETIC = r"""
start: expr
expr: term (("+" | "-") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}|0/
"""


def test_lark_grammar(compiler: GrammarCompiler, finishers: list[int], tokenizer: Any) -> None:
    finishers = [*tokenizer.encode("1)", add_special_tokens=False), *finishers]
    for seed in range(8):
        matcher = compiler.compile(grammar.lark(ARITHMETIC)).matcher()
        tokens, ended = walk(matcher, compiler.eos, random.Random(seed), finishers)
        assert ended
        text = tokenizer.decode(tokens)
        assert re.fullmatch(r"[0-9()+\-]+", text) and text.count("(") == text.count(")"), text
        eval(text, {"__builtins__": {}})


def test_lark_choice(compiler: GrammarCompiler, finishers: list[int], tokenizer: Any) -> None:
    seen = set()
    for seed in range(12):
        matcher = compiler.compile(grammar.lark('start: "yes" | "no" | "maybe later"')).matcher()
        tokens, ended = walk(matcher, compiler.eos, random.Random(seed), finishers)
        seen.add(tokenizer.decode(tokens))
        assert ended
    assert seen <= {"yes", "no", "maybe later"} and len(seen) >= 2


def test_regex(compiler: GrammarCompiler, finishers: list[int], tokenizer: Any) -> None:
    for seed in range(8):
        matcher = compiler.compile(grammar.regex(r"[A-Z]{2}-[0-9]{3,4}")).matcher()
        tokens, ended = walk(matcher, compiler.eos, random.Random(seed), finishers)
        assert ended and re.fullmatch(r"[A-Z]{2}-[0-9]{3,4}", tokenizer.decode(tokens))


@pytest.mark.parametrize(
    "bad",
    [
        lambda: grammar.lark("start: foo\nfoo: ("),
        lambda: grammar.lark("start: undefined_rule"),
        lambda: grammar.regex("a["),
    ],
)
def test_bad_grammars_are_engine_errors(compiler: GrammarCompiler, bad: Any) -> None:
    with pytest.raises(EngineError, match="does not compile"):
        compiler.compile(bad())


def test_empty_grammar_is_refused() -> None:
    with pytest.raises(EngineError, match="empty"):
        grammar.lark("  ")


# --- tool calls -----------------------------------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def _check_calls(calls: list[dict[str, Any]]) -> None:
    for call in calls:
        name = call["function"]["name"]
        assert name in SCHEMAS
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[name])


def test_forced_tool_call_is_always_a_valid_call(
    compiler: GrammarCompiler, finishers: list[int], tokenizer: Any
) -> None:
    calls_seen = 0
    for seed in range(10):
        matcher = compiler.compile(grammar.tool_calls(TOOLS, forced=True)).matcher()
        tokens, ended = walk(matcher, compiler.eos, random.Random(seed), finishers)
        if not ended:
            continue
        content, calls = parse_tool_calls(tokenizer.decode(tokens), "hermes")
        assert calls and content is None, tokenizer.decode(tokens)
        _check_calls(calls)
        calls_seen += len(calls)
    assert calls_seen >= 5


def test_auto_tool_choice_allows_text_or_valid_calls(compiler: GrammarCompiler, tokenizer: Any) -> None:
    compiled = compiler.compile(grammar.tool_calls(TOOLS, forced=False))
    prose = compiled.matcher()
    assert all(prose.advance(t) for t in tokenizer.encode("No tool needed: 4.", add_special_tokens=False))
    assert prose.accepting
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
    good = compiled.matcher()
    assert all(good.advance(t) for t in tokenizer.encode("Let me check. " + call, add_special_tokens=False))
    assert good.accepting
    for wrong in (
        '<tool_call>\n{"name": "get_time"',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": 5',
        "<tool_call> hi",
    ):
        matcher = compiled.matcher()
        assert not all(matcher.advance(t) for t in tokenizer.encode(wrong, add_special_tokens=False)), wrong


def test_json_call_syntaxes(compiler: GrammarCompiler, tokenizer: Any) -> None:
    forced = compiler.compile(grammar.tool_calls(TOOLS, forced=True, syntax="llama3"))
    matcher = forced.matcher()
    text = '<|python_tag|>{"name": "now", "parameters": {}}'
    assert all(matcher.advance(t) for t in tokenizer.encode(text, add_special_tokens=False)) and matcher.accepting
    auto = compiler.compile(grammar.tool_calls(TOOLS, forced=False, syntax="json"))
    matcher = auto.matcher()
    assert all(matcher.advance(t) for t in tokenizer.encode("Hello there", add_special_tokens=False))
    matcher = auto.matcher()
    assert not all(matcher.advance(t) for t in tokenizer.encode('{"name": "nope"', add_special_tokens=False))


def test_tools_must_be_functions() -> None:
    with pytest.raises(EngineError):
        grammar.tool_calls([], forced=True)
    with pytest.raises(EngineError):
        grammar.tool_calls([{"type": "function", "function": {}}], forced=True)


# --- the batched step -----------------------------------------------------------------------------


def test_token_mask_on_a_batch(compiler: GrammarCompiler, tokenizer: Any) -> None:
    """Rows 0 and 2 constrained, row 1 free: one mask over the batch, sampling only ever sees allowed tokens."""
    torch.manual_seed(0)
    vocab = len(tokenizer) + 64  # a model's logits are often wider than its tokenizer
    mask = TokenMask("cpu")
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    matchers = {
        0: compiler.compile(grammar.json_schema(schema)).matcher(),
        2: compiler.compile(grammar.regex("ab+c")).matcher(),
    }
    outputs: dict[int, list[int]] = {0: [], 2: []}
    for _ in range(60):
        rows = [(row, m) for row, m in matchers.items() if not (outputs[row] and outputs[row][-1] == compiler.eos)]
        if not rows:
            break
        logits = torch.randn(3, vocab)
        free = logits[1].clone()
        mask.apply(logits, rows)
        assert torch.equal(logits[1], free), "an unconstrained row is untouched"
        assert torch.isinf(logits[0, len(tokenizer) :]).all(), "ids past the tokenizer are never allowed"
        tokens = torch.multinomial(torch.softmax(logits, -1), 1).flatten().tolist()
        for row, matcher in rows:
            assert matcher.advance(tokens[row])
            outputs[row].append(tokens[row])
    assert outputs[0][-1] == compiler.eos and outputs[2][-1] == compiler.eos
    jsonschema.validate(json.loads(tokenizer.decode(outputs[0][:-1])), schema)
    assert re.fullmatch("ab+c", tokenizer.decode(outputs[2][:-1]))


def test_a_failed_matcher_allows_only_the_end(compiler: GrammarCompiler, tokenizer: Any) -> None:
    matcher = compiler.compile(grammar.regex("[0-9]+")).matcher()
    assert not matcher.advance(tokenizer.encode("x", add_special_tokens=False)[0])
    assert matcher.error and matcher.finished
    assert compiler.eos in matcher.allowed().tolist()
    logits = torch.randn(1, len(tokenizer))
    TokenMask("cpu").apply(logits, [(0, matcher)])
    assert torch.isfinite(logits).any(), "never an all-masked row"


@pytest.mark.parametrize(
    ("constraint", "json_object", "off_loop"), [(None, False, False), (None, True, True), ("g", False, True)]
)
async def test_validation_with_a_grammar_runs_off_the_event_loop(
    constraint: Any, json_object: bool, off_loop: bool
) -> None:
    """A cold compile must not stall the loop; a request without a grammar skips the thread hop."""
    import threading

    from cortex.neuron.engine.types import GenerationRequest, SamplingParams

    seen: list[threading.Thread] = []

    def validate(request: GenerationRequest) -> int:
        seen.append(threading.current_thread())
        if request.constraint == "bad":
            raise EngineError("Lark grammar does not compile")
        return 7

    sampling = SamplingParams(max_new_tokens=4, json_object=json_object)
    request = GenerationRequest("r", [1, 2], sampling, constraint=constraint)
    assert await grammar.validate_off_loop(validate, request) == 7
    assert (seen[0] is not threading.main_thread()) is off_loop
    with pytest.raises(EngineError, match="does not compile"):  # the caller's 400, unchanged
        await grammar.validate_off_loop(validate, GenerationRequest("r", [1], sampling, constraint="bad"))
