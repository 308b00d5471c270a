"""The gateway hurt on purpose: restarted under load, and 200 clients that open streams and never read.

- restart under load: while it is down clients cannot connect (nothing else); once the new process
  listens it rebuilds the fleet from the neurons and serves again, with no answer above 499 except
  a bounded 503 while the fleet is not yet known;
- non-reading clients: their streams cost the gateway a bounded buffer each (< 50 MB for 200), they
  are cut off after `client_write_timeout_s`, every neuron stream behind them is cancelled, and the
  memory comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.chaos.conftest import CLIENT_WRITE_S, MARGIN_S, Clock, chaos_gateway_toml, neuron_toml, report, rss_mb
from tests.support.gateway_procs import GatewayDaemon, eventually, run_fake_neuron
from tests.support.procs import Daemon, free_port, get_json, run_neuron, spawn, wait_http, wait_model_status

MODEL = "tiny"
SHORT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
# What a non-reading client sends: a stream from the fake neuron's model.
NEVER_READ_BODY = b'{"model": "m", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'


@contextlib.contextmanager
def gateway_on(tmp: Path, toml: str, port: int, metrics_port: int, tag: str) -> Iterator[GatewayDaemon]:
    """A gateway process on a fixed port (so a restart comes back on the same address)."""
    cfg = tmp / f"cortex-{tag}.toml"
    cfg.write_text(toml)
    log_path = tmp / f"cortex-{tag}.log"
    env = {"CORTEX_GATEWAY__LISTEN": f"127.0.0.1:{port}", "CORTEX_GATEWAY__METRICS_LISTEN": f"127.0.0.1:{metrics_port}"}
    proc = spawn([sys.executable, "-m", "cortex.cli.cortex_cmd", "serve", "--config", str(cfg)], log_path, env)
    daemon = GatewayDaemon(proc, f"http://127.0.0.1:{port}", log_path, f"http://127.0.0.1:{metrics_port}", cfg)
    try:
        wait_http(f"{daemon.url}/health", proc, log_path, timeout=60)
        yield daemon
    finally:
        daemon.stop()


@contextlib.asynccontextmanager
async def long_streams_behind_gateway(tmp: Path, events: int, tag: str) -> AsyncIterator[tuple[Daemon, GatewayDaemon]]:
    """A fake neuron that streams `events` events at once per request, behind a gateway it is healthy in."""
    spec = {"name": "a", "devices": [{"vram_total_mb": 24000}], "preloaded": ["m"], "stream_events": events}
    spec["event_interval_s"] = 0
    with run_fake_neuron(tmp, spec) as fake:
        # The fake answers many streams at once on a busy machine: give it time to start each one.
        toml = chaos_gateway_toml({"a": fake.url}, stream_idle_timeout_s=60).replace(
            "timeout_s = 2\n", "timeout_s = 30\n", 1
        )
        with gateway_on(tmp, toml, free_port(), free_port(), tag) as gateway:
            await eventually(lambda: get_json(f"{gateway.url}/health")["healthy_neurons"] == 1, timeout=60)
            yield fake, gateway


async def test_gateway_restart_under_load(tmp_path: Path, tiny_model: Path) -> None:
    port, metrics_port = free_port(), free_port()
    outcomes: list[tuple[float, str]] = []
    running = True

    async def client(http: aiohttp.ClientSession, url: str) -> None:
        while running:
            try:
                async with http.post(f"{url}/v1/chat/completions", json=SHORT) as resp:
                    await resp.read()
                    outcomes.append((time.monotonic(), str(resp.status)))
            except aiohttp.ClientError:
                outcomes.append((time.monotonic(), "no connection"))
                await asyncio.sleep(0.05)

    with run_neuron(tmp_path, neuron_toml(tiny_model)) as neuron:
        wait_model_status(neuron.url, MODEL)
        toml = chaos_gateway_toml({"n": neuron.url})
        # A new connection per request: a pooled one to the old process would fail once after the restart.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            with gateway_on(tmp_path, toml, port, metrics_port, "first") as first:
                await eventually(lambda: get_json(f"{first.url}/health")["healthy_neurons"] == 1, timeout=60)
                load = [asyncio.create_task(client(http, first.url)) for _ in range(8)]
                await asyncio.sleep(2)
                first.stop()
            down_at = time.monotonic()
            with gateway_on(tmp_path, toml, port, metrics_port, "second") as second:
                up_at = time.monotonic()
                await eventually(lambda: any(s == "200" and t > up_at for t, s in outcomes), timeout=60)
                served_at = next(t for t, s in outcomes if s == "200" and t > up_at)
                rebuilt = await eventually(
                    lambda: get_json(f"{second.url}/health")["healthy_neurons"] == 1 and time.monotonic(), timeout=60
                )
                await asyncio.sleep(1)
                running = False  # stop the clients while the second gateway still serves: its own stop is no fault
                await asyncio.gather(*load)
    statuses = {s for _, s in outcomes}
    assert statuses <= {"200", "503", "no connection"}, statuses  # never a 500 or a hang (503: draining, no fleet yet)
    last = [s for _, s in outcomes[-8:]]
    assert last == ["200"] * len(last), last  # serving again, steadily
    report(
        "gateway_restart",
        down_s=up_at - down_at,
        served_after_listen_s=served_at - up_at,
        fleet_rebuilt_after_listen_s=rebuilt - up_at,
        requests=len(outcomes),
        refused_while_down=sum(1 for _, s in outcomes if s == "no connection"),
    )


def open_and_never_read(url: str, body: bytes = NEVER_READ_BODY) -> socket.socket:
    """A client that sends a streaming request and then reads nothing (a tiny receive window)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    return sock


