"""Tool calling on any model: the generic prompt format, tool modes, and the grammars tool_choice selects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cortex.neuron.engine.chat import ChatRenderer
from cortex.neuron.engine.grammar import GrammarCompiler
from cortex.neuron.engine.tools import (
    GENERIC_TOOLS_PROMPT,
    ToolCallParser,
    call_syntax,
    generic_tools_prompt,
    parse_tool_calls,
    tool_call_mode,
    tool_grammar,
)
from cortex.neuron.engine.types import EngineError
from tests.support.models import TOOL_TEMPLATE

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
LOOP = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24C"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)  # SmolLM2's template: no tool support


@pytest.fixture
def native_tokenizer(tokenizer: Any) -> Any:
    import copy

    native = copy.copy(tokenizer)
    native.chat_template = TOOL_TEMPLATE
    return native


def test_tool_modes() -> None:
    assert tool_call_mode(TOOL_TEMPLATE) == "native:hermes"
    assert tool_call_mode("{{ '<|python_tag|>' }}{% if tools %}{% endif %}") == "native:llama3"
    assert tool_call_mode("{% for m in messages %}{{ m.content }}{% endfor %}") == "generic"
    assert tool_call_mode(None) is None  # no template at all: no chat, no tools
    assert [call_syntax(m) for m in ("generic", "native:hermes", "native:json", "hermes", None)] == [
        "hermes",
        "hermes",
        "json",
        "hermes",
        None,
    ]


def test_generic_mode_writes_the_tools_into_the_system_prompt(tokenizer: Any) -> None:
    renderer = ChatRenderer(tokenizer)
    assert renderer.tool_mode == "generic"
    text = renderer.render_text(LOOP[:2], [WEATHER, CLOCK])
    assert text.index("Be brief.") < text.index("# Tools") < text.index("<|im_start|>user")
    listed = [json.loads(line) for line in text.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()]
    assert listed == [
        {
            "name": "get_weather",
            "description": "Current weather for a city.",
            "parameters": WEATHER["function"]["parameters"],
        },
        {"name": "now", "parameters": {"type": "object", "properties": {}}},
    ]
    assert '<tool_call>\n{"name": "<tool name>", "arguments": {' in text
    assert renderer.render_text(LOOP[:2]) == tokenizer.apply_chat_template(
        LOOP[:2], tokenize=False, add_generation_prompt=True
    )


def test_generic_mode_renders_calls_and_results_as_text(tokenizer: Any) -> None:
    text = ChatRenderer(tokenizer).render_text([*LOOP, {"role": "tool", "content": "and windy"}], [WEATHER])
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in text
    )
    assert "<|im_start|>user\n<tool_response>\nsunny, 24C\n</tool_response>\n<tool_response>\nand windy\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_generic_mode_without_a_system_message(tokenizer: Any) -> None:
    text = ChatRenderer(tokenizer).render_text(LOOP[1:2], [WEATHER])
    assert text.startswith("<|im_start|>system\n# Tools")


def test_native_templates_render_their_own_way(native_tokenizer: Any) -> None:
    renderer = ChatRenderer(native_tokenizer)
    assert renderer.tool_mode == "native:hermes"
    text = renderer.render_text(LOOP, [WEATHER])
    assert GENERIC_TOOLS_PROMPT.splitlines()[2] not in text and "Function signatures are within <tools>" in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 24C\n</tool_response>" in text  # the template's own rendering


def test_generic_replies_parse_as_calls() -> None:
    reply = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parser = ToolCallParser("generic")
    events = parser.feed(reply) + parser.finish()
    assert parser.tool_format == "hermes" and len(events) == 2
    content, calls = parse_tool_calls(reply, "generic")
    assert content == "Checking." and calls[0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("mode", ["generic", "native:hermes"])
def test_tool_choice_selects_the_grammar(tokenizer: Any, mode: str) -> None:
    compiler = GrammarCompiler(tokenizer, {tokenizer.eos_token_id})
    assert tool_grammar([WEATHER], "none", mode) is None and tool_grammar(None, "auto", mode) is None

    def accepts(choice: Any, text: str) -> bool:
        grammar = tool_grammar([WEATHER, CLOCK], choice, mode)
        assert grammar is not None
        matcher = compiler.compile(grammar).matcher()
        return all(matcher.advance(t) for t in tokenizer.encode(text, add_special_tokens=False)) and matcher.accepting

    prose = "It is sunny."
    weather = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    clock = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    assert accepts("auto", prose) and accepts("auto", weather)
    assert not accepts("required", prose) and accepts("required", weather) and accepts("required", clock)
    assert accepts({"type": "any"}, clock)
    named = {"type": "function", "function": {"name": "now"}}
    assert accepts(named, clock) and not accepts(named, weather)
    assert accepts({"type": "tool", "name": "get_weather"}, weather)  # Anthropic's shape, should it arrive


def test_json_syntax_is_forced_but_free_on_auto() -> None:
    assert tool_grammar([WEATHER], "auto", "native:json") is None  # a bare-JSON call is only known at the end
    assert tool_grammar([WEATHER], "required", "native:llama3") is not None


def test_bad_tool_choices() -> None:
    with pytest.raises(EngineError, match="not one of the tools"):
        tool_grammar([WEATHER], {"type": "function", "function": {"name": "missing"}}, "generic")
    with pytest.raises(EngineError, match="unsupported tool_choice"):
        tool_grammar([WEATHER], 42, "generic")
    with pytest.raises(EngineError, match="each tool"):
        generic_tools_prompt([{"type": "function", "function": {}}])


# --- custom tools (free-form input, optionally in a grammar) ----------------------------------------

PATCH_GRAMMAR = 'start: "ADD " NAME ("," NAME)*\nNAME: /[a-z]{1,5}/\n'
PATCH = {
    "type": "custom",
    "custom": {
        "name": "apply_patch",
        "description": "Apply a patch.",
        "format": {"type": "grammar", "grammar": {"syntax": "lark", "definition": PATCH_GRAMMAR}},
    },
}
CODE = {
    "type": "custom",
    "custom": {"name": "run", "format": {"type": "grammar", "syntax": "regex", "definition": "[0-9]+"}},
}
NOTE = {"type": "custom", "custom": {"name": "note"}}
CUSTOM_CALL = {"id": "call_2", "type": "custom", "custom": {"name": "apply_patch", "input": "ADD a,b"}}


def test_custom_calls_parse_and_render_back() -> None:
    from cortex.neuron.engine.tools import render_custom_call

    reply = "Patching.\n" + render_custom_call("apply_patch", "ADD x\nline two")
    content, calls = parse_tool_calls(reply, "generic")
    assert content == "Patching."
    assert calls[0]["type"] == "custom" and calls[0]["custom"] == {"name": "apply_patch", "input": "ADD x\nline two"}


@pytest.mark.parametrize("mode", ["generic", "native:hermes"])
def test_custom_tool_grammars(tokenizer: Any, mode: str) -> None:
    compiler = GrammarCompiler(tokenizer, {tokenizer.eos_token_id})

    def accepts(tools: list[dict[str, Any]], choice: Any, text: str) -> bool:
        grammar = tool_grammar(tools, choice, mode)
        assert grammar is not None
        matcher = compiler.compile(grammar).matcher()
        return all(matcher.advance(t) for t in tokenizer.encode(text, add_special_tokens=False)) and matcher.accepting

    def call(name: str, text: str) -> str:
        return f'<tool_call>\n{{"name": "{name}"}}\n<input>\n{text}\n</input>\n</tool_call>'

    tools = [WEATHER, PATCH, CODE, NOTE]
    assert accepts(tools, "required", call("apply_patch", "ADD abc,de"))
    assert not accepts(tools, "required", call("apply_patch", "DELETE everything"))
    assert accepts(tools, "auto", "Sure. " + call("run", "42"))
    assert not accepts(tools, "auto", "Sure. " + call("run", "forty-two"))
    assert accepts(tools, "required", call("note", "anything at all,\nover lines"))
    named = {"type": "custom", "custom": {"name": "apply_patch"}}
    assert accepts(tools, named, call("apply_patch", "ADD z")) and not accepts(tools, named, call("note", "x"))


# A patch grammar in the style agents ship (Codex's apply_patch): rules with literals, `%import common.LF`,
# regex terminals inside rules, an alias (`-> line`), optional parts, a trailing LF? after the last line.
EDIT_LARK = r"""start: open_edit file_op+ close_edit
open_edit: "*** Begin Edit" LF
close_edit: "*** End Edit" LF?

