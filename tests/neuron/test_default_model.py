"""End to end with the real SmolLM2-135M-Instruct GGUF: `neuron serve` with no config answers correctly."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from cortex.neuron.default_model import DEFAULT_MODEL_ID
from tests.support.procs import Daemon, free_port, spawn, wait_http, wait_model_status
from tests.support.sse import sse_events

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def default_neuron(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """Exactly what a user runs: no config file at all."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("default") / "neuron.log"
    args = [sys.executable, "-m", "cortex.cli.neuron_cmd", "serve", "--listen", f"127.0.0.1:{port}"]
    proc = spawn(args, log_path)
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_http(f"{daemon.url}/version", proc, log_path)
        wait_model_status(daemon.url, DEFAULT_MODEL_ID, timeout=300)
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.log()


async def test_answers_capital_of_france(default_neuron: Daemon) -> None:
    body = {"model": DEFAULT_MODEL_ID, "messages": QUESTION, "max_tokens": 30}
    async with aiohttp.ClientSession() as http, http.post(f"{default_neuron.url}/v1/chat/completions", json=body) as r:
        reply = await r.json()
    assert r.status == 200, reply
    assert "Paris" in reply["choices"][0]["message"]["content"]
    assert reply["choices"][0]["finish_reason"] == "stop"


async def test_streamed_answer_matches(default_neuron: Daemon) -> None:
    body = {"model": DEFAULT_MODEL_ID, "messages": QUESTION, "max_tokens": 30, "stream": True, "temperature": 0}
    async with aiohttp.ClientSession() as http, http.post(f"{default_neuron.url}/v1/chat/completions", json=body) as r:
        events = await sse_events(r)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert "Paris" in text


def test_curl_from_the_readme(default_neuron: Daemon) -> None:
    """The README's first curl body, sent straight to a neuron (which knows the model by its id, not by the
    gateway's alias; tests/e2e/test_docs.py runs the command word for word against a real `cortex up`)."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    data = readme.split("-d '", 1)[1].split("'", 1)[0].replace('"smollm2"', f'"{DEFAULT_MODEL_ID}"')
    assert DEFAULT_MODEL_ID in data
    out = subprocess.run(
        ["curl", "-s", f"{default_neuron.url}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", data],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "Paris" in out.stdout


async def test_json_object_answer_parses(default_neuron: Daemon) -> None:
    messages = [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "What is the capital of France? Answer as a JSON object with the key capital."},
    ]
    body = {"model": DEFAULT_MODEL_ID, "messages": messages, "max_tokens": 60}
    body["response_format"] = {"type": "json_object"}
    async with aiohttp.ClientSession() as http, http.post(f"{default_neuron.url}/v1/chat/completions", json=body) as r:
        reply = await r.json()
    assert r.status == 200, reply
    assert reply["choices"][0]["finish_reason"] == "stop"
    answer = json.loads(reply["choices"][0]["message"]["content"])
    assert isinstance(answer, dict)
    assert "Paris" in json.dumps(answer)


async def test_json_schema_answer_validates(default_neuron: Daemon) -> None:
    """A strict json_schema request: SmolLM2 answers with an object the schema accepts, and the right one."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    body = {"model": DEFAULT_MODEL_ID, "messages": QUESTION, "max_tokens": 60, "temperature": 0}
    body["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    async with aiohttp.ClientSession() as http, http.post(f"{default_neuron.url}/v1/chat/completions", json=body) as r:
        reply = await r.json()
    assert r.status == 200, reply
    assert reply["choices"][0]["finish_reason"] == "stop"
    answer = json.loads(reply["choices"][0]["message"]["content"])
    jsonschema.validate(answer, schema)
    assert "Paris" in answer["capital"]


async def test_generic_tool_call(default_neuron: Daemon) -> None:
    """SmolLM2's template has no tools: the neuron lists them in the prompt and the call comes back well formed."""
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 40}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    body = {"model": DEFAULT_MODEL_ID, "messages": messages, "tools": [tool], "tool_choice": "required"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{default_neuron.url}/v1/chat/completions", json={**body, "max_tokens": 200}) as r:
            reply = await r.json()
        async with http.get(f"{default_neuron.url}/models") as r:
            models = await r.json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls", reply
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and isinstance(json.loads(call["arguments"])["city"], str)
    entries = models["models"] if isinstance(models, dict) else models
    assert [m["tool_call_format"] for m in entries if m["id"] == DEFAULT_MODEL_ID] == ["generic"]
