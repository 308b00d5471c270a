"""A neuron failing before a request produced output: the request is served anyway, never a 503.

Real neurons with the same tiny model behind a real gateway, device faults armed with the
neurons' test hook (`POST /admin/fault`: the model's next forward raises a device fault):

- a fault on one of two replicas: the request (streamed or not) is retried once on the other;
- a fault on the only replica: the request waits for the model's recovery and is served then;
- a neuron frozen (SIGSTOP) while a request waits for its first byte: once the poller finds it
  unreachable the request is retried on the other replica, long before its own timeouts.

Greedy decoding of one fixed random model gives the same text on either replica, so every answer
is compared with the other replica's own answer to the same request.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.chaos.conftest import MARGIN_S, Clock, chaos_gateway_toml, neuron_toml, report, resume, stop
from tests.support.gateway_procs import GatewayDaemon, run_gateway, wait_until
from tests.support.procs import Daemon, get_json, run_neuron, wait_model_status

MODEL = "tiny"


def faulty_neuron_toml(model_dir: Path) -> str:
    return "fault_injection = true\n" + neuron_toml(model_dir, MODEL)


def body(prompt: str) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 24, "temperature": 0}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=MARGIN_S * 8, sock_connect=10)) as session:
        yield session


async def direct(http: aiohttp.ClientSession, neuron: Daemon, request: dict[str, Any]) -> str:
    """The neuron's own non-streamed answer to `request`: what the retried request must equal."""
    async with http.post(f"{neuron.url}/v1/chat/completions", json={**request, "stream": False}) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json())["choices"][0]["message"]["content"]


async def through(http: aiohttp.ClientSession, url: str, request: dict[str, Any], rid: str, *, stream: bool) -> str:
    """The gateway's answer: the content, asserting a 200 and (streamed) a clean end with no error event."""
    headers = {"x-request-id": rid}
    async with http.post(f"{url}/v1/chat/completions", json={**request, "stream": stream}, headers=headers) as resp:
        raw = await resp.read()
        assert resp.status == 200, raw[:500]
    if not stream:
        return json.loads(raw)["choices"][0]["message"]["content"]
    lines = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    chunks = [json.loads(line) for line in lines[:-1]]
    assert not any("error" in c for c in chunks), chunks
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))


def served_by(gateway: GatewayDaemon, rid: str) -> str:
    """The node of a request's `request.done` line (written just after its answer went out)."""

    def line() -> str | None:
        done = f"request_id={rid} "
        return next((x for x in gateway.log().splitlines() if "event=request.done" in x and done in x), None)

    found = wait_until(line, timeout=10)
    return found.split(" node=", 1)[1].split(" ", 1)[0]


def loaded_on(gateway_url: str) -> list[str]:
    """The nodes the gateway's catalogue shows the model loaded on (its poller's view, not the neurons')."""
    models = get_json(f"{gateway_url}/v1/models")["data"]
    return next((m["loaded_on"] for m in models if m["id"] == MODEL), [])