file_op: create_op | drop_op | change_op
create_op: "*** Create: " path LF plus_line+
drop_op: "*** Drop: " path LF
change_op: "*** Change: " path LF rename? hunk?

path: /(.+)/
plus_line: "+" /(.*)/ LF -> line
rename: "*** Rename to: " path LF
hunk: (marker | edit_line)+
marker: ("@@" | "@@ " /(.+)/) LF
edit_line: ("+" | "-" | " ") /(.*)/ LF

%import common.LF
"""


def test_an_agent_style_patch_grammar_compiles_and_constrains(tokenizer: Any) -> None:
    compiler = GrammarCompiler(tokenizer, {tokenizer.eos_token_id})
    tool = {
        "type": "custom",
        "custom": {"name": "edit", "format": {"type": "grammar", "syntax": "lark", "definition": EDIT_LARK}},
    }

    def accepts(text: str) -> bool:
        grammar = tool_grammar([tool], "required", "generic")
        assert grammar is not None
        matcher = compiler.compile(grammar).matcher()
        call = f'<tool_call>\n{{"name": "edit"}}\n<input>\n{text}\n</input>\n</tool_call>'
        return all(matcher.advance(t) for t in tokenizer.encode(call, add_special_tokens=False)) and matcher.accepting

    edit = "*** Begin Edit\n*** Change: src/a.py\n@@ def f():\n-    x = 1\n+    x = 2\n"
    edit += "*** Create: b.txt\n+hi\n*** End Edit"
    assert accepts(edit)
    assert not accepts("*** Begin Edit\n*** Remove: a.py\n*** End Edit")


def test_custom_tools_in_the_generic_prompt(tokenizer: Any) -> None:
    messages = [*LOOP[:2], {"role": "assistant", "content": None, "tool_calls": [CUSTOM_CALL]}]
    text = ChatRenderer(tokenizer).render_text([*messages, {"role": "tool", "content": "patched"}], [WEATHER, PATCH])
    listed = [json.loads(line) for line in text.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()]
    assert listed[1] == {
        "name": "apply_patch",
        "description": "Apply a patch.",
        "input": {"grammar": "lark", "definition": PATCH_GRAMMAR},
    }
    assert "take free-form input" in text
    assert '<tool_call>\n{"name": "apply_patch"}\n<input>\nADD a,b\n</input>\n</tool_call>' in text


def test_custom_tools_with_a_native_template(native_tokenizer: Any) -> None:
    messages = [*LOOP[:2], {"role": "assistant", "content": "", "tool_calls": [CUSTOM_CALL, CALL]}]
    text = ChatRenderer(native_tokenizer).render_text(messages, [WEATHER, PATCH])
    assert '"name": "apply_patch"' in text and "Takes free-form input" in text  # listed by the template itself
    assert "<input>\nADD a,b\n</input>" in text and '"name": "get_weather", "arguments"' in text


def test_custom_tools_need_a_free_form_syntax() -> None:
    with pytest.raises(EngineError, match="free-form"):
        tool_grammar([PATCH], "required", "native:json")
    bad = {
        "type": "custom",
        "custom": {"name": "x", "format": {"type": "grammar", "syntax": "ebnf", "definition": "a"}},
    }
    with pytest.raises(EngineError, match="lark"):
        tool_grammar([bad], "required", "generic")
