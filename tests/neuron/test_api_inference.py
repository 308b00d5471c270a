"""OpenAI chat and text completions against a real neuron serving a tiny model."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.neuron.conftest import TINY
from tests.support.procs import Daemon
from tests.support.sse import sse_events

HELLO = [{"role": "user", "content": "Hello there"}]


def counts(usage: dict[str, Any]) -> dict[str, int]:
    """The token counts of a usage; how much of the prompt the prefix cache served may differ between runs."""
    return {key: usage[key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")}


async def chat(http: aiohttp.ClientSession, url: str, **body: Any) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/v1/chat/completions", json={"model": TINY, **body}) as resp:
        return resp.status, await resp.json()


async def test_chat_reply_has_usage_and_length_finish(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    status, body = await chat(http, neuron.url, messages=HELLO, max_tokens=8, temperature=0)
    assert status == 200, body
    assert body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8


async def test_stream_matches_non_stream_and_ends_with_usage(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    _, whole = await chat(http, neuron.url, messages=HELLO, max_tokens=12, temperature=0)
    request = {"model": TINY, "messages": HELLO, "max_tokens": 12, "temperature": 0, "stream": True}
    request["stream_options"] = {"include_usage": True}
    async with http.post(f"{neuron.url}/v1/chat/completions", json=request) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["length"]
    assert chunks[-1]["choices"] == []
    assert counts(chunks[-1]["usage"]) == counts(whole["usage"])


async def test_stream_without_include_usage_has_no_usage_chunk(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    request = {"model": TINY, "messages": HELLO, "max_tokens": 4, "stream": True}
    async with http.post(f"{neuron.url}/v1/chat/completions", json=request) as resp:
        events = await sse_events(resp)
    assert all("usage" not in e for e in events[:-1])


async def test_text_completion(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    request = {"model": TINY, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    async with http.post(f"{neuron.url}/v1/completions", json=request) as resp:
        body = await resp.json()
    assert resp.status == 200, body
    assert body["object"] == "text_completion"
    assert isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["completion_tokens"] == 5


async def test_stop_string_ends_generation_without_emitting_it(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    _, free = await chat(http, neuron.url, messages=HELLO, max_tokens=40, temperature=0)
    text = free["choices"][0]["message"]["content"]
    stop = text[10:13]
    if not stop.strip():
        stop = text.strip()[5:8]
    _, stopped = await chat(http, neuron.url, messages=HELLO, max_tokens=40, temperature=0, stop=[stop])
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_sequence"] == stop
    assert choice["message"]["content"] == text[: text.index(stop)]


async def test_seeded_sampling_is_reproducible(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    params = {"messages": HELLO, "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "seed": 7}
    _, first = await chat(http, neuron.url, **params)
    _, second = await chat(http, neuron.url, **params)
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


async def test_concurrent_greedy_requests_match_serial(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    """Eight requests at once must return what each returns alone: no shared KV state."""
    prompts = [[{"role": "user", "content": f"Tell me about item number {i} " * (i + 1)}] for i in range(8)]
    serial = [await chat(http, neuron.url, messages=p, max_tokens=24, temperature=0) for p in prompts]
    together = await asyncio.gather(
        *(chat(http, neuron.url, messages=p, max_tokens=24, temperature=0) for p in prompts)
    )
    for (_, alone), (_, concurrent) in zip(serial, together, strict=True):
        assert concurrent["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]
        assert counts(concurrent["usage"]) == counts(alone["usage"])


async def test_health_answers_fast_during_long_generation(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    """The event loop never computes: /health is served while a 512-token generation runs."""
    request = {"messages": HELLO, "max_tokens": 512, "temperature": 0, "stop": None}
    generation = asyncio.create_task(chat(http, neuron.url, **request))
    await asyncio.sleep(0.2)
    answered = 0
    while not generation.done():
        async with http.get(f"{neuron.url}/health") as resp:
            assert resp.status == 200
            await resp.read()
        answered += 1
        await asyncio.sleep(0.02)
    status, body = await generation
    assert status == 200 and body["usage"]["completion_tokens"] > 100
    assert answered >= 5  # counted, not timed: latency figures belong to benchmarks


async def test_a_repeated_prompt_reports_its_cached_tokens(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    """The prefix cache serves a prompt seen before: usage.prompt_tokens_details.cached_tokens says how much."""
    messages = [{"role": "user", "content": "Cache me if you can. " * 12}]
    _, first = await chat(http, neuron.url, messages=messages, max_tokens=2, temperature=0)
    _, again = await chat(http, neuron.url, messages=messages, max_tokens=2, temperature=0)
    prompt = again["usage"]["prompt_tokens"]
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert first["usage"]["prompt_tokens"] == prompt
    assert 0 < cached < prompt  # the last prompt token is always computed: it yields the first logits
    request = {"model": TINY, "messages": messages, "max_tokens": 2, "stream": True}
    request["stream_options"] = {"include_usage": True}
    async with http.post(f"{neuron.url}/v1/chat/completions", json=request) as resp:
        events = await sse_events(resp)
    assert events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"] == cached
    async with http.post(
        f"{neuron.url}/v1/completions", json={"model": TINY, "prompt": "Cache me if you can. " * 12, "max_tokens": 2}
    ) as resp:
        text = await resp.json()
    async with http.post(
        f"{neuron.url}/v1/completions", json={"model": TINY, "prompt": "Cache me if you can. " * 12, "max_tokens": 2}
    ) as resp:
        text = await resp.json()
    assert text["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
