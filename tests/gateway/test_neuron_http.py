"""The gateway's HTTP client to neurons (gateway/neuron_http.py), against real aiohttp servers on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from cortex.gateway.neuron_http import (
    EventTooLarge,
    NeuronBodyError,
    NeuronClient,
    NeuronConnectError,
    NeuronReadTimeout,
    NeuronResponse,
    Timeouts,
)
from tests.support.gateway_procs import eventually
from tests.support.procs import free_port

TIMEOUTS = Timeouts(connect_s=2.0, read_s=5.0)
HEADERS = {"Content-Type": "application/json", "x-request-id": "r-1"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    """One aiohttp server with a route per test; remembers the peers and bodies it saw."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.bodies: list[bytes] = []
        self.headers: list[CIMultiDict[str]] = []
        self.cancelled = asyncio.Event()
        self.port = free_port()
        self.url = URL(f"http://127.0.0.1:{self.port}")
        self.runner: web.AppRunner | None = None

    async def start(self, handler: Handler, *, keepalive_timeout: float = 75.0) -> None:
        async def seen(request: web.Request) -> web.StreamResponse:
            self.peers.append(request.transport.get_extra_info("peername"))
            self.bodies.append(await request.read())
            self.headers.append(request.headers.copy())
            try:
                return await handler(request)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise

        app = web.Application()
        app.router.add_post("/{tail:.*}", seen)
        self.runner = web.AppRunner(app, handler_cancellation=True, keepalive_timeout=keepalive_timeout)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    yield s
    await s.stop()


@pytest.fixture
async def client() -> AsyncIterator[NeuronClient]:
    c = NeuronClient()
    yield c
    c.close()


async def first_event_then(
    client: NeuronClient, url: URL, timeouts: Timeouts, error: type[Exception]
) -> NeuronResponse:
    """Open a stream, read its first event (`data: 1`), and expect the next read to fail with `error`."""
    response = await client.post(url, b"{}", HEADERS, timeouts)
    assert await response.readuntil(b"\n\n", 1000) == b"data: 1\n\n"
    with pytest.raises(error):
        await response.readuntil(b"\n\n", 1000)
    return response


async def json_reply(request: web.Request) -> web.StreamResponse:
    return web.json_response({"path": request.path}, headers={"Retry-After": "3"})


async def test_a_whole_answer_is_read_and_its_connection_reused(server: Server, client: NeuronClient) -> None:
    await server.start(json_reply)
    for n in range(3):
        response = await client.post(server.url / "v1/x", b'{"n": %d}' % n, HEADERS, TIMEOUTS)
        assert response.status == 200
        assert response.headers["retry-after"] == "3"
        assert await response.read() == b'{"path": "/v1/x"}'
        assert await response.read() == b'{"path": "/v1/x"}'  # read twice: the same body
        response.release()
    assert server.bodies == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert len(set(server.peers)) == 1  # one connection for all three
    assert server.headers[0]["x-request-id"] == "r-1"
    assert server.headers[0]["Host"] == f"127.0.0.1:{server.port}"


async def test_an_error_status_is_an_answer_not_an_exception(server: Server, client: NeuronClient) -> None:
    async def refuse(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "no"}}, status=503)

    await server.start(refuse)
    response = await client.post(server.url / "v1/x", b"{}", HEADERS, TIMEOUTS)
    assert (response.status, await response.read()) == (503, b'{"error": {"message": "no"}}')
    response.release()


async def test_a_stream_is_read_event_by_event_as_it_arrives(server: Server, client: NeuronClient) -> None:
    step = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\ndata: ")  # an event split across writes
        await step.wait()
        await response.write(b"2\n")
        await response.write(b"\ndata: tail")
        await response.write_eof()
        return response

    await server.start(stream)
    response = await client.post(server.url / "s", b"{}", HEADERS, TIMEOUTS)
    assert await response.readuntil(b"\n\n", 1000) == b"data: 1\n\n"
    second = asyncio.create_task(response.readuntil(b"\n\n", 1000))
    await asyncio.sleep(0.05)
    assert not second.done()  # waits for the rest of the event
    step.set()
    assert await second == b"data: 2\n\n"
    assert await response.readuntil(b"\n\n", 1000) == b"data: tail"  # the body's end: what is left
    assert await response.readuntil(b"\n\n", 1000) == b""
    response.release()


