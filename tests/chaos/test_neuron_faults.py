"""A neuron killed or frozen under a real gateway: what its clients get, and how soon the fleet serves again.

- kill -9 mid-stream: the stream ends with an error event (not a hang), and once a neuron is back on
  the address the next request is served;
- SIGSTOP mid-stream: the gateway's stream idle timeout ends the stream with an error event; a new
  request while it is frozen gets a clear 5xx within the first-byte timeout (or at once, once the
  poller has marked the node unhealthy); after SIGCONT requests are served again;
- SIGSTOP between requests: the same bounds for the first request that finds it frozen.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.chaos.conftest import (
    FIRST_BYTE_S,
    MARGIN_S,
    STREAM_IDLE_S,
    Clock,
    chaos_gateway_toml,
    neuron_toml,
    report,
    resume,
    stop,
)
from tests.support.gateway_procs import eventually, run_gateway
from tests.support.procs import free_port, get_json, run_neuron, wait_model_status

MODEL = "tiny"
# Greedy decoding of a fixed random model: the same long answer every run (no early end of sequence).
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 900, "temperature": 0}
SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10)) as session:
        yield session


async def events_until_end(resp: aiohttp.ClientResponse, on_first: Any) -> tuple[list[Any], bool]:
    """Read a stream's data payloads; call `on_first` after the second one; (payloads, ended with [DONE])."""
    payloads: list[Any] = []
    fired = False
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            return payloads, True
        payloads.append(json.loads(data))
        if len(payloads) == 2 and not fired:
            fired = True
            on_first()
    return payloads, False


async def serve_one(http: aiohttp.ClientSession, url: str) -> int:
    async with http.post(f"{url}/v1/chat/completions", json=SHORT) as resp:
        await resp.read()
        return resp.status


async def served_after(http: aiohttp.ClientSession, url: str, deadline_s: float) -> float:
    """Seconds until a normal request through the gateway gets 200 (polled)."""
    clock = Clock()

    async def ok() -> bool:
        try:
            return await serve_one(http, url) == 200
        except aiohttp.ClientError:
            return False

    while clock.elapsed() < deadline_s:
        if await ok():
            return clock.elapsed()
        await asyncio.sleep(0.1)
    raise AssertionError(f"no request served within {deadline_s} s")


async def test_kill9_mid_stream_ends_it_with_an_error_then_the_fleet_serves_again(
    tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    with run_neuron(tmp_path, neuron_toml(tiny_model), port=port) as neuron:
        wait_model_status(neuron.url, MODEL)
        with run_gateway(tmp_path, chaos_gateway_toml({"n": neuron.url}), wait_healthy=1) as gateway:
            clock = Clock()
            async with asyncio.timeout(MARGIN_S * 4):
                async with http.post(f"{gateway.url}/v1/chat/completions", json={**LONG, "stream": True}) as resp:
                    assert resp.status == 200

                    def kill() -> None:
                        neuron.kill()
                        killed_at.append(clock.elapsed())

                    killed_at: list[float] = []
                    payloads, done = await events_until_end(resp, kill)
            assert killed_at, "the stream ended before the neuron was killed"
            error_after = clock.elapsed() - killed_at[0]
            assert not done and "error" in payloads[-1], payloads[-1]
            assert payloads[-1]["error"]["code"] == "stream_interrupted"
            assert error_after < MARGIN_S
            # The neuron comes back on its address: the gateway notices and serves again.
            with run_neuron(tmp_path, neuron_toml(tiny_model), port=port) as again:
                wait_model_status(again.url, MODEL)
                served = await served_after(http, gateway.url, 60)
            report("kill9_mid_stream", error_event_after_s=error_after, served_after_neuron_ready_s=served)


async def test_sigstop_mid_stream_and_between_requests(
    tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession
) -> None:
    with run_neuron(tmp_path, neuron_toml(tiny_model)) as neuron:
        wait_model_status(neuron.url, MODEL)
        pid = neuron.proc.pid
        with run_gateway(tmp_path, chaos_gateway_toml({"n": neuron.url}), wait_healthy=1) as gateway:
            # 1. Frozen mid-stream: an error event within the stream idle timeout.
            stopped_at: list[float] = []
            clock = Clock()
            try:
                async with asyncio.timeout(STREAM_IDLE_S + MARGIN_S * 2):
                    async with http.post(f"{gateway.url}/v1/chat/completions", json={**LONG, "stream": True}) as r:
                        assert r.status == 200

                        def freeze() -> None:
                            stop(pid)
                            stopped_at.append(clock.elapsed())

                        payloads, done = await events_until_end(r, freeze)
                assert stopped_at, "the stream ended before the neuron was frozen"
                error_after = clock.elapsed() - stopped_at[0]
                assert not done and payloads[-1]["error"]["code"] == "stream_interrupted", payloads[-1]
                assert error_after < STREAM_IDLE_S + MARGIN_S

                # 2. A new request while it is frozen: a clear 5xx within the first-byte bound.
                clock = Clock()
                async with asyncio.timeout(FIRST_BYTE_S + MARGIN_S * 2):
                    status = await serve_one(http, gateway.url)
                refused_after = clock.elapsed()
                assert status in (502, 503, 504)
                assert refused_after < FIRST_BYTE_S + MARGIN_S
            finally:
                resume(pid)
            # 3. Thawed: served again once the poller sees it.
            recovered = await served_after(http, gateway.url, 60)

            # 4. Frozen between requests: the first request that finds it gets a bounded error too.
            stop(pid)
            try:
                clock = Clock()
                async with asyncio.timeout(FIRST_BYTE_S + MARGIN_S * 2):
                    status = await serve_one(http, gateway.url)
                idle_refused_after = clock.elapsed()
                assert status in (502, 503, 504)
            finally:
                resume(pid)
            recovered_again = await served_after(http, gateway.url, 60)
            await eventually(lambda: get_json(f"{gateway.url}/health")["healthy_neurons"] == 1, timeout=30)
            report(
                "sigstop",
                stream_error_after_s=error_after,
                new_request_refused_after_s=refused_after,
                served_after_sigcont_s=recovered,
                idle_stop_refused_after_s=idle_refused_after,
                served_after_second_sigcont_s=recovered_again,
            )
