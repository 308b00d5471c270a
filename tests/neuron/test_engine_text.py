"""Text-side pieces of the engine: detokenisation, stop strings, tool-call and reasoning parsing."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from cortex.neuron.engine import PlainText, ReasoningParser, ReasoningText, ToolCall, ToolCallParser, parse_tool_calls
from cortex.neuron.engine.detokenize import IncrementalDetokenizer, StopMatcher
from cortex.neuron.engine.reasoning import prompt_opens_thinking
from cortex.neuron.engine.sequence import OutputStream
from cortex.neuron.engine.tools import detect_tool_format
from cortex.neuron.engine.types import SamplingParams

MULTIBYTE = "Grüße aus Köln 🌍🚀! 你好\uff0c世界。 Ça va? 👨‍👩‍👧 — naïve café, 日本語のテキスト 🎉 end"


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def chunks(text: str, rng: random.Random) -> list[str]:
    """`text` cut at random points, including empty and one-character pieces."""
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(1, len(text) // 2 + 1)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


# Detokenisation


def test_multibyte_characters_span_several_tokens(tokenizer: Any) -> None:
    """The premise of the next tests: byte-level BPE splits emoji and CJK across tokens."""
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_streamed_text_never_splits_a_character(tokenizer: Any) -> None:
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer.encode("Say:", add_special_tokens=False))
    deltas = [detokenizer.push(i) for i in ids]
    deltas.append(detokenizer.flush())
    assert not any("\ufffd" in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == MULTIBYTE


def test_output_stream_accounts_every_token_and_keeps_text_whole(tokenizer: Any) -> None:
    ids = tokenizer.encode(MULTIBYTE, add_special_tokens=False)
    stream = OutputStream(tokenizer, [], SamplingParams(max_new_tokens=len(ids)), frozenset({2}), len(ids))
    deltas = [d for i in ids for d in stream.push(i)]
    assert stream.reason == "length"
    assert "".join(d.text for d in deltas) == MULTIBYTE
    assert not any("\ufffd" in d.text for d in deltas)
    assert sum(d.tokens for d in deltas) == len(ids)


def test_output_stream_stops_at_eos_without_emitting_it(tokenizer: Any) -> None:
    ids = [*tokenizer.encode("Paris.", add_special_tokens=False), tokenizer.eos_token_id, 42]
    stream = OutputStream(tokenizer, [], SamplingParams(max_new_tokens=10), frozenset({tokenizer.eos_token_id}), 10)
    text = ""
    for token in ids:
        text += "".join(d.text for d in stream.push(token))
        if stream.done:
            break
    assert (text, stream.reason, stream.generated) == ("Paris.", "stop", len(ids) - 1)


def test_output_stream_cuts_at_a_stop_string_spanning_tokens(tokenizer: Any) -> None:
    text = "The answer is 42. Observation: the sky is blue."
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=100, stop=("Observation:", "never"))
    stream = OutputStream(tokenizer, [], params, frozenset(), 100)
    emitted: list[str] = []
    for token in ids:
        emitted += [d.text for d in stream.push(token)]
        assert not "".join(emitted).endswith("Obs")  # a stop's beginning is held back, never shown
        if stream.done:
            break
    assert "".join(emitted) == "The answer is 42. "
    assert (stream.reason, stream.stop_sequence) == ("stop", "Observation:")


def test_stop_matcher_releases_a_false_start_and_prefers_the_earliest_stop() -> None:
    matcher = StopMatcher(["</end>", "STOP"])
    assert matcher.push("abc </e") == ("abc ", None)
    assert matcher.push("nd") == ("", None)
    assert matcher.push("x") == ("</endx", None)
    assert matcher.push(" wait STOP now </end>") == (" wait ", "STOP")
    assert StopMatcher(["lo"]).flush() == ""
    held = StopMatcher(["world"])
    assert held.push("hello wor") == ("hello ", None)
    assert held.flush() == "wor"


# Tool calls

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln", "days": 3}}\n</tool_call>'


def feed_all(parser: ToolCallParser, pieces: list[str]) -> list[Any]:
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    return events


def summarise(events: list[Any]) -> tuple[str, list[tuple[str, dict[str, Any]]]]:
    text = "".join(e.text for e in events if isinstance(e, PlainText))
    calls = [
        (e.call["function"]["name"], json.loads(e.call["function"]["arguments"]))
        for e in events
        if isinstance(e, ToolCall)
    ]
    return text, calls


def test_hermes_tool_calls_parse_across_any_chunking() -> None:
    reply = "Let me check. " + CALL + "\n" + CALL.replace("Köln", "Lyon") + " done"
    expected = (
        "Let me check. \n done",
        [("get_weather", {"city": "Köln", "days": 3}), ("get_weather", {"city": "Lyon", "days": 3})],
    )
    rng = random.Random(3)
    for _ in range(200):
        assert summarise(feed_all(ToolCallParser("hermes"), chunks(reply, rng))) == expected


def test_hermes_parser_never_streams_part_of_a_tag() -> None:
    parser = ToolCallParser("hermes")
    shown = ""
    for char in "Sure " + CALL:
        shown += "".join(e.text for e in parser.feed(char) if isinstance(e, PlainText))
        assert "<" not in shown
    assert shown == "Sure "


def test_tool_call_ids_and_shape() -> None:
    content, calls = parse_tool_calls(CALL)
    assert content is None and len(calls) == 1
    call = calls[0]
    assert call["id"].startswith("call_") and len(call["id"]) > 10 and call["type"] == "function"
    assert json.loads(call["function"]["arguments"]) == {"city": "Köln", "days": 3}
    assert parse_tool_calls(CALL + CALL)[1][0]["id"] != parse_tool_calls(CALL)[1][0]["id"]


@pytest.mark.parametrize(
    "reply",
    [
        '<tool_call>{"name": "f", "arguments": {"a": 1}</tool_call>',  # broken JSON
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        "<tool_call>not json at all</tool_call>",
        '<tool_call>{"name": "f", "arguments": "{oops"}</tool_call>',
        "<tool_call>{",  # cut off
    ],
)
def test_malformed_tool_calls_come_back_as_text(reply: str) -> None:
    content, calls = parse_tool_calls("Before " + reply)
    assert calls == [] and content == "Before " + reply


def test_unterminated_but_complete_call_is_still_a_call() -> None:
    content, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": {"x": [1, 2]}}\n')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"x": [1, 2]}


def test_string_arguments_and_parameters_key_are_accepted() -> None:
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    _, calls = parse_tool_calls('{"name": "g", "parameters": {"y": 2}}', "json")
    assert (calls[0]["function"]["name"], json.loads(calls[0]["function"]["arguments"])) == ("g", {"y": 2})


def test_bare_json_and_python_tag_formats() -> None:
    rng = random.Random(5)
    for reply in ['  {"name": "f", "arguments": {"q": "x"}}', '<|python_tag|>{"name": "f", "parameters": {"q": "x"}}']:
        for _ in range(50):
            assert summarise(feed_all(ToolCallParser("llama3"), chunks(reply, rng))) == ("", [("f", {"q": "x"})])
    parser = ToolCallParser("json")
    assert parser.feed("Hello {there}") == [PlainText("Hello {there}")]  # plain replies stream at once
    assert summarise(feed_all(ToolCallParser("json"), ['{"just": "data"}'])) == ('{"just": "data"}', [])


def test_models_without_a_tool_format_pass_text_through() -> None:
    parser = ToolCallParser(None)
    assert parser.feed(CALL) == [PlainText(CALL)] and parser.finish() == []


def test_tool_format_detection() -> None:
    from tests.support.models import TOOL_TEMPLATE

    assert detect_tool_format(TOOL_TEMPLATE) == "hermes"
    assert detect_tool_format("{{ '<|python_tag|>' }}{% if tools %}{% endif %}") == "llama3"
    assert detect_tool_format("{% if tools %}{{ tools | tojson }}{% endif %}") == "json"
    assert detect_tool_format("{{ messages }}") is None and detect_tool_format(None) is None


# Reasoning


def split(parser: ReasoningParser, pieces: list[str]) -> tuple[str, str]:
    events = [e for p in pieces for e in parser.feed(p)] + parser.finish()
    reasoning = "".join(e.text for e in events if isinstance(e, ReasoningText))
    content = "".join(e.text for e in events if isinstance(e, PlainText))
    return reasoning, content


def test_reasoning_is_split_from_content_across_any_chunking() -> None:
    reply = "<think>\nThe user wants 2+2 < 5. </thin is not the end.\n</think>\n\nIt is 4."
    rng = random.Random(7)
    for _ in range(200):
        assert split(ReasoningParser(), chunks(reply, rng)) == (
            "\nThe user wants 2+2 < 5. </thin is not the end.\n",
            "It is 4.",
        )


def test_reasoning_opened_by_the_prompt_and_plain_replies() -> None:
    assert split(ReasoningParser(start_in_reasoning=True), ["hmm", "</think>", "ok"]) == ("hmm", "ok")
    assert split(ReasoningParser(), ["Just ", "an answer <think>x</think>"]) == ("", "Just an answer <think>x</think>")
    assert split(ReasoningParser(), ["<think>cut off"]) == ("cut off", "")
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")
