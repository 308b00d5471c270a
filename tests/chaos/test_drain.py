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
from tests.support.gateway_procs import run_single_model_fleet

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
