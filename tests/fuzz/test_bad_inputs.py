"""The inputs that once took a model down or got a non-JSON answer, each pinned to the answer it must get now.

Every one is sent to the neuron directly and through the gateway where the route exists on both;
after each, the served model must still be loaded with no device fault counted (fuzz_fleet.model_problems).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from tests.fuzz.conftest import SERVED, FuzzFleet
from tests.fuzz.harness import envelope_problem

CHAT = "/v1/chat/completions"


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}


def deep_json(levels: int) -> bytes:
    body = chat(stream=True)
    return json.dumps(body)[:-1].encode() + b', "x": ' + b"[" * levels + b"]" * levels + b"}"


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, bytes, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers={"Content-Type": "application/json", **(headers or {})}) as resp:
        return resp.status, await resp.read(), resp.headers


def assert_error(status: int, raw: bytes, expected: set[int], dialect: str = "openai") -> None:
    assert status in expected, f"status {status}: {raw[:300]!r}"
    problem = envelope_problem(json.loads(raw), dialect)
    assert problem is None, f"{problem}: {raw[:300]!r}"


def bases(fleet: FuzzFleet) -> list[str]:
    return [fleet.neuron.url, fleet.gateway.url]


# (route, body, statuses it may get): the model must never be harmed, whichever status the server chose.
BAD_REQUESTS: list[tuple[str, dict[str, Any], set[int]]] = [
    ("/v1/completions", {"model": SERVED, "prompt": [999999], "max_tokens": 2}, {400}),
    ("/v1/completions", {"model": SERVED, "prompt": [-1], "max_tokens": 2}, {400}),
    ("/v1/completions", {"model": SERVED, "prompt": [2**40], "max_tokens": 2}, {400}),
    ("/v1/completions", {"model": SERVED, "prompt": [999999], "max_tokens": 2, "stream": True}, {400}),
    (CHAT, chat(top_p=1e-300), {200, 400}),
    (CHAT, chat(top_p=1e-45), {200, 400}),
    (CHAT, chat(repetition_penalty=1e-300), {200, 400}),
    (CHAT, chat(repetition_penalty=1e-300, stream=True), {200, 400}),
    (CHAT, chat(min_p=1e-300, temperature=1e-300), {200, 400}),
    (CHAT, chat(seed=2**64), {400}),
    (CHAT, chat(seed=2**63), {200, 400}),
    (CHAT, chat(top_k=2**63), {400}),
    (CHAT, chat(top_k=2**64, temperature=0.7), {400}),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": [], "text": "x"}]}]), {400}),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": {"a": 1}, "text": "x"}]}]), {400}),
]


@pytest.mark.parametrize(
    ("route", "body", "expected"), BAD_REQUESTS, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD_REQUESTS)]
)
async def test_bad_values_fail_only_their_request(
    fuzz_fleet: FuzzFleet, fuzz_http: aiohttp.ClientSession, route: str, body: dict[str, Any], expected: set[int]
):
    for base in bases(fuzz_fleet):
        status, raw, _ = await post(fuzz_http, base + route, body)
        if status >= 400:
            assert_error(status, raw, expected)
        else:
            assert status in expected, raw[:300]
            assert b'"error"' not in raw, raw[:300]  # a stream that started must not end in an error event
        assert fuzz_fleet.model_problems() == [], f"{base}{route} {body}"


async def test_anthropic_content_block_with_a_list_type_is_a_400(
    fuzz_fleet: FuzzFleet, fuzz_http: aiohttp.ClientSession
):
    for block_type in ([], {"a": 1}):
        body = {"model": SERVED, "max_tokens": 2, "messages": [{"role": "user", "content": [{"type": block_type}]}]}
        status, raw, _ = await post(fuzz_http, f"{fuzz_fleet.gateway.url}/v1/messages", body)
        assert_error(status, raw, {400}, "anthropic")


@pytest.mark.parametrize("levels", [200, 300, 5000])
async def test_deeply_nested_json_is_a_400(fuzz_fleet: FuzzFleet, fuzz_http: aiohttp.ClientSession, levels: int):
    for base in bases(fuzz_fleet):
        status, raw, _ = await post(fuzz_http, base + CHAT, deep_json(levels))
        assert_error(status, raw, {400})
    status, raw, _ = await post(fuzz_http, f"{fuzz_fleet.gateway.url}/v1/messages", deep_json(levels))
    assert_error(status, raw, {400}, "anthropic")


async def test_nul_byte_in_a_load_path_is_a_400(fuzz_fleet: FuzzFleet, fuzz_http: aiohttp.ClientSession):
    status, raw, _ = await post(
        fuzz_http, f"{fuzz_fleet.neuron.url}/models/load", {"model_id": "x", "source": "/tmp/a\x00b"}
    )
    assert_error(status, raw, {400})
    status, raw, _ = await post(fuzz_http, f"{fuzz_fleet.neuron.url}/models/load", {"model_id": "/tmp/a\x00b"})
    assert_error(status, raw, {400})


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "compress", "gzip, br"])
async def test_a_body_that_is_not_in_its_encoding_gets_json(
    fuzz_fleet: FuzzFleet, fuzz_http: aiohttp.ClientSession, encoding: str
):
    for base in bases(fuzz_fleet):
        status, raw, _ = await post(fuzz_http, base + CHAT, b"not compressed", {"Content-Encoding": encoding})
        assert_error(status, raw, {400} if encoding in ("gzip", "deflate") else {415})
    status, raw, _ = await post(
        fuzz_http, f"{fuzz_fleet.gateway.url}/v1/messages", b"not compressed", {"Content-Encoding": encoding}
    )
    assert_error(status, raw, {400} if encoding in ("gzip", "deflate") else {415}, "anthropic")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies_are_decoded(fuzz_fleet: FuzzFleet, fuzz_http: aiohttp.ClientSession, encoding: str):
    plain = json.dumps(chat()).encode()
    packed = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    for base in bases(fuzz_fleet):
        status, raw, _ = await post(fuzz_http, base + CHAT, packed, {"Content-Encoding": encoding})
        assert status == 200, raw[:300]


async def test_a_compressed_body_is_bounded_after_decoding(fuzz_fleet: FuzzFleet, fuzz_http: aiohttp.ClientSession):
    bomb = gzip.compress(b" " * (40 * 1024 * 1024))  # 40 MB of spaces in ~40 kB: over both daemons' limits
    for base in bases(fuzz_fleet):
        status, raw, _ = await post(fuzz_http, base + CHAT, bomb, {"Content-Encoding": "gzip"})
        assert_error(status, raw, {413})


async def test_oversized_headers_and_bodies_get_json(fuzz_fleet: FuzzFleet, fuzz_http: aiohttp.ClientSession):
    for base in bases(fuzz_fleet):
        status, raw, _ = await post(fuzz_http, base + CHAT, chat(), {"X-Big": "a" * 20000})
        assert_error(status, raw, {431}, "either")
        async with fuzz_http.get(base + "/health", headers={f"X-H{i}": "v" for i in range(200)}) as resp:
            assert_error(resp.status, await resp.read(), {431}, "either")
    status, raw, _ = await post(fuzz_http, fuzz_fleet.neuron.url + CHAT, b" " * (9 * 1024 * 1024))
    assert_error(status, raw, {413})
    status, raw, _ = await post(fuzz_http, fuzz_fleet.gateway.url + "/v1/messages", b" " * (33 * 1024 * 1024))
    assert_error(status, raw, {413}, "anthropic")


async def test_no_version_banner(fuzz_fleet: FuzzFleet, fuzz_http: aiohttp.ClientSession):
    for url in (
        f"{fuzz_fleet.neuron.url}/health",
        f"{fuzz_fleet.gateway.url}/health",
        f"{fuzz_fleet.gateway.metrics_url}/metrics",
        f"{fuzz_fleet.gateway.url}/nope",
    ):
        async with fuzz_http.get(url) as resp:
            assert not any(ch.isdigit() for ch in resp.headers.get("Server", "")), resp.headers.get("Server")


def _http_request(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    status_line = await reader.readline()
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return int(status_line.split()[1]), await reader.readexactly(length)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br"])
async def test_a_bad_body_leaves_the_keep_alive_connection_usable(fuzz_fleet: FuzzFleet, encoding: str):
    """Two pipelined requests on one connection: the corrupt one gets its error, the next one its answer."""
    good = json.dumps({"model": SERVED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    for base in bases(fuzz_fleet):
        url = urlsplit(base)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            writer.write(
                _http_request(CHAT, b"garbage", f"Content-Encoding: {encoding}\r\n") + _http_request(CHAT, good)
            )
            await writer.drain()
            first = await asyncio.wait_for(_read_response(reader), 30)
            second = await asyncio.wait_for(_read_response(reader), 30)
        finally:
            writer.close()
        assert first[0] == (415 if encoding == "br" else 400), first
        assert second[0] == 200, second
