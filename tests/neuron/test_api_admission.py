"""Admission limits, client disconnects and device-fault poisoning, on a real neuron."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.neuron.conftest import FAULTY, NARROW, TINY
from tests.support.procs import Daemon

HELLO = [{"role": "user", "content": "Hello there"}]


async def model_health(http: aiohttp.ClientSession, url: str, model_id: str) -> dict[str, Any]:
    health = await (await http.get(f"{url}/health")).json()
    return next(m for m in health["models"] if m["id"] == model_id)


async def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_full_queue_gets_429_and_long_wait_503(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    long = {"model": NARROW, "messages": HELLO, "max_tokens": 1000, "temperature": 0, "stream": True}
    running = await http.post(f"{neuron.url}/v1/chat/completions", json=long)  # takes the only slot
    await running.content.readline()
    queued = asyncio.create_task(http.post(f"{neuron.url}/v1/chat/completions", json=long))
    await wait_until(lambda: _queue_depth_is(http, neuron.url, 1))
    async with http.post(f"{neuron.url}/v1/chat/completions", json=long) as refused:
        assert refused.status == 429
        assert refused.headers["Retry-After"]
        body = await refused.json()
    assert await _queue_depth_is(http, neuron.url, 1), "a full queue refuses at once, without queueing"
    assert body["error"]["type"] == "rate_limit_error"
    timed_out = await queued
    assert timed_out.status == 503
    assert timed_out.headers["Retry-After"]
    assert (await timed_out.json())["error"]["code"] == "queue_timeout"
    running.close()
    await wait_until(lambda: _in_flight_is(http, neuron.url, 0))
    entry = await model_health(http, neuron.url, NARROW)
    assert entry["rejected_queue_full"] >= 1 and entry["rejected_timeout"] >= 1


async def _queue_depth_is(http: aiohttp.ClientSession, url: str, depth: int) -> bool:
    return (await model_health(http, url, NARROW))["queue_depth"] == depth


async def _in_flight_is(http: aiohttp.ClientSession, url: str, n: int, model: str = NARROW) -> bool:
    return (await model_health(http, url, model))["in_flight"] == n


async def test_client_disconnect_mid_stream_frees_the_slot(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    request = {"model": TINY, "messages": HELLO, "max_tokens": 900, "temperature": 0, "stream": True}
    resp = await http.post(f"{neuron.url}/v1/chat/completions", json=request)
    for _ in range(6):
        await resp.content.readline()
    assert (await model_health(http, neuron.url, TINY))["in_flight"] == 1
    resp.close()  # drops the connection mid-stream
    await wait_until(lambda: _in_flight_is(http, neuron.url, 0, TINY), timeout=5)


async def test_device_fault_poisons_then_recovers(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    url = neuron.url
    armed = await http.post(f"{url}/admin/fault", json={"model_id": FAULTY, "count": 1})
    assert armed.status == 200
    request = {"model": FAULTY, "messages": HELLO, "max_tokens": 8}
    async with http.post(f"{url}/v1/chat/completions", json=request) as failed:
        assert failed.status == 503
        body = await failed.json()
    assert "device fault" in body["error"]["message"]
    statuses = set()

    async def loaded_again() -> bool:
        models = await (await http.get(f"{url}/models")).json()
        status = next(m for m in models if m["id"] == FAULTY)["status"]
        statuses.add(status)
        if status != "loaded":
            async with http.post(f"{url}/v1/chat/completions", json=request) as fast_fail:
                assert fast_fail.status == 503 and fast_fail.headers["Retry-After"]
        return status == "loaded"

    await wait_until(loaded_again, timeout=60)
    assert statuses & {"poisoned", "recovering"}
    async with http.post(f"{url}/v1/chat/completions", json=request) as ok:
        assert ok.status == 200
    async with http.post(f"{url}/v1/chat/completions", json={**request, "model": TINY}) as other:
        assert other.status == 200, "a fault in one model leaves the others serving"


async def test_fault_during_stream_ends_stream_with_error_event(neuron: Daemon, http: aiohttp.ClientSession) -> None:
    await wait_until(lambda: _status_is(http, neuron.url, FAULTY, "loaded"), timeout=60)
    request = {"model": FAULTY, "messages": HELLO, "max_tokens": 400, "stream": True}
    async with http.post(f"{neuron.url}/v1/chat/completions", json=request) as resp:
        await resp.content.readline()
        await http.post(f"{neuron.url}/admin/fault", json={"model_id": FAULTY, "count": 1})
        raw = (await resp.read()).decode()
    assert '"error"' in raw and "device fault" in raw
    assert raw.rstrip().endswith("data: [DONE]")
    await wait_until(lambda: _status_is(http, neuron.url, FAULTY, "loaded"), timeout=60)


async def _status_is(http: aiohttp.ClientSession, url: str, model_id: str, status: str) -> bool:
    models = await (await http.get(f"{url}/models")).json()
    return next(m for m in models if m["id"] == model_id)["status"] == status
