"""Start real daemons on loopback for tests: free ports, readiness waits, clean shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_http(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}:\n{log_path.read_text(errors='replace')}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as resp:
            if resp.status < 500:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s:\n{log_path.read_text(errors='replace')}")


def spawn(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # No network here: hub lookups must fail fast instead of waiting on timeouts.
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    log = log_path.open("wb")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=full_env)


def cpu_neuron_toml(model_dir: Path, model_id: str = "tiny") -> str:
    """A neuron.toml that serves the local model in `model_dir` as `model_id` on the CPU, in 4 GiB."""
    return f"""
model_roots = ["{model_dir.parent}"]
[devices]
use = "cpu"
cpu_memory_mb = 4096
[[default_models]]
model_id = "{model_id}"
source = "{model_dir}"
"""


@contextlib.contextmanager
def run_neuron(
    tmp: Path, config_toml: str, *, env: dict[str, str] | None = None, port: int | None = None
) -> Iterator[Daemon]:
    """A real `neuron serve` process with the given neuron.toml text (listen is set here)."""
    port = port or free_port()
    cfg = tmp / f"neuron-{port}.toml"
    cfg.write_text(config_toml)
    log_path = tmp / f"neuron-{port}.log"
    args = [sys.executable, "-m", "cortex.cli.neuron_cmd", "serve", "--config", str(cfg)]
    args += ["--listen", f"127.0.0.1:{port}"]
    proc = spawn(args, log_path, env)
    daemon = Daemon(proc, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_http(f"{daemon.url}/version", proc, log_path)
        yield daemon
    finally:
        daemon.stop()


def get_json(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> Any:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_model_status(
    url: str, model_id: str, status: str = "loaded", timeout: float = 120.0, headers: dict[str, str] | None = None
) -> dict:
    """Poll a neuron's /models until `model_id` reaches `status`; fail early on `failed` (`headers`: its token)."""
    deadline = time.monotonic() + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        models = get_json(f"{url}/models", headers=headers)
        last = next((m for m in models if m["id"] == model_id), {})
        if last.get("status") == status:
            return last
        if last.get("status") == "failed" and status != "failed":
            raise AssertionError(f"load of {model_id} failed: {last}")
        time.sleep(0.1)
    raise TimeoutError(f"{model_id} did not reach {status}: {last}")
