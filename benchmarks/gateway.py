"""Gateway overhead: what cortex adds on top of calling a neuron directly. Prints one JSON object.

Against a minimal fixed-response upstream (a raw asyncio HTTP/1.1 server speaking just enough of
the neuron contract), side by side in one run:

- added latency at concurrency 1: p50/p99 through the gateway minus p50/p99 direct (`wrk --latency`);
- requests/s at concurrency 32 with the gateway pinned to one core (`taskset -c 0`), and direct;
- added time to the first streamed byte: a stream's first `data:` event, through the gateway vs
  direct (a raw-socket client, one request at a time — wrk only sees whole responses); once for
  streams sent at once, once for streams that pause 20 ms after their first event (then every
  process has gone idle before the next request, and waking idle vCPUs is part of the cost);
- CPU time the gateway process spends per request (from /proc), which bounds one core's rate
  even when other work on the machine disturbs the wall-clock figures.

The upstream, wrk and the first-byte client share the other core, so the gateway's core is its own.
Needs `wrk` (Debian: apt-get install wrk) and `taskset` (util-linux).

    python benchmarks/gateway.py [--seconds 5] [--log-level info]
    python benchmarks/gateway.py --baseline /tmp/old-checkout --rounds 3   # two gateways, one run

With --baseline (a checkout of another commit, e.g. `git archive REV src | tar -x -C /tmp/old-checkout`),
both gateways are measured against the same upstream, alternating, and `this_over_baseline` gives
each figure of this gateway over the baseline's.

Every run also measures `reach`: the least an aiohttp gateway can do, a bare aiohttp server that
forwards each request with aiohttp's client and returns the answer (no routing, no accounting, no
log). `this_over_reach` puts the gateway against it, so the figures read the same on a fast
machine and a slow one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

MODEL = "bench"
CHAT_BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8})
STREAM_BODY = json.dumps({**json.loads(CHAT_BODY), "stream": True})
# The same with a pause: the upstream holds the rest of the stream this long after its first event,
# as a model does between tokens. Every process on the path has then gone idle before the next request.
PAUSED_STREAM_BODY = json.dumps({**json.loads(STREAM_BODY), "bench_pause": True})
STREAM_GAP_S = 0.02

# ---- the fixed-response upstream -------------------------------------------------------------------
_REPLY = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }
).encode()
_CONTROL = {
    b"/version": json.dumps({"version": "bench"}).encode(),
    b"/discovery": json.dumps(
        {"hostname": "bench", "devices": [{"index": 0, "name": "bench", "vram_total_mb": 80000, "kind": "cuda"}]}
    ).encode(),
    b"/health": json.dumps(
        {
            "devices": [{"index": 0, "vram_used_mb": 1000, "vram_free_mb": 79000, "vram_total_mb": 80000}],
            "models": [{"id": MODEL, "status": "loaded", "in_flight": 0, "queue_depth": 0}],
        }
    ).encode(),
    b"/models": json.dumps(
        [{"id": MODEL, "status": "loaded", "devices": [0], "vram_used_mb": 1000, "limit": {"context": 4096}}]
    ).encode(),
}


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(delta: str | None, finish: str | None = None, usage: bool = False) -> bytes:
    chunk: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": MODEL}
    if usage:
        chunk["choices"] = []
        chunk["usage"] = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    else:
        chunk["choices"] = [{"index": 0, "delta": {"content": delta} if delta else {}, "finish_reason": finish}]
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


_STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
_STREAM_FIRST = _chunk(_sse("Hello"))
_STREAM_REST = b"".join(
    _chunk(e) for e in (_sse(" there"), _sse("!"), _sse(None, "stop"), _sse(None, usage=True), b"data: [DONE]\n\n")
) + _chunk(b"")


class Upstream(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length bodies only: the least work a server can do per request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            length = int(match.group(1)) if match else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            self.respond(head.split(b" ", 2)[1], body)

    def respond(self, path: bytes, body: bytes) -> None:
        if path == b"/v1/chat/completions":
            if b'"stream":true' in body.replace(b" ", b""):
                self.transport.write(_STREAM_HEAD + _STREAM_FIRST)
                if b"bench_pause" in body:
                    asyncio.get_running_loop().call_later(STREAM_GAP_S, self._finish_stream)
                else:
                    self._finish_stream()
                return
            payload = _REPLY
        else:
            payload = _CONTROL.get(path, b"{}")
        head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload)
        self.transport.write(head + payload)

    def _finish_stream(self) -> None:
        if not self.transport.is_closing():
            self.transport.write(_STREAM_REST)


async def _serve_upstream(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Upstream, "127.0.0.1", port, backlog=1024, reuse_address=True)
    async with server:
        await server.serve_forever()


# ---- measurement helpers --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(url)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not match:
        raise ValueError(text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def run_wrk(url: str, connections: int, seconds: int, lua: Path, cpu: str) -> dict[str, float]:
    args = ["taskset", "-c", cpu, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(lua), url]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        result[f"p{pct}_ms"] = _ms(re.search(rf"\s{pct}%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    result["non_2xx"] = float(errors.group(1)) if errors else 0.0
    return result


def first_byte_ms(host: str, port: int, requests: int, body_text: str = STREAM_BODY) -> dict[str, float]:
    """Time from sending a streaming request to receiving its first `data:` event, one at a time."""
    body = body_text.encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    samples = []
    with socket.create_connection((host, port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(requests):
            started = time.perf_counter()
            sock.sendall(head + body)
            received = b""
            while b"data:" not in received:
                received += sock.recv(65536)
            samples.append((time.perf_counter() - started) * 1000)
            while not received.endswith(b"0\r\n\r\n"):  # drain to the terminating chunk
                received += sock.recv(65536)
    samples.sort()
    return {"p50_ms": statistics.median(samples), "p99_ms": samples[int(len(samples) * 0.99) - 1]}


def _write_lua(directory: Path) -> Path:
    lua = directory / "post.lua"
    body = CHAT_BODY.replace("\\", "\\\\").replace('"', '\\"')
    lua.write_text(f'wrk.method = "POST"\nwrk.body = "{body}"\nwrk.headers["Content-Type"] = "application/json"\n')
    return lua


def _gateway_config(directory: Path, upstream_port: int, port: int, log_level: str) -> Path:
    cfg = directory / "cortex.toml"
    cfg.write_text(
        f'[gateway]\nlisten = "127.0.0.1:{port}"\nmetrics_listen = "127.0.0.1:{free_port()}"\n'
        f'log_level = "{log_level}"\n[poll]\ninterval_s = 2\n'
        f'[[neurons]]\nname = "bench"\nendpoint = "http://127.0.0.1:{upstream_port}"\n'
    )
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--first-byte-requests", type=int, default=400)
    parser.add_argument("--log-level", default="info", help="the gateway's log level (info: one line per request)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (e.g. a git worktree of an older commit): its gateway is measured too, in the same "
        "run, against the same upstream, alternating with this one",
    )
    parser.add_argument("--rounds", type=int, default=1, help="measure each gateway this many times (medians count)")
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is required (apt-get install wrk util-linux)")
    cpus = sorted(os.sched_getaffinity(0))
    gateway_cpu, other_cpu = str(cpus[0]), str(cpus[-1])
    trees: dict[str, Path | None] = {"reach": None, "this": Path(__file__).resolve().parents[1] / "src"}
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve() / "src", **trees}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        upstream_port = free_port()
        upstream_cmd = [sys.executable, __file__, "--upstream", str(upstream_port)]
        upstream = subprocess.Popen(["taskset", "-c", other_cpu, *upstream_cmd])
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
        try:
            wait_http(f"http://127.0.0.1:{upstream_port}/version")
            for _ in range(args.rounds):
                for name, src in trees.items():
                    results[name].append(_measure_gateway(args, directory, src, upstream_port, gateway_cpu, other_cpu))
        finally:
            upstream.terminate()
            upstream.wait(10)
    setup = {
        "gateway_cpu": gateway_cpu,
        "upstream_wrk_and_client_cpu": other_cpu,
        "cpus": len(cpus),
        "gateway_log_level": args.log_level,
        "seconds_per_wrk_run": args.seconds,
        "python": sys.version.split()[0],
        "event_loop": _loop_name(),
    }
    medians = {name: _medians(runs) for name, runs in results.items()}
    summary = {"setup": {**setup, "baseline": str(args.baseline), "rounds": args.rounds}, **medians}
    summary["this_over_reach"] = ratios(medians["reach"], medians["this"])
    if args.baseline is not None:
        summary["this_over_baseline"] = ratios(medians["baseline"], medians["this"])
    print(json.dumps(summary, indent=2))


def _measure_gateway(
    args: argparse.Namespace, directory: Path, src: Path | None, upstream_port: int, gateway_cpu: str, other_cpu: str
) -> dict[str, Any]:
    """Measure the cortex gateway in `src` (None: the bare aiohttp proxy, `reach`)."""
    gateway_port = free_port()
    if src is None:
        gateway_cmd = [sys.executable, __file__, "--bare-proxy", str(upstream_port), str(gateway_port)]
    else:
        cfg = _gateway_config(directory, upstream_port, gateway_port, args.log_level)
        gateway_cmd = [sys.executable, "-m", "cortex.cli.cortex_cmd", "serve", "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(src or "")}
    log = (directory / f"gateway-{gateway_port}.log").open("wb")
    proc = subprocess.Popen(["taskset", "-c", gateway_cpu, *gateway_cmd], stdout=log, stderr=log, env=env)
    try:
        wait_http(f"http://127.0.0.1:{gateway_port}/health")
        time.sleep(0.5)  # the first poll marks the upstream healthy
        return measure(args, directory, upstream_port, gateway_port, other_cpu, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


# The figures compared between two gateways: (section, key) of `measure`'s result. Above 1 is more for
# requests/s and more time for the others (so better for the first, worse for the rest).
COMPARED = {
    "gateway_one_core_rps": ("throughput_c32_rps", "gateway_one_core"),
    "gateway_one_core_rps_from_cpu_time": ("throughput_c32_rps", "gateway_one_core_rps_from_cpu_time"),
    "gateway_cpu_us_per_request": ("throughput_c32_rps", "gateway_cpu_us_per_request"),
    "added_p50_ms_c1": ("latency_c1_ms", "added_p50"),
    "added_p99_ms_c1": ("latency_c1_ms", "added_p99"),
    "added_first_byte_p50_ms": ("stream_first_byte_ms", "added_p50"),
    "added_first_byte_after_idle_p50_ms": ("stream_first_byte_after_idle_ms", "added_p50"),
}


def ratios(baseline: dict[str, Any], this: dict[str, Any]) -> dict[str, float | None]:
    """This gateway's figure over the baseline's, for each of COMPARED (None where the baseline's is 0 or absent)."""
    out: dict[str, float | None] = {}
    for name, (section, key) in COMPARED.items():
        old, new = baseline[section].get(key), this[section].get(key)
        out[name] = round(new / old, 3) if old and new is not None else None
    return out


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds as one: each figure's median over the rounds (one disturbed round moves no figure)."""
    first = runs[0]
    if isinstance(first, dict):
        return {key: _medians([run[key] for run in runs]) for key in first}
    if isinstance(first, int | float) and not isinstance(first, bool):
        median = statistics.median(runs)
        return round(median, 3) if isinstance(median, float) else median
    return first


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    args: argparse.Namespace, directory: Path, upstream_port: int, gateway_port: int, cpu: str, gateway_pid: int
) -> dict:
    lua = _write_lua(directory)
    direct_url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
    gateway_url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
    run_wrk(gateway_url, 4, 2, lua, cpu)  # warm-up: pooled connections, code paths
    first_byte_ms("127.0.0.1", gateway_port, 50)
    direct1 = run_wrk(direct_url, 1, args.seconds, lua, cpu)
    gateway1 = run_wrk(gateway_url, 1, args.seconds, lua, cpu)
    direct32 = run_wrk(direct_url, 32, args.seconds, lua, cpu)
    cpu_before = cpu_seconds(gateway_pid)
    gateway32 = run_wrk(gateway_url, 32, args.seconds, lua, cpu)
    # CPU the gateway spent per request: robust to other load on the machine, it bounds one core's rate.
    cpu_per_request = (cpu_seconds(gateway_pid) - cpu_before) / max(1.0, gateway32["rps"] * args.seconds)
    fb_direct = first_byte_ms("127.0.0.1", upstream_port, args.first_byte_requests)
    fb_gateway = first_byte_ms("127.0.0.1", gateway_port, args.first_byte_requests)
    paused_direct = first_byte_ms("127.0.0.1", upstream_port, args.first_byte_requests // 2, PAUSED_STREAM_BODY)
    paused_gateway = first_byte_ms("127.0.0.1", gateway_port, args.first_byte_requests // 2, PAUSED_STREAM_BODY)
    r = lambda x: round(x, 3)  # noqa: E731
    return {
        "latency_c1_ms": {
            "direct": {"p50": r(direct1["p50_ms"]), "p99": r(direct1["p99_ms"])},
            "gateway": {"p50": r(gateway1["p50_ms"]), "p99": r(gateway1["p99_ms"])},
            "added_p50": r(gateway1["p50_ms"] - direct1["p50_ms"]),
            "added_p99": r(gateway1["p99_ms"] - direct1["p99_ms"]),
        },
        "throughput_c32_rps": {
            "direct": round(direct32["rps"]),
            "gateway_one_core": round(gateway32["rps"]),
            "gateway_p99_ms": r(gateway32["p99_ms"]),
            "gateway_cpu_us_per_request": round(cpu_per_request * 1e6, 1),
            "gateway_one_core_rps_from_cpu_time": round(1 / cpu_per_request) if cpu_per_request else None,
            "gateway_non_2xx": int(gateway32["non_2xx"]),
        },
        "stream_first_byte_ms": {
            "direct": {"p50": r(fb_direct["p50_ms"]), "p99": r(fb_direct["p99_ms"])},
            "gateway": {"p50": r(fb_gateway["p50_ms"]), "p99": r(fb_gateway["p99_ms"])},
            "added_p50": r(fb_gateway["p50_ms"] - fb_direct["p50_ms"]),
        },
        # Streams that pause 20 ms after their first event, so every process on the path idles
        # between requests: adds the cost of waking idle vCPUs (one more process hop: more wake-ups).
        "stream_first_byte_after_idle_ms": {
            "direct": {"p50": r(paused_direct["p50_ms"]), "p99": r(paused_direct["p99_ms"])},
            "gateway": {"p50": r(paused_gateway["p50_ms"]), "p99": r(paused_gateway["p99_ms"])},
            "added_p50": r(paused_gateway["p50_ms"] - paused_direct["p50_ms"]),
        },
        "targets": {
            "added_p50_ms_max": 0.3,
            "added_p99_ms_max": 1.5,
            "gateway_one_core_rps_min": 5000,
            "added_first_byte_ms_max": 0.5,
        },
    }


async def _serve_bare_proxy(upstream_port: int, port: int) -> None:
    """`reach`: aiohttp's server and client and nothing else, the floor under any aiohttp gateway."""
    import aiohttp
    from aiohttp import web

    target = f"http://127.0.0.1:{upstream_port}"
    session = aiohttp.ClientSession()

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": "application/json"}
        async with session.post(target + request.path, data=body, headers=headers) as upstream:
            if upstream.headers.get("Content-Type") != "text/event-stream":
                return web.Response(body=await upstream.read(), status=upstream.status, content_type="application/json")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            async for data in upstream.content.iter_any():
                await response.write(data)
            return response

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_get("/health", health)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


def _run(main_coroutine: Any) -> None:
    try:
        import uvloop

        uvloop.run(main_coroutine)
    except ImportError:
        asyncio.run(main_coroutine)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--upstream":
        _run(_serve_upstream(int(sys.argv[2])))
    elif len(sys.argv) == 4 and sys.argv[1] == "--bare-proxy":
        _run(_serve_bare_proxy(int(sys.argv[2]), int(sys.argv[3])))
    else:
        main()