async def test_a_large_body_is_read_whole_and_the_connection_still_reused(server: Server, client: NeuronClient) -> None:
    big = b"x" * (3 << 20)  # far over the read-pause mark

    async def large(request: web.Request) -> web.StreamResponse:
        return web.Response(body=big)

    await server.start(large)
    for _ in range(2):
        response = await client.post(server.url / "b", b"{}", HEADERS, TIMEOUTS)
        assert await response.read() == big
        response.release()
    assert len(set(server.peers)) == 1


async def test_an_event_over_the_size_limit_is_refused(server: Server, client: NeuronClient) -> None:
    async def long_event(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"data: " + b"y" * 5000 + b"\n\n")

    await server.start(long_event)
    response = await client.post(server.url / "s", b"{}", HEADERS, TIMEOUTS)
    with pytest.raises(EventTooLarge):
        await response.readuntil(b"\n\n", 1000)
    response.close()


async def test_nothing_listening_is_a_connect_error(client: NeuronClient) -> None:
    with pytest.raises(NeuronConnectError):
        await client.post(URL(f"http://127.0.0.1:{free_port()}/v1/x"), b"{}", HEADERS, TIMEOUTS)


async def test_a_connection_closed_before_the_answer_is_a_connect_error(server: Server, client: NeuronClient) -> None:
    async def hang_up(request: web.Request) -> web.StreamResponse:
        request.transport.close()
        await asyncio.sleep(1)
        raise AssertionError("unreachable")

    await server.start(hang_up)
    with pytest.raises(NeuronConnectError):
        await client.post(server.url / "x", b"{}", HEADERS, TIMEOUTS)


async def test_an_answer_that_breaks_off_is_a_body_error(server: Server, client: NeuronClient) -> None:
    async def break_off(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await asyncio.sleep(0.05)
        request.transport.close()
        return response

    await server.start(break_off)
    response = await first_event_then(client, server.url / "s", TIMEOUTS, NeuronBodyError)
    response.release()


async def test_silence_before_the_headers_or_between_events_times_out(server: Server, client: NeuronClient) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        if request.path == "/head":
            await asyncio.sleep(2)
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await asyncio.sleep(2)
        return response

    await server.start(slow)
    quick = Timeouts(connect_s=2.0, read_s=0.2)
    with pytest.raises(NeuronReadTimeout):
        await client.post(server.url / "head", b"{}", HEADERS, quick)
    response = await first_event_then(client, server.url / "gap", quick, NeuronReadTimeout)
    response.close()


async def test_closing_a_response_aborts_the_neurons_handler(server: Server, client: NeuronClient) -> None:
    async def forever(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        while True:
            await response.write(b"data: tick\n\n")
            await asyncio.sleep(0.02)

    await server.start(forever)
    response = await client.post(server.url / "s", b"{}", HEADERS, TIMEOUTS)
    assert await response.readuntil(b"\n\n", 1000) == b"data: tick\n\n"
    reader = asyncio.create_task(response.readuntil(b"never", 1 << 20))
    await asyncio.sleep(0.05)
    response.close()
    with pytest.raises(NeuronBodyError):
        await reader  # a reader waiting when the response is closed hears it at once
    await asyncio.wait_for(server.cancelled.wait(), 5)


async def test_a_connection_the_neuron_dropped_while_idle_is_not_reused(server: Server, client: NeuronClient) -> None:
    await server.start(json_reply, keepalive_timeout=0.1)
    first = await client.post(server.url / "a", b"{}", HEADERS, TIMEOUTS)
    await first.read()
    first.release()
    await eventually(lambda: not any(client._idle.values()))  # the server closed it; the pool let it go
    second = await client.post(server.url / "b", b"{}", HEADERS, TIMEOUTS)
    assert await second.read() == b'{"path": "/b"}'
    second.release()
    assert len(set(server.peers)) == 2


async def test_a_header_value_with_a_line_break_is_refused(server: Server, client: NeuronClient) -> None:
    await server.start(json_reply)
    with pytest.raises(ValueError, match="line break"):
        await client.post(server.url / "x", b"{}", {"x-request-id": "a\r\nInjected: 1"}, TIMEOUTS)
    assert server.bodies == []