def arm(http_url: str) -> None:
    import urllib.request

    data = json.dumps({"model_id": MODEL, "count": 1}).encode()
    request = urllib.request.Request(f"{http_url}/admin/fault", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200


async def test_a_device_fault_before_output_is_served_by_the_other_replica(
    tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession
) -> None:
    toml = faulty_neuron_toml(tiny_model)
    with run_neuron(tmp_path, toml) as a, run_neuron(tmp_path, toml) as b:
        neurons = {"a": a, "b": b}
        for neuron in neurons.values():
            wait_model_status(neuron.url, MODEL)
        with run_gateway(tmp_path, chaos_gateway_toml({n: d.url for n, d in neurons.items()}), wait_healthy=2) as gw:
            for round_, stream in enumerate((True, False)):
                # Both replicas serving in the gateway's view (round 0's faulted one has reloaded and been
                # polled since), so the router's pick is the one used least recently: not the last one.
                wait_until(lambda: sorted(loaded_on(gw.url)) == ["a", "b"], timeout=MARGIN_S * 2)
                await through(http, gw.url, body(f"warm {round_}"), f"warm-{round_}", stream=False)
                last = served_by(gw, f"warm-{round_}")
                target = "b" if last == "a" else "a"
                other = neurons[last]
                wait_model_status(neurons[target].url, MODEL)
                request = body(f"count to {round_ + 5}")
                expected = await direct(http, other, request)
                arm(neurons[target].url)
                clock = Clock()
                content = await through(http, gw.url, request, f"faulted-{round_}", stream=stream)
                assert content == expected
                assert served_by(gw, f"faulted-{round_}") == last
                assert f"event=model.poisoned request_id=faulted-{round_} " in neurons[target].log()
                retries = [line for line in gw.log().splitlines() if "event=upstream.retry" in line]
                assert len(retries) == round_ + 1 and f"node={target}" in retries[-1], retries
                report("device_fault_other_replica", stream=stream, served_after_s=clock.elapsed())
            # Counted once: one request.done line per request, the retried ones included.
            assert gw.log().count("event=request.done request_id=faulted-0 ") == 1


async def test_a_device_fault_on_the_only_replica_waits_for_its_recovery(
    tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession
) -> None:
    with run_neuron(tmp_path, faulty_neuron_toml(tiny_model)) as neuron:
        wait_model_status(neuron.url, MODEL)
        # The model reloads within first_byte_timeout_s (the chaos gateway's 10 s) on a quiet machine; give it more.
        toml = chaos_gateway_toml({"n": neuron.url}, first_byte_timeout_s=MARGIN_S * 4)
        with run_gateway(tmp_path, toml, wait_healthy=1) as gw:
            for stream in (True, False):
                request = body(f"recover {stream}")
                expected = await direct(http, neuron, request)
                arm(neuron.url)
                clock = Clock()
                assert await through(http, gw.url, request, f"recovered-{stream}", stream=stream) == expected
                report("device_fault_only_replica", stream=stream, served_after_s=clock.elapsed())
                wait_model_status(neuron.url, MODEL)
            assert gw.log().count("event=upstream.await_recovery") == 2
            assert neuron.log().count("event=model.recovered") == 2


async def test_a_request_waiting_on_a_frozen_neuron_moves_once_the_poller_loses_it(
    tmp_path: Path, tiny_model: Path, http: aiohttp.ClientSession
) -> None:
    toml = neuron_toml(tiny_model)
    with run_neuron(tmp_path, toml) as a, run_neuron(tmp_path, toml) as b:
        neurons = {"a": a, "b": b}
        for neuron in neurons.values():
            wait_model_status(neuron.url, MODEL)
        # Timeouts far beyond the poller's verdict (2 polls of at most 2 s): what moves the request is the poller.
        slow = {"stream_idle_timeout_s": 120.0, "first_byte_timeout_s": 120.0}
        with run_gateway(
            tmp_path, chaos_gateway_toml({n: d.url for n, d in neurons.items()}, **slow), wait_healthy=2
        ) as gw:
            for round_, stream in enumerate((True, False)):
                await through(http, gw.url, body(f"warm {round_}"), f"warm-{round_}", stream=False)
                last = served_by(gw, f"warm-{round_}")
                target = "b" if last == "a" else "a"
                request = body(f"frozen {round_}")
                expected = await direct(http, neurons[last], request)
                stop(neurons[target].proc.pid)
                try:
                    clock = Clock()
                    content = await through(http, gw.url, request, f"frozen-{round_}", stream=stream)
                    elapsed = clock.elapsed()
                finally:
                    resume(neurons[target].proc.pid)
                assert content == expected
                assert served_by(gw, f"frozen-{round_}") == last
                assert elapsed < 60, elapsed  # its own timeouts are 120 s
                assert f"event=upstream.node_lost request_id=- node={target}" in gw.log()
                report("frozen_neuron_request_moved", stream=stream, served_after_s=elapsed)
                wait_model_status(neurons[target].url, MODEL)
                await _healthy_again(http, gw.url, target)


async def _healthy_again(http: aiohttp.ClientSession, url: str, node: str) -> None:
    import asyncio

    for _ in range(300):
        async with http.get(f"{url}/health") as resp:
            if (await resp.json())["neurons"][node]["healthy"]:
                return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{node} never healthy again")
