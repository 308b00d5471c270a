"""Start a real `cortex serve` process (and fake neurons) on loopback for tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.procs import (
    Daemon,
    cpu_neuron_toml,
    free_port,
    get_json,
    run_neuron,
    spawn,
    wait_http,
    wait_model_status,
)


@dataclass
class GatewayDaemon(Daemon):
    metrics_url: str = ""
    config_path: Path | None = None

    def state(self) -> dict[str, Any]:
        return get_json(f"{self.url}/admin/state")

    def metrics(self) -> str:
        import urllib.request

        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=5) as resp:
            return resp.read().decode()


def cortex_toml(
    neurons: dict[str, str],
    *,
    models_config: str | None = "models.toml",
    strategy: str = "lru",
    min_residency_s: float = 0.0,
    poll_interval_s: float = 0.2,
    unhealthy_after: int = 2,
    keepalive_interval_s: float = 0.2,
    defrag_after_cycles: int = 0,
    preload_pinned: bool = False,
    extra_gateway: str = "",
) -> str:
    """A cortex.toml for tests: fast polling, no residency by default, listen set by the launcher."""
    lines = [f'models_config = "{models_config}"'] if models_config else []
    lines += [
        "[gateway]",
        f"keepalive_interval_s = {keepalive_interval_s}",
        "retry_after_s = 2",
        extra_gateway,
        "[poll]",
        f"interval_s = {poll_interval_s}",
        "timeout_s = 2",
        f"unhealthy_after = {unhealthy_after}",
        "[eviction]",
        f'strategy = "{strategy}"',
        f"min_residency_s = {min_residency_s}",
        f"defrag_after_cycles = {defrag_after_cycles}",
        "[load]",
        "poll_interval_s = 0.05",
        "timeout_s = 120",
        f"preload_pinned = {'true' if preload_pinned else 'false'}",
    ]
    for name, url in neurons.items():
        lines += ["[[neurons]]", f'name = "{name}"', f'endpoint = "{url}"']
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def run_gateway(
    tmp: Path,
    config_toml: str,
    models_toml: str | None = None,
    *,
    env: dict[str, str] | None = None,
    wait_healthy: int = 0,
) -> Iterator[GatewayDaemon]:
    """A real `cortex serve` process; `wait_healthy`: wait until that many neurons are healthy."""
    port, metrics_port = free_port(), free_port()
    cfg = tmp / f"cortex-{port}.toml"
    cfg.write_text(config_toml)
    if models_toml is not None:
        (tmp / "models.toml").write_text(models_toml)
    log_path = tmp / f"cortex-{port}.log"
    args = [sys.executable, "-m", "cortex.cli.cortex_cmd", "serve", "--config", str(cfg)]
    full_env = {
        "CORTEX_GATEWAY__LISTEN": f"127.0.0.1:{port}",
        "CORTEX_GATEWAY__METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
        **(env or {}),
    }
    proc = spawn(args, log_path, full_env)
    daemon = GatewayDaemon(proc, f"http://127.0.0.1:{port}", log_path, f"http://127.0.0.1:{metrics_port}", cfg)
    try:
        wait_http(f"{daemon.url}/health", proc, log_path, timeout=30)
        if wait_healthy:
            wait_until(lambda: get_json(f"{daemon.url}/health")["healthy_neurons"] >= wait_healthy, timeout=30)
        yield daemon
    finally:
        daemon.stop()


@contextlib.contextmanager
def run_fake_neuron(tmp: Path, spec: dict[str, Any], *, port: int | None = None) -> Iterator[Daemon]:
    """A fake neuron process (tests/support/fake_neuron.py) with the given spec."""
    port = port or free_port()
    spec_path = tmp / f"fake-{port}.json"
    spec_path.write_text(json.dumps(spec))
    log_path = tmp / f"fake-{port}.log"
    args = [sys.executable, "-m", "tests.support.fake_neuron", "--port", str(port), "--spec", str(spec_path)]
    proc = spawn(args, log_path)
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_http(f"{daemon.url}/version", proc, log_path, timeout=30)
        yield daemon
    finally:
        daemon.stop()


class _Poll:
    """A condition polled until a deadline: what `wait_until` and `eventually` share (they differ in how they sleep)."""

    def __init__(self, predicate: Any, timeout: float, message: str) -> None:
        self.predicate, self.timeout, self.message = predicate, timeout, message
        self.deadline = time.monotonic() + timeout
        self.value: Any = None
        self.last_exc: Exception | None = None

    def met(self) -> bool:
        """Check once: True when the predicate returned something truthy (kept in `value`); TimeoutError when late."""
        if time.monotonic() >= self.deadline:
            raise TimeoutError(f"condition not met within {self.timeout}s {self.message} (last error: {self.last_exc})")
        try:
            self.value = self.predicate()
        except Exception as exc:  # a daemon not answering yet is what we are waiting out
            self.last_exc = exc
            return False
        return bool(self.value)


def wait_until(predicate: Any, timeout: float = 30.0, interval: float = 0.05, message: str = "") -> Any:
    """Poll `predicate` until it returns something truthy; that value, or TimeoutError."""
    poll = _Poll(predicate, timeout, message)
    while not poll.met():
        time.sleep(interval)
    return poll.value


async def eventually(predicate: Any, timeout: float = 30.0, interval: float = 0.05, message: str = "") -> Any:
    """`wait_until` for async tests: sleeps without blocking the event loop (sockets must close meanwhile)."""
    poll = _Poll(predicate, timeout, message)
    while not poll.met():  # noqa: ASYNC110  (the condition is another process's state: nothing to await)
        await asyncio.sleep(interval)
    return poll.value


@dataclass
class RealFleet:
    gateway: GatewayDaemon
    neuron: Daemon


@contextlib.contextmanager
def run_single_model_fleet(
    tmp: Path, model_id: str, model_dir: Path, gateway_toml: Callable[[dict[str, str]], str] | None = None
) -> Iterator[RealFleet]:
    """One real neuron serving one local model on its CPU, and one real gateway in front of it.

    `gateway_toml` makes the gateway's cortex.toml from {node name: neuron URL} (default: `cortex_toml`'s).
    """
    with run_neuron(tmp, cpu_neuron_toml(model_dir, model_id)) as neuron:
        wait_model_status(neuron.url, model_id)
        neurons = {"real": neuron.url}
        toml = gateway_toml(neurons) if gateway_toml else cortex_toml(neurons, models_config=None)
        with run_gateway(tmp, toml, wait_healthy=1) as gateway:
            yield RealFleet(gateway, neuron)
