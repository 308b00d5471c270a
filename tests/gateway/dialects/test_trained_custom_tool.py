"""Codex's `apply_patch` loop end to end, with a model that calls the tool by itself.

A tiny Llama is trained here (seconds on CPU, tests/support/trained_tool_model.py's recipe) on the two
prompts this loop produces, rendered exactly as the neuron renders them from what the gateway sends:

- asked to create a file, with a `custom` tool `apply_patch` whose input is a Lark grammar on offer
  (`tool_choice` auto: nothing forces the call), it writes the patch as a custom tool call;
- given the call and its output back (`custom_tool_call` + `custom_tool_call_output` items), it
  answers in text.

Through the official `openai` SDK, the real gateway's Responses route and a real neuron, the call
reaches the client as a `custom_tool_call` whose input satisfies the grammar (the neuron decoded it
under the grammar, so a call can only be valid), streamed and not.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from cortex.core.openai import ChatCompletionRequest
from cortex.gateway.dialects.responses.request import parse_responses_request
from cortex.gateway.dialects.responses.to_chat import to_chat_request
from tests.support.dialect_schemas import assert_response, assert_responses_event
from tests.support.gateway_procs import run_single_model_fleet
from tests.support.models import TOOL_TEMPLATE
from tests.support.trained_tool_model import train_and_save

MODEL = "tiny-apply-patch"
QUESTION = "Create hello.txt saying hello."
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello\n*** End Patch"
ANSWER = "Created hello.txt."
PATCH_GRAMMAR = r"""start: "*** Begin Patch\n" hunk+ "*** End Patch"
hunk: "*** Add File: " FILENAME "\n" ADD_LINE+
FILENAME: /[A-Za-z0-9_.\/-]+/
ADD_LINE: /\+[^\n]*\n/
"""
PATCH_SHAPE = re.compile(r"\A\*\*\* Begin Patch\n(\*\*\* Add File: [\w./-]+\n(\+[^\n]*\n)+)+\*\*\* End Patch\Z")
APPLY_PATCH: Any = {
    "type": "custom",
    "name": "apply_patch",
    "description": "Edit files with a patch.",
    "format": {"type": "grammar", "syntax": "lark", "definition": PATCH_GRAMMAR},
}


def _turns(call_id: str = "call_1") -> list[list[Any]]:
    first: list[Any] = [{"role": "user", "content": QUESTION}]
    call = {"type": "custom_tool_call", "call_id": call_id, "name": "apply_patch", "input": PATCH}
    output = {"type": "custom_tool_call_output", "call_id": call_id, "output": "Done!"}
    return [first, [*first, call, output]]


def _neuron_view(items: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(messages, tools) as the neuron hands them to its chat renderer for this Responses input."""
    body = to_chat_request(parse_responses_request({"model": MODEL, "input": items, "tools": [APPLY_PATCH]}))
    req = ChatCompletionRequest.model_validate(body)
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    return [m.model_dump(exclude_none=True) for m in req.messages], tools


def build_patch_model(out: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """Train on the loop's two turns; `tokenizer_dir` holds SmolLM2's tokenizer with `TOOL_TEMPLATE`
    (the session's tiny tool model: loading it from there skips the GGUF tokenizer's slow conversion)."""
    from transformers import AutoTokenizer

    from cortex.neuron.engine.chat import ChatRenderer
    from cortex.neuron.engine.tools import render_custom_call

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.chat_template == TOOL_TEMPLATE
    renderer = ChatRenderer(tokenizer)
    samples: dict[tuple[int, ...], list[int]] = {}
    for items, reply in zip(_turns(), (render_custom_call("apply_patch", PATCH), ANSWER), strict=True):
        messages, tools = _neuron_view(items)
        reply_ids = [*tokenizer.encode(reply, add_special_tokens=False), tokenizer.eos_token_id]
        samples[tuple(renderer.render(messages, tools))] = reply_ids
    return train_and_save(out, tokenizer, samples, seed=seed, hidden=64, layers=2)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, tiny_tool_model: Path) -> Iterator[openai.OpenAI]:
    tmp = tmp_path_factory.mktemp("apply-patch")
    model_dir = build_patch_model(tmp / "models" / MODEL, tiny_tool_model)
    with run_single_model_fleet(tmp, MODEL, model_dir) as fleet:
        yield openai.OpenAI(base_url=f"{fleet.gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_model_calls_the_grammar_tool_and_reads_its_output(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL, input=QUESTION, tools=[APPLY_PATCH], max_output_tokens=96, temperature=0
    )
    assert_response(first.model_dump(mode="json", exclude_unset=True))
    (call,) = first.output
    assert call.type == "custom_tool_call" and call.name == "apply_patch"
    assert call.input == PATCH and PATCH_SHAPE.match(call.input)
    second = client.responses.create(
        model=MODEL, input=_turns(call.call_id)[1], tools=[APPLY_PATCH], max_output_tokens=32, temperature=0
    )
    assert second.output_text == ANSWER


def test_the_call_streams_as_custom_tool_call_events(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=MODEL, input=QUESTION, tools=[APPLY_PATCH], max_output_tokens=96, stream=True, temperature=0
        )
    )
    for event in events:
        assert_responses_event(event.type, event.model_dump(exclude_unset=True))
    names = [event.type for event in events]
    assert names[2:] == [
        "response.output_item.added",
        "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.done",
        "response.output_item.done",
        "response.completed",
    ], names
    done = events[4]
    assert done.type == "response.custom_tool_call_input.done" and done.input == PATCH
    (call,) = events[-1].response.output  # type: ignore[union-attr]
    assert call.type == "custom_tool_call" and call.input == PATCH
