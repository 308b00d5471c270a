"""`cortex up --fleet 2`: a one-machine fleet of two neurons, ports and shares chosen for the operator.

The neurons start empty (a neuron.toml with `default_models = []`), so this needs no model load:
both nodes must be healthy on consecutive ports with half the CPU memory budget each, `up` must say
it is up with no model loaded, and if `cortex up` is killed outright its neurons must not outlive it.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from tests.support.procs import free_port, spawn


def _state(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/admin/state", timeout=5) as resp:
        return json.loads(resp.read())


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/version", timeout=1):
            return True
    except OSError:
        return False


def test_fleet_of_two_on_one_machine(tmp_path: Path) -> None:
    config = tmp_path / "neuron.toml"
    config.write_text("default_models = []\n")
    gateway, metrics = free_port(), free_port()
    first = free_port()
    while not (first < 65535 and _port_free(first + 1)):
        first = free_port()
    log_path = tmp_path / "up.log"
    args = [sys.executable, "-m", "cortex.cli.cortex_cmd", "up", "--fleet", "2", "--neuron-config", str(config)]
    args += ["--listen", f"127.0.0.1:{gateway}", "--metrics-listen", f"127.0.0.1:{metrics}"]
    args += ["--neuron-listen", f"127.0.0.1:{first}"]
    proc = spawn(args, log_path)
    url = f"http://127.0.0.1:{gateway}"
    try:
        deadline = time.monotonic() + 240
        while "no model loaded yet" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.5)
        nodes = {n["name"]: n for n in _state(url)["nodes"]}
        assert set(nodes) == {"local-1", "local-2"}
        assert nodes["local-1"]["endpoint"].endswith(f":{first}") and nodes["local-2"]["endpoint"].endswith(
            f":{first + 1}"
        )
        assert all(n["healthy"] for n in nodes.values())
        budgets = [n["devices"][0]["vram_total_mb"] for n in nodes.values()]
        ram_mb = psutil.virtual_memory().total / 2**20
        assert budgets[0] == budgets[1] and budgets[0] <= ram_mb * 0.5 / 2 + 1  # the default 0.5 split in two
        assert "starting 2 neuron(s): local-1" in log_path.read_text()
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to clean up: the neurons must go by themselves
        proc.wait(10)
    deadline = time.monotonic() + 60
    while _answers(first) or _answers(first + 1):
        assert time.monotonic() < deadline, "a neuron outlived a killed `cortex up`"
        time.sleep(0.5)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
