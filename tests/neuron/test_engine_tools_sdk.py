"""The official SDKs' typed parsing through a real gateway and neuron: a pydantic model in, the parsed object out.

The model is the tiny random-weight one: it would never write JSON by itself, so every parsed object
here exists because the neuron decoded under the schema the SDK derived from the pydantic model.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.support.gateway_procs import run_single_model_fleet

MODEL = "tiny-sdk"


class Verdict(BaseModel):
    answer: Literal["yes", "no"]
    confidence: int = Field(ge=0, le=9)
    tags: list[Literal["a", "b", "c"]] = Field(max_length=2)


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[str]:
    with run_single_model_fleet(tmp_path_factory.mktemp("sdk"), MODEL, tiny_model) as fleet:
        yield fleet.gateway.url


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _parse(client: openai.OpenAI) -> Verdict | None:
    messages = [{"role": "user", "content": "Is the sky blue?"}]
    chat = client.chat.completions if hasattr(client.chat.completions, "parse") else client.beta.chat.completions
    completion = chat.parse(  # type: ignore[attr-defined]
        model=MODEL, messages=messages, response_format=Verdict, max_tokens=200, temperature=0
    )
    return completion.choices[0].message.parsed


def test_chat_completions_parse(gateway_url: str) -> None:
    parsed = _parse(_client(gateway_url))
    assert isinstance(parsed, Verdict)


def test_responses_parse(gateway_url: str) -> None:
    response = _client(gateway_url).responses.parse(
        model=MODEL, input="Is the sky blue?", text_format=Verdict, max_output_tokens=200, temperature=0
    )
    assert isinstance(response.output_parsed, Verdict)


class Answer(BaseModel):
    answer: Literal["yes", "no"]
    sure: bool


def test_anthropic_structured_output(gateway_url: str) -> None:
    import anthropic

    client = anthropic.Anthropic(base_url=gateway_url, api_key="unused", max_retries=0, timeout=120)
    messages: list[Any] = [{"role": "user", "content": "Is the sky blue?"}]
    message = client.messages.parse(model=MODEL, max_tokens=200, messages=messages, output_format=Answer)
    assert isinstance(message.parsed_output, Answer)
    raw = client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=messages,
        output_config={"format": {"type": "json_schema", "schema": Answer.model_json_schema()}},
    )
    Answer.model_validate_json(raw.content[0].text)  # type: ignore[union-attr]


# One short greedy answer with the logprobs of each token and its two likeliest alternatives.
LOGPROBS_REQUEST: Any = {
    "model": MODEL,
    "input": "Count to three.",
    "max_output_tokens": 8,
    "temperature": 0,
    "include": ["message.output_text.logprobs"],
    "top_logprobs": 2,
}


def test_responses_logprobs(gateway_url: str) -> None:
    response = _client(gateway_url).responses.create(**LOGPROBS_REQUEST)
    part = response.output[0].content[0]  # type: ignore[union-attr]
    assert part.logprobs and "".join(p.token for p in part.logprobs) == part.text
    assert all(len(p.top_logprobs) == 2 and p.logprob <= 0 for p in part.logprobs)


def test_responses_logprobs_stream(gateway_url: str) -> None:
    """Streamed, each text delta carries its own tokens' logprobs; the done events carry them all."""
    from tests.support.dialect_schemas import assert_responses_event

    events = list(_client(gateway_url).responses.create(**LOGPROBS_REQUEST, stream=True))
    for event in events:
        assert_responses_event(event.type, event.model_dump(exclude_unset=True))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    done = next(e for e in events if e.type == "response.output_text.done")
    streamed = [p for d in deltas for p in d.logprobs]
    assert streamed and "".join(p.token for p in streamed) == done.text
    assert [p.token for p in done.logprobs] == [p.token for p in streamed]
    assert all(len(p.top_logprobs or []) == 2 and p.logprob <= 0 for p in streamed)
    final = events[-1].response.output[0].content[0]  # type: ignore[union-attr]
    assert [p.token for p in final.logprobs] == [p.token for p in streamed]
