"""SIGTERM drains: a stream in flight finishes normally (never cut mid-token without an error event), new
requests get 503 + Retry-After and /health says draining meanwhile, and the gateway routes around a
neuron that is going away."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.chaos.conftest import MARGIN_S, Clock, chaos_gateway_toml, report
from tests.support.gateway_procs import run_gateway, run_single_model_fleet
from tests.support.procs import cpu_neuron_toml, run_neuron, wait_model_status

MODEL = "tiny"
STREAM = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "temperature": 0}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as session:
        yield session


async def stream_through_sigterm(
    http: aiohttp.ClientSession, url: str, pid_to_signal: int, draining_url: str
) -> tuple[list[str], float, list[tuple[int, str, str | None]]]:
    """Start a stream through `url`, SIGTERM the process after its first events and ask `draining_url`
    (that process) for its health and a new completion meanwhile: the stream's data lines, how long it
    then took, and what the two probes got (status, error code or health status, Retry-After)."""
    lines: list[str] = []
    probes: list[tuple[int, str, str | None]] = []
    clock = Clock()
    signalled = 0.0

    async def probe() -> None:
        await asyncio.sleep(0.3)
        async with http.get(f"{draining_url}/health") as resp:
            probes.append((resp.status, (await resp.json())["status"], resp.headers.get("Retry-After")))
        async with http.post(f"{draining_url}/v1/chat/completions", json=STREAM) as resp:
            probes.append((resp.status, (await resp.json())["error"]["code"], resp.headers.get("Retry-After")))

    async with asyncio.timeout(MARGIN_S * 6):
        async with http.post(f"{url}/v1/chat/completions", json={**STREAM, "stream": True}) as resp:
            assert resp.status == 200
            probing = None
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                lines.append(line[6:])
                if len(lines) == 2:
                    os.kill(pid_to_signal, signal.SIGTERM)
                    signalled = clock.elapsed()
                    probing = asyncio.create_task(probe())
            if probing is not None:
                await probing
    return lines, clock.elapsed() - signalled, probes


def refused_while_draining(probes: list[tuple[int, str, str | None]]) -> bool:
    return [(status, what) for status, what, _ in probes] == [(503, "draining"), (503, "draining")] and all(
        retry is not None for _, _, retry in probes
    )


def ended_cleanly(lines: list[str]) -> bool:
    """[DONE] last, and no error event before it."""
    return bool(lines) and lines[-1] == "[DONE]" and not any('"error"' in line for line in lines[:-1])


async def test_neuron_sigterm_lets_its_streams_finish(
    tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession
) -> None:
    with run_single_model_fleet(tmp_path, MODEL, tiny_model, chaos_gateway_toml) as fleet:
        neuron, gateway = fleet.neuron, fleet.gateway
        lines, finished_after, probes = await stream_through_sigterm(http, gateway.url, neuron.proc.pid, neuron.url)
        assert ended_cleanly(lines), lines[-3:]
        assert refused_while_draining(probes), probes
        assert neuron.proc.wait(timeout=MARGIN_S * 4) == 0
        # Gone: a new request gets a clear answer, not a hang.
        clock = Clock()
        async with http.post(f"{gateway.url}/v1/chat/completions", json=STREAM) as resp:
            body = json.loads(await resp.read())
        assert resp.status in (502, 503) and "error" in body
        report("neuron_sigterm", stream_finished_after_s=finished_after, next_refused_after_s=clock.elapsed())


async def test_gateway_sigterm_lets_its_streams_finish(
    tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession
) -> None:
    with run_single_model_fleet(tmp_path, MODEL, tiny_model, chaos_gateway_toml) as fleet:
        gateway = fleet.gateway
        lines, finished_after, probes = await stream_through_sigterm(http, gateway.url, gateway.proc.pid, gateway.url)
        assert ended_cleanly(lines), lines[-3:]
        assert refused_while_draining(probes), probes
        assert gateway.proc.wait(timeout=MARGIN_S * 4) == 0
        report("gateway_sigterm", stream_finished_after_s=finished_after)


# ---- the drain runs out: streams still running end with an error in their client's dialect --------------------

DIALECT_STREAMS = {
    "openai": ("/v1/chat/completions", {**STREAM, "max_tokens": 900, "stream": True}),
    "anthropic": (
        "/v1/messages",
        {"model": MODEL, "max_tokens": 900, "messages": [{"role": "user", "content": "go"}], "stream": True},
    ),
    "responses": ("/v1/responses", {"model": MODEL, "input": "go", "max_output_tokens": 900, "stream": True}),
}


async def read_sse(resp: aiohttp.ClientResponse, started: asyncio.Event) -> list[tuple[str, str]]:
    """(event name, data) of every event until the connection closes; `started` set after two data events."""
    events: list[tuple[str, str]] = []
    name = "message"
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            events.append((name, line[6:]))
            name = "message"
            if len(events) == 2:
                started.set()
    return events


async def streams_cut_by_sigterm(
    http: aiohttp.ClientSession, url: str, pid: int, dialects: list[str]
) -> tuple[dict[str, list[tuple[str, str]]], float]:
    """Start a stream per dialect through `url`, SIGTERM `pid` once each sent two events: every stream's
    events, and the seconds from the signal until the last stream ended."""
    started = {d: asyncio.Event() for d in dialects}

    async def one(dialect: str) -> list[tuple[str, str]]:
        path, body = DIALECT_STREAMS[dialect]
        async with http.post(f"{url}{path}", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return await read_sse(resp, started[dialect])

    async with asyncio.timeout(MARGIN_S * 6):
        tasks = {d: asyncio.create_task(one(d)) for d in dialects}
        await asyncio.gather(*(e.wait() for e in started.values()))
        os.kill(pid, signal.SIGTERM)
        clock = Clock()
        return {d: await t for d, t in tasks.items()}, clock.elapsed()


def openai_error_code(events: list[tuple[str, str]]) -> str | None:
    """The code of the error event that ends an OpenAI stream ([DONE] may follow it), else None."""
    data = [d for _, d in events if d != "[DONE]"]
    last = json.loads(data[-1]) if data else {}
    return last.get("error", {}).get("code") if isinstance(last, dict) else None


async def test_gateway_sigterm_past_the_drain_ends_every_stream_with_its_dialects_error(
    tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession
) -> None:
    no_drain = lambda neurons: chaos_gateway_toml(neurons, drain_timeout_s=0)  # noqa: E731
    with run_single_model_fleet(tmp_path, MODEL, tiny_model, no_drain) as fleet:
        gateway = fleet.gateway
        events, ended_after = await streams_cut_by_sigterm(http, gateway.url, gateway.proc.pid, list(DIALECT_STREAMS))
        assert gateway.proc.wait(timeout=MARGIN_S * 4) == 0
        assert openai_error_code(events["openai"]) == "shutting_down", events["openai"][-2:]
        name, data = events["anthropic"][-1]
        assert name == "error" and json.loads(data)["type"] == "error", events["anthropic"][-2:]
        name, data = events["responses"][-1]
        assert name == "response.failed", events["responses"][-2:]
        assert "shut down" in json.loads(data)["response"]["error"]["message"], data
        assert "event=gateway.drain_timeout" in gateway.log()
        report("gateway_drain_timeout_cut", streams=3, ended_after_s=ended_after)


async def test_neuron_sigterm_past_the_drain_ends_its_streams_with_an_error_event(
    tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession
) -> None:
    with run_neuron(tmp_path, "drain_timeout_s = 0\n" + cpu_neuron_toml(tiny_model, MODEL)) as neuron:
        wait_model_status(neuron.url, MODEL)
        with run_gateway(tmp_path, chaos_gateway_toml({"n": neuron.url}), wait_healthy=1) as gateway:
            events, ended_after = await streams_cut_by_sigterm(
                http, gateway.url, neuron.proc.pid, ["openai", "anthropic"]
            )
            assert neuron.proc.wait(timeout=MARGIN_S * 4) == 0
            # Output had gone out: not retried; the neuron's own error event reaches the client in its dialect.
            assert openai_error_code(events["openai"]) == "shutting_down", events["openai"][-2:]
            assert events["openai"][-1][1] == "[DONE]"
            name, data = events["anthropic"][-1]
            assert name == "error" and "shut down" in json.loads(data)["error"]["message"], events["anthropic"][-2:]
            assert "event=neuron.drain_timeout" in neuron.log()
            report("neuron_drain_timeout_cut", streams=2, ended_after_s=ended_after)