@pytest.mark.timeout(600)
async def test_200_clients_that_never_read(tmp_path: Path) -> None:
    async with long_streams_behind_gateway(tmp_path, 600, "readers") as (fake, gateway):
        pid = gateway.proc.pid
        baseline = rss_mb(pid)
        clock = Clock()
        sockets = [open_and_never_read(gateway.url) for _ in range(200)]

        def settled() -> bool:
            """Every request reached the neuron and none is in flight any more: finished or cut off."""
            relayed = len(get_json(f"{fake.url}/_fake/log", timeout=60)["requests"]) >= 200
            nodes = get_json(f"{gateway.url}/admin/state", timeout=60)["nodes"]
            return relayed and all(m["in_flight"] == 0 for n in nodes for m in n["models"])

        try:
            peak = baseline
            while not settled():
                peak = max(peak, rss_mb(pid))
                assert clock.elapsed() < CLIENT_WRITE_S + MARGIN_S * 8, "streams still pinned"
                await asyncio.sleep(0.2)
            settled_after = clock.elapsed()
            cut = get_json(f"{fake.url}/_fake/log", timeout=30)["cancelled"]
        finally:
            for sock in sockets:
                sock.close()
        await asyncio.sleep(1)
        after = rss_mb(pid)
    growth = peak - baseline
    assert growth < 50, f"200 non-reading clients grew the gateway by {growth:.0f} MB"
    assert after - baseline < 50
    report(
        "non_reading_clients",
        baseline_mb=baseline,
        peak_growth_mb=growth,
        after_growth_mb=after - baseline,
        settled_after_s=settled_after,
        neuron_streams_cancelled=cut,
    )


@pytest.mark.timeout(600)
async def test_a_client_that_stops_reading_is_cut_off(tmp_path: Path) -> None:
    """Streams longer than every socket buffer on the way: the gateway's writes wait, and it cuts the clients off."""
    async with long_streams_behind_gateway(tmp_path, 40000, "stalled") as (fake, gateway):
        clock = Clock()
        sockets = [open_and_never_read(gateway.url) for _ in range(4)]

        def all_cut() -> bool:  # 40,000 events cannot have finished: ended streams were cut off
            nodes = get_json(f"{gateway.url}/admin/state", timeout=30)["nodes"]
            started = len(get_json(f"{fake.url}/_fake/log", timeout=30)["requests"]) >= 4
            return started and all(m["in_flight"] == 0 for n in nodes for m in n["models"])

        try:
            await eventually(all_cut, timeout=CLIENT_WRITE_S + MARGIN_S * 4)
            cut_after = clock.elapsed()
        finally:
            for sock in sockets:
                sock.close()
        # A lease is released before its access line is written (the lines of a loop turn go out together).
        await eventually(lambda: gateway.log().count("status=499") >= 4, timeout=MARGIN_S * 2)
        log = gateway.log()
    assert log.count("status=499") >= 4 and "Traceback" not in log
    report("stalled_client", cut_off_after_s=cut_after)
